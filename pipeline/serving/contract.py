"""What both serving backends share: the list contract, its checks, and the backend interface.

A published list set is a frame of :data:`LIST_COLUMNS` (optionally with a per-row
``model_version``, ``variant`` and ``experiment``); :func:`prepare_lists` checks its shape and
types and returns it in view order (:data:`VIEW_COLUMNS`), and :func:`frame_stats` /
:func:`check_loaded` apply the semantic rules (a ``__default__`` list, ranks 1..N per user id
without gaps, no item twice in a list) to what a backend loaded. Beside it, a publish may carry
the experiment's assignments (:data:`ASSIGNMENT_COLUMNS`, :func:`prepare_assignments`), loaded
into a sibling table of the version (:func:`assignments_table_name`) and swapped with it. The
error classes, the version table naming, the swap backoff, the forward-only rule
(:func:`refuse_older`), which old versions to drop, and the SQL file loading are the same for
PostgreSQL and SQLite.

:class:`ServingBackend` is the interface :mod:`pipeline.serving.store` drives: it writes the
publish algorithm once against it, and :mod:`pipeline.serving.postgres` and
:mod:`pipeline.serving.sqlite` implement it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, Protocol

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.core.config import DEFAULT_USER, REPO_ROOT, as_utc
from pipeline.core.errors import ServingError
from pipeline.core.timing import StageClock

__all__ = [
    "ASSIGNMENTS_PREFIX",
    "ASSIGNMENTS_TABLE_RE",
    "ASSIGNMENTS_VIEW",
    "ASSIGNMENT_COLUMNS",
    "DEFAULT_SCHEMA",
    "EXPERIMENT_LOCK_TIMEOUT_MS",
    "ISO_UTC",
    "LIST_COLUMNS",
    "LOAD_CHUNK_ROWS",
    "ListValidationError",
    "LoadStats",
    "MAX_RANK",
    "NothingPublishedError",
    "OPTIONAL_LIST_COLUMNS",
    "OlderThanLive",
    "PROMOTION_LOCK_WAIT_S",
    "PUBLISH_LOCK_WAIT_S",
    "PublishResult",
    "READER_ROLE",
    "READ_LOCK_TIMEOUT_MS",
    "SCHEMA_ENV_VAR",
    "SQL_DIR",
    "SWAP_ATTEMPTS",
    "SWAP_BACKOFF_S",
    "SchemaOutdated",
    "ServingBackend",
    "ServingConnectionError",
    "SwapLockTimeout",
    "TABLE_PREFIX",
    "TABLE_RE",
    "VIEW_COLUMNS",
    "VIEW_NAME",
    "assignments_table_name",
    "backoff_delay",
    "check_loaded",
    "frame_from_rows",
    "frame_generated_at",
    "frame_stats",
    "json_safe",
    "migration_names",
    "needs_per_row",
    "phases",
    "prepare_assignments",
    "prepare_lists",
    "refuse_older",
    "resolve_schema",
    "sql_text",
    "table_name",
    "variant_default_user",
    "versions_to_drop",
]

SQL_DIR = REPO_ROOT / "sql"
DEFAULT_SCHEMA = "recs"
SCHEMA_ENV_VAR = "RECS_SERVING_SCHEMA"
VIEW_NAME = "recommendations"
#: The view of the live version's experiment assignments (user_id, experiment, variant).
ASSIGNMENTS_VIEW = "recommendation_assignments"
READER_ROLE = "cms_reader"
TABLE_PREFIX = "recommendations_v"
#: The sibling table of version N holding its assignments: ``recommendation_assignments_v<N>``.
ASSIGNMENTS_PREFIX = "recommendation_assignments_v"

#: Columns of a published list frame, as handed to :func:`~pipeline.serving.store.publish_lists`.
LIST_COLUMNS: tuple[str, ...] = (
    "user_id",
    "rank",
    "item_id",
    "score",
    "reason",
    "source",
    "generated_at",
)
#: Optional per-row columns of a published list frame: the model version that produced the row
#: (default: the publish's ``model_version``), the experiment and its variant (default null).
OPTIONAL_LIST_COLUMNS: tuple[str, ...] = ("model_version", "variant", "experiment")
#: Columns of the view (the CMS contract), in order: ``variant`` and ``experiment`` come last,
#: so queries written for the first eight keep working.
VIEW_COLUMNS: tuple[str, ...] = (
    "user_id",
    "rank",
    "item_id",
    "score",
    "reason",
    "source",
    "model_version",
    "generated_at",
    "variant",
    "experiment",
)
#: Columns of the assignments view (and of a publish's ``assignments`` frame).
ASSIGNMENT_COLUMNS: tuple[str, ...] = ("user_id", "experiment", "variant")
MAX_RANK = 32767  # smallint

#: Rows per load chunk (SQLite ``executemany``, PostgreSQL CSV rendering for COPY).
LOAD_CHUNK_ROWS = 50_000
READ_LOCK_TIMEOUT_MS = 2000
SWAP_ATTEMPTS = 5
SWAP_BACKOFF_S = 0.2
PUBLISH_LOCK_WAIT_S = 300
#: How long a run waits for another run's promotion decision (which may refit a champion).
PROMOTION_LOCK_WAIT_S = 3 * 3600
#: How long recording an experiment change waits for another one (a short transaction).
EXPERIMENT_LOCK_TIMEOUT_MS = 10_000

#: ISO-8601 UTC text with microseconds: ``generated_at`` in a prepared frame, SQLite timestamps.
ISO_UTC = "%Y-%m-%dT%H:%M:%S.%f+00:00"
TABLE_RE = re.compile(rf"^{TABLE_PREFIX}[1-9][0-9]*$")
ASSIGNMENTS_TABLE_RE = re.compile(rf"^{ASSIGNMENTS_PREFIX}[1-9][0-9]*$")
_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_ARROW_TEXT = pd.ArrowDtype(pa.string())


# =================================================================================================
# Errors and results
# =================================================================================================


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


class SchemaOutdated(ServingError):
    """The serving objects predate this code (a view without a column it reads): the next
    migration (``ensure_schema``, every publish) upgrades them."""


@dataclass(frozen=True)
class PublishResult:
    """What one publish made live."""

    version: int
    table: str
    rows: int
    users: int
    model_version: str
    #: Users with an assignment row (in a running experiment's variants); 0 without one.
    assigned: int = 0


@dataclass(frozen=True)
class LoadStats:
    """The semantic checks of one list set (:func:`frame_stats`; SQLite:
    ``validate_list_table.sql``)."""

    n_rows: int
    n_users: int
    default_rows: int
    bad_rank_users: int
    first_bad_rank_user: str | None
    dup_item_users: int
    first_dup_item_user: str | None


# =================================================================================================
# The backend interface
# =================================================================================================


class ServingBackend(Protocol):
    """One serving database, chosen once per call by :func:`pipeline.serving.store.backend_for`.

    The publish methods take the connection that :meth:`publishing` yields (the publish lock
    held); the others open their own connection. Driver errors (:attr:`driver_error`) that a
    publish step lets through are turned into :class:`ServingError` by the caller.
    """

    #: Where the lists go, for messages (host/database/schema, or the file; never a password).
    target: str
    #: The view as messages name it.
    view_label: str
    #: The driver's error class, caught around a whole publish.
    driver_error: type[Exception]

    def redact(self, text: str) -> str:
        """``text`` without secrets (the DSN's password)."""

    def qualified(self, table: str) -> str:
        """A version table as log messages name it."""

    def ensure_schema(self) -> None:
        """Create the serving objects if missing (idempotent)."""

    def promotion_lock(self, wait_s: float) -> contextlib.AbstractContextManager[None]:
        """Held while a run decides on a promotion; never blocks a publish."""

    def read_rows(self, name: str, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """The rows of the read query ``name`` (a SQL file); :class:`NothingPublishedError`
        when there is no view or catalog yet."""

    def insert_promotion(self, params: Mapping[str, Any]) -> int:
        """Append one promotion decision (creating the schema if needed); its id."""

    def replace_rows(self, table: str, key: Mapping[str, Any], rows: list[dict[str, Any]]) -> None:
        """In one transaction, delete the rows of ``table`` (``monitoring`` or ``impact``)
        that ``delete_<table>.sql`` selects with ``key`` and insert ``rows`` with
        ``insert_<table>.sql`` (creating the schema if needed)."""

    def record_experiment(
        self,
        params: Mapping[str, Any],
        decide: Callable[[tuple[Any, ...] | None, list[tuple[Any, ...]]], bool],
    ) -> tuple[int, bool]:
        """In one transaction that excludes other writers of ``experiments``: read the record
        of ``params``' (name, version) (or None) and the newest record of every experiment
        (``latest_experiments.sql``), call ``decide(existing, latest)``, which raises to refuse
        and returns False when the existing record already is this one, and insert ``params``
        when it returns True (creating the schema if needed). Returns (id, inserted)."""

    def forget_users(self, user_ids: list[str], *, dry_run: bool = False) -> dict[str, int]:
        """Delete the rows of ``user_ids`` from every table with a ``user_id`` column, in one
        transaction under the publish lock, without moving a view; rows removed (or found,
        with ``dry_run``) per table."""

    def insert_erasure(self, params: Mapping[str, Any]) -> tuple[int, bool]:
        """Append one ``erasures`` record unless its ``request_id`` is recorded already
        (creating the schema if needed); (id, inserted)."""

    def write_pseudonyms(self, pairs: pd.DataFrame) -> int:
        """Record ``pseudonym, user_id`` pairs in ``user_pseudonyms`` (kept when already
        there; creating the schema if needed); how many were new."""

    def read_pseudonyms(self) -> pd.DataFrame:
        """Every ``pseudonym, user_id`` pair (empty before the first)."""

    def publishing(self, *, lock_timeout_ms: int) -> contextlib.AbstractContextManager[Any]:
        """A connection holding the publish lock (one publisher at a time), closed on exit."""

    def migrate(self, conn: Any) -> None:
        """Run the idempotent schema migrations on ``conn``."""

    def fail_abandoned(self, conn: Any) -> None:
        """Mark versions a dead publisher left ``loading`` as ``failed``."""

    def live_logical_date(self, conn: Any) -> Any:
        """The live version's ``logical_date`` (None before the first publish)."""

    def reserve_version(
        self, conn: Any, *, rows: int, users: int, model_version: str, logical_date: datetime
    ) -> tuple[int, str]:
        """Insert and commit the catalog row (``loading``): the new version and its table."""

    def load_table(
        self,
        conn: Any,
        table: str,
        frame: pd.DataFrame,
        *,
        assignments: pd.DataFrame,
        model_version: str,
    ) -> None:
        """Create, load, check (:func:`check_loaded`) and index ``table`` and its assignments
        table (:func:`assignments_table_name`, loaded with ``assignments``, possibly empty) in
        one transaction. ``model_version`` is the version's constant (the view's default for
        rows without their own)."""

    def try_swap(
        self,
        conn: Any,
        version: int,
        table: str,
        *,
        lock_timeout_ms: int,
        model_version: str,
        generated_at: datetime,
    ) -> bool:
        """One swap attempt: point the views at ``table`` and its assignments table and mark
        ``version`` live in one transaction. False when readers kept the lock past
        ``lock_timeout_ms`` (rolled back)."""

    def swap_blocked(self, lock_timeout_ms: int) -> str:
        """What kept a swap attempt from its lock, for messages."""

    def abandon_version(self, conn: Any, version: int, table: str, *, error: str) -> None:
        """Best effort after a failed publish: drop ``table`` (and its assignments table),
        mark ``version`` failed."""

    def droppable_versions(self, conn: Any) -> list[tuple[Any, ...]]:
        """(version, table, status) of the versions whose tables still exist, newest first."""

    def drop_version(self, conn: Any, version: int, table: str, *, lock_timeout_ms: int) -> None:
        """Drop ``table`` and its assignments table and record it in the catalog (raises
        :attr:`driver_error`)."""


# =================================================================================================
# List preparation and checks
# =================================================================================================


def prepare_lists(lists: pd.DataFrame, model_version: str) -> pd.DataFrame:
    """Check the frame's shape and types and return it in view-column order, ready to load.

    The optional columns (:data:`OPTIONAL_LIST_COLUMNS`): ``model_version`` per row (nulls and
    a missing column become ``model_version``), ``variant`` and ``experiment`` (null outside an
    experiment; both null or both set in every row, one experiment per publish, one variant per
    user id, and none for ``__default__``, the list of users outside any experiment).
    Semantic checks (fallback list, contiguous ranks, unique items) run on the loaded table
    (:func:`check_loaded`), so that what goes live is what was checked.
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
        [math.inf, -math.inf]
    )
    if bad_score.any():
        raise ListValidationError(
            f"column 'score' must be a finite number or null; row {int(bad_score.idxmax())} "
            f"is {lists['score'].iloc[int(bad_score.idxmax())]!r}"
        )
    frame["score"] = score
    for column in ("reason", "source"):
        frame[column] = _text_column(lists[column], column, nullable=True)
    if "model_version" in lists.columns:
        frame["model_version"] = _text_column(
            lists["model_version"], "model_version", nullable=True
        ).fillna(model_version)
    else:
        frame["model_version"] = model_version
    frame["generated_at"] = _timestamp_column(lists["generated_at"])
    if frame["generated_at"].nunique() != 1:
        raise ListValidationError(
            f"column 'generated_at' must hold one value per publish (the run's cutoff); got "
            f"{frame['generated_at'].nunique()} distinct values"
        )
    for column in ("variant", "experiment"):
        frame[column] = (
            _text_column(lists[column], column, nullable=True)
            if column in lists.columns
            else pd.Series(pd.NA, index=frame.index, dtype=_ARROW_TEXT)
        )
    _check_variants(frame)
    return frame[list(VIEW_COLUMNS)]


def _check_variants(frame: pd.DataFrame) -> None:
    """The experiment columns of a prepared frame are coherent (see :func:`prepare_lists`)."""
    variant, experiment = frame["variant"], frame["experiment"]
    if not variant.notna().any() and not experiment.notna().any():
        return
    half = variant.isna() != experiment.isna()
    if half.any():
        row = int(half.to_numpy(dtype=bool).argmax())
        raise ListValidationError(
            f"row {row} (user {frame['user_id'].iloc[row]!r}) has only one of 'variant' and "
            "'experiment': both are set (in an experiment) or both null"
        )
    experiments = experiment.dropna().unique()
    if len(experiments) > 1:
        raise ListValidationError(f"one experiment per publish, got {sorted(experiments)}")
    mixed = frame[["user_id", "variant"]].drop_duplicates()["user_id"]
    if mixed.duplicated().any():
        raise ListValidationError(
            f"user {mixed[mixed.duplicated()].iloc[0]!r} has rows of two variants"
        )
    default = (frame["user_id"] == DEFAULT_USER).to_numpy(dtype=bool)
    if variant[default].notna().any():
        raise ListValidationError(
            f"the {DEFAULT_USER!r} list is for users outside any experiment: its variant must "
            f"be null (a variant's fallback is {variant_default_user('<variant>')!r})"
        )


def prepare_assignments(assignments: pd.DataFrame | None) -> pd.DataFrame:
    """The experiment assignments of a publish (:data:`ASSIGNMENT_COLUMNS`) as Arrow text,
    checked: no nulls, one row per user, one experiment. None gives an empty frame."""
    if assignments is None:
        return pd.DataFrame({column: pd.Series(dtype=_ARROW_TEXT) for column in ASSIGNMENT_COLUMNS})
    if not isinstance(assignments, pd.DataFrame):
        raise ListValidationError(
            f"assignments must be a pandas DataFrame, got {type(assignments).__name__}"
        )
    missing = [column for column in ASSIGNMENT_COLUMNS if column not in assignments.columns]
    if missing:
        raise ListValidationError(
            f"assignments lack the columns {missing} (need {list(ASSIGNMENT_COLUMNS)})"
        )
    frame = pd.DataFrame(
        {
            column: _text_column(assignments[column], f"assignments.{column}", nullable=False)
            for column in ASSIGNMENT_COLUMNS
        }
    )
    twice = frame["user_id"].duplicated()
    if twice.any():
        raise ListValidationError(
            f"assignments hold user {frame['user_id'][twice].iloc[0]!r} more than once"
        )
    if frame["experiment"].nunique() > 1:
        raise ListValidationError(
            f"one experiment per publish, got {sorted(frame['experiment'].unique())}"
        )
    return frame


def needs_per_row(frame: pd.DataFrame, model_version: str) -> bool:
    """Whether a prepared frame needs ``model_version``, ``variant`` and ``experiment`` stored
    per row: an experiment runs, or some row comes from another model version. Otherwise the
    view supplies the version's constant and NULLs, and PostgreSQL loads a third less text."""
    return bool(
        frame["variant"].notna().any()
        or frame["experiment"].notna().any()
        or (frame["model_version"] != model_version).any()
    )


def variant_default_user(variant: str) -> str:
    """The fallback list of a variant's users: ``__default__:<variant>``."""
    return f"{DEFAULT_USER}:{variant}"


def _text_column(values: pd.Series, column: str, *, nullable: bool) -> pd.Series:
    """Strings, Arrow-backed (the CSV renderer then reads them without a copy); rejects nulls
    where they are not allowed. Non-string values are converted with ``str``."""
    values = values.reset_index(drop=True)
    missing = values.isna()
    if not nullable and missing.any():
        raise ListValidationError(f"column {column!r} is null in row {int(missing.idxmax())}")
    if values.dtype == object and pd.api.types.infer_dtype(values, skipna=True) not in (
        "string",
        "empty",
    ):
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
            f"column 'rank' must be an integer in 1..{MAX_RANK}; row {row} is {values.iloc[row]!r}"
        )
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
            f"column 'generated_at' is null in row {int(values.isna().idxmax())}"
        )
    # Format each distinct time once (lists of one run share a handful of them).
    codes, uniques = pd.factorize(values.dt.tz_convert("UTC"))
    rendered = np.asarray(pd.DatetimeIndex(uniques).strftime(ISO_UTC), dtype=object)
    return pd.Series(rendered[codes], dtype=object)


