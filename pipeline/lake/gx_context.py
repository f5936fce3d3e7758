"""The file-backed Great Expectations project under the data dir: validation history.

:mod:`pipeline.lake.validate` finds bad rows with an in-memory (ephemeral) GX context, one chunk
at a time. What a validation *was* (one landing file at ingest, or one run's ``validate``) is
recorded here, once, in a file-backed GX project (``<data_dir>/gx/``):

* ``great_expectations.yml`` with one Data Docs site, ``data_docs/``, and the stores;
* the ``events`` suite (refreshed from ``expectations/events.json`` on every record, with the
  run's allowed event types: the repo file stays the reviewed source of truth), a pandas data
  source ``events`` with a dataframe asset, a ValidationDefinition and a Checkpoint ``events``
  whose actions are :class:`~great_expectations.checkpoint.UpdateDataDocsAction` (the page of
  the new result plus the site index: history across runs) and :class:`ValidationLogAction`
  (one compact JSON line per result in ``validation_log.jsonl``, read by the monitor);
* ``uncommitted/validations/``: the stored results, compact (counts, no unexpected values, no
  row positions: no user id reaches the project or its Data Docs).

The result handed to the Checkpoint's actions is one merged
:class:`ExpectationSuiteValidationResult` per file or run (:func:`merged_result`), not one per
chunk: the rows were validated already, so the Checkpoint does not validate again; its actions
run on that result (``Checkpoint._run_actions``, the step ``Checkpoint.run`` ends with).

Every record holds an exclusive lock (``<project>/.lock``, ``flock``): Airflow runs tasks in
separate processes, and an ingest and a ``validate`` of another day may record at once; the
project is created under the same lock on first use. Results older than
:data:`KEEP_DAYS` (by validation time, relative to the newest result) are deleted when a new
one is recorded, and all but the newest :data:`KEEP_RESULTS`: the index lists every result
kept (its build reads each one, so its cost is bounded, not growing with history).

Importing this module imports ``great_expectations`` (seconds): import it lazily.
"""

from __future__ import annotations

import os

os.environ["GX_ANALYTICS_ENABLED"] = "false"

import datetime as dt  # noqa: E402 - after the analytics switch
import fcntl  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
from collections.abc import Iterator, Mapping, Sequence  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Literal  # noqa: E402

import great_expectations as gx  # noqa: E402
from great_expectations.checkpoint import UpdateDataDocsAction  # noqa: E402
from great_expectations.checkpoint.actions import ActionContext, ValidationAction  # noqa: E402
from great_expectations.checkpoint.checkpoint import Checkpoint, CheckpointResult  # noqa: E402
from great_expectations.core.expectation_suite import ExpectationSuite  # noqa: E402
from great_expectations.core.expectation_validation_result import (  # noqa: E402
    ExpectationSuiteValidationResult,
    ExpectationValidationResult,
)
from great_expectations.core.run_identifier import RunIdentifier  # noqa: E402
from great_expectations.data_context.types.resource_identifiers import (  # noqa: E402
    ExpectationSuiteIdentifier,
    ValidationResultIdentifier,
)

from pipeline.lake.storage import durable_write  # noqa: E402

logger = logging.getLogger(__name__)

#: The one Data Docs site of the project.
SITE_NAME = "events_validation"
#: Name of the suite, the data source, its asset, the ValidationDefinition and the Checkpoint.
NAME = "events"
#: Results validated more than this many days before the newest are deleted...
KEEP_DAYS = 30
#: ... and so are all but the newest KEEP_RESULTS: the index lists every result kept, and its
#: build reads each (~3 ms a result), so a record's cost stops growing with history.
KEEP_RESULTS = 200
#: Meta key of a result holding what the pipeline knows about it (kind, source, rows).
META_KEY = "recs"

_UNSAFE = re.compile(r"[^A-Za-z0-9._=-]+")


