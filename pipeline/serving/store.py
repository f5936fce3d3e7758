"""Serving database: versioned list tables behind one view that is swapped atomically.

The CMS reads the view ``recommendations`` (see ARCHITECTURE.md, "Serving DB"):
``SELECT item_id, reason FROM recommendations WHERE user_id = $1 ORDER BY rank``, falling back to
the rows of ``user_id = '__default__'``. Every publish loads a new table, checks it, and only then
points the view at it, so a reader sees the whole old list set or the whole new one.

Backends
--------
``dsn=None`` selects the embedded SQLite file (``Settings.serving_sqlite_path``); otherwise ``dsn``
is a ``postgresql://`` (or ``postgres://``) URI or a libpq ``key=value`` string. Passwords never
appear in error messages or logs.

Objects (PostgreSQL)
--------------------
Everything lives in one schema, ``recs`` by default (the ``schema`` argument, then the
``RECS_SERVING_SCHEMA`` environment variable, override it):

* ``recs.recommendations_v<N>``: one table per publish; N comes from the catalog's identity
  sequence, so it only grows and is never reused. It stores :data:`PG_TABLE_COLUMNS`:
  ``model_version`` and ``generated_at`` are one value per publish, so the view supplies them as
  constants (a third less to parse in the COPY). ``user_id`` has the "C" collation, which makes
  the index build several times cheaper than a locale-aware sort;
* ``recs.recommendation_versions``: the catalog (version, table_name, rows, users,
  model_version, logical_date, created_at, status ``loading|live|retired|failed``,
  published_at, retired_at, dropped_at, error); a unique partial index allows one live row;
* ``recs.model_promotions``: audit of promotion-gate decisions (:func:`record_promotion`);
* ``recs.recommendations``: the view, ``SELECT <stored columns>, '<model_version>'::text,
  '<generated_at>'::timestamptz FROM recs.recommendations_v<live>``.

The role ``cms_reader`` (cluster-wide, NOLOGIN, created idempotently) gets ``USAGE`` on the schema
and ``SELECT`` on the view, nothing else: a view runs with its owner's privileges, so the version
tables, catalog and audit table stay unreadable to it. So that the CMS can name the view
unqualified, ``ensure_schema`` runs ``ALTER ROLE cms_reader IN DATABASE <db> SET search_path =
recs``; this applies to sessions that *log in* as ``cms_reader`` (an administrator gives it
``LOGIN PASSWORD ...``). A CMS login that is merely a *member* of ``cms_reader`` must set
``search_path=recs`` itself (``ALTER ROLE cms_app SET search_path = recs``, or
``options=-csearch_path=recs`` in its DSN), or query ``recs.recommendations``.

The SQLite file holds the same tables, catalog, audit table and view, without schema and roles.

Publish (PostgreSQL)
--------------------
1. Take a session advisory lock for the schema (one publisher at a time), run the idempotent
   migrations (``sql/postgres/0*.sql``), mark versions a crashed publisher left ``loading`` as
   ``failed``.
2. Insert the catalog row (status ``loading``) and commit: this reserves N.
3. One transaction: ``CREATE TABLE recs.recommendations_vN``; ``COPY ... FROM STDIN (FREEZE)``
   (CSV rendered by Arrow chunk by chunk from the frame, so memory stays bounded; frozen rows need
   no hint-bit writes by the first readers nor a later freeze by VACUUM); the contract checks
   (``__default__`` present, ranks 1..N contiguous and items unique per user) run vectorised on
   the frame in a thread while the server parses the COPY, and the database confirms them: the
   COPY's row count, the ``__default__`` row count, and the unique index on (user_id, rank);
   ``ANALYZE``; commit. A failure rolls the table back.
4. Swap, in a short transaction: ``SET LOCAL lock_timeout``; ``CREATE OR REPLACE VIEW``; grant
   ``SELECT`` on the view to ``cms_reader``; catalog: new ``live``, old ``retired``. The view's
   ACCESS EXCLUSIVE lock waits behind readers that hold the view, and CMS readers queue behind
   that request, so ``lock_timeout`` bounds their wait; on ``LockNotAvailable`` the swap retries
   with exponential backoff, ``swap_attempts`` times in all. When the view cannot be replaced in
   place (a column type or collation changed, e.g. the first publish after an upgrade), the same
   transaction drops and creates it instead.
5. Drop the tables of all but the newest ``keep_versions`` live/retired versions (and of failed
   ones), with the same lock timeout; a failed drop is logged and retried by the next publish.

A failure before the swap commits leaves the old version live, drops the new table, marks the
catalog row ``failed`` (best effort) and raises a
:class:`~pipeline.core.errors.ServingError`; a retry publishes normally.

Readers must use READ COMMITTED (the default) or autocommit: a REPEATABLE READ transaction whose
snapshot predates a swap would see the new table without its rows.

Publish (SQLite)
----------------
Same steps; a ``flock`` on ``<file>.publish-lock`` serialises publishers, rows load with
``executemany`` in chunks inside one transaction, and the swap is ``DROP VIEW`` + ``CREATE VIEW``
plus the catalog update inside one ``BEGIN IMMEDIATE`` transaction (SQLite DDL is
transactional). The file uses WAL journal mode, so readers never wait for the publisher.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import re
import sqlite3
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psycopg2
import pyarrow as pa
import pyarrow.csv as pa_csv
from psycopg2 import errors as pg_errors
from psycopg2 import sql
from psycopg2.extensions import connection as PgConnection
from psycopg2.extensions import cursor as PgCursor
from psycopg2.extensions import parse_dsn

from pipeline.core.config import DEFAULT_USER, REPO_ROOT, as_utc
from pipeline.core.errors import ServingError
from pipeline.core.timing import StageClock

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SCHEMA",
    "ListValidationError",
    "NothingPublishedError",
    "OlderThanLive",
    "PublishResult",
    "READER_ROLE",
    "ServingConnectionError",
    "SwapLockTimeout",
    "VIEW_COLUMNS",
    "VIEW_NAME",
    "ensure_schema",
    "live_version",
    "promotion_lock",
    "publish_lists",
    "read_all",
    "read_user_list",
    "record_promotion",
]

SQL_DIR = REPO_ROOT / "sql"
DEFAULT_SCHEMA = "recs"
SCHEMA_ENV_VAR = "RECS_SERVING_SCHEMA"
VIEW_NAME = "recommendations"
READER_ROLE = "cms_reader"
TABLE_PREFIX = "recommendations_v"

#: Columns of a published list frame, as handed to :func:`publish_lists`.
LIST_COLUMNS: tuple[str, ...] = (
    "user_id", "rank", "item_id", "score", "reason", "source", "generated_at",
)
#: Columns of the view (the CMS contract), in order.
VIEW_COLUMNS: tuple[str, ...] = (
    "user_id", "rank", "item_id", "score", "reason", "source", "model_version", "generated_at",
)
MAX_RANK = 32767  # smallint

LOAD_CHUNK_ROWS = 50_000
COPY_READ_BYTES = 1 << 16
CONNECT_TIMEOUT_S = 5
READ_LOCK_TIMEOUT_MS = 2000
SWAP_ATTEMPTS = 5
SWAP_BACKOFF_S = 0.2
PUBLISH_LOCK_WAIT_S = 300
#: How long a run waits for another run's promotion decision (which may refit a champion).
PROMOTION_LOCK_WAIT_S = 3 * 3600
#: ``maintenance_work_mem`` for the (user_id, rank) index build: an in-memory sort up to a few
#: million rows instead of a spill to disk (session-local, one index build at a time).
INDEX_BUILD_MEMORY = "256MB"

#: Columns stored in a Postgres version table; ``model_version`` and ``generated_at`` are one
#: value per version, so the view supplies them as constants instead of storing them per row.
PG_TABLE_COLUMNS: tuple[str, ...] = ("user_id", "rank", "item_id", "score", "reason", "source")

#: Arrow types of a prepared list chunk as rendered for COPY (generated_at is ISO text already).
_ARROW_TYPES: dict[str, pa.DataType] = {
    "user_id": pa.string(), "rank": pa.int64(), "item_id": pa.string(), "score": pa.float64(),
    "reason": pa.string(), "source": pa.string(), "model_version": pa.string(),
    "generated_at": pa.string(),
}
_ARROW_TEXT = pd.ArrowDtype(pa.string())
_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_TABLE_RE = re.compile(rf"^{TABLE_PREFIX}[1-9][0-9]*$")
_SQLITE_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ISO_UTC = "%Y-%m-%dT%H:%M:%S.%f+00:00"


class ServingConnectionError(ServingError):
    """The serving database cannot be reached or opened (names host/db or file, no password)."""


class ListValidationError(ServingError):
    """The lists to publish break the contract; nothing was swapped."""


class SwapLockTimeout(ServingError):
    """The view swap kept hitting the lock timeout behind readers; the old version stays live."""


class NothingPublishedError(ServingError):
    """The serving database has no live version (or no schema) yet."""


class OlderThanLive(ServingError):
    """The live lists are for a newer logical date than this publish: they stay live."""


@dataclass(frozen=True)
class PublishResult:
    """What one publish made live."""

    version: int
    table: str
    rows: int
    users: int
    model_version: str


@dataclass(frozen=True)
class _LoadStats:
    """The semantic checks of one list set (:func:`_frame_stats`; SQLite:
    ``validate_list_table.sql``)."""

    n_rows: int
    n_users: int
    default_rows: int
    bad_rank_users: int
    first_bad_rank_user: str | None
    dup_item_users: int
    first_dup_item_user: str | None


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
) -> PublishResult:
    """Publish ``lists`` as a new version and make it live atomically.

    ``lists`` has the columns :data:`LIST_COLUMNS` (``generated_at`` timezone-aware); the
    ``model_version`` column is added here. ``dsn`` None publishes to the SQLite file at
    ``sqlite_path``. Keeps the newest ``keep_versions`` version tables, the live one included
    (older ones are dropped after the swap). ``lock_timeout_ms`` bounds each swap attempt and so
    how long CMS readers can queue behind it; ``schema`` (Postgres only) defaults to
    ``RECS_SERVING_SCHEMA`` or ``recs``. Raises
    :class:`ListValidationError` for lists that break the contract, :class:`SwapLockTimeout`
    when readers block the swap ``swap_attempts`` times, :class:`ServingConnectionError` when the
    database is unreachable; in every case the previously live version stays live. With
    ``allow_older`` False, raises :class:`OlderThanLive` (before loading anything) when the live
    version's ``logical_date`` is newer than ``logical_date``: checked under the publish lock,
    so two runs that race cannot put older lists over newer ones.
    """
    if keep_versions < 1:
        raise ValueError(f"keep_versions must be >= 1, got {keep_versions}")
    if lock_timeout_ms < 1:
        raise ValueError(f"lock_timeout_ms must be >= 1, got {lock_timeout_ms}")
    if swap_attempts < 1:
        raise ValueError(f"swap_attempts must be >= 1, got {swap_attempts}")
    started = time.perf_counter()
    frame = _prepare_lists(lists, model_version)
    logger.debug("phase prepare %.1fs", time.perf_counter() - started)
    when = as_utc(logical_date)
    if dsn is None:
        return _sqlite_publish(frame, Path(sqlite_path), model_version=model_version,
                               logical_date=when, keep_versions=keep_versions,
                               lock_timeout_ms=lock_timeout_ms, swap_attempts=swap_attempts,
                               allow_older=allow_older)
    target = _resolve_schema(schema)
    try:
        return _pg_publish(frame, dsn, target, model_version=model_version, logical_date=when,
                           keep_versions=keep_versions, lock_timeout_ms=lock_timeout_ms,
                           swap_attempts=swap_attempts, allow_older=allow_older)
    except psycopg2.Error as exc:
        raise ServingError(
            f"publish to {_describe_dsn(dsn)} schema {target} failed: "
            f"{_scrub(str(exc).strip(), dsn)}; the previously live version is unchanged"
        ) from None


def ensure_schema(*, dsn: str | None, sqlite_path: Path, schema: str | None = None) -> None:
    """Create the serving schema objects if missing (idempotent; safe before every publish)."""
    if dsn is None:
        with contextlib.closing(_sqlite_connect(Path(sqlite_path), timeout_s=30,
                                                must_exist=False)) as conn:
            _sqlite_ensure_schema(conn)
        return
    target = _resolve_schema(schema)
    with contextlib.closing(_pg_connect(dsn, lock_timeout_ms=READ_LOCK_TIMEOUT_MS)) as conn:
        try:
            _pg_acquire_publish_lock(conn, target)
            _pg_ensure_schema(conn, target)
        except psycopg2.Error as exc:
            raise ServingError(
                f"schema migration on {_describe_dsn(dsn)} failed: {_scrub(str(exc).strip(), dsn)}"
            ) from None


@contextlib.contextmanager
def promotion_lock(*, dsn: str | None, sqlite_path: Path, schema: str | None = None,
                   wait_s: float = PROMOTION_LOCK_WAIT_S) -> Iterator[None]:
    """Held while a run decides whether its model becomes champion and moves the alias: two
    runs (a backfill beside the nightly run, say) never decide at once, so each sees the
    other's champion. A PostgreSQL session advisory lock (another key than the publish lock,
    which it never blocks), or a ``flock`` beside the SQLite file. Raises
    :class:`ServingError` after ``wait_s`` seconds of waiting."""
    if dsn is None:
        with _sqlite_file_lock(Path(sqlite_path), ".promotion-lock", "promotion decision",
                               wait_s):
            yield
        return
    target = _resolve_schema(schema)
    with contextlib.closing(_pg_connect(dsn, lock_timeout_ms=READ_LOCK_TIMEOUT_MS)) as conn:
        try:
            _pg_advisory_lock(conn, _advisory_key(f"{target}/promotion"), wait_s,
                              f"another run's promotion decision on schema {target}")
        except psycopg2.Error as exc:
            raise ServingError(f"promotion lock on {_describe_dsn(dsn)} failed: "
                               f"{_scrub(str(exc).strip(), dsn)}") from None
        yield  # closing the session releases the lock


def read_user_list(
    user_id: str, *, dsn: str | None, sqlite_path: Path, schema: str | None = None,
) -> pd.DataFrame:
    """The CMS lookup: the live list of ``user_id`` ordered by rank, or the fallback list.

    Returns all view columns (:data:`VIEW_COLUMNS`); ``user_id`` is ``__default__`` when the
    user has no personal list. Raises :class:`NothingPublishedError` before the first publish.
    """
    params = {"user_id": str(user_id), "default_user": DEFAULT_USER}
    return _frame_from_rows(_read_rows("read_user_list.sql", params, dsn=dsn,
                                       sqlite_path=sqlite_path, schema=schema))


def read_all(*, dsn: str | None, sqlite_path: Path, schema: str | None = None) -> pd.DataFrame:
    """The whole live view ordered by ``user_id``, ``rank`` (one consistent snapshot)."""
    return _frame_from_rows(_read_rows("read_all.sql", {}, dsn=dsn, sqlite_path=sqlite_path,
                                       schema=schema))


def live_version(
    *, dsn: str | None, sqlite_path: Path, schema: str | None = None,
) -> dict[str, Any] | None:
    """The catalog row of the live version, or None when nothing is published yet."""
    keys = ("version", "table_name", "rows", "users", "model_version", "logical_date",
            "created_at", "status", "published_at")
    try:
        rows = _read_rows("live_version.sql", {}, dsn=dsn, sqlite_path=sqlite_path, schema=schema)
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
    database clock (an audit timestamp, not pipeline logic).
    """
    if not decision:
        raise ValueError("decision must be a non-empty string")
    params = {
        "decided_at": as_utc(decided_at) if decided_at is not None else None,
        "model_name": model_name,
        "model_version": str(model_version),
        "decision": decision,
        "reason": reason,
        "metrics": json.dumps(_json_safe(dict(metrics or {})), sort_keys=True, allow_nan=False),
        "triggered_by": triggered_by,
    }
    if dsn is None:
        params["decided_at"] = (params["decided_at"].strftime(_ISO_UTC)
                                if params["decided_at"] is not None else None)
        ensure_schema(dsn=None, sqlite_path=sqlite_path)
        with contextlib.closing(_sqlite_connect(Path(sqlite_path), timeout_s=30,
                                                must_exist=True)) as conn:
            with _sqlite_transaction(conn) as cur:
                cur.execute(_sqlite_query("insert_promotion.sql"), params)
                (promotion_id,) = cur.fetchone()
        return int(promotion_id)
    target = _resolve_schema(schema)
    query = _pg_query("insert_promotion.sql", target)
    with contextlib.closing(_pg_connect(dsn, lock_timeout_ms=READ_LOCK_TIMEOUT_MS)) as conn:
        try:
            try:
                with _pg_transaction(conn) as cur:
                    cur.execute(query, params)
                    (promotion_id,) = cur.fetchone()
            except (pg_errors.UndefinedTable, pg_errors.InvalidSchemaName):
                _pg_acquire_publish_lock(conn, target)
                _pg_ensure_schema(conn, target)
                with _pg_transaction(conn) as cur:
                    cur.execute(query, params)
                    (promotion_id,) = cur.fetchone()
        except psycopg2.Error as exc:
            raise ServingError(
                f"recording the promotion of {model_name} {model_version} on "
                f"{_describe_dsn(dsn)} failed: {_scrub(str(exc).strip(), dsn)}"
            ) from None
    logger.info("recorded promotion decision %s for %s %s (id %s)", decision, model_name,
                model_version, promotion_id)
    return int(promotion_id)