def frame_generated_at(frame: pd.DataFrame) -> datetime:
    """The one ``generated_at`` of a prepared frame, as an aware UTC datetime."""
    return as_utc(datetime.strptime(frame["generated_at"].iloc[0], ISO_UTC))


def frame_stats(frame: pd.DataFrame) -> LoadStats:
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
    return LoadStats(
        n_rows=len(frame),
        n_users=n_users,
        default_rows=int(count[names == DEFAULT_USER].sum()),
        bad_rank_users=int(bad_rank.sum()),
        first_bad_rank_user=min(names[bad_rank]) if bad_rank.any() else None,
        dup_item_users=int(dup_items.sum()),
        first_dup_item_user=min(names[dup_items]) if dup_items.any() else None,
    )


def check_loaded(stats: LoadStats, *, expected_rows: int, table: str) -> None:
    """Raise :class:`ListValidationError` when the loaded table breaks the contract."""
    problems: list[str] = []
    if stats.n_rows != expected_rows:
        problems.append(f"loaded {stats.n_rows} rows, expected {expected_rows}")
    if stats.default_rows == 0:
        problems.append(f"no fallback list (no rows for user_id {DEFAULT_USER!r})")
    if stats.bad_rank_users:
        problems.append(
            f"{stats.bad_rank_users} user(s) have ranks that are not 1..N without gaps or "
            f"duplicates (first: {stats.first_bad_rank_user!r})"
        )
    if stats.dup_item_users:
        problems.append(
            f"{stats.dup_item_users} user(s) have the same item more than once "
            f"(first: {stats.first_dup_item_user!r})"
        )
    if problems:
        raise ListValidationError(
            f"lists for {table} failed validation: {'; '.join(problems)}; "
            "the live version is unchanged"
        )