# ------------------------------------------------------------------------------------------
# The action that feeds the monitor
# ------------------------------------------------------------------------------------------
class ValidationLogAction(ValidationAction):
    """Append one compact JSON line per validation result to the project's validation log.

    A GX custom action: GX registers a ValidationAction subclass under its ``type`` default
    (here ``recs_validation_log``) when the class is defined, so a stored Checkpoint naming it
    loads in any process that imported this module. ``log_name`` is relative to the project
    folder (the project can move).
    """

    type: Literal["recs_validation_log"] = "recs_validation_log"
    log_name: str

    def run(
        self, checkpoint_result: CheckpointResult, action_context: ActionContext | None = None
    ) -> dict:
        context: Any = self._resolve_context().context
        root = Path(context.root_directory)
        docs = self._get_data_docs_pages_from_prior_action(action_context) or {}
        records = [
            compact_record(key, result, docs.get(key, {}).get(SITE_NAME))
            for key, result in checkpoint_result.run_results.items()
        ]
        path = root / self.log_name
        append_records(path, records)
        return {"log": str(path), "records": len(records)}


def compact_record(
    key: ValidationResultIdentifier, result: ExpectationSuiteValidationResult, page: str | None
) -> dict[str, Any]:
    """The log line of one result: run, source, rows, success and per-expectation counts."""
    recs: Any = result.meta.get(META_KEY)
    meta = dict(recs or {})
    unexpected: dict[str, int] = {}
    failed: list[str] = []
    for expectation in result.results:
        label = expectation_label(expectation.expectation_config)
        count = (expectation.result or {}).get("unexpected_count")
        if count is not None:
            unexpected[label] = int(count)
        if not expectation.success:
            failed.append(label)
    stats = result.statistics or {}
    return {
        "run_name": key.run_id.run_name,
        "run_time": _iso(key.run_id.run_time),
        "recorded_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "kind": meta.get("kind"),
        "source": meta.get("source"),
        "rows": meta.get("rows"),
        "rows_rejected": meta.get("rows_rejected"),
        "success": bool(result.success),
        "evaluated_expectations": stats.get("evaluated_expectations"),
        "unsuccessful_expectations": stats.get("unsuccessful_expectations"),
        "failed": failed,
        "unexpected": unexpected,
        "page": page,
    }