# =================================================================================================
# Pure helpers: list preparation and checks
# =================================================================================================


def _prepare_lists(lists: pd.DataFrame, model_version: str) -> pd.DataFrame:
    """Check the frame's shape and types and return it in view-column order, ready to load.

    Semantic checks (fallback list, contiguous ranks, unique items) run in the database on the
    loaded table, so that what goes live is what was checked.
    """
    if not isinstance(lists, pd.DataFrame):
        raise ListValidationError(f"lists must be a pandas DataFrame, got {type(lists).__name__}")
    if not isinstance(model_version, str) or not model_version.strip():
        raise ListValidationError("model_version must be a non-empty string")
    missing = [column for column in LIST_COLUMNS if column not in lists.columns]
    if missing:
        raise ListValidationError(f"lists lack the columns {missing} (need {list(LIST_COLUMNS)})")
    if lists.empty:
        raise ListValidationError("lists are empty: refusing to publish an empty list set")

    frame = pd.DataFrame(index=pd.RangeIndex(len(lists)))
    for column in ("user_id", "item_id"):
        frame[column] = _text_column(lists[column], column, nullable=False)
    frame["rank"] = _rank_column(lists["rank"])
    score = pd.to_numeric(lists["score"], errors="coerce").astype("float64").reset_index(drop=True)
    bad_score = (score.isna() & lists["score"].reset_index(drop=True).notna()) | score.isin(
        [math.inf, -math.inf])
    if bad_score.any():
        raise ListValidationError(
            f"column 'score' must be a finite number or null; row {int(bad_score.idxmax())} "
            f"is {lists['score'].iloc[int(bad_score.idxmax())]!r}")
    frame["score"] = score
    for column in ("reason", "source"):
        frame[column] = _text_column(lists[column], column, nullable=True)
    frame["model_version"] = model_version
    frame["generated_at"] = _timestamp_column(lists["generated_at"])
    if frame["generated_at"].nunique() != 1:
        raise ListValidationError(
            f"column 'generated_at' must hold one value per publish (the run's cutoff); got "
            f"{frame['generated_at'].nunique()} distinct values")
    return frame[list(VIEW_COLUMNS)]