def frame_from_rows(rows: list[tuple[Any, ...]]) -> pd.DataFrame:
    """View rows as a frame with stable dtypes on both backends."""
    frame = pd.DataFrame.from_records(rows, columns=list(VIEW_COLUMNS))
    frame["rank"] = frame["rank"].astype("int64")
    frame["score"] = frame["score"].astype("float64")
    frame["generated_at"] = pd.to_datetime(frame["generated_at"], utc=True, format="ISO8601")
    return frame


def json_safe(value: Any) -> Any:
    """Metrics as plain JSON values: numpy scalars unwrapped, non-finite floats as null."""
    if isinstance(value, Mapping):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


# =================================================================================================
# Rules shared by the backends
# =================================================================================================


def resolve_schema(schema: str | None) -> str:
    """The Postgres schema to use: argument, then ``RECS_SERVING_SCHEMA``, then ``recs``."""
    name = schema or os.environ.get(SCHEMA_ENV_VAR) or DEFAULT_SCHEMA
    if not _SCHEMA_RE.match(name):
        raise ServingError(f"invalid serving schema name {name!r} (lowercase letters, digits, _)")
    return name


def table_name(version: int) -> str:
    """The table of ``version``: ``recommendations_v<N>``."""
    name = f"{TABLE_PREFIX}{int(version)}"
    if not TABLE_RE.match(name):
        raise ServingError(f"invalid version number {version!r}")
    return name


