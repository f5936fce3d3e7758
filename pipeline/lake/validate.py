"""Validation stage: run the ``events`` Great Expectations suite and quarantine bad rows.

The suite (``expectations/events.json``) is reviewed like code. This module runs it on the run's
event snapshot with an ephemeral GX context and then sorts the results into two kinds:

* table-level failures (a required column is missing, or an expectation could not run at all):
  the batch is unusable and :class:`EventValidationFailed` (a
  :class:`~pipeline.core.errors.ValidationFailed`) is raised;
* row-level failures (nulls, values outside a set or range, duplicate ``event_id`` beyond the
  first occurrence, timestamps after the run cutoff plus clock skew): those rows are written to
  a quarantine Parquet file with a ``reason`` column and dropped from the returned frame. The
  run fails only when their share exceeds ``max_bad_row_share``.

GX is asked for ``COMPLETE`` results keyed by a named positional index (``__row__``) with
``exclude_unexpected_values``: each row-level expectation then reports one list of row positions,
which maps back to the frame with numpy indexing (no per-row Python work on our side).

``great_expectations`` is imported lazily (importing it takes seconds); ``GX_ANALYTICS_ENABLED``
is set to ``false`` before that import.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.config import as_utc
from pipeline.core.errors import DataError, ValidationFailed
from pipeline.lake.event_ids import EventIdIndex, hash_event_ids
from pipeline.lake.jsonl import read_records

if TYPE_CHECKING:
    from great_expectations.core.expectation_suite import ExpectationSuite
    from great_expectations.core.expectation_validation_result import (
        ExpectationSuiteValidationResult,
        ExpectationValidationResult,
    )
    from great_expectations.data_context.data_context.ephemeral_data_context import (
        EphemeralDataContext,
    )

logger = logging.getLogger(__name__)

SUITE_NAME = "events"
#: The suite parameter holding the latest acceptable event timestamp (ISO-8601, UTC).
MAX_TIMESTAMP_PARAMETER = "max_event_timestamp"
#: Events may be this much later than the cutoff (producer clocks drift).
DEFAULT_CLOCK_SKEW = dt.timedelta(minutes=5)
#: Example rows kept per failing expectation (report and error message).
MAX_EXAMPLES = 5
#: Column holding the quarantine reasons.
REASON_COLUMN = "reason"
#: Lineage columns naming where a row came from.
LINEAGE_COLUMNS: tuple[str, str] = ("source_file", "source_row")

#: The file-backed GX project under the data dir, its Data Docs site and its validation log
#: (:mod:`pipeline.lake.gx_context`).
GX_PROJECT_DIR = "gx"
DATA_DOCS_DIR = "data_docs"
VALIDATION_LOG = "validation_log.jsonl"

_ROW_INDEX = "__row__"  # name of the positional index handed to GX
_TYPE_TYPES = frozenset(
    {"expect_column_values_to_be_of_type", "expect_column_values_to_be_in_type_list"}
)
_EVENT_TYPE_COLUMN = "event_type"
_IN_SET = "expect_column_values_to_be_in_set"
_UNIQUE = "expect_column_values_to_be_unique"
_DEFAULT_VOLUME_RULE: dict[str, Any] = {
    "check_days": 7,
    "trailing_days": 7,
    "min_ratio_to_trailing_median": 0.5,
}
# Expectations that flag every copy of a duplicated key: we quarantine the later copies only.
_KEEP_FIRST_TYPES = frozenset(
    {
        "expect_column_values_to_be_unique",
        "expect_compound_columns_to_be_unique",
    }
)
_RESULT_FORMAT: dict[str, Any] = {
    "result_format": "COMPLETE",
    "unexpected_index_column_names": [_ROW_INDEX],
    # Row positions only: no per-row value lists, no "df.filter(items=[...])" query string.
    "exclude_unexpected_values": True,
    "return_unexpected_index_query": False,
    "partial_unexpected_count": 0,
}


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExpectationFailure:
    """One failed expectation.

    Attributes:
        expectation: GX expectation type, e.g. ``expect_column_values_to_not_be_null``.
        column: The column (``", "``-joined for multi-column expectations), or None.
        level: ``"row"`` (rows quarantined), ``"table"`` (the batch failed as a whole) or
            ``"error"`` (the expectation could not run).
        unexpected_count: Rows this expectation sends to quarantine (for uniqueness: the copies
            after the first); None for table-level failures and errors.
        examples: Up to :data:`MAX_EXAMPLES` ``(source_file, source_row, value)`` tuples.
        detail: GX's exception message when the expectation could not run.
    """

    expectation: str
    column: str | None
    level: str
    unexpected_count: int | None = None
    examples: tuple[tuple[str | None, int | None, Any], ...] = ()
    detail: str | None = None

    @property
    def label(self) -> str:
        """``expectation(column)``: the text used in quarantine reasons and messages."""
        return f"{self.expectation}({self.column})" if self.column else self.expectation

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (examples as ``[source_file, source_row, value]`` lists)."""
        out: dict[str, Any] = {
            "expectation": self.expectation,
            "column": self.column,
            "level": self.level,
            "unexpected_count": self.unexpected_count,
            "examples": [list(example) for example in self.examples],
        }
        if self.detail:
            out["detail"] = self.detail
        return out