def _text_column(values: pd.Series, column: str, *, nullable: bool) -> pd.Series:
    """Strings, Arrow-backed (the CSV renderer then reads them without a copy); rejects nulls
    where they are not allowed. Non-string values are converted with ``str``."""
    values = values.reset_index(drop=True)
    missing = values.isna()
    if not nullable and missing.any():
        raise ListValidationError(f"column {column!r} is null in row {int(missing.idxmax())}")
    if values.dtype == object and pd.api.types.infer_dtype(values, skipna=True) not in (
            "string", "empty"):
        values = values.map(str, na_action="ignore")
    return values.astype(_ARROW_TEXT)


def _rank_column(values: pd.Series) -> pd.Series:
    """Ranks as int64, integer-valued and within 1..32767."""
    values = values.reset_index(drop=True)
    numeric = pd.to_numeric(values, errors="coerce")
    bad = numeric.isna() | (numeric % 1 != 0) | (numeric < 1) | (numeric > MAX_RANK)
    if bad.any():
        row = int(bad.idxmax())
        raise ListValidationError(
            f"column 'rank' must be an integer in 1..{MAX_RANK}; row {row} is {values.iloc[row]!r}")
    return numeric.astype("int64")


def _timestamp_column(values: pd.Series) -> pd.Series:
    """``generated_at`` as ISO-8601 UTC text with microseconds; naive times are rejected."""
    values = values.reset_index(drop=True)
    if not isinstance(values.dtype, pd.DatetimeTZDtype):
        try:
            values = pd.to_datetime(values)
        except (TypeError, ValueError) as exc:
            raise ListValidationError(f"column 'generated_at' is not a timestamp: {exc}") from None
        if not isinstance(values.dtype, pd.DatetimeTZDtype):
            raise ListValidationError("column 'generated_at' must be timezone-aware (UTC)")
    if values.isna().any():
        raise ListValidationError(
            f"column 'generated_at' is null in row {int(values.isna().idxmax())}")
    # Format each distinct time once (lists of one run share a handful of them).
    codes, uniques = pd.factorize(values.dt.tz_convert("UTC"))
    rendered = np.asarray(pd.DatetimeIndex(uniques).strftime(_ISO_UTC), dtype=object)
    return pd.Series(rendered[codes], dtype=object)