def append_records(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    """Append lines to a JSON-lines log (rewritten to a temp file, fsynced and renamed, as
    :func:`pipeline.lake.jsonl.append_record`; callers hold the project lock)."""
    if not records:
        return
    existing = path.read_bytes() if path.exists() else b""
    lines = b"".join(
        (json.dumps(dict(record), sort_keys=True, default=str) + "\n").encode()
        for record in records
    )
    durable_write(path, lambda fh: fh.write(existing + lines))


def expectation_label(config: Any) -> str:
    """``expectation(column)``, as in quarantine reasons."""
    kwargs = config.kwargs
    columns = (
        [str(kwargs["column"])]
        if kwargs.get("column") is not None
        else [str(c) for c in kwargs.get("column_list") or []]
    )
    return f"{config.type}({', '.join(columns)})" if columns else str(config.type)


# ------------------------------------------------------------------------------------------
# One merged result per file or run
# ------------------------------------------------------------------------------------------
@dataclass
class ExpectationTally:
    """One expectation over all the chunks of a file or run."""

    config: Any  # ExpectationConfiguration
    success: bool = True
    element_count: int = 0
    missing_count: int = 0
    unexpected_count: int | None = None
    observed_value: Any = None
    exception_message: str | None = None
    column_map: bool = False  # GX reported element counts (a row-level expectation)


def merged_result(
    template: ExpectationSuiteValidationResult,
    tallies: Sequence[ExpectationTally],
    *,
    run_id: RunIdentifier,
    meta: Mapping[str, Any],
) -> ExpectationSuiteValidationResult:
    """One compact result from a chunk result (``template``, for its suite and batch meta) and
    the tallies: counts and percentages only, never unexpected values or row positions."""
    results = []
    for tally in tallies:
        detail: dict[str, Any] = {}
        if tally.column_map:
            elements = tally.element_count
            unexpected = tally.unexpected_count or 0
            nonmissing = elements - tally.missing_count
            detail = {
                "element_count": elements,
                "missing_count": tally.missing_count,
                "missing_percent": _percent(tally.missing_count, elements),
                "unexpected_count": unexpected,
                "unexpected_percent": _percent(unexpected, nonmissing),
                "unexpected_percent_total": _percent(unexpected, elements),
                "unexpected_percent_nonmissing": _percent(unexpected, nonmissing),
                "partial_unexpected_list": [],
            }
        elif tally.observed_value is not None:
            detail = {"observed_value": tally.observed_value}
        exception_info = {
            "raised_exception": tally.exception_message is not None,
            "exception_message": tally.exception_message,
            "exception_traceback": None,
        }
        results.append(
            ExpectationValidationResult(
                success=tally.success,
                expectation_config=tally.config,
                result=detail,
                exception_info=exception_info,
            )
        )
    evaluated = len(results)
    successful = sum(1 for r in results if r.success)
    base_meta: dict[str, Any] = {
        k: v
        for k, v in (template.meta or {}).items()
        if k in {"great_expectations_version", "active_batch_definition", "batch_markers"}
    }
    result_meta: Any = {
        **base_meta,
        "run_id": run_id,
        "validation_time": run_id.run_time,
        "batch_parameters": {"dataframe": "<DATAFRAME>"},
        # what the page and the index show as the data asset: which file or run this was
        "batch_kwargs": {"data_asset_name": f"{NAME} ({meta.get('kind')}: {meta.get('source')})"},
        META_KEY: dict(meta),
    }
    return ExpectationSuiteValidationResult(
        success=successful == evaluated,
        results=results,
        suite_name=template.suite_name,
        statistics={
            "evaluated_expectations": evaluated,
            "successful_expectations": successful,
            "unsuccessful_expectations": evaluated - successful,
            "success_percent": _percent(successful, evaluated) if evaluated else None,
        },
        meta=result_meta,
        batch_id=template.batch_id,
    )


def run_name(kind: str, source: str) -> str:
    """A file-system-safe run name: ``ingest-<file>`` or ``validate-<cutoff>``."""
    return f"{kind}-{_UNSAFE.sub('_', source)}"[:200]


# ------------------------------------------------------------------------------------------
# The project
# ------------------------------------------------------------------------------------------
class ValidationProject:
    """The file-backed GX project at ``root`` (``<data_dir>/gx``), its Data Docs site in
    ``root / docs_name``, its validation log ``root / log_name`` (the names are
    :mod:`pipeline.lake.validate`'s, which reads the log without importing GX)."""

    def __init__(self, root: Path, docs_name: str, log_name: str) -> None:
        self.root = Path(root).resolve()
        self.docs_name = docs_name
        self.log_name = log_name
        # opened on the first record and kept (its stores read the files, so results other
        # processes record are seen); the Checkpoint is set up again when the suite changes
        self._context: Any = None
        self._checkpoint: Checkpoint | None = None
        self._suite_json: dict | None = None

    @property
    def docs_index(self) -> Path:
        return self.root / self.docs_name / "index.html"

    @property
    def log_path(self) -> Path:
        return self.root / self.log_name

    def record(
        self, suite: ExpectationSuite, results: Sequence[ExpectationSuiteValidationResult]
    ) -> Path | None:
        """Store ``results`` (one per file or run) and run the Checkpoint's actions on them:
        their Data Docs pages, the site index and the validation log. Returns the index."""
        if not results:
            return None
        with self._locked():
            if self._context is None:
                self._context = self._open()
            context = self._context
            suite_json = suite.to_json_dict()
            if self._checkpoint is None or suite_json != self._suite_json:
                self._checkpoint = self._set_up(context, suite)
                self._suite_json = suite_json
            checkpoint = self._checkpoint
            run_results: dict[ValidationResultIdentifier, ExpectationSuiteValidationResult] = {}
            suite_key = ExpectationSuiteIdentifier(name=suite.name)
            for result in results:
                result.meta["checkpoint_id"] = checkpoint.id
                key = ValidationResultIdentifier(
                    expectation_suite_identifier=suite_key,
                    run_id=result.meta["run_id"],
                    batch_identifier=result.batch_id,
                )
                context.validation_results_store.store_validation_results(
                    suite_validation_result=result,
                    suite_validation_result_identifier=key,
                    expectation_suite_identifier=suite_key,
                )
                run_results[key] = result
            self._prune(context, max(key.run_id.run_time for key in run_results))
            first = next(iter(run_results))
            # What Checkpoint.run does after validating (ours are validated already).
            checkpoint._run_actions(
                checkpoint_result=CheckpointResult(
                    run_id=first.run_id, run_results=run_results, checkpoint_config=checkpoint
                )
            )
        return self.docs_index if self.docs_index.exists() else None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _open(self) -> Any:
        """The FileDataContext (scaffolded on first use), with our one Data Docs site."""
        context: Any = gx.get_context(mode="file", context_root_dir=str(self.root))
        site = {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": f"{self.docs_name}/",
            },
            "site_index_builder": {
                "class_name": "DefaultSiteIndexBuilder",
                "validation_results_limit": KEEP_RESULTS,
            },
        }
        sites = context.list_data_docs_sites()
        if sites.get(SITE_NAME) != site or set(sites) != {SITE_NAME}:
            for name in list(sites):
                if name != SITE_NAME:
                    context.delete_data_docs_site(name)
            if SITE_NAME in context.list_data_docs_sites():
                context.update_data_docs_site(SITE_NAME, site)
            else:
                context.add_data_docs_site(SITE_NAME, site)
        return context

    def _set_up(self, context: Any, suite: ExpectationSuite) -> Checkpoint:
        """Suite (refreshed), data source, asset, batch definition, ValidationDefinition and
        Checkpoint, each created or updated in the project."""
        stored = context.suites.add_or_update(suite)
        try:
            datasource = context.data_sources.get(NAME)
        except (KeyError, ValueError, LookupError):
            datasource = context.data_sources.add_pandas(name=NAME)
        try:
            asset = datasource.get_asset(NAME)
        except LookupError:
            asset = datasource.add_dataframe_asset(name=NAME)
        try:
            batch_definition = asset.get_batch_definition(NAME)
        except (KeyError, LookupError):
            batch_definition = asset.add_batch_definition_whole_dataframe(NAME)
        definition = context.validation_definitions.add_or_update(
            gx.ValidationDefinition(name=NAME, data=batch_definition, suite=stored)
        )
        checkpoint: Checkpoint = context.checkpoints.add_or_update(
            gx.Checkpoint(
                name=NAME,
                validation_definitions=[definition],
                actions=[
                    UpdateDataDocsAction(name="update_data_docs", site_names=[SITE_NAME]),
                    ValidationLogAction(name="validation_log", log_name=self.log_name),
                ],
            )
        )
        return checkpoint

    def _prune(self, context: Any, newest: dt.datetime) -> None:
        """Keep the newest KEEP_RESULTS results validated at most KEEP_DAYS before ``newest``;
        delete the others (their pages go with the index build, which drops pages whose
        result is gone)."""
        horizon = _utc(newest) - dt.timedelta(days=KEEP_DAYS)
        store = context.validation_results_store
        keys = sorted(store.list_keys(), key=lambda k: _utc(k.run_id.run_time), reverse=True)
        for rank, key in enumerate(keys):
            if rank >= KEEP_RESULTS or _utc(key.run_id.run_time) < horizon:
                store.remove_key(key)


def _percent(part: int, whole: int) -> float | None:
    return 100.0 * part / whole if whole else None


def _utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value


def _iso(value: Any) -> str:
    return value.isoformat() if hasattr(value, "isoformat") else str(value)
