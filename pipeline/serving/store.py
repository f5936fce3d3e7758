"""Serving database: versioned list tables behind one view that is swapped atomically.

The CMS reads the view ``recommendations`` (see ARCHITECTURE.md, "Serving DB"):
``SELECT item_id, reason FROM recommendations WHERE user_id = $1 ORDER BY rank``, falling back to
the rows of ``user_id = '__default__'``. Every publish loads a new table, checks it, and only then
points the view at it, so a reader sees the whole old list set or the whole new one.

Experiments
-----------
While an A/B experiment runs (:func:`active_experiment`), a publish's rows carry ``variant`` and
``experiment`` (the view's last two columns; NULL outside an experiment) and their own
``model_version``; each recommending variant has its fallback list ``__default__:<variant>``
beside ``__default__`` (users outside the experiment). The assignments of the published users
(``user_id, experiment, variant``, holdout users included: they have no rows) go into a
sibling table of the version, loaded in the same transaction and exposed by the view
``recommendation_assignments``, swapped with ``recommendations`` in the same transaction.
:func:`read_user_list` is the CMS rule: the user's own list, else the fallback of the user's
variant (none for a holdout: no rows), else ``__default__``.

Backends
--------
``dsn=None`` selects the embedded SQLite file (``Settings.serving_sqlite_path``,
:mod:`pipeline.serving.sqlite`); otherwise ``dsn`` is a ``postgresql://`` (or ``postgres://``)
URI or a libpq ``key=value`` string (:mod:`pipeline.serving.postgres`, schema ``recs`` unless
``schema`` or ``RECS_SERVING_SCHEMA`` say otherwise). Each public function picks the backend once
(:func:`backend_for`) and talks to it through
:class:`~pipeline.serving.contract.ServingBackend`; the list contract and its checks live in
:mod:`pipeline.serving.contract`. Passwords never appear in error messages or logs.

Both hold per publish a table ``recommendations_v<N>`` (N only grows, never reused), the catalog
``recommendation_versions`` (status ``loading|live|retired|failed``, one live row), the audit
table ``model_promotions`` (:func:`record_promotion`) and the view; beside them the
``monitoring`` table (:func:`record_monitoring`) and the ``experiments`` audit trail of A/B
experiments (:func:`record_experiment`, :func:`read_experiments`, :func:`active_experiment`;
one row per start, change or stop, unique per (name, version); the configs and their rules are
in :mod:`pipeline.serving.experiments`).

Publish
-------
1. Take the publish lock (one publisher at a time), run the idempotent migrations, mark versions
   a crashed publisher left ``loading`` as ``failed``; with ``allow_older`` False, refuse lists
   older than the live ones (:class:`OlderThanLive`) under that lock.
2. Insert the catalog row (status ``loading``) and commit: this reserves N.
3. In one transaction, create and load the table, run the contract checks (``__default__``
   present, ranks 1..N contiguous and items unique per user id) and index it, then create, load
   and index its assignments table (one row per user); a failure rolls both back.
4. Swap, in a short transaction: point both views at the new tables; catalog: new ``live``, old
   ``retired``. An attempt blocked by readers past ``lock_timeout_ms`` rolls back and is retried
   with exponential backoff, ``swap_attempts`` times in all (then :class:`SwapLockTimeout`).
5. Drop the tables of all but the newest ``keep_versions`` live/retired versions (and of failed
   ones); a failed drop is logged and retried by the next publish.

A failure before the swap commits leaves the old version live, drops the new tables, marks the
catalog row ``failed`` (best effort) and raises a
:class:`~pipeline.core.errors.ServingError`; a retry publishes normally.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import psycopg2
from psycopg2.extensions import parse_dsn

from pipeline.core.config import DEFAULT_USER, as_utc
from pipeline.core.errors import ConfigError, ServingError
from pipeline.serving.contract import (
    ASSIGNMENT_COLUMNS,
    ASSIGNMENTS_VIEW,
    DEFAULT_SCHEMA,
    ISO_UTC,
    LIST_COLUMNS,
    PROMOTION_LOCK_WAIT_S,
    READER_ROLE,
    SWAP_ATTEMPTS,
    VIEW_COLUMNS,
    VIEW_NAME,
    ListValidationError,
    NothingPublishedError,
    OlderThanLive,
    PublishResult,
    SchemaOutdated,
    ServingBackend,
    ServingConnectionError,
    SwapLockTimeout,
    backoff_delay,
    frame_from_rows,
    frame_generated_at,
    json_safe,
    phases,
    prepare_assignments,
    prepare_lists,
    refuse_older,
    resolve_schema,
    versions_to_drop,
)
from pipeline.serving.experiments import ACTIONS as EXPERIMENT_ACTIONS
from pipeline.serving.experiments import (
    AnotherExperimentRunning,
    ChangeRefused,
    Experiment,
    ExperimentError,
    check_change,
)
from pipeline.serving.postgres import PostgresBackend, describe_dsn, normalize_dsn, scrub
from pipeline.serving.sqlite import SqliteBackend

logger = logging.getLogger(__name__)

__all__ = [
    "ASSIGNMENT_COLUMNS",
    "ASSIGNMENTS_VIEW",
    "DEFAULT_SCHEMA",
    "LIST_COLUMNS",
    "ListValidationError",
    "NothingPublishedError",
    "OlderThanLive",
    "PublishResult",
    "READER_ROLE",
    "ServingBackend",
    "ServingConnectionError",
    "SwapLockTimeout",
    "VIEW_COLUMNS",
    "VIEW_NAME",
    "active_experiment",
    "backend_for",
    "ensure_schema",
    "live_version",
    "promotion_lock",
    "publish_lists",
    "read_all",
    "read_assignments",
    "read_experiments",
    "read_user_list",
    "read_monitoring",
    "record_experiment",
    "record_monitoring",
    "record_promotion",
]


def backend_for(dsn: str | None, sqlite_path: Path, schema: str | None = None) -> ServingBackend:
    """The backend of ``dsn``: the SQLite file at ``sqlite_path`` when ``dsn`` is None, else
    PostgreSQL in ``schema`` (default ``RECS_SERVING_SCHEMA`` or ``recs``)."""
    if dsn is None:
        return SqliteBackend(Path(sqlite_path))
    return PostgresBackend(dsn, resolve_schema(schema))


def check_config(dsn: str | None, schema: str | None = None) -> str:
    """ConfigError unless ``dsn`` (None: the SQLite file) and the serving schema are usable:
    the DSN parses and names PostgreSQL, the schema name is a plain identifier. Nothing is
    connected to. Returns a description of the target (never the password)."""
    if dsn is None:
        return "the embedded SQLite file"
    try:
        name = resolve_schema(schema)
        fields = parse_dsn(normalize_dsn(dsn))
    except (ServingError, psycopg2.Error) as exc:
        raise ConfigError(f"serving configuration: {scrub(str(exc), dsn)}") from exc
    ports = [p for p in str(fields.get("port") or "").split(",") if p]  # libpq: a list
    if not all(p.isdigit() and 0 < int(p) < 65536 for p in ports):
        raise ConfigError(
            f"serving configuration: invalid port {fields['port']!r} in {describe_dsn(dsn)}"
        )
    return f"{describe_dsn(dsn)} schema {name}"


# =================================================================================================
# Public API
# =================================================================================================


def publish_lists(
    lists: pd.DataFrame,
    *,
    dsn: str | None,
    sqlite_path: Path,
    model_version: str,
    logical_date: datetime,
    keep_versions: int = 3,
    lock_timeout_ms: int = 2000,
    swap_attempts: int = SWAP_ATTEMPTS,
    schema: str | None = None,
    allow_older: bool = True,
    assignments: pd.DataFrame | None = None,
) -> PublishResult:
    """Publish ``lists`` as a new version and make it live atomically.

    ``lists`` has the columns :data:`LIST_COLUMNS` (``generated_at`` timezone-aware) and optionally
    ``model_version`` per row (missing or null: ``model_version``), ``variant`` and ``experiment``
    (null outside an experiment; see :func:`~pipeline.serving.contract.prepare_lists`).
    ``assignments`` (optional, :data:`ASSIGNMENT_COLUMNS`: one row per user a running experiment put
    in a variant) goes live with the lists, in the view ``recommendation_assignments``. ``dsn`` None
    publishes to the SQLite file at ``sqlite_path``. Keeps the newest ``keep_versions`` version
    tables, the live one included (older ones are dropped after the swap). ``lock_timeout_ms``
    bounds each swap attempt and so how long CMS readers can queue behind it; ``schema`` (Postgres
    only) defaults to ``RECS_SERVING_SCHEMA`` or ``recs``. Raises :class:`ListValidationError` for
    lists that break the contract, :class:`SwapLockTimeout` when readers block the swap
    ``swap_attempts`` times, :class:`ServingConnectionError` when the database is unreachable; in
    every case the previously live version stays live. With ``allow_older`` False, raises
    :class:`OlderThanLive` (before loading anything) when the live version's ``logical_date`` is
    newer than ``logical_date``: checked under the publish lock, so two runs that race cannot put
    older lists over newer ones.
    """
    if keep_versions < 1:
        raise ValueError(f"keep_versions must be >= 1, got {keep_versions}")
    if lock_timeout_ms < 1:
        raise ValueError(f"lock_timeout_ms must be >= 1, got {lock_timeout_ms}")
    if swap_attempts < 1:
        raise ValueError(f"swap_attempts must be >= 1, got {swap_attempts}")
    started = time.perf_counter()
    frame = prepare_lists(lists, model_version)
    assigned = prepare_assignments(assignments)
    logger.debug("phase prepare %.1fs", time.perf_counter() - started)
    backend = backend_for(dsn, sqlite_path, schema)
    try:
        return _publish(
            backend,
            frame,
            assigned,
            model_version=model_version,
            logical_date=as_utc(logical_date),
            keep_versions=keep_versions,
            lock_timeout_ms=lock_timeout_ms,
            swap_attempts=swap_attempts,
            allow_older=allow_older,
        )
    except backend.driver_error as exc:
        raise ServingError(
            f"publish to {backend.target} failed: {backend.redact(str(exc).strip())}; "
            "the previously live version is unchanged"
        ) from None


def ensure_schema(*, dsn: str | None, sqlite_path: Path, schema: str | None = None) -> None:
    """Create the serving schema objects if missing (idempotent; safe before every publish)."""
    backend_for(dsn, sqlite_path, schema).ensure_schema()


@contextlib.contextmanager
def promotion_lock(
    *,
    dsn: str | None,
    sqlite_path: Path,
    schema: str | None = None,
    wait_s: float = PROMOTION_LOCK_WAIT_S,
) -> Iterator[None]:
    """Held while a run decides whether its model becomes champion and moves the alias: two
    runs (a backfill beside the nightly run, say) never decide at once, so each sees the
    other's champion. A PostgreSQL session advisory lock (another key than the publish lock,
    which it never blocks), or a ``flock`` beside the SQLite file. Raises
    :class:`ServingError` after ``wait_s`` seconds of waiting."""
    with backend_for(dsn, sqlite_path, schema).promotion_lock(wait_s):
        yield


def read_user_list(
    user_id: str,
    *,
    dsn: str | None,
    sqlite_path: Path,
    schema: str | None = None,
) -> pd.DataFrame:
    """The CMS lookup: the live list of ``user_id`` ordered by rank, or its fallback list.

    Returns all view columns (:data:`VIEW_COLUMNS`). A user without a personal list gets the
    fallback of the variant a running experiment assigned them (``user_id`` then is
    ``__default__:<variant>``; a holdout variant has none, so no rows), else ``__default__``.
    Raises :class:`NothingPublishedError` before the first publish.
    """
    params = {"user_id": str(user_id), "default_user": DEFAULT_USER}
    return frame_from_rows(
        _read_view(backend_for(dsn, sqlite_path, schema), "read_user_list.sql", params)
    )


def read_all(*, dsn: str | None, sqlite_path: Path, schema: str | None = None) -> pd.DataFrame:
    """The whole live view ordered by ``user_id``, ``rank`` (one consistent snapshot)."""
    return frame_from_rows(_read_view(backend_for(dsn, sqlite_path, schema), "read_all.sql", {}))


def read_assignments(
    *, dsn: str | None, sqlite_path: Path, user_id: str | None = None, schema: str | None = None
) -> pd.DataFrame:
    """The live version's experiment assignments (:data:`ASSIGNMENT_COLUMNS`, by user), of
    every user or of ``user_id``; empty when no experiment ran at the live publish. Raises
    :class:`NothingPublishedError` before the first publish."""
    rows = _read_view(
        backend_for(dsn, sqlite_path, schema),
        "read_assignments.sql",
        {"user_id": None if user_id is None else str(user_id)},
    )
    return pd.DataFrame.from_records(rows, columns=list(ASSIGNMENT_COLUMNS)).astype(object)


def _read_view(
    backend: ServingBackend, query: str, params: Mapping[str, Any]
) -> list[tuple[Any, ...]]:
    """``backend.read_rows``; when the views predate this code (a live version published
    before experiments, not migrated yet), migrate (:func:`ensure_schema`, which waits for a
    running publish) and read again."""
    try:
        return backend.read_rows(query, params)
    except (NothingPublishedError, SchemaOutdated):
        try:
            published = bool(backend.read_rows("live_version.sql", {}))
        except NothingPublishedError:
            published = False
        if not published:
            raise
    logger.info("the serving views predate %s: migrating them", ASSIGNMENTS_VIEW)
    backend.ensure_schema()
    return backend.read_rows(query, params)


def live_version(
    *,
    dsn: str | None,
    sqlite_path: Path,
    schema: str | None = None,
) -> dict[str, Any] | None:
    """The catalog row of the live version, or None when nothing is published yet."""
    keys = (
        "version",
        "table_name",
        "rows",
        "users",
        "model_version",
        "logical_date",
        "created_at",
        "status",
        "published_at",
    )
    try:
        rows = backend_for(dsn, sqlite_path, schema).read_rows("live_version.sql", {})
    except NothingPublishedError:
        return None
    if not rows:
        return None
    record = dict(zip(keys, rows[0], strict=True))
    for key in ("logical_date", "created_at", "published_at"):
        if record[key] is not None:
            record[key] = as_utc(record[key])
    for key in ("version", "rows", "users"):
        record[key] = int(record[key])
    return record


def recorded_decision(
    *,
    dsn: str | None,
    sqlite_path: Path,
    model_name: str,
    model_version: str,
    schema: str | None = None,
) -> str | None:
    """The newest decision ``model_promotions`` holds on ``model_version``, or None."""
    try:
        rows = backend_for(dsn, sqlite_path, schema).read_rows(
            "promotion_recorded.sql",
            {"model_name": model_name, "model_version": str(model_version)},
        )
    except NothingPublishedError:
        return None
    return str(rows[0][1]) if rows else None


def record_promotion(
    *,
    dsn: str | None,
    sqlite_path: Path,
    model_name: str,
    model_version: str,
    decision: str,
    reason: str | None,
    metrics: Mapping[str, Any] | None = None,
    triggered_by: str | None = None,
    decided_at: datetime | None = None,
    schema: str | None = None,
) -> int:
    """Append one promotion-gate decision to ``model_promotions``; returns its id.

    ``metrics`` is stored as JSON (non-finite floats become null). ``decided_at`` None uses the
    database clock (an audit timestamp, not pipeline logic). Creates the schema if needed.
    """
    if not decision:
        raise ValueError("decision must be a non-empty string")
    params = {
        "decided_at": as_utc(decided_at) if decided_at is not None else None,
        "model_name": model_name,
        "model_version": str(model_version),
        "decision": decision,
        "reason": reason,
        "metrics": json.dumps(json_safe(dict(metrics or {})), sort_keys=True, allow_nan=False),
        "triggered_by": triggered_by,
    }
    promotion_id = backend_for(dsn, sqlite_path, schema).insert_promotion(params)
    logger.info(
        "recorded promotion decision %s for %s %s (id %s)",
        decision,
        model_name,
        model_version,
        promotion_id,
    )
    return promotion_id


MONITORING_COLUMNS = (
    "run_date",
    "source",
    "metric",
    "subject",
    "value",
    "status",
    "window_start",
    "window_end",
    "reference",
    "model_version",
)


def record_monitoring(
    rows: pd.DataFrame,
    *,
    run_date: datetime,
    source: str,
    dsn: str | None,
    sqlite_path: Path,
    schema: str | None = None,
) -> int:
    """Replace the ``monitoring`` rows of one run (``run_date``, ``source``) with ``rows``
    (columns: metric, subject, value, status, and optionally window_start, window_end,
    reference, model_version) in one transaction: a re-run of a date leaves one set of rows.
    Non-finite values are stored as NULL. Returns the number of rows written."""
    run_date = as_utc(run_date)
    records = []
    for row in rows.to_dict("records"):
        value = row.get("value")
        value = None if value is None or pd.isna(value) else float(value)
        records.append(
            {
                "run_date": run_date,
                "source": source,
                "metric": str(row["metric"]),
                "subject": str(row.get("subject") or ""),
                "value": value,
                "status": str(row.get("status") or "unknown"),
                "window_start": _optional_utc(row.get("window_start")),
                "window_end": _optional_utc(row.get("window_end")),
                "reference": row.get("reference"),
                "model_version": row.get("model_version"),
            }
        )
    backend_for(dsn, sqlite_path, schema).replace_rows(
        "monitoring", {"run_date": run_date, "source": source}, records
    )
    logger.info("monitoring: %d rows for %s (%s)", len(records), run_date.isoformat(), source)
    return len(records)


def read_monitoring(
    *,
    dsn: str | None,
    sqlite_path: Path,
    schema: str | None = None,
    since: datetime | None = None,
    source: str | None = None,
) -> pd.DataFrame:
    """The monitoring rows (oldest run first), optionally from ``since`` on and of one
    ``source``; an empty frame when nothing was recorded yet."""
    backend = backend_for(dsn, sqlite_path, schema)
    since_param: Any = None if since is None else as_utc(since)
    if isinstance(backend, SqliteBackend) and since_param is not None:
        since_param = since_param.strftime(ISO_UTC)
    try:
        rows = backend.read_rows("read_monitoring.sql", {"since": since_param, "source": source})
    except (NothingPublishedError, ServingError) as exc:
        if isinstance(exc, NothingPublishedError) or "no such table" in str(exc):
            return pd.DataFrame(columns=list(MONITORING_COLUMNS))
        raise
    frame = pd.DataFrame(rows, columns=list(MONITORING_COLUMNS))
    for column in ("run_date", "window_start", "window_end"):
        frame[column] = pd.to_datetime(frame[column], utc=True, format="ISO8601")
    frame["value"] = pd.to_numeric(frame["value"], errors="coerce").astype("float64")
    return frame


EXPERIMENT_COLUMNS = (
    "id",
    "name",
    "version",
    "action",
    "status",
    "forced",
    "config",
    "changed_by",
    "reason",
    "changed_at",
)


def record_experiment(
    experiment: Experiment | Mapping[str, Any],
    action: str,
    changed_by: str,
    reason: str | None,
    dsn: str | None,
    sqlite_path: Path,
    schema: str | None = None,
    *,
    changed_at: datetime | None = None,
) -> int:
    """Append one row to ``experiments``: ``action`` (``start`` | ``change`` | ``stop``) of
    ``experiment`` (an :class:`~pipeline.serving.experiments.Experiment` or its config dict)
    by ``changed_by`` (who: "manual by alice", "cli", ...) for ``reason``. Returns its id.

    Idempotent per (name, version): recording a version that is already recorded with the same
    action and config (a retried task) returns the existing id and adds nothing; the same
    version with another action or config is refused. Checked in the same transaction, which
    excludes other writers:

    * ``start``: the config is running and started (has buckets); its name and salt were never
      recorded; no other experiment is running (:class:`AnotherExperimentRunning`, at most one
      runs at a time);
    * ``change``: running, and a legal next version of the newest recorded one
      (:func:`~pipeline.serving.experiments.check_change`: nobody changes group, except users
      of buckets a forced shrink released, who go to the default);
    * ``stop``: status ``stopped``, the newest recorded version running, nothing else changed.

    ``changed_at`` None uses the database clock (an audit timestamp). Creates the schema if
    needed. Raises :class:`~pipeline.serving.experiments.ExperimentError` (or a subclass) when
    refused, :class:`ServingError` when the database fails.
    """
    new = experiment if isinstance(experiment, Experiment) else Experiment.from_dict(experiment)
    if action not in EXPERIMENT_ACTIONS:
        raise ExperimentError(
            f"action must be one of {', '.join(EXPERIMENT_ACTIONS)}, got {action!r}"
        )
    if not isinstance(changed_by, str) or not changed_by.strip():
        raise ExperimentError(
            "changed_by must say who made the change (e.g. 'manual by alice', 'cli')"
        )
    if not new.allocated:
        raise ExperimentError(
            f"experiment {new.name!r} has no buckets: record it after "
            "Experiment.start() so that the record says who is where"
        )
    expected_status = "stopped" if action == "stop" else "running"
    if new.status != expected_status:
        raise ExperimentError(
            f"a {action!r} record needs status {expected_status!r}; "
            f"version {new.version} of {new.name!r} is {new.status!r}"
        )
    config = new.to_dict()
    params = {
        "name": new.name,
        "version": new.version,
        "action": action,
        "config": json.dumps(config, sort_keys=True, allow_nan=False),
        "changed_by": changed_by,
        "reason": reason,
        "changed_at": as_utc(changed_at) if changed_at is not None else None,
    }

    def decide(existing: tuple[Any, ...] | None, latest: list[tuple[Any, ...]]) -> bool:
        if existing is not None:
            if existing[3] == action and _json_value(existing[4]) == config:
                return False
            raise ExperimentError(
                f"version {new.version} of experiment {new.name!r} is already recorded "
                f"({existing[3]} by {existing[5]} at {_when(existing[7])}) with another "
                f"{'config' if existing[3] == action else 'action'}: a change needs a new "
                "version"
            )
        _check_experiment_record(new, action, latest)
        return True

    backend = backend_for(dsn, sqlite_path, schema)
    record_id, inserted = backend.record_experiment(params, decide)
    if inserted:
        logger.info(
            "experiment %s version %d: %s by %s (id %d)%s",
            new.name,
            new.version,
            action,
            changed_by,
            record_id,
            f": {new.last_change['summary']}" if new.last_change else "",
        )
    else:
        logger.info(
            "experiment %s version %d: %s was already recorded (id %d)",
            new.name,
            new.version,
            action,
            record_id,
        )
    return record_id


def _check_experiment_record(new: Experiment, action: str, latest: list[tuple[Any, ...]]) -> None:
    """The rules of :func:`record_experiment` against the newest record of every experiment."""
    newest = {row[1]: row for row in latest}
    running = [row for row in latest if row[3] != "stop"]
    if action == "start":
        if new.name in newest:
            row = newest[new.name]
            raise ExperimentError(
                f"experiment {new.name!r} was already recorded (version {row[2]}, {row[3]} by "
                f"{row[5]}): record a 'change' or 'stop' of it with a new version, or start a "
                "new experiment under a new name and salt"
            )
        others = [row for row in running if row[1] != new.name]
        if others:
            row = others[-1]
            raise AnotherExperimentRunning(
                f"experiment {row[1]!r} (version {row[2]}, recorded by {row[5]} at "
                f"{_when(row[7])}) is running: stop it before starting {new.name!r} (at most "
                "one experiment runs at a time)"
            )
        for row in latest:
            if _json_value(row[4]).get("salt") == new.salt:
                raise ExperimentError(
                    f"salt {new.salt!r} was used by experiment {row[1]!r}: a new experiment "
                    "takes a new salt, or its users land where they were before"
                )
        return
    row = newest.get(new.name)
    if row is None:
        raise ExperimentError(
            f"experiment {new.name!r} was never started: record its 'start' first"
        )
    if row[3] == "stop":
        raise ChangeRefused(
            f"experiment {new.name!r} was stopped at version {row[2]} (by "
            f"{row[5]}): stopped experiments do not change; start a new one "
            "with a new name and salt"
        )
    check_change(Experiment.from_dict(_json_value(row[4])), new)


def read_experiments(
    dsn: str | None, sqlite_path: Path, name: str | None = None, *, schema: str | None = None
) -> pd.DataFrame:
    """The ``experiments`` records (oldest first), of every experiment or of ``name``:
    :data:`EXPERIMENT_COLUMNS`, ``config`` as a dict (``status`` and ``forced`` taken from
    it), ``changed_at`` UTC. An empty frame when nothing was recorded yet."""
    rows = _experiment_rows(
        "read_experiments.sql", {"name": name}, dsn=dsn, sqlite_path=sqlite_path, schema=schema
    )
    frame = pd.DataFrame(
        [_experiment_record(row) for row in rows], columns=list(EXPERIMENT_COLUMNS)
    )
    frame["changed_at"] = pd.to_datetime(frame["changed_at"], utc=True, format="ISO8601")
    for column in ("id", "version"):
        frame[column] = frame[column].astype("int64")
    frame["forced"] = frame["forced"].astype(bool)
    return frame


def active_experiment(
    dsn: str | None, sqlite_path: Path, *, schema: str | None = None
) -> dict[str, Any] | None:
    """The newest record of the running experiment (a dict of :data:`EXPERIMENT_COLUMNS`;
    ``Experiment.from_dict(record["config"])`` is the experiment), or None when none runs."""
    rows = _experiment_rows(
        "latest_experiments.sql", {}, dsn=dsn, sqlite_path=sqlite_path, schema=schema
    )
    running = [row for row in rows if row[3] != "stop"]
    if len(running) > 1:  # record_experiment prevents it; say so rather than pick silently
        logger.warning(
            "%d experiments are running (%s); using the newest",
            len(running),
            ", ".join(str(row[1]) for row in running),
        )
    return _experiment_record(max(running, key=lambda row: row[0])) if running else None


def _experiment_rows(
    query: str, params: Mapping[str, Any], *, dsn: str | None, sqlite_path: Path, schema: str | None
) -> list[tuple[Any, ...]]:
    try:
        return backend_for(dsn, sqlite_path, schema).read_rows(query, params)
    except (NothingPublishedError, ServingError) as exc:
        if isinstance(exc, NothingPublishedError) or "no such table" in str(exc):
            return []
        raise


def _experiment_record(row: tuple[Any, ...]) -> dict[str, Any]:
    config = _json_value(row[4])
    return {
        "id": int(row[0]),
        "name": row[1],
        "version": int(row[2]),
        "action": row[3],
        "status": config.get("status"),
        "forced": bool((config.get("last_change") or {}).get("forced", False)),
        "config": config,
        "changed_by": row[5],
        "reason": row[6],
        "changed_at": _utc_time(row[7]),
    }


def _utc_time(value: Any) -> datetime:
    """A timestamp of either backend (datetime, or ISO text from SQLite) as UTC."""
    return as_utc(value if isinstance(value, datetime) else pd.Timestamp(value).to_pydatetime())


def _when(value: Any) -> str:
    return f"{_utc_time(value):%Y-%m-%d %H:%M:%S} UTC"


def _json_value(value: Any) -> dict[str, Any]:
    """A config as a dict: psycopg2 parses jsonb already, SQLite returns text."""
    return json.loads(value) if isinstance(value, (str, bytes)) else dict(value)


def record_impact(
    daily: pd.DataFrame,
    *,
    start: datetime,
    end: datetime,
    as_of: datetime,
    dsn: str | None,
    sqlite_path: Path,
    schema: str | None = None,
) -> int:
    """Replace the ``impact`` rows of the days ``[start, end)`` with ``daily`` (the impact
    DAG's rows: day, cutoff, model_version, variant and the metrics of
    :data:`pipeline.monitoring.impact.METRIC_COLUMNS`) in one transaction. Non-finite values
    are stored as NULL. Returns the number of rows written."""
    records = []
    for row in daily.to_dict("records"):
        record = {
            key: (None if value is None or (isinstance(value, float) and value != value) else value)
            for key, value in row.items()
        }
        for key in ("day", "cutoff"):
            record[key] = as_utc(pd.Timestamp(record[key]).to_pydatetime())
        for key, value in record.items():
            if hasattr(value, "item"):  # numpy scalars -> Python
                record[key] = value.item()
        record["computed_as_of"] = as_utc(as_of)
        records.append(record)
    backend_for(dsn, sqlite_path, schema).replace_rows(
        "impact", {"start": as_utc(start), "end": as_utc(end)}, records
    )
    logger.info(
        "impact: %d rows for [%s, %s)", len(records), as_utc(start).date(), as_utc(end).date()
    )
    return len(records)


def read_impact(
    *, dsn: str | None, sqlite_path: Path, schema: str | None = None, since: datetime | None = None
) -> pd.DataFrame:
    """The impact rows (oldest day first), optionally from ``since`` on; empty before any."""
    backend = backend_for(dsn, sqlite_path, schema)
    since_param: Any = None if since is None else as_utc(since)
    if isinstance(backend, SqliteBackend) and since_param is not None:
        since_param = since_param.strftime(ISO_UTC)
    try:
        rows = backend.read_rows("read_impact.sql", {"since": since_param})
    except (NothingPublishedError, ServingError) as exc:
        if isinstance(exc, NothingPublishedError) or "no such table" in str(exc):
            return pd.DataFrame()
        raise
    columns = _impact_columns()
    frame = pd.DataFrame(rows, columns=columns)
    for column in ("day", "cutoff", "computed_as_of"):
        frame[column] = pd.to_datetime(frame[column], utc=True, format="ISO8601")
    return frame


def _impact_columns() -> list[str]:
    metrics = ["users_served", "users_active"]
    for suffix in ("", "_top3"):
        metrics += [
            f"{k}{suffix}"
            for k in (
                "impressions",
                "clicks",
                "ctr",
                "engaged_users",
                "engaged_share",
                "converted_users",
                "conversion",
                "revenue",
                "revenue_per_active",
            )
        ]
    return ["day", "cutoff", "model_version", "variant", *metrics, "computed_as_of"]


def _optional_utc(value: Any) -> datetime | None:
    if value is None or (not isinstance(value, datetime) and pd.isna(value)):
        return None
    return as_utc(value)


# =================================================================================================
# The publish algorithm, once for both backends
# =================================================================================================


def _publish(
    backend: ServingBackend,
    frame: pd.DataFrame,
    assignments: pd.DataFrame,
    *,
    model_version: str,
    logical_date: datetime,
    keep_versions: int,
    lock_timeout_ms: int,
    swap_attempts: int,
    allow_older: bool,
) -> PublishResult:
    """Steps 1-5 of the module docstring on a prepared frame; driver errors propagate."""
    started = time.monotonic()
    with backend.publishing(lock_timeout_ms=lock_timeout_ms) as conn:
        backend.migrate(conn)
        backend.fail_abandoned(conn)
        if not allow_older:
            refuse_older(backend.live_logical_date(conn), logical_date)
        users = int(frame["user_id"].nunique())
        version, table = backend.reserve_version(
            conn,
            rows=len(frame),
            users=users,
            model_version=model_version,
            logical_date=logical_date,
        )
        try:
            loading = time.monotonic()
            backend.load_table(
                conn, table, frame, assignments=assignments, model_version=model_version
            )
            logger.info(
                "loaded and checked %s (%d rows, %d assignments) in %.2f s",
                backend.qualified(table),
                len(frame),
                len(assignments),
                time.monotonic() - loading,
            )
            with phases(logger) as phase:
                _swap(
                    backend,
                    conn,
                    version,
                    table,
                    lock_timeout_ms=lock_timeout_ms,
                    attempts=swap_attempts,
                    model_version=model_version,
                    generated_at=frame_generated_at(frame),
                )
                phase("swap")
        except BaseException as exc:
            backend.abandon_version(conn, version, table, error=backend.redact(str(exc)))
            raise
        with phases(logger) as phase:
            _drop_old_versions(
                backend, conn, keep_versions=keep_versions, lock_timeout_ms=lock_timeout_ms
            )
            phase("drop old")
    logger.info(
        "published %s: %d rows for %d users, model %s (%.2f s)",
        backend.qualified(table),
        len(frame),
        users,
        model_version,
        time.monotonic() - started,
    )
    return PublishResult(
        version=version,
        table=table,
        rows=len(frame),
        users=users,
        model_version=model_version,
        assigned=len(assignments),
    )


def _swap(
    backend: ServingBackend,
    conn: Any,
    version: int,
    table: str,
    *,
    lock_timeout_ms: int,
    attempts: int,
    model_version: str,
    generated_at: datetime,
) -> None:
    """Point the view at ``table`` and mark it live; retry with backoff while readers block."""
    for attempt in range(1, attempts + 1):
        if backend.try_swap(
            conn,
            version,
            table,
            lock_timeout_ms=lock_timeout_ms,
            model_version=model_version,
            generated_at=generated_at,
        ):
            logger.info("view %s now reads %s (attempt %d)", backend.view_label, table, attempt)
            return
        if attempt == attempts:
            break
        delay = backoff_delay(attempt)
        logger.warning(
            "view swap to %s: %s (attempt %d of %d); retrying in %.1f s",
            table,
            backend.swap_blocked(lock_timeout_ms),
            attempt,
            attempts,
            delay,
        )
        time.sleep(delay)
    raise SwapLockTimeout(
        f"could not switch {backend.view_label} to {table}: "
        f"{backend.swap_blocked(lock_timeout_ms)} in all {attempts} attempts; the previously "
        "live version is unchanged"
    )


def _drop_old_versions(
    backend: ServingBackend, conn: Any, *, keep_versions: int, lock_timeout_ms: int
) -> None:
    """Drop version tables beyond the newest ``keep_versions``; failures are only logged."""
    for version, table in versions_to_drop(backend.droppable_versions(conn), keep_versions):
        try:
            backend.drop_version(conn, version, table, lock_timeout_ms=lock_timeout_ms)
            logger.info("dropped old version table %s", backend.qualified(table))
        except backend.driver_error as exc:
            logger.warning(
                "could not drop old version table %s (next publish retries): %s",
                backend.qualified(table),
                backend.redact(str(exc).strip()),
            )