def _frame_generated_at(frame: pd.DataFrame) -> datetime:
    """The one ``generated_at`` of a prepared frame, as an aware UTC datetime."""
    return as_utc(datetime.strptime(frame["generated_at"].iloc[0], _ISO_UTC))


def _frame_stats(frame: pd.DataFrame) -> _LoadStats:
    """The contract checks of a prepared frame, vectorised: fallback list present, ranks 1..N
    without gaps or duplicates per user, no item twice in a list."""
    users, user_ids = pd.factorize(frame["user_id"])
    items, item_ids = pd.factorize(frame["item_id"])
    users = users.astype(np.int64)
    rank = frame["rank"].to_numpy(np.int64)
    n_users = len(user_ids)
    count = np.bincount(users, minlength=n_users)
    by_user = pd.Series(rank).groupby(users)
    low, high = by_user.min().to_numpy(), by_user.max().to_numpy()
    dup_rank = pd.Series(users * (MAX_RANK + 1) + rank).duplicated().to_numpy()
    dup_item = pd.Series(users * max(len(item_ids), 1) + items).duplicated().to_numpy()
    bad_rank = (low != 1) | (high != count) | (np.bincount(users[dup_rank], minlength=n_users) > 0)
    dup_items = np.bincount(users[dup_item], minlength=n_users) > 0
    names = np.asarray(user_ids, dtype=object)
    return _LoadStats(
        n_rows=len(frame), n_users=n_users,
        default_rows=int(count[names == DEFAULT_USER].sum()),
        bad_rank_users=int(bad_rank.sum()),
        first_bad_rank_user=min(names[bad_rank]) if bad_rank.any() else None,
        dup_item_users=int(dup_items.sum()),
        first_dup_item_user=min(names[dup_items]) if dup_items.any() else None)


def _check_loaded(stats: _LoadStats, *, expected_rows: int, table: str) -> None:
    """Raise :class:`ListValidationError` when the loaded table breaks the contract."""
    problems: list[str] = []
    if stats.n_rows != expected_rows:
        problems.append(f"loaded {stats.n_rows} rows, expected {expected_rows}")
    if stats.default_rows == 0:
        problems.append(f"no fallback list (no rows for user_id {DEFAULT_USER!r})")
    if stats.bad_rank_users:
        problems.append(
            f"{stats.bad_rank_users} user(s) have ranks that are not 1..N without gaps or "
            f"duplicates (first: {stats.first_bad_rank_user!r})")
    if stats.dup_item_users:
        problems.append(
            f"{stats.dup_item_users} user(s) have the same item more than once "
            f"(first: {stats.first_dup_item_user!r})")
    if problems:
        raise ListValidationError(
            f"lists for {table} failed validation: {'; '.join(problems)}; "
            "the live version is unchanged")


def _frame_from_rows(rows: list[tuple[Any, ...]]) -> pd.DataFrame:
    """View rows as a frame with stable dtypes on both backends."""
    frame = pd.DataFrame.from_records(rows, columns=list(VIEW_COLUMNS))
    frame["rank"] = frame["rank"].astype("int64")
    frame["score"] = frame["score"].astype("float64")
    frame["generated_at"] = pd.to_datetime(frame["generated_at"], utc=True, format="ISO8601")
    return frame


def _json_safe(value: Any) -> Any:
    """Metrics as plain JSON values: numpy scalars unwrapped, non-finite floats as null."""
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _resolve_schema(schema: str | None) -> str:
    """The Postgres schema to use: argument, then ``RECS_SERVING_SCHEMA``, then ``recs``."""
    name = schema or os.environ.get(SCHEMA_ENV_VAR) or DEFAULT_SCHEMA
    if not _SCHEMA_RE.match(name):
        raise ServingError(f"invalid serving schema name {name!r} (lowercase letters, digits, _)")
    return name


def _table_name(version: int) -> str:
    name = f"{TABLE_PREFIX}{int(version)}"
    if not _TABLE_RE.match(name):
        raise ServingError(f"invalid version number {version!r}")
    return name


def _backoff_delay(attempt: int) -> float:
    """Seconds to wait after failed swap ``attempt`` (1-based): 0.2, 0.4, 0.8, ..."""
    return SWAP_BACKOFF_S * 2 ** (attempt - 1)