def assignments_table_name(table: str) -> str:
    """The assignments table beside the version table ``table``:
    ``recommendation_assignments_v<N>`` for ``recommendations_v<N>``."""
    if not TABLE_RE.match(table):
        raise ServingError(f"invalid version table name {table!r}")
    return ASSIGNMENTS_PREFIX + table[len(TABLE_PREFIX) :]


def backoff_delay(attempt: int) -> float:
    """Seconds to wait after failed swap ``attempt`` (1-based): 0.2, 0.4, 0.8, ..."""
    return SWAP_BACKOFF_S * 2 ** (attempt - 1)


def refuse_older(live_logical_date: Any, logical_date: datetime) -> None:
    """Raise :class:`OlderThanLive` when the live lists are for a later logical date."""
    if live_logical_date is None:
        return
    live = as_utc(live_logical_date)
    if live > logical_date:
        raise OlderThanLive(
            f"the live lists are for logical date {live:%Y-%m-%d %H:%M}, newer than this "
            f"publish's {logical_date:%Y-%m-%d %H:%M}: they stay live (production moves "
            "forward only)"
        )


def versions_to_drop(rows: list[tuple[Any, ...]], keep_versions: int) -> list[tuple[int, str]]:
    """From (version, table, status) rows newest first: all but the newest kept live/retired."""
    kept = 0
    doomed: list[tuple[int, str]] = []
    for version, table, status in rows:
        if status == "live" or (status == "retired" and kept < keep_versions):
            kept += 1
            continue
        doomed.append((int(version), str(table)))
    return doomed


@contextlib.contextmanager
def phases(log: logging.Logger) -> Iterator[Callable[[str], None]]:
    """``phase(name)`` logs (DEBUG, on ``log``) the seconds since the previous phase ended."""
    clock = StageClock()
    yield lambda name: log.debug("phase %s %.1fs", name, clock.lap(name))


# =================================================================================================
# SQL files
# =================================================================================================


@lru_cache(maxsize=None)
def sql_text(dialect: str, name: str) -> str:
    """The text of ``sql/<dialect>/<name>``."""
    path = SQL_DIR / dialect / name
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ServingError(f"cannot read SQL file {path}: {exc}") from exc


def migration_names(dialect: str) -> list[str]:
    """Schema migrations (``NNN_*.sql``) in order."""
    return sorted(path.name for path in (SQL_DIR / dialect).glob("[0-9][0-9][0-9]_*.sql"))