@dataclass(frozen=True)
class ValidationReport:
    """Outcome of :func:`validate_events`.

    Attributes:
        rows: Rows validated.
        bad_rows: Distinct rows quarantined (a row failing several expectations counts once).
        bad_share: ``bad_rows / rows`` (0.0 for an empty frame).
        passed: True when the batch is accepted: no table-level failure and ``bad_share`` within
            ``max_bad_row_share``. A passed batch may still have quarantined rows.
        failures: Failed expectations, in suite order.
        quarantine_path: The quarantine Parquet file, or None when no row was quarantined.
        data_docs_path: ``index.html`` of the Data Docs built for this validation, or None.
    """

    rows: int
    bad_rows: int
    bad_share: float
    passed: bool
    failures: tuple[ExpectationFailure, ...] = field(default_factory=tuple)
    quarantine_path: Path | None = None
    data_docs_path: Path | None = None
    volume_warnings: tuple[dict[str, Any], ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """Small JSON-serialisable summary (for XCom, logs and run metadata)."""
        return {
            "rows": self.rows,
            "bad_rows": self.bad_rows,
            "bad_share": self.bad_share,
            "passed": self.passed,
            "failures": [failure.to_dict() for failure in self.failures],
            "quarantine_path": str(self.quarantine_path) if self.quarantine_path else None,
            "data_docs_path": str(self.data_docs_path) if self.data_docs_path else None,
            "volume_warnings": [dict(warning) for warning in self.volume_warnings],
        }


class EventValidationFailed(ValidationFailed):
    """:class:`~pipeline.core.errors.ValidationFailed` carrying the :class:`ValidationReport`."""

    def __init__(self, message: str, report: ValidationReport) -> None:
        super().__init__(message)
        self.report = report


# ------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------
def load_suite_config(suite_path: Path) -> dict[str, Any]:
    """Read the suite JSON file (the dict ``gx.ExpectationSuite(**...)`` takes)."""
    with open(suite_path, encoding="utf-8") as fh:
        config: dict[str, Any] = json.load(fh)
    return config


def validate_events(
    events: pd.DataFrame,
    *,
    suite_path: Path,
    cutoff: dt.datetime,
    allowed_event_types: Collection[str],
    max_bad_row_share: float = 0.05,
    quarantine_path: Path,
    data_docs_dir: Path | None = None,
    clock_skew: dt.timedelta = DEFAULT_CLOCK_SKEW,
) -> tuple[pd.DataFrame, ValidationReport]:
    """Validate a normalised event frame; quarantine bad rows; return the clean rows.

    Args:
        events: Normalised events (``schema.LAKE_EVENT_DTYPES`` columns, the feedback ones
            optional, plus the lineage columns ``source_file`` and ``source_row``). Not
            modified.
        suite_path: The ``events`` suite JSON (``expectations/events.json``).
        cutoff: The run cutoff; naive datetimes are taken as UTC. Events later than
            ``cutoff + clock_skew`` are quarantined.
        allowed_event_types: Replaces the ``value_set`` of the suite's ``event_type`` in-set
            expectation for this run.
        max_bad_row_share: Largest acceptable share of quarantined rows (0..1).
        quarantine_path: Parquet file for the bad rows (with a ``reason`` column). Written
            atomically when there are bad rows, removed when there are none.
        data_docs_dir: When given, the validation is recorded, as one result, in the
            file-backed GX project that is this folder's parent (:mod:`.gx_context`): a page in
            this Data Docs site, which keeps every recorded validation, and a line in the
            validation log. Never fails the validation (a failure is logged as a warning).
        clock_skew: Tolerance added to ``cutoff``.

    Returns:
        ``(clean_events, report)``: the rows that passed every row-level expectation (index
        reset) and the :class:`ValidationReport`.

    Raises:
        EventValidationFailed: (a :class:`~pipeline.core.errors.ValidationFailed`) when a
            table-level expectation fails, an expectation cannot run, or the share of bad rows
            exceeds ``max_bad_row_share``. The quarantine file and Data Docs are written first.
        ValueError: Bad arguments or a suite file that does not load completely.
    """
    if not 0.0 <= max_bad_row_share <= 1.0:
        raise ValueError(f"max_bad_row_share must be within [0, 1], got {max_bad_row_share}")
    allowed = sorted({str(event_type) for event_type in allowed_event_types})
    if not allowed:
        raise ValueError("allowed_event_types is empty")
    max_timestamp = as_utc(cutoff) + clock_skew
    rows = len(events)

    runner = _SuiteRunner(Path(suite_path), allowed)
    tally = _validate_tally(cutoff) if data_docs_dir is not None else None
    failures, row_failures = runner.run(events, max_timestamp, _run_name(cutoff), tally)
    bad_positions, reasons = _combine_row_failures(row_failures, rows)
    bad_rows = int(bad_positions.size)
    bad_share = bad_rows / rows if rows else 0.0

    written = _write_quarantine(events, bad_positions, reasons, Path(quarantine_path))
    docs_index = None
    if tally is not None and data_docs_dir is not None:
        tally.add_failures(failures, bad_rows)
        docs_index = _Recorder(Path(data_docs_dir), runner).record(tally)

    fatal = [failure for failure in failures if failure.level != "row"]
    passed = not fatal and bad_share <= max_bad_row_share
    daily = (
        events["timestamp"].dt.floor("D").value_counts()
        if "timestamp" in events and isinstance(events["timestamp"].dtype, pd.DatetimeTZDtype)
        else pd.Series(dtype="int64")
    )
    report = ValidationReport(
        rows=rows,
        bad_rows=bad_rows,
        bad_share=bad_share,
        passed=passed,
        failures=tuple(failures),
        quarantine_path=written,
        data_docs_path=docs_index,
        volume_warnings=tuple(check_daily_volume(daily, as_utc(cutoff), runner.volume_rule)),
    )
    _log_failures(report)
    if not passed:
        message = _failure_message(report, max_bad_row_share, max_timestamp)
        logger.error("%s", message)
        raise EventValidationFailed(message, report)

    keep = np.ones(rows, dtype=bool)
    keep[bad_positions] = False
    clean = events[keep].reset_index(drop=True)
    logger.info(
        "Validated %d events: %d quarantined (%.2f%%), %d clean; quarantine=%s docs=%s",
        rows,
        bad_rows,
        100.0 * bad_share,
        len(clean),
        written,
        docs_index,
    )
    return clean, report


def validate_events_file(
    raw_path: Path,
    *,
    clean_path: Path,
    suite_path: Path,
    cutoff: dt.datetime,
    allowed_event_types: Collection[str],
    max_bad_row_share: float = 0.05,
    quarantine_path: Path,
    data_docs_dir: Path | None = None,
    clock_skew: dt.timedelta = DEFAULT_CLOCK_SKEW,
    chunk_rows: int = 250_000,
    validated_sources: Collection[str] = (),
) -> ValidationReport:
    """:func:`validate_events` streamed over a Parquet snapshot, ``chunk_rows`` rows at a time.

    Memory is bounded by a chunk. Each chunk runs through the suite; ``event_id`` uniqueness is
    also enforced across chunks (later copies are quarantined with the uniqueness reason). Clean
    rows go to ``clean_path`` (replaced atomically, only when the batch passes), bad rows to
    ``quarantine_path``; the daily volume is checked against the suite's ``meta.volume`` rule
    (warnings only). Raises :class:`EventValidationFailed` like :func:`validate_events`.
    With ``data_docs_dir``, the chunks' results are recorded as one result (one Data Docs
    page, one validation log line), as :func:`validate_events` does.

    Rows whose ``source_file`` is in ``validated_sources`` passed this suite, with these event
    types, when they were ingested (:class:`LandingValidator`), and the lake holds each event
    id once: they are not checked again. When every row is such a row, the snapshot becomes
    the clean file as it is (a hard link: nothing is rewritten), so a night's validation
    costs what its new data costs, not what the lake holds.
    """
    if not 0.0 <= max_bad_row_share <= 1.0:
        raise ValueError(f"max_bad_row_share must be within [0, 1], got {max_bad_row_share}")
    allowed = sorted({str(event_type) for event_type in allowed_event_types})
    if not allowed:
        raise ValueError("allowed_event_types is empty")
    max_timestamp = as_utc(cutoff) + clock_skew
    validated = frozenset(validated_sources)
    if validated and _all_validated(raw_path, validated):
        return _prevalidated(raw_path, clean_path, quarantine_path, cutoff, suite_path)
    runner = _SuiteRunner(Path(suite_path), allowed)
    tally = _validate_tally(cutoff) if data_docs_dir is not None else None
    parquet = pq.ParquetFile(raw_path)
    schema = parquet.schema_arrow
    seen = EventIdIndex()
    merged: dict[tuple[str, str | None, str], ExpectationFailure] = {}
    daily: pd.Series = pd.Series(dtype="int64")
    rows = bad_rows = 0
    quarantine_writer: pq.ParquetWriter | None = None
    quarantine_tmp = _tmp_path(Path(quarantine_path))
    clean_tmp = _tmp_path(Path(clean_path))
    started = time.perf_counter()
    try:
        with pq.ParquetWriter(clean_tmp, schema) as clean_writer:
            for number, chunk in enumerate(_iter_frames(parquet, chunk_rows)):
                check = (
                    ~chunk["source_file"].isin(list(validated)).to_numpy()
                    if validated and "source_file" in chunk
                    else np.ones(len(chunk), dtype=bool)
                )
                positions = np.flatnonzero(check)
                failures, row_failures = (
                    runner.run(
                        chunk.iloc[positions].reset_index(drop=True),
                        max_timestamp,
                        f"{_run_name(cutoff)}-part{number:04d}",
                        tally,
                    )
                    if (positions.size or number == 0)
                    else ([], [])
                )
                row_failures = [(label, positions[at]) for label, at in row_failures]
                if "event_id" in chunk:
                    h1, h2 = hash_event_ids(pa.array(chunk["event_id"].iloc[positions].array))
                    again = positions[np.flatnonzero(seen.contains(h1, h2))]
                    seen.add(h1, h2)
                    if again.size:
                        failure = ExpectationFailure(
                            _UNIQUE,
                            "event_id",
                            "row",
                            int(again.size),
                            _examples(chunk, again, ["event_id"]),
                        )
                        failures.append(failure)
                        row_failures.append((failure.label, again))
                _merge_failures(merged, failures)
                bad, reasons = _combine_row_failures(row_failures, len(chunk))
                if bad.size:
                    quarantined = chunk.iloc[bad].reset_index(drop=True)
                    quarantined[REASON_COLUMN] = pd.array(reasons, dtype="string")
                    table = pa.Table.from_pandas(quarantined, preserve_index=False)
                    if quarantine_writer is None:
                        quarantine_writer = pq.ParquetWriter(quarantine_tmp, table.schema)
                    quarantine_writer.write_table(table)
                keep = np.ones(len(chunk), dtype=bool)
                keep[bad] = False
                clean_writer.write_table(
                    pa.Table.from_pandas(chunk[keep], schema=schema, preserve_index=False)
                )
                if (
                    len(chunk)
                    and "timestamp" in chunk
                    and isinstance(chunk["timestamp"].dtype, pd.DatetimeTZDtype)
                ):
                    days = chunk["timestamp"].dt.floor("D").value_counts()
                    daily = daily.add(days, fill_value=0) if len(daily) else days
                rows += len(chunk)
                bad_rows += int(bad.size)
                logger.info(
                    "validated %d rows so far, %d quarantined (%.1fs)",
                    rows,
                    bad_rows,
                    time.perf_counter() - started,
                )
        if quarantine_writer is not None:
            quarantine_writer.close()
            os.replace(quarantine_tmp, quarantine_path)
            written: Path | None = Path(quarantine_path)
        else:
            Path(quarantine_path).unlink(missing_ok=True)
            written = None
    except BaseException:
        if quarantine_writer is not None:
            quarantine_writer.close()
        quarantine_tmp.unlink(missing_ok=True)
        clean_tmp.unlink(missing_ok=True)
        raise
    docs_index = None
    if tally is not None and data_docs_dir is not None:  # one result for the whole snapshot
        tally.add_failures(list(merged.values()), bad_rows)
        docs_index = _Recorder(Path(data_docs_dir), runner).record(tally)
    failures = sorted(
        merged.values(),
        key=lambda f: runner.order.get((f.expectation, f.column), len(runner.order)),
    )
    volume = check_daily_volume(daily, as_utc(cutoff), runner.volume_rule)
    bad_share = bad_rows / rows if rows else 0.0
    passed = not [f for f in failures if f.level != "row"] and bad_share <= max_bad_row_share
    report = ValidationReport(
        rows=rows,
        bad_rows=bad_rows,
        bad_share=bad_share,
        passed=passed,
        failures=tuple(failures),
        quarantine_path=written,
        data_docs_path=docs_index,
        volume_warnings=tuple(volume),
    )
    _log_failures(report)
    _warn_volume(volume, runner.volume_rule)
    if not passed:
        clean_tmp.unlink(missing_ok=True)
        message = _failure_message(report, max_bad_row_share, max_timestamp)
        logger.error("%s", message)
        raise EventValidationFailed(message, report)
    os.replace(clean_tmp, clean_path)
    logger.info(
        "Validated %d events: %d quarantined (%.2f%%); clean -> %s; quarantine=%s; data docs: %s",
        rows,
        bad_rows,
        100.0 * bad_share,
        clean_path,
        written,
        docs_index,
    )
    return report


def _all_validated(raw_path: Path, validated: frozenset[str]) -> bool:
    """Whether every row of the snapshot came from a file validated at ingest."""
    table = pq.read_table(raw_path, columns=["source_file"])
    sources = pc.unique(table.column("source_file")).to_pylist()
    return all(source in validated for source in sources)


def _prevalidated(
    raw_path: Path, clean_path: Path, quarantine_path: Path, cutoff: dt.datetime, suite_path: Path
) -> ValidationReport:
    """The report of a snapshot validated row by row at ingest: the snapshot is the clean
    file (hard-linked), only the daily volume is checked."""
    stamps = pq.read_table(raw_path, columns=["timestamp"]).column("timestamp").to_pandas()
    daily = stamps.dt.floor("D").value_counts()
    rule = _volume_rule(Path(suite_path))
    volume = check_daily_volume(daily, as_utc(cutoff), rule)
    _warn_volume(volume, rule)
    tmp = _tmp_path(Path(clean_path))
    tmp.unlink(missing_ok=True)
    try:
        os.link(raw_path, tmp)
    except OSError:  # no hard links here (another file system): copy
        shutil.copyfile(raw_path, tmp)
    os.replace(tmp, clean_path)
    Path(quarantine_path).unlink(missing_ok=True)
    logger.info(
        "Validated %d events at ingest (suite digest matches): nothing to re-check; clean -> %s",
        len(stamps),
        clean_path,
    )
    return ValidationReport(
        rows=len(stamps), bad_rows=0, bad_share=0.0, passed=True, volume_warnings=tuple(volume)
    )


def _volume_rule(suite_path: Path) -> dict[str, Any]:
    """The suite's ``meta.volume`` rule over the defaults."""
    config = load_suite_config(suite_path)
    return {**_DEFAULT_VOLUME_RULE, **config.get("meta", {}).get("volume", {})}


def _warn_volume(volume: list[dict[str, Any]], rule: Mapping[str, Any]) -> None:
    for warning in volume:
        logger.warning(
            "volume: %s has %d events, under %.0f%% of the trailing median %.0f",
            warning["date"],
            warning["rows"],
            100 * rule["min_ratio_to_trailing_median"],
            warning["trailing_median"],
        )


def suite_digest(suite_path: Path, allowed_event_types: Collection[str]) -> str:
    """What a validation means: a hash of the suite file and the allowed event types. Rows
    validated at ingest under the same digest need no second validation in a run."""
    digest = hashlib.sha256(Path(suite_path).read_bytes())
    digest.update("\x1f".join(sorted({str(t) for t in allowed_event_types})).encode())
    return digest.hexdigest()[:16]


class LandingValidator:
    """The events suite, loaded once per ingest, run on each normalised chunk of a landing file
    before its rows enter the lake: rows that fail go to the file's quarantine with their
    reason (so a corrected re-send of them is not deduplicated away later), and a
    table-level failure (a column missing or of the wrong type) rejects the file.

    Duplicate event ids are not this check's business: the lake's commit deduplicates them.

    With ``data_docs_dir``, each file's validation is recorded once, however many chunks it
    had (:meth:`finish`; also done when the chunks of another file begin, and by
    :meth:`close`): one Data Docs page and one validation log line per landing file.
    """

    def __init__(
        self,
        suite_path: Path,
        allowed_event_types: Collection[str],
        data_docs_dir: Path | None = None,
    ) -> None:
        allowed = sorted({str(event_type) for event_type in allowed_event_types})
        if not allowed:
            raise ValueError("allowed_event_types is empty")
        self.digest = suite_digest(suite_path, allowed)
        self._runner = _SuiteRunner(Path(suite_path), allowed)
        self._recorder = _Recorder(Path(data_docs_dir), self._runner) if data_docs_dir else None
        self._pending: dict[str, _Tally] = {}

    def finish(self, source: str) -> Path | None:
        """Record the validation of the file ``source`` (every chunk :meth:`split` saw) as one
        result; the Data Docs index, or None (no recording, nothing validated, or recording
        failed: logged, never raised)."""
        tally = self._pending.pop(source, None)
        if tally is None or self._recorder is None:
            return None
        return self._recorder.record(tally)

    def close(self) -> None:
        """Record every file not finished yet."""
        for source in list(self._pending):
            self.finish(source)

    def _tally(self, source: str) -> _Tally | None:
        if self._recorder is None:
            return None
        if source not in self._pending:
            self.close()  # another file's chunks begin: the files before are done
            self._pending[source] = _Tally("ingest", source)
        return self._pending[source]

    def split(
        self, events: pd.DataFrame, *, latest_valid: dt.datetime, source: str
    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        """``(clean, rejected)``: ``rejected`` holds the failing rows with a ``reason``.

        Raises :class:`~pipeline.core.errors.DataError` on a table-level failure, naming the
        file and the column (the file stays out of the lake and is retried)."""
        if events.empty:
            return events, events.assign(**{REASON_COLUMN: pd.Series(dtype="string")})
        tally = self._tally(source)
        failures, row_failures = self._runner.run(events, latest_valid, f"ingest-{source}", tally)
        fatal = [f for f in failures if f.level != "row"]
        if fatal:
            if tally is not None:  # the file is rejected here: its validation ends
                tally.add_failures(failures, 0)
                self.finish(source)
            report = ValidationReport(
                rows=len(events), bad_rows=0, bad_share=0.0, passed=False, failures=tuple(failures)
            )
            raise DataError(
                _failure_message(report, 0.0, latest_valid), file=source, column=fatal[0].column
            )
        row_level = [f for f in failures if f.level == "row"]
        kept = [
            pair
            for pair, failure in zip(row_failures, row_level, strict=True)
            if failure.expectation not in _KEEP_FIRST_TYPES
        ]
        bad, reasons = _combine_row_failures(kept, len(events))
        keep = np.ones(len(events), dtype=bool)
        keep[bad] = False
        rejected = events.iloc[bad].reset_index(drop=True)
        rejected[REASON_COLUMN] = pd.array(reasons, dtype="string")
        if tally is not None:
            tally.add_failures(failures, int(bad.size))
        return events[keep].reset_index(drop=True), rejected


# ------------------------------------------------------------------------------------------
# Validation history: one result per landing file or run, in the file-backed GX project
# ------------------------------------------------------------------------------------------
def data_docs_dir(data_dir: Path) -> Path:
    """The shared Data Docs site, ``<data_dir>/gx/data_docs``; its GX project is the parent
    folder (:mod:`pipeline.lake.gx_context`)."""
    return Path(data_dir) / GX_PROJECT_DIR / DATA_DOCS_DIR


def read_validation_log(data_dir: Path) -> list[dict]:
    """The validation log (one JSON record per recorded validation, oldest first; empty when
    nothing was recorded): what :class:`~pipeline.lake.gx_context.ValidationLogAction` wrote."""
    return read_records(Path(data_dir) / GX_PROJECT_DIR / VALIDATION_LOG, "validation log")


class _Tally:
    """One file's (``kind="ingest"``) or run's (``"validate"``) validation over its chunks:
    GX's per-expectation results summed, and the failures the pipeline acted on."""

    def __init__(self, kind: str, source: str, name: str | None = None) -> None:
        self.kind = kind
        self.source = source
        self.name = name or source  # in the run name, ``<kind>-<name>``
        self.started = dt.datetime.now(dt.timezone.utc)  # the result's run time (wall clock)
        self.template: Any = None  # the first chunk's GX result: suite name, batch meta
        self.stats: dict[str, dict[str, Any]] = {}  # expectation id -> sums, in suite order
        self.rows = 0
        self.rows_rejected = 0
        self.failures: dict[tuple[str, str | None, str], ExpectationFailure] = {}

    def add_result(self, result: ExpectationSuiteValidationResult, rows: int) -> None:
        if self.template is None:
            self.template = result
        self.rows += rows
        for position, expectation in enumerate(result.results):
            config = expectation.expectation_config
            entry = self.stats.setdefault(
                str(config.id or position),
                {"config": config, "elements": 0, "missing": 0, "observed": None, "map": False},
            )
            detail = expectation.result or {}
            if "element_count" in detail:
                entry["map"] = True
                entry["elements"] += int(detail.get("element_count") or 0)
                entry["missing"] += int(detail.get("missing_count") or 0)
            elif config.type in _TYPE_TYPES and entry["observed"] is None:
                # a dtype name; other observed values (a column's min, ...) could quote data
                entry["observed"] = _jsonable(detail.get("observed_value"))

    def add_failures(self, failures: list[ExpectationFailure], rejected: int) -> None:
        _merge_failures(self.failures, failures)
        self.rows_rejected += rejected

    def outcomes(self) -> list[dict[str, Any]]:
        """Per expectation: its config, counts, and success as the pipeline judged it
        (uniqueness counts the copies after the first; errors carry their message)."""
        by_label: dict[tuple[str, str | None], ExpectationFailure] = {}
        for failure in self.failures.values():
            by_label.setdefault((failure.expectation, failure.column), failure)
        out = []
        for entry in self.stats.values():
            config = entry["config"]
            column = ", ".join(_domain_columns(config.kwargs)) or None
            failure = by_label.get((config.type, column))
            out.append(
                {
                    "config": config,
                    "success": failure is None,
                    "element_count": entry["elements"],
                    "missing_count": entry["missing"],
                    "unexpected_count": (
                        (failure.unexpected_count if failure else 0) if entry["map"] else None
                    ),
                    "observed_value": entry["observed"],
                    "exception_message": failure.detail if failure else None,
                    "column_map": entry["map"],
                }
            )
        return out


def _validate_tally(cutoff: dt.datetime) -> _Tally:
    return _Tally("validate", as_utc(cutoff).isoformat(), _run_name(cutoff))


class _Recorder:
    """Records tallies in the GX project whose Data Docs site is ``docs_dir``."""

    def __init__(self, docs_dir: Path, runner: _SuiteRunner) -> None:
        self.docs_dir = Path(docs_dir)
        self.runner = runner
        self._project: Any = None

    def record(self, tally: _Tally) -> Path | None:
        """One result for the tally: its Data Docs page, the site index and a validation log
        line. Returns the index; never raises (docs are a convenience: logged as a warning)."""
        if tally.template is None or not (tally.rows or tally.failures):
            return None
        started = time.perf_counter()
        try:
            from pipeline.lake import gx_context  # lazy: it imports great_expectations

            if self._project is None:
                self._project = gx_context.ValidationProject(
                    self.docs_dir.parent, self.docs_dir.name, VALIDATION_LOG
                )
            gx = _import_gx()
            run_id = gx.RunIdentifier(
                run_name=gx_context.run_name(tally.kind, tally.name), run_time=tally.started
            )
            result = gx_context.merged_result(
                tally.template,
                [gx_context.ExpectationTally(**outcome) for outcome in tally.outcomes()],
                run_id=run_id,
                meta={
                    "kind": tally.kind,
                    "source": tally.source,
                    "rows": tally.rows,
                    "rows_rejected": tally.rows_rejected,
                },
            )
            suite = _load_suite(self.runner.suite_path, self.runner.allowed)
            index: Path | None = self._project.record(suite, [result])
        except Exception:  # noqa: BLE001 - docs must not fail the pipeline
            logger.warning(
                "Recording the validation of %s in %s failed: Data Docs and the validation "
                "log miss it",
                tally.source,
                self.docs_dir,
                exc_info=True,
            )
            return None
        logger.info(
            "validation of %s recorded (%d rows, %d rejected) in %.2fs; data docs: %s",
            tally.source,
            tally.rows,
            tally.rows_rejected,
            time.perf_counter() - started,
            index,
        )
        return index


def check_daily_volume(
    daily: pd.Series, cutoff: dt.datetime, rule: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """Days (among the last ``check_days`` before ``cutoff``) under ``min_ratio`` x the median
    of their ``trailing_days`` predecessors; missing days count as 0, and a day needs at least
    3 trailing days inside the data to be judged."""
    if daily.empty:
        return []
    first = pd.Timestamp(daily.index.min())
    last_day = pd.Timestamp(cutoff).floor("D") - pd.Timedelta(days=1)
    if last_day < first:
        return []
    counts = daily.reindex(pd.date_range(first, last_day, freq="D", tz="UTC"), fill_value=0)
    trailing = int(rule["trailing_days"])
    median = counts.shift(1).rolling(trailing, min_periods=3).median()
    ratio = float(rule["min_ratio_to_trailing_median"])
    recent = counts.index > last_day - pd.Timedelta(days=int(rule["check_days"]))
    flagged = recent & (counts < ratio * median).to_numpy()
    return [
        {
            "date": day.date().isoformat(),
            "rows": int(counts[day]),
            "trailing_median": float(median[day]),
        }
        for day in counts.index[flagged]
    ]


def _iter_frames(parquet: pq.ParquetFile, chunk_rows: int) -> Any:
    """Frames of at most ``chunk_rows`` rows (one empty frame for an empty file)."""
    empty = True
    for batch in parquet.iter_batches(batch_size=chunk_rows):
        empty = False
        yield pa.Table.from_batches([batch]).to_pandas()
    if empty:
        yield parquet.schema_arrow.empty_table().to_pandas()


def _merge_failures(
    merged: dict[tuple[str, str | None, str], ExpectationFailure],
    failures: list[ExpectationFailure],
) -> None:
    """Add one chunk's failures: counts add up, examples keep the first MAX_EXAMPLES."""
    for failure in failures:
        key = (failure.expectation, failure.column, failure.level)
        before = merged.get(key)
        if before is None:
            merged[key] = failure
            continue
        count = None
        if failure.unexpected_count is not None or before.unexpected_count is not None:
            count = (before.unexpected_count or 0) + (failure.unexpected_count or 0)
        merged[key] = ExpectationFailure(
            before.expectation,
            before.column,
            before.level,
            count,
            (before.examples + failure.examples)[:MAX_EXAMPLES],
            before.detail,
        )


def _log_failures(report: ValidationReport) -> None:
    for failure in report.failures:
        if failure.level == "row":
            logger.warning(
                "%s: %d rows quarantined, e.g. %s",
                failure.label,
                failure.unexpected_count,
                _format_examples(failure),
            )
        else:
            logger.warning(
                "%s failed (%s)%s",
                failure.label,
                failure.level,
                f": {failure.detail}" if failure.detail else "",
            )


def _tmp_path(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


class _SuiteRunner:
    """The suite loaded once into one ephemeral context; runs it on one frame at a time."""

    def __init__(self, suite_path: Path, allowed: list[str]) -> None:
        gx = _import_gx()
        self.suite_path = suite_path
        self.allowed = allowed
        self.volume_rule = _volume_rule(suite_path)
        suite = _load_suite(suite_path, allowed)
        self.context = _ephemeral_context()
        self.suite = self.context.suites.add(suite)
        self.checked = _suite_columns(self.suite)
        self.order = {
            (e.expectation_type, ", ".join(_domain_columns(e.configuration.kwargs)) or None): i
            for i, e in enumerate(self.suite.expectations)
        }
        datasource = self.context.data_sources.add_pandas(name="events")
        asset = datasource.add_dataframe_asset(name="events")
        batch_definition = asset.add_batch_definition_whole_dataframe("snapshot")
        self.definition = self.context.validation_definitions.add(
            gx.ValidationDefinition(name="events", data=batch_definition, suite=self.suite)
        )

    def run(
        self,
        events: pd.DataFrame,
        max_timestamp: dt.datetime,
        run_name: str,
        tally: _Tally | None = None,
    ) -> tuple[list[ExpectationFailure], list[tuple[str, np.ndarray]]]:
        """Failures (suite order) and ``(reason, row positions)`` for one frame; GX's result
        is added to ``tally`` (the file's or run's record) when given."""
        gx = _import_gx()
        frame = events.copy(deep=False)  # shares data (copy-on-write); only the index changes
        frame.index = pd.RangeIndex(len(events), name=_ROW_INDEX)
        # GX fingerprints (hashes) the whole batch: hand it only the columns the suite checks.
        checked = self.checked
        batch = frame if checked is None else frame[[c for c in frame.columns if c in checked]]
        result = self.definition.run(
            batch_parameters={"dataframe": batch},
            expectation_parameters={MAX_TIMESTAMP_PARAMETER: max_timestamp.isoformat()},
            result_format=_RESULT_FORMAT,
            run_id=gx.RunIdentifier(run_name=run_name, run_time=dt.datetime.now(dt.timezone.utc)),
        )
        if tally is not None:
            tally.add_result(result, len(events))
        return _collect_failures(result, self.suite, frame)


# ------------------------------------------------------------------------------------------
# Great Expectations plumbing
# ------------------------------------------------------------------------------------------
def _import_gx() -> Any:
    """Import great_expectations with analytics disabled (the import takes a few seconds)."""
    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    import great_expectations as gx

    return gx


def _load_suite(suite_path: Path, allowed_event_types: list[str]) -> ExpectationSuite:
    """Load the suite JSON and set the run's allowed event types.

    GX drops an expectation it cannot parse with only a log line, so a suite that loads fewer
    expectations than the file lists is rejected here.
    """
    gx = _import_gx()
    config = load_suite_config(suite_path)
    suite: ExpectationSuite = gx.ExpectationSuite(**config)
    listed = len(config.get("expectations", []))
    if len(suite.expectations) != listed:
        raise ValueError(
            f"{suite_path}: only {len(suite.expectations)} of {listed} expectations "
            "are valid for this Great Expectations version (see the GX log above)"
        )
    unknown = set(suite.suite_parameter_options) - {MAX_TIMESTAMP_PARAMETER}
    if unknown:
        raise ValueError(
            f"{suite_path}: suite parameters {sorted(unknown)} are not supplied by "
            f"pipeline.lake.validate (only {MAX_TIMESTAMP_PARAMETER!r} is)"
        )
    overridden = 0
    for expectation in suite.expectations:
        if (
            expectation.expectation_type == _IN_SET
            and getattr(expectation, "column", None) == _EVENT_TYPE_COLUMN
        ):
            expectation.value_set = list(allowed_event_types)
            overridden += 1
    if not overridden:
        raise ValueError(
            f"{suite_path}: no {_IN_SET} expectation on {_EVENT_TYPE_COLUMN!r} "
            "to apply allowed_event_types to"
        )
    return suite


def _suite_columns(suite: ExpectationSuite) -> set[str] | None:
    """Every column some expectation of the suite is about; None if one looks at the whole table
    (e.g. ``expect_table_columns_to_match_set``), which then must see every column."""
    columns: set[str] = set()
    for expectation in suite.expectations:
        domain = _domain_columns(expectation.configuration.kwargs)
        if not domain:
            return None
        columns.update(domain)
    return columns


def _ephemeral_context() -> EphemeralDataContext:
    """An in-memory GX context for the row-level work: no docs site, no progress bars."""
    gx = _import_gx()
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites={},
        progress_bars=ProgressBarsConfig(globally=False),
    )
    context: EphemeralDataContext = gx.get_context(mode="ephemeral", project_config=config)
    return context


def _run_name(cutoff: dt.datetime) -> str:
    return "cutoff-" + as_utc(cutoff).strftime("%Y-%m-%dT%H%M%SZ")


# ------------------------------------------------------------------------------------------
# Result interpretation
# ------------------------------------------------------------------------------------------
def _exception_message(exception_info: Mapping[str, Any] | None) -> str | None:
    """The message of an expectation that raised, or None.

    GX reports either ``{"raised_exception": bool, ...}`` or, when a metric failed,
    ``{"<metric id>": {"raised_exception": "True", "exception_message": ...}}``.
    """
    if not exception_info:
        return None
    infos = [exception_info] if "raised_exception" in exception_info else exception_info.values()
    for info in infos:
        if isinstance(info, Mapping) and str(info.get("raised_exception")).lower() == "true":
            return str(info.get("exception_message") or "unknown error")
    return None


def _domain_columns(kwargs: Mapping[str, Any]) -> list[str]:
    """The column(s) an expectation is about: ``column``, ``column_list`` or A/B pairs."""
    if kwargs.get("column") is not None:
        return [str(kwargs["column"])]
    if kwargs.get("column_list") is not None:
        return [str(column) for column in kwargs["column_list"]]
    return [str(kwargs[key]) for key in ("column_A", "column_B") if kwargs.get(key) is not None]


def _unexpected_positions(result: Mapping[str, Any]) -> np.ndarray:
    """Row positions from ``unexpected_index_list`` (sorted, int64).

    With a named index and ``exclude_unexpected_values`` GX returns ``[{"__row__": [...]}]``;
    a plain list of positions is accepted too.
    """
    entries = result.get("unexpected_index_list") or []
    if not entries:
        return np.empty(0, dtype=np.int64)
    if isinstance(entries[0], Mapping):
        chunks = [np.atleast_1d(np.asarray(entry[_ROW_INDEX], dtype=np.int64)) for entry in entries]
        positions = np.concatenate(chunks)
    else:
        positions = np.asarray(entries, dtype=np.int64)
    return np.unique(positions)


def _keep_first(frame: pd.DataFrame, positions: np.ndarray, columns: list[str]) -> np.ndarray:
    """Drop the first occurrence of each duplicated key from ``positions``.

    GX flags every copy of a duplicated key, so all copies are in ``positions`` (sorted), and
    the first copy among them is the first in the frame.
    """
    if positions.size == 0 or not columns or not set(columns) <= set(frame.columns):
        return positions
    later = frame[columns].iloc[positions].duplicated(keep="first").to_numpy()
    return positions[later]


def _jsonable(value: Any) -> Any:
    """A JSON-friendly scalar for reports and messages."""
    if value is None or (not isinstance(value, (list, tuple, dict)) and pd.isna(value)):
        return None
    if isinstance(value, (pd.Timestamp, dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _examples(
    frame: pd.DataFrame, positions: np.ndarray, columns: list[str]
) -> tuple[tuple[str | None, int | None, Any], ...]:
    """Up to MAX_EXAMPLES ``(source_file, source_row, value)`` tuples for ``positions``."""
    head = frame.iloc[positions[:MAX_EXAMPLES]]
    present = [column for column in columns if column in frame.columns]
    out = []
    for i in range(len(head)):  # at most MAX_EXAMPLES rows
        row = head.iloc[i]
        source_file = _jsonable(row[LINEAGE_COLUMNS[0]]) if LINEAGE_COLUMNS[0] in head else None
        source_row = _jsonable(row[LINEAGE_COLUMNS[1]]) if LINEAGE_COLUMNS[1] in head else None
        if len(present) == 1:
            value = _jsonable(row[present[0]])
        else:
            value = {column: _jsonable(row[column]) for column in present} or None
        out.append((source_file, source_row, value))
    return tuple(out)


def _collect_failures(
    result: ExpectationSuiteValidationResult,
    suite: ExpectationSuite,
    frame: pd.DataFrame,
) -> tuple[list[ExpectationFailure], list[tuple[str, np.ndarray]]]:
    """Turn GX results into failure summaries (suite order) and ``(reason, positions)`` pairs."""
    order = {expectation.id: i for i, expectation in enumerate(suite.expectations)}
    ordered: list[ExpectationValidationResult] = sorted(
        result.results, key=lambda r: order.get(r.expectation_config.id, len(order))
    )
    failures: list[ExpectationFailure] = []
    row_failures: list[tuple[str, np.ndarray]] = []
    for expectation_result in ordered:
        config = expectation_result.expectation_config
        columns = _domain_columns(config.kwargs)
        column = ", ".join(columns) or None
        error = _exception_message(expectation_result.exception_info)
        if error is not None:
            failures.append(ExpectationFailure(config.type, column, "error", detail=error))
            continue
        if expectation_result.success:
            continue
        details = expectation_result.result or {}
        if "unexpected_index_list" not in details:
            failures.append(ExpectationFailure(config.type, column, "table"))
            continue
        positions = _unexpected_positions(details)
        if config.type in _KEEP_FIRST_TYPES:
            positions = _keep_first(frame, positions, columns)
        if positions.size == 0:  # e.g. only first copies were flagged
            continue
        failure = ExpectationFailure(
            expectation=config.type,
            column=column,
            level="row",
            unexpected_count=int(positions.size),
            examples=_examples(frame, positions, columns),
        )
        failures.append(failure)
        row_failures.append((failure.label, positions))
    return failures, row_failures


def _combine_row_failures(
    row_failures: Sequence[tuple[str, np.ndarray]], rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct bad row positions (sorted) and their ``"; "``-joined reasons (same order).

    Loops over expectations, not rows: each step is a vectorised object-array concatenation.
    """
    if not row_failures:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=object)
    bad = np.unique(np.concatenate([positions for _, positions in row_failures]))
    if bad.size and (bad[0] < 0 or bad[-1] >= rows):
        raise RuntimeError("GX returned row positions outside the frame")
    reasons = np.full(bad.size, "", dtype=object)
    for label, positions in row_failures:
        slots = np.searchsorted(bad, positions)
        current = reasons[slots]
        reasons[slots] = np.where(current == "", label, current + ("; " + label))
    return bad, reasons


# ------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------
def _write_quarantine(
    events: pd.DataFrame, positions: np.ndarray, reasons: np.ndarray, path: Path
) -> Path | None:
    """Write the bad rows (+ ``reason``) atomically; remove a stale file when there are none."""
    if positions.size == 0:
        if path.exists():
            path.unlink()
            logger.info("Removed stale quarantine file %s", path)
        return None
    quarantined = events.iloc[positions].reset_index(drop=True)
    quarantined[REASON_COLUMN] = pd.array(reasons, dtype="string")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        quarantined.to_parquet(tmp_name, index=False)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    logger.info("Quarantined %d rows to %s", len(quarantined), path)
    return path


def _format_examples(failure: ExpectationFailure) -> str:
    parts = []
    for source_file, source_row, value in failure.examples:
        parts.append(
            f"{source_file or '<unknown file>'} row {source_row} ({failure.column}={value!r})"
        )
    return ", ".join(parts) or "-"


def _failure_message(
    report: ValidationReport, max_bad_row_share: float, max_timestamp: dt.datetime
) -> str:
    """An operator-facing message: what failed, where, how much, and example rows."""
    lines = [
        f"events validation failed: {report.bad_rows} of {report.rows} rows "
        f"({report.bad_share:.2%}) failed row-level expectations "
        f"(max_bad_row_share {max_bad_row_share:.2%}; max timestamp {max_timestamp.isoformat()})"
    ]
    for failure in report.failures:
        if failure.level == "table":
            lines.append(
                f"- table-level expectation {failure.expectation} failed "
                f"for column {failure.column!r}"
            )
        elif failure.level == "error":
            lines.append(
                f"- expectation {failure.expectation} on column {failure.column!r} "
                f"could not run: {failure.detail}"
            )
        else:
            share = (failure.unexpected_count or 0) / report.rows if report.rows else 0.0
            lines.append(
                f"- expectation {failure.expectation} on column {failure.column!r}: "
                f"{failure.unexpected_count} rows ({share:.2%}), e.g. "
                f"{_format_examples(failure)}"
            )
    if report.quarantine_path:
        lines.append(f"bad rows written to {report.quarantine_path}")
    if report.data_docs_path:
        lines.append(f"data docs: {report.data_docs_path}")
    return "\n".join(lines)