def _advisory_key(schema: str) -> int:
    digest = hashlib.blake2b(f"pipeline.serving:{schema}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _chunk_columns(chunk: pd.DataFrame, null: object) -> list[list[Any]]:
    """Columns of a prepared chunk as Python lists, nulls (None/NaN) replaced by ``null``."""
    columns: list[list[Any]] = []
    for name in chunk.columns:
        values = chunk[name]
        listed = values.tolist()
        if values.isna().any():
            listed = [null if value is None or value is pd.NA or value != value else value
                      for value in listed]
        columns.append(listed)
    return columns


def _render_csv(chunk: pd.DataFrame) -> bytes:
    """One chunk as CSV for ``COPY ... (FORMAT csv)``, rendered by Arrow's C++ writer.

    Arrow quotes every string and leaves nulls unquoted-empty, which is exactly COPY's CSV
    convention: ``""`` is an empty string, an empty field is NULL (NaN scores become NULL).
    """
    schema = pa.schema([(name, _ARROW_TYPES[name]) for name in chunk.columns])
    table = pa.Table.from_pandas(chunk, schema=schema, preserve_index=False, nthreads=1)
    sink = pa.BufferOutputStream()
    pa_csv.write_csv(table, sink, pa_csv.WriteOptions(include_header=False))
    return sink.getvalue().to_pybytes()


class _CsvChunkStream:
    """File-like ``read()`` over CSV rendered one chunk of rows at a time (bounded memory)."""

    def __init__(self, frame: pd.DataFrame, chunk_rows: int | None = None,
                 columns: tuple[str, ...] | None = None) -> None:
        chunk_rows = chunk_rows or LOAD_CHUNK_ROWS
        if columns is not None:
            frame = frame[list(columns)]
        self._chunks = (frame.iloc[start:start + chunk_rows]
                        for start in range(0, len(frame), chunk_rows))
        self._current = io.BytesIO()

    def read(self, size: int = -1) -> bytes:
        while True:
            data = self._current.read(size)
            if data:
                return data
            chunk = next(self._chunks, None)
            if chunk is None:
                return b""
            self._current = io.BytesIO(_render_csv(chunk))


# =================================================================================================
# SQL files
# =================================================================================================


@lru_cache(maxsize=None)
def _sql_text(dialect: str, name: str) -> str:
    path = SQL_DIR / dialect / name
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ServingError(f"cannot read SQL file {path}: {exc}") from exc


def _migration_names(dialect: str) -> list[str]:
    """Schema migrations (``NNN_*.sql``) in order."""
    return sorted(path.name for path in (SQL_DIR / dialect).glob("[0-9][0-9][0-9]_*.sql"))


def _pg_query(name: str, schema: str, *, table: str | None = None, index: str | None = None,
              lock_timeout_ms: int | None = None, memory: str | None = None,
              literals: Mapping[str, Any] | None = None) -> sql.Composed:
    """A Postgres SQL file with its placeholders filled as identifiers or literals (values in
    ``literals`` become :class:`psycopg2.sql.Literal`; DDL cannot take bind parameters)."""
    parts: dict[str, sql.Composable] = {
        "schema": sql.Identifier(schema),
        "schema_lit": sql.Literal(schema),
        "view": sql.Identifier(VIEW_NAME),
        "reader_role": sql.Identifier(READER_ROLE),
        "reader_role_lit": sql.Literal(READER_ROLE),
    }
    if table is not None:
        if not _TABLE_RE.match(table):
            raise ServingError(f"invalid version table name {table!r}")
        parts["table"] = sql.Identifier(table)
    if index is not None:
        parts["index"] = sql.Identifier(index)
    if lock_timeout_ms is not None:
        parts["lock_timeout"] = sql.Literal(f"{int(lock_timeout_ms)}ms")
    if memory is not None:
        parts["memory"] = sql.Literal(memory)
    for key, value in (literals or {}).items():
        parts[key] = sql.Literal(value)
    return sql.SQL(_sql_text("postgres", name)).format(**parts)


def _sqlite_ident(name: str) -> str:
    if not _SQLITE_IDENT_RE.match(name):
        raise ServingError(f"invalid SQLite identifier {name!r}")
    return f'"{name}"'


def _sqlite_query(name: str, **identifiers: str) -> str:
    """A SQLite SQL file; placeholders (if any are given) are filled with quoted identifiers."""
    text = _sql_text("sqlite", name)
    if not identifiers:
        return text
    return text.format(**{key: _sqlite_ident(value) for key, value in identifiers.items()})


def _sqlite_statements(script: str) -> list[str]:
    """Split a SQL script into statements (``executescript`` would commit the transaction)."""
    statements: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            if _has_code(pending):
                statements.append(pending.strip())
            pending = ""
    if _has_code(pending):
        statements.append(pending.strip())
    return statements


def _has_code(text: str) -> bool:
    return any(line.strip() and not line.strip().startswith("--") for line in text.splitlines())


# =================================================================================================
# PostgreSQL backend
# =================================================================================================


def _normalize_dsn(dsn: str) -> str:
    """libpq-ready DSN: ``postgres://`` and ``postgresql+psycopg2://`` become ``postgresql://``,
    Airflow's ``__extra__`` query parameter is dropped; other URI schemes are refused."""
    text = dsn.strip()
    if "://" not in text:
        return text  # libpq key=value string
    scheme, rest = text.split("://", 1)
    if scheme.lower() not in ("postgresql", "postgres", "postgresql+psycopg2"):
        where = ""
        with contextlib.suppress(ValueError):
            parts = urllib.parse.urlsplit(text)
            where = f" (host={parts.hostname or ''} dbname={parts.path.lstrip('/')})"
        raise ServingConnectionError(
            f"unsupported serving DSN scheme {scheme!r}{where}: expected postgresql:// (or "
            "dsn=None for the embedded SQLite file)")
    parts = urllib.parse.urlsplit(f"postgresql://{rest}")
    pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    if any(key == "__extra__" for key, _ in pairs):
        query = urllib.parse.urlencode([(key, value) for key, value in pairs if key != "__extra__"],
                                       quote_via=urllib.parse.quote)
        parts = parts._replace(query=query)
    return urllib.parse.urlunsplit(parts)


def _describe_dsn(dsn: str) -> str:
    """``host=... port=... dbname=... user=...`` for messages; never the password."""
    fields: dict[str, str] = {}
    try:
        fields = parse_dsn(_normalize_dsn(dsn))
    except (psycopg2.Error, ServingError):
        try:
            parts = urllib.parse.urlsplit(dsn.strip())
            fields = {"host": parts.hostname or "", "dbname": parts.path.lstrip("/"),
                      "user": parts.username or ""}
        except ValueError:
            return "an unparseable serving DSN"
    shown = [f"{key}={fields[key]}" for key in ("host", "port", "dbname", "user")
             if fields.get(key)]
    return "postgres " + (" ".join(shown) if shown else "(libpq defaults)")


def _scrub(message: str, dsn: str) -> str:
    """Remove the DSN's password (raw and URL-decoded) from a message."""
    secrets: set[str] = set()
    with contextlib.suppress(Exception):
        secrets.add(parse_dsn(_normalize_dsn(dsn)).get("password") or "")
    with contextlib.suppress(Exception):
        raw = urllib.parse.urlsplit(dsn.strip()).password or ""
        secrets.update({raw, urllib.parse.unquote(raw)})
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        message = message.replace(secret, "***")
    return message


def _pg_connect(dsn: str, *, lock_timeout_ms: int) -> PgConnection:
    """Open a connection (UTC session, ``lock_timeout`` set) or raise
    :class:`ServingConnectionError` naming host and database."""
    normalized = _normalize_dsn(dsn)
    try:
        conn = psycopg2.connect(normalized, connect_timeout=CONNECT_TIMEOUT_S,
                                application_name="recs-pipeline-serving")
    except psycopg2.Error as exc:
        raise ServingConnectionError(
            f"cannot connect to the serving database ({_describe_dsn(dsn)}): "
            f"{_scrub(str(exc).strip(), dsn)}") from None
    try:
        with conn.cursor() as cur:
            cur.execute("SET TIME ZONE 'UTC'")
            cur.execute("SET client_min_messages = warning")  # no "already exists, skipping"
            cur.execute("SELECT set_config('lock_timeout', %s, false)",
                        (f"{int(lock_timeout_ms)}ms",))
        conn.commit()
    except psycopg2.Error as exc:
        conn.close()
        raise ServingConnectionError(
            f"cannot set up the session on the serving database ({_describe_dsn(dsn)}): "
            f"{_scrub(str(exc).strip(), dsn)}") from None
    return conn


@contextlib.contextmanager
def _pg_transaction(conn: PgConnection) -> Iterator[PgCursor]:
    """A cursor inside one transaction: commit on success, roll back on any exception."""
    try:
        with conn.cursor() as cur:
            yield cur
        conn.commit()
    except BaseException:
        if not conn.closed:
            with contextlib.suppress(psycopg2.Error):
                conn.rollback()
        raise


def _pg_log_notices(conn: PgConnection) -> None:
    for notice in conn.notices:
        logger.warning("serving DB: %s", notice.strip())
    del conn.notices[:]


def _pg_acquire_publish_lock(conn: PgConnection, schema: str) -> None:
    """Session advisory lock: one publisher (or migration) per schema at a time."""
    _pg_advisory_lock(conn, _advisory_key(schema), PUBLISH_LOCK_WAIT_S,
                      f"another publish to schema {schema}")


def _pg_advisory_lock(conn: PgConnection, key: int, wait_s: float, holder: str) -> None:
    """Take the session advisory lock ``key``, waiting at most ``wait_s`` seconds."""
    try:
        with _pg_transaction(conn) as cur:
            cur.execute("SELECT set_config('lock_timeout', %s, true)",
                        (f"{int(wait_s * 1000)}ms",))
            cur.execute("SELECT pg_advisory_lock(%s)", (key,))
    except pg_errors.LockNotAvailable:
        raise ServingError(f"{holder} held the lock for over {wait_s:g} s") from None


def _refuse_older(live_logical_date: Any, logical_date: datetime) -> None:
    """Raise :class:`OlderThanLive` when the live lists are for a later logical date."""
    if live_logical_date is None:
        return
    live = as_utc(live_logical_date)
    if live > logical_date:
        raise OlderThanLive(
            f"the live lists are for logical date {live:%Y-%m-%d %H:%M}, newer than this "
            f"publish's {logical_date:%Y-%m-%d %H:%M}: they stay live (production moves "
            "forward only)")


def _pg_ensure_schema(conn: PgConnection, schema: str) -> None:
    with _pg_transaction(conn) as cur:
        for name in _migration_names("postgres"):
            cur.execute(_pg_query(name, schema))
    _pg_log_notices(conn)


def _pg_publish(frame: pd.DataFrame, dsn: str, schema: str, *, model_version: str,
                logical_date: datetime, keep_versions: int, lock_timeout_ms: int,
                swap_attempts: int, allow_older: bool) -> PublishResult:
    started = time.monotonic()
    with contextlib.closing(_pg_connect(dsn, lock_timeout_ms=lock_timeout_ms)) as conn:
        _pg_acquire_publish_lock(conn, schema)
        _pg_ensure_schema(conn, schema)
        _pg_fail_abandoned(conn, schema)
        if not allow_older:
            with _pg_transaction(conn) as cur:
                cur.execute(_pg_query("live_version.sql", schema))
                live = cur.fetchone()
            _refuse_older(live[5] if live else None, logical_date)
        users = int(frame["user_id"].nunique())
        version, table = _pg_reserve_version(conn, schema, rows=len(frame), users=users,
                                             model_version=model_version,
                                             logical_date=logical_date)
        try:
            _pg_load_table(conn, schema, table, frame)
            with _phases() as phase:
                _pg_swap_view(conn, schema, version, table, lock_timeout_ms=lock_timeout_ms,
                              attempts=swap_attempts, model_version=model_version,
                              generated_at=_frame_generated_at(frame))
                phase("swap")
        except BaseException as exc:
            _pg_abandon_version(conn, schema, version, table, error=_scrub(str(exc), dsn))
            raise
        with _phases() as phase:
            _pg_drop_old_versions(conn, schema, keep_versions=keep_versions,
                                  lock_timeout_ms=lock_timeout_ms)
            phase("drop old")
    logger.info("published %s.%s: %d rows for %d users, model %s (%.2f s)", schema, table,
                len(frame), users, model_version, time.monotonic() - started)
    return PublishResult(version=version, table=table, rows=len(frame), users=users,
                         model_version=model_version)


def _pg_fail_abandoned(conn: PgConnection, schema: str) -> None:
    """Versions still ``loading`` while we hold the publish lock belong to a dead publisher."""
    with _pg_transaction(conn) as cur:
        cur.execute(
            sql.SQL("UPDATE {}.recommendation_versions SET status = 'failed', "
                    "error = 'abandoned by an interrupted publish' WHERE status = 'loading'"
                    ).format(sql.Identifier(schema)))
        if cur.rowcount:
            logger.warning("marked %d abandoned loading version(s) in %s as failed",
                           cur.rowcount, schema)


def _pg_reserve_version(conn: PgConnection, schema: str, *, rows: int, users: int,
                        model_version: str, logical_date: datetime) -> tuple[int, str]:
    params = {"schema": schema, "rows": rows, "users": users, "model_version": model_version,
              "logical_date": logical_date}
    with _pg_transaction(conn) as cur:
        cur.execute(_pg_query("insert_version.sql", schema), params)
        version, table = cur.fetchone()
    if table != _table_name(version):
        raise ServingError(f"catalog returned table {table!r} for version {version}")
    return int(version), str(table)


def _pg_load_table(conn: PgConnection, schema: str, table: str, frame: pd.DataFrame) -> None:
    """Create, COPY, validate, index and analyze the version table in one transaction."""
    started = time.monotonic()
    with (_pg_transaction(conn) as cur, _phases() as phase,
          ThreadPoolExecutor(1, thread_name_prefix="recs-validate") as background):
        # The contract checks run on the frame in a thread while the server parses the COPY
        # (the COPY is server-bound, so they cost no wall time); the database then confirms the
        # row count, the fallback list and, through the unique index, one row per rank.
        checked = background.submit(_frame_stats, frame)
        cur.execute(_pg_query("create_list_table.sql", schema, table=table))
        cur.copy_expert(_pg_query("copy_list_table.sql", schema, table=table),
                        _CsvChunkStream(frame, columns=PG_TABLE_COLUMNS), size=COPY_READ_BYTES)
        copied = cur.rowcount
        phase("copy")
        stats = dataclasses.replace(checked.result(), n_rows=copied)
        _check_loaded(stats, expected_rows=len(frame), table=table)
        phase("validate (wait)")
        try:
            cur.execute(_pg_query("index_list_table.sql", schema, table=table,
                                  index=f"{table}_user_rank", memory=INDEX_BUILD_MEMORY))
        except pg_errors.UniqueViolation as exc:
            raise ListValidationError(
                f"lists for {table} failed validation: two rows for one user and rank "
                f"({str(exc).strip().splitlines()[-1]}); the live version is unchanged") from None
        phase("index")
        cur.execute(_pg_query("count_user_rows.sql", schema, table=table),
                    {"user_id": DEFAULT_USER})
        (default_rows,) = cur.fetchone()
        if default_rows != stats.default_rows:
            raise ListValidationError(
                f"lists for {table} failed validation: {default_rows} rows for {DEFAULT_USER!r} "
                f"in the table, {stats.default_rows} in the frame; the live version is unchanged")
        cur.execute(_pg_query("analyze_list_table.sql", schema, table=table))
        phase("analyze")
    logger.info("loaded and checked %s.%s (%d rows) in %.2f s", schema, table, len(frame),
                time.monotonic() - started)


@contextlib.contextmanager
def _phases() -> Iterator[Any]:
    """``phase(name)`` logs (DEBUG) the seconds since the previous phase ended."""
    clock = StageClock()
    yield lambda name: logger.debug("phase %s %.1fs", name, clock.lap(name))


def _pg_swap_view(conn: PgConnection, schema: str, version: int, table: str, *,
                  lock_timeout_ms: int, attempts: int, model_version: str,
                  generated_at: datetime) -> None:
    """Point the view at ``table`` and mark it live; retry with backoff on lock timeouts.

    When the view cannot be replaced in place (its columns' types or collations differ from the
    new table's, e.g. after an upgrade of the table DDL), it is dropped and created again in the
    same short transaction: readers queued on the old view resolve the name again and read the
    new one.
    """
    constants = {"model_version": model_version, "generated_at": generated_at}
    statements = {
        False: _pg_query("swap_view.sql", schema, table=table, lock_timeout_ms=lock_timeout_ms,
                         literals=constants),
        True: _pg_query("recreate_view.sql", schema, table=table,
                        lock_timeout_ms=lock_timeout_ms, literals=constants),
    }
    mark = _pg_query("mark_live.sql", schema)
    recreate = False
    attempt = 0
    while True:
        attempt += 1
        try:
            with _pg_transaction(conn) as cur:
                cur.execute(statements[recreate])
                cur.execute(mark, {"version": version})
            logger.info("view %s.%s now reads %s (attempt %d)", schema, VIEW_NAME, table, attempt)
            return
        except pg_errors.InvalidTableDefinition as exc:
            if recreate:
                raise
            logger.warning("view %s.%s cannot be replaced in place (%s); recreating it in the "
                           "swap transaction", schema, VIEW_NAME, str(exc).strip())
            recreate, attempt = True, attempt - 1
        except pg_errors.LockNotAvailable:
            if attempt >= attempts:
                raise SwapLockTimeout(
                    f"could not switch {schema}.{VIEW_NAME} to {table}: readers held the view "
                    f"past the {lock_timeout_ms} ms lock timeout in all {attempts} attempts; "
                    "the previously live version is unchanged") from None
            delay = _backoff_delay(attempt)
            logger.warning("view swap to %s hit the %d ms lock timeout (attempt %d of %d); "
                           "retrying in %.1f s", table, lock_timeout_ms, attempt, attempts, delay)
            time.sleep(delay)


def _pg_abandon_version(conn: PgConnection, schema: str, version: int, table: str, *,
                        error: str) -> None:
    """Best effort after a failed publish: drop the new table, mark the catalog row failed."""
    try:
        if not conn.closed:
            conn.rollback()
        with _pg_transaction(conn) as cur:
            cur.execute(sql.SQL("DROP TABLE IF EXISTS {}.{}").format(
                sql.Identifier(schema), sql.Identifier(table)))
            cur.execute(
                sql.SQL("UPDATE {}.recommendation_versions SET status = 'failed', error = %s, "
                        "dropped_at = now() WHERE version = %s AND status <> 'live'"
                        ).format(sql.Identifier(schema)),
                (error[:2000], version))
        logger.warning("publish of version %d failed; dropped %s.%s and marked it failed",
                       version, schema, table)
    except psycopg2.Error as exc:
        logger.warning("could not clean up failed version %d (%s.%s): %s", version, schema,
                       table, str(exc).strip())


def _pg_drop_old_versions(conn: PgConnection, schema: str, *, keep_versions: int,
                          lock_timeout_ms: int) -> None:
    """Drop version tables beyond the newest ``keep_versions``; failures are only logged."""
    with _pg_transaction(conn) as cur:
        cur.execute(_pg_query("list_droppable_versions.sql", schema))
        rows = cur.fetchall()
    for version, table in _versions_to_drop(rows, keep_versions):
        try:
            with _pg_transaction(conn) as cur:
                cur.execute("SELECT set_config('lock_timeout', %s, true)",
                            (f"{int(lock_timeout_ms)}ms",))
                cur.execute(sql.SQL("DROP TABLE IF EXISTS {}.{}").format(
                    sql.Identifier(schema), sql.Identifier(table)))
                cur.execute(sql.SQL("UPDATE {}.recommendation_versions SET dropped_at = now() "
                                    "WHERE version = %s").format(sql.Identifier(schema)),
                            (version,))
            logger.info("dropped old version table %s.%s", schema, table)
        except psycopg2.Error as exc:
            logger.warning("could not drop old version table %s.%s (next publish retries): %s",
                           schema, table, str(exc).strip())


def _versions_to_drop(rows: list[tuple[Any, ...]], keep_versions: int) -> list[tuple[int, str]]:
    """From (version, table, status) rows newest first: all but the newest kept live/retired."""
    kept = 0
    doomed: list[tuple[int, str]] = []
    for version, table, status in rows:
        if status == "live" or (status == "retired" and kept < keep_versions):
            kept += 1
            continue
        doomed.append((int(version), str(table)))
    return doomed


def _pg_read_rows(name: str, params: Mapping[str, Any], dsn: str,
                  schema: str) -> list[tuple[Any, ...]]:
    with contextlib.closing(_pg_connect(dsn, lock_timeout_ms=READ_LOCK_TIMEOUT_MS)) as conn:
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(_pg_query(name, schema), dict(params) or None)
                return cur.fetchall()
        except (pg_errors.UndefinedTable, pg_errors.InvalidSchemaName):
            raise NothingPublishedError(
                f"nothing published yet in schema {schema} on {_describe_dsn(dsn)}") from None
        except psycopg2.Error as exc:
            raise ServingError(f"reading {schema}.{VIEW_NAME} on {_describe_dsn(dsn)} failed: "
                               f"{_scrub(str(exc).strip(), dsn)}") from None


# =================================================================================================
# SQLite backend
# =================================================================================================


def _sqlite_connect(path: Path, *, timeout_s: float, must_exist: bool) -> sqlite3.Connection:
    """Autocommit connection (transactions are explicit) or a clear error naming the file."""
    if must_exist and not path.exists():
        raise NothingPublishedError(f"no serving database at {path}: nothing published yet")
    try:
        if not must_exist:
            path.parent.mkdir(parents=True, exist_ok=True)
        return sqlite3.connect(str(path), timeout=timeout_s, isolation_level=None)
    except (sqlite3.Error, OSError) as exc:
        raise ServingConnectionError(f"cannot open the serving SQLite database {path}: {exc}"
                                     ) from None


@contextlib.contextmanager
def _sqlite_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Cursor]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``; roll back on any exception."""
    cur = conn.cursor()
    cur.execute("BEGIN IMMEDIATE")
    try:
        yield cur
        cur.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise
    finally:
        cur.close()


def _sqlite_ensure_schema(conn: sqlite3.Connection) -> None:
    (mode,) = conn.execute("PRAGMA journal_mode=WAL").fetchone()
    if str(mode).lower() != "wal":
        logger.warning("serving SQLite file is in %s journal mode, not WAL", mode)
    with _sqlite_transaction(conn) as cur:
        for name in _migration_names("sqlite"):
            for statement in _sqlite_statements(_sqlite_query(name)):
                cur.execute(statement)


def _sqlite_publish_lock(path: Path) -> contextlib.AbstractContextManager[None]:
    """Exclusive ``flock`` on ``<file>.publish-lock``: one publisher per SQLite file."""
    return _sqlite_file_lock(path, ".publish-lock", "publish", PUBLISH_LOCK_WAIT_S)


@contextlib.contextmanager
def _sqlite_file_lock(path: Path, suffix: str, what: str, wait_s: float) -> Iterator[None]:
    """Exclusive ``flock`` on ``<file><suffix>``, waiting at most ``wait_s`` seconds."""
    lock_path = path.with_name(path.name + suffix)
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path, "a+b")  # noqa: SIM115 (closed below)
    except OSError as exc:
        raise ServingConnectionError(f"cannot open the {what} lock {lock_path}: {exc}") from None
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ServingError(f"another {what} held {lock_path} for over "
                                       f"{wait_s:g} s") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()


def _sqlite_publish(frame: pd.DataFrame, path: Path, *, model_version: str,
                    logical_date: datetime, keep_versions: int, lock_timeout_ms: int,
                    swap_attempts: int, allow_older: bool) -> PublishResult:
    started = time.monotonic()
    try:
        with _sqlite_publish_lock(path), contextlib.closing(
                _sqlite_connect(path, timeout_s=lock_timeout_ms / 1000, must_exist=False)) as conn:
            _sqlite_ensure_schema(conn)
            _sqlite_fail_abandoned(conn)
            if not allow_older:
                live = conn.execute(_sqlite_query("live_version.sql")).fetchone()
                _refuse_older(live[5] if live else None, logical_date)
            users = int(frame["user_id"].nunique())
            version, table = _sqlite_reserve_version(conn, rows=len(frame), users=users,
                                                     model_version=model_version,
                                                     logical_date=logical_date)
            try:
                _sqlite_load_table(conn, table, frame)
                _sqlite_swap_view(conn, version, table, lock_timeout_ms=lock_timeout_ms,
                                  attempts=swap_attempts)
            except BaseException as exc:
                _sqlite_abandon_version(conn, version, table, error=str(exc))
                raise
            _sqlite_drop_old_versions(conn, keep_versions=keep_versions)
    except sqlite3.Error as exc:
        raise ServingError(f"publish to {path} failed: {exc}; the previously live version is "
                           "unchanged") from None
    logger.info("published %s in %s: %d rows for %d users, model %s (%.2f s)", table, path,
                len(frame), users, model_version, time.monotonic() - started)
    return PublishResult(version=version, table=table, rows=len(frame), users=users,
                         model_version=model_version)


def _sqlite_fail_abandoned(conn: sqlite3.Connection) -> None:
    with _sqlite_transaction(conn) as cur:
        cur.execute("UPDATE recommendation_versions SET status = 'failed', "
                    "error = 'abandoned by an interrupted publish' WHERE status = 'loading'")
        if cur.rowcount:
            logger.warning("marked %d abandoned loading version(s) as failed", cur.rowcount)


def _sqlite_reserve_version(conn: sqlite3.Connection, *, rows: int, users: int,
                            model_version: str, logical_date: datetime) -> tuple[int, str]:
    params = {"rows": rows, "users": users, "model_version": model_version,
              "logical_date": logical_date.strftime(_ISO_UTC)}
    with _sqlite_transaction(conn) as cur:
        cur.execute(_sqlite_query("insert_version.sql"), params)
        (version,) = cur.fetchone()
        table = _table_name(version)
        cur.execute("UPDATE recommendation_versions SET table_name = ? WHERE version = ?",
                    (table, version))
    return int(version), table


def _sqlite_load_table(conn: sqlite3.Connection, table: str, frame: pd.DataFrame) -> None:
    """Create, load (``executemany`` in chunks), validate and index in one transaction."""
    started = time.monotonic()
    insert = _sqlite_query("insert_list_rows.sql", table=table)
    with _sqlite_transaction(conn) as cur:
        cur.execute(_sqlite_query("create_list_table.sql", table=table))
        for start in range(0, len(frame), LOAD_CHUNK_ROWS):
            chunk = frame.iloc[start:start + LOAD_CHUNK_ROWS]
            cur.executemany(insert, zip(*_chunk_columns(chunk, None)))
        cur.execute(_sqlite_query("validate_list_table.sql", table=table),
                    {"default_user": DEFAULT_USER})
        _check_loaded(_LoadStats(*cur.fetchone()), expected_rows=len(frame), table=table)
        for statement in _sqlite_statements(
                _sqlite_query("finalize_list_table.sql", table=table, index=f"{table}_user_rank")):
            cur.execute(statement)
    logger.info("loaded and checked %s (%d rows) in %.2f s", table, len(frame),
                time.monotonic() - started)


def _sqlite_swap_view(conn: sqlite3.Connection, version: int, table: str, *,
                      lock_timeout_ms: int, attempts: int) -> None:
    """Swap the view and the catalog in one ``BEGIN IMMEDIATE`` transaction, with retries."""
    swap = _sqlite_statements(_sqlite_query("swap_view.sql", view=VIEW_NAME, table=table))
    mark = _sqlite_statements(_sqlite_query("mark_live.sql"))
    for attempt in range(1, attempts + 1):
        try:
            with _sqlite_transaction(conn) as cur:
                for statement in swap:
                    cur.execute(statement)
                for statement in mark:
                    cur.execute(statement, {"version": version})
            logger.info("view %s now reads %s (attempt %d)", VIEW_NAME, table, attempt)
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if attempt == attempts:
                raise SwapLockTimeout(
                    f"could not switch {VIEW_NAME} to {table}: the database stayed locked past "
                    f"the {lock_timeout_ms} ms timeout in all {attempts} attempts; the previously "
                    "live version is unchanged") from None
            delay = _backoff_delay(attempt)
            logger.warning("view swap to %s found the database locked (attempt %d of %d); "
                           "retrying in %.1f s", table, attempt, attempts, delay)
            time.sleep(delay)


def _sqlite_abandon_version(conn: sqlite3.Connection, version: int, table: str, *,
                            error: str) -> None:
    try:
        with _sqlite_transaction(conn) as cur:
            cur.execute(_sqlite_query("drop_list_table.sql", table=table))
            cur.execute("UPDATE recommendation_versions SET status = 'failed', error = ?, "
                        "dropped_at = strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now') "
                        "WHERE version = ? AND status <> 'live'", (error[:2000], version))
        logger.warning("publish of version %d failed; dropped %s and marked it failed",
                       version, table)
    except sqlite3.Error as exc:
        logger.warning("could not clean up failed version %d (%s): %s", version, table, exc)


def _sqlite_drop_old_versions(conn: sqlite3.Connection, *, keep_versions: int) -> None:
    rows = conn.execute(_sqlite_query("list_droppable_versions.sql")).fetchall()
    for version, table in _versions_to_drop(rows, keep_versions):
        try:
            with _sqlite_transaction(conn) as cur:
                cur.execute(_sqlite_query("drop_list_table.sql", table=table))
                cur.execute("UPDATE recommendation_versions SET dropped_at = "
                            "strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now') WHERE version = ?",
                            (version,))
            logger.info("dropped old version table %s", table)
        except sqlite3.Error as exc:
            logger.warning("could not drop old version table %s (next publish retries): %s",
                           table, exc)


def _sqlite_read_rows(name: str, params: Mapping[str, Any], path: Path) -> list[tuple[Any, ...]]:
    with contextlib.closing(_sqlite_connect(path, timeout_s=READ_LOCK_TIMEOUT_MS / 1000,
                                            must_exist=True)) as conn:
        try:
            return conn.execute(_sqlite_query(name, view=VIEW_NAME), dict(params)).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                raise NothingPublishedError(f"nothing published yet in {path}") from None
            raise ServingError(f"reading {VIEW_NAME} in {path} failed: {exc}") from None


# =================================================================================================
# Backend dispatch for reads
# =================================================================================================


def _read_rows(name: str, params: Mapping[str, Any], *, dsn: str | None, sqlite_path: Path,
               schema: str | None) -> list[tuple[Any, ...]]:
    if dsn is None:
        return _sqlite_read_rows(name, params, Path(sqlite_path))
    return _pg_read_rows(name, params, dsn, _resolve_schema(schema))
