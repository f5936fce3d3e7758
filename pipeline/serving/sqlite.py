"""The embedded SQLite serving backend (:class:`SqliteBackend`), selected by ``dsn=None``.

The file (``Settings.serving_sqlite_path``) holds the same version tables (with their
assignments tables), catalog (``recommendation_versions``), audit table (``model_promotions``)
and views (``recommendations``, ``recommendation_assignments``) as the PostgreSQL schema,
without schema and roles; version tables store ``model_version`` and ``generated_at`` per row.
It uses WAL journal mode, so readers never wait for the publisher and an open read transaction
keeps its snapshot across a swap.

Publish steps: a ``flock`` on ``<file>.publish-lock`` serialises publishers (the promotion
decision takes ``<file>.promotion-lock``, which never blocks a publish); rows load with
``executemany`` in chunks inside one ``BEGIN IMMEDIATE`` transaction, which then runs the contract
checks (``validate_list_table.sql``) and builds the index, then loads and indexes the
assignments table; the swap is ``DROP VIEW`` + ``CREATE VIEW`` of both views plus the catalog
update inside one ``BEGIN IMMEDIATE`` transaction (SQLite DDL is transactional). A swap attempt
that finds the database locked past the timeout fails and the caller retries it with backoff.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import re
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.core.config import DEFAULT_USER
from pipeline.core.errors import ServingError
from pipeline.serving.contract import (
    ASSIGNMENT_COLUMNS,
    ASSIGNMENTS_VIEW,
    EXPERIMENT_LOCK_TIMEOUT_MS,
    ISO_UTC,
    LOAD_CHUNK_ROWS,
    PUBLISH_LOCK_WAIT_S,
    READ_LOCK_TIMEOUT_MS,
    VIEW_NAME,
    ListValidationError,
    LoadStats,
    NothingPublishedError,
    SchemaOutdated,
    ServingConnectionError,
    assignments_table_name,
    check_loaded,
    migration_names,
    sql_text,
    table_name,
)

logger = logging.getLogger(__name__)

__all__ = ["SqliteBackend"]

_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SqliteBackend:
    """The serving store in the SQLite file ``path``
    (:class:`~pipeline.serving.contract.ServingBackend`)."""

    driver_error = sqlite3.Error
    view_label = VIEW_NAME

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.target = str(self.path)

    # --------------------------------------------------------------------------- messages

    def redact(self, text: str) -> str:
        return text  # a file path holds no secret

    def qualified(self, table: str) -> str:
        return f"{table} in {self.path}"

    # --------------------------------------------------------------------------- connections

    def connect(self, *, timeout_s: float, must_exist: bool) -> sqlite3.Connection:
        """Autocommit connection (transactions are explicit) or a clear error naming the file."""
        if must_exist and not self.path.exists():
            raise NothingPublishedError(
                f"no serving database at {self.path}: nothing published yet"
            )
        try:
            if not must_exist:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            return sqlite3.connect(str(self.path), timeout=timeout_s, isolation_level=None)
        except (sqlite3.Error, OSError) as exc:
            raise ServingConnectionError(
                f"cannot open the serving SQLite database {self.path}: {exc}"
            ) from None

    def publish_lock(self) -> contextlib.AbstractContextManager[None]:
        """Exclusive ``flock`` on ``<file>.publish-lock``: one publisher per SQLite file."""
        return self._file_lock(".publish-lock", "publish", PUBLISH_LOCK_WAIT_S)

    @contextlib.contextmanager
    def _file_lock(self, suffix: str, what: str, wait_s: float) -> Iterator[None]:
        """Exclusive ``flock`` on ``<file><suffix>``, waiting at most ``wait_s`` seconds."""
        lock_path = self.path.with_name(self.path.name + suffix)
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(lock_path, "a+b")  # noqa: SIM115 (closed below)
        except OSError as exc:
            raise ServingConnectionError(
                f"cannot open the {what} lock {lock_path}: {exc}"
            ) from None
        try:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise ServingError(
                            f"another {what} held {lock_path} for over {wait_s:g} s"
                        ) from None
                    time.sleep(0.05)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        finally:
            handle.close()

    # --------------------------------------------------------------------------- schema, locks

    def migrate(self, conn: sqlite3.Connection) -> None:
        mode = _journal_mode_wal(conn)
        if str(mode).lower() != "wal":
            logger.warning("serving SQLite file is in %s journal mode, not WAL", mode)
        with _transaction(conn) as cur:
            for name in migration_names("sqlite"):
                for statement in _statements(_query(name)):
                    cur.execute(statement)
            _upgrade_view(cur)

    def ensure_schema(self) -> None:
        with contextlib.closing(self.connect(timeout_s=30, must_exist=False)) as conn:
            self.migrate(conn)

    def promotion_lock(self, wait_s: float) -> contextlib.AbstractContextManager[None]:
        """A ``flock`` on ``<file>.promotion-lock``."""
        return self._file_lock(".promotion-lock", "promotion decision", wait_s)

    # --------------------------------------------------------------------------- reads, audit

    def read_rows(self, name: str, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        with contextlib.closing(
            self.connect(timeout_s=READ_LOCK_TIMEOUT_MS / 1000, must_exist=True)
        ) as conn:
            try:
                return conn.execute(
                    _query(name, view=VIEW_NAME, assignments_view=ASSIGNMENTS_VIEW), dict(params)
                ).fetchall()
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    raise NothingPublishedError(f"nothing published yet in {self.path}") from None
                if "no such column" in str(exc):
                    raise SchemaOutdated(
                        f"{self.path} predates this code ({exc}); a migration upgrades it"
                    ) from None
                raise ServingError(f"reading {VIEW_NAME} in {self.path} failed: {exc}") from None

    def replace_rows(self, table: str, key: Mapping[str, Any], rows: list[dict[str, Any]]) -> None:
        def iso(value: Any) -> Any:
            return value.strftime(ISO_UTC) if isinstance(value, datetime) else value

        self.ensure_schema()
        with contextlib.closing(self.connect(timeout_s=30, must_exist=True)) as conn:
            with _transaction(conn) as cur:
                cur.execute(_query(f"delete_{table}.sql"), {k: iso(v) for k, v in key.items()})
                cur.executemany(
                    _query(f"insert_{table}.sql"),
                    [{k: iso(v) for k, v in row.items()} for row in rows],
                )

    def record_experiment(
        self,
        params: Mapping[str, Any],
        decide: Callable[[tuple[Any, ...] | None, list[tuple[Any, ...]]], bool],
    ) -> tuple[int, bool]:
        """``BEGIN IMMEDIATE`` excludes other writers for the read-decide-insert."""
        params = dict(params)
        if params["changed_at"] is not None:
            params["changed_at"] = params["changed_at"].strftime(ISO_UTC)
        self.ensure_schema()
        with contextlib.closing(
            self.connect(timeout_s=EXPERIMENT_LOCK_TIMEOUT_MS / 1000, must_exist=True)
        ) as conn:
            with _transaction(conn) as cur:
                key = {"name": params["name"], "version": params["version"]}
                existing = cur.execute(_query("experiment_version.sql"), key).fetchone()
                latest = cur.execute(_query("latest_experiments.sql")).fetchall()
                if not decide(existing, latest):
                    return int(existing[0]), False
                row = cur.execute(_query("insert_experiment.sql"), params).fetchone()
                if row is None:  # cannot happen under the write lock; say so if it does
                    raise ServingError(
                        f"experiment {params['name']!r} version "
                        f"{params['version']} appeared while recording it"
                    )
        return int(row[0]), True

    def insert_promotion(self, params: Mapping[str, Any]) -> int:
        params = dict(params)
        if params["decided_at"] is not None:
            params["decided_at"] = params["decided_at"].strftime(ISO_UTC)
        self.ensure_schema()
        with contextlib.closing(self.connect(timeout_s=30, must_exist=True)) as conn:
            with _transaction(conn) as cur:
                cur.execute(_query("insert_promotion.sql"), params)
                (promotion_id,) = cur.fetchone()
        return int(promotion_id)

    # --------------------------------------------------------------------------- erasure

    def forget_users(self, user_ids: list[str], *, dry_run: bool = False) -> dict[str, int]:
        """Delete the rows of ``user_ids`` from every table with a ``user_id`` column (every
        kept version's lists and assignments, live included) in one ``BEGIN IMMEDIATE``
        transaction under the publish lock; WAL readers keep reading meanwhile. With
        ``secure_delete`` the freed pages are zeroed, and a checkpoint moves them out of the
        WAL. Returns rows removed (or, with ``dry_run``, found) per table."""
        found: dict[str, int] = {}
        ids = list(user_ids)
        if not self.path.exists():
            return found
        with (
            self.publish_lock(),
            contextlib.closing(self.connect(timeout_s=30, must_exist=True)) as conn,
        ):
            self.migrate(conn)
            conn.execute("PRAGMA secure_delete = ON")
            with _transaction(conn) as cur:
                tables = [row[0] for row in cur.execute(_query("user_tables.sql")).fetchall()]
                params = {"ids": json.dumps(ids)}  # one parameter, however many ids
                for table in tables:
                    if dry_run:
                        (count,) = cur.execute(
                            _query("count_user_rows.sql", table=table), params
                        ).fetchone()
                        found[table] = int(count)
                    else:
                        cur.execute(_query("delete_user_rows.sql", table=table), params)
                        found[table] = cur.rowcount
            if not dry_run and any(found.values()):
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        return found

    def insert_erasure(self, params: Mapping[str, Any]) -> tuple[int, bool]:
        """Record one erasure (creating the schema if needed); (id, inserted)."""
        params = dict(params)
        if isinstance(params["requested_at"], datetime):
            params["requested_at"] = params["requested_at"].strftime(ISO_UTC)
        self.ensure_schema()
        with contextlib.closing(self.connect(timeout_s=30, must_exist=True)) as conn:
            with _transaction(conn) as cur:
                row = cur.execute(_query("insert_erasure.sql"), params).fetchone()
                if row is not None:
                    return int(row[0]), True
                (existing,) = cur.execute(
                    "SELECT id FROM erasures WHERE request_id = ?", (params["request_id"],)
                ).fetchone()
        return int(existing), False

    # --------------------------------------------------------------------------- pseudonyms

    def write_pseudonyms(self, pairs: pd.DataFrame) -> int:
        """Record ``pseudonym, user_id`` pairs (creating the schema if needed) in one
        transaction; pairs already recorded are kept. Returns how many were new."""
        rows = [
            {"pseudonym": p, "user_id": u}
            for p, u in zip(
                pairs["pseudonym"].astype(str), pairs["user_id"].astype(str), strict=True
            )
        ]
        self.ensure_schema()
        with contextlib.closing(self.connect(timeout_s=30, must_exist=True)) as conn:
            with _transaction(conn) as cur:
                before = conn.total_changes
                cur.executemany(_query("insert_pseudonyms.sql"), rows)
                return conn.total_changes - before

    def read_pseudonyms(self) -> pd.DataFrame:
        """Every ``pseudonym, user_id`` pair; empty before the first."""
        empty = pd.DataFrame(
            {"pseudonym": pd.Series(dtype=object), "user_id": pd.Series(dtype=object)}
        )
        if not self.path.exists():
            return empty
        with contextlib.closing(self.connect(timeout_s=30, must_exist=True)) as conn:
            try:
                rows = conn.execute(_query("read_pseudonyms.sql")).fetchall()
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    return empty
                raise
        return pd.DataFrame(rows, columns=["pseudonym", "user_id"], dtype=object) if rows else empty

    # --------------------------------------------------------------------------- publish steps

    @contextlib.contextmanager
    def publishing(self, *, lock_timeout_ms: int) -> Iterator[sqlite3.Connection]:
        with (
            self.publish_lock(),
            contextlib.closing(
                self.connect(timeout_s=lock_timeout_ms / 1000, must_exist=False)
            ) as conn,
        ):
            yield conn

    def fail_abandoned(self, conn: sqlite3.Connection) -> None:
        with _transaction(conn) as cur:
            cur.execute(
                "UPDATE recommendation_versions SET status = 'failed', "
                "error = 'abandoned by an interrupted publish' WHERE status = 'loading'"
            )
            if cur.rowcount:
                logger.warning("marked %d abandoned loading version(s) as failed", cur.rowcount)

    def live_logical_date(self, conn: sqlite3.Connection) -> Any:
        live = conn.execute(_query("live_version.sql")).fetchone()
        return live[5] if live else None

    def reserve_version(
        self,
        conn: sqlite3.Connection,
        *,
        rows: int,
        users: int,
        model_version: str,
        logical_date: datetime,
    ) -> tuple[int, str]:
        params = {
            "rows": rows,
            "users": users,
            "model_version": model_version,
            "logical_date": logical_date.strftime(ISO_UTC),
        }
        with _transaction(conn) as cur:
            cur.execute(_query("insert_version.sql"), params)
            (version,) = cur.fetchone()
            table = table_name(version)
            cur.execute(
                "UPDATE recommendation_versions SET table_name = ? WHERE version = ?",
                (table, version),
            )
        return int(version), table

    def load_table(
        self,
        conn: sqlite3.Connection,
        table: str,
        frame: pd.DataFrame,
        *,
        assignments: pd.DataFrame,
        model_version: str,
    ) -> None:
        """Create, load (``executemany`` in chunks), validate and index the list table and its
        assignments table in one transaction (model_version is stored per row here)."""
        insert = _query("insert_list_rows.sql", table=table)
        other = assignments_table_name(table)
        with _transaction(conn) as cur:
            cur.execute(_query("create_list_table.sql", table=table))
            for start in range(0, len(frame), LOAD_CHUNK_ROWS):
                chunk = frame.iloc[start : start + LOAD_CHUNK_ROWS]
                cur.executemany(insert, zip(*_chunk_columns(chunk, None)))
            cur.execute(
                _query("validate_list_table.sql", table=table), {"default_user": DEFAULT_USER}
            )
            check_loaded(LoadStats(*cur.fetchone()), expected_rows=len(frame), table=table)
            for statement in _statements(
                _query("finalize_list_table.sql", table=table, index=f"{table}_user_rank")
            ):
                cur.execute(statement)
            cur.execute(_query("create_assignments_table.sql", assignments=other))
            add = _query("insert_assignment_rows.sql", assignments=other)
            for start in range(0, len(assignments), LOAD_CHUNK_ROWS):
                chunk = assignments[list(ASSIGNMENT_COLUMNS)].iloc[start : start + LOAD_CHUNK_ROWS]
                cur.executemany(add, zip(*_chunk_columns(chunk, None)))
            try:
                for statement in _statements(
                    _query(
                        "finalize_assignments_table.sql", assignments=other, index=f"{other}_user"
                    )
                ):
                    cur.execute(statement)
            except sqlite3.IntegrityError as exc:
                raise ListValidationError(
                    f"assignments for {other}: a user is assigned twice ({exc}); the live "
                    "version is unchanged"
                ) from None

    def try_swap(
        self,
        conn: sqlite3.Connection,
        version: int,
        table: str,
        *,
        lock_timeout_ms: int,
        model_version: str,
        generated_at: datetime,
    ) -> bool:
        """One ``BEGIN IMMEDIATE`` transaction (the view stores model_version and generated_at
        per row, so they are not needed here)."""
        swap = _statements(
            _query(
                "swap_view.sql",
                view=VIEW_NAME,
                table=table,
                assignments_view=ASSIGNMENTS_VIEW,
                assignments=assignments_table_name(table),
            )
        )
        mark = _statements(_query("mark_live.sql"))
        try:
            with _transaction(conn) as cur:
                for statement in swap:
                    cur.execute(statement)
                for statement in mark:
                    cur.execute(statement, {"version": version})
            return True
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            return False

    def swap_blocked(self, lock_timeout_ms: int) -> str:
        return f"the database stayed locked past the {lock_timeout_ms} ms timeout"

    def abandon_version(
        self, conn: sqlite3.Connection, version: int, table: str, *, error: str
    ) -> None:
        try:
            with _transaction(conn) as cur:
                _drop_tables(cur, table)
                cur.execute(
                    "UPDATE recommendation_versions SET status = 'failed', error = ?, "
                    "dropped_at = strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now') "
                    "WHERE version = ? AND status <> 'live'",
                    (error[:2000], version),
                )
            logger.warning(
                "publish of version %d failed; dropped %s and marked it failed", version, table
            )
        except sqlite3.Error as exc:
            logger.warning("could not clean up failed version %d (%s): %s", version, table, exc)

    def droppable_versions(self, conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
        return conn.execute(_query("list_droppable_versions.sql")).fetchall()

    def drop_version(
        self, conn: sqlite3.Connection, version: int, table: str, *, lock_timeout_ms: int
    ) -> None:
        with _transaction(conn) as cur:
            _drop_tables(cur, table)
            cur.execute(
                "UPDATE recommendation_versions SET dropped_at = "
                "strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now') WHERE version = ?",
                (version,),
            )


def _journal_mode_wal(conn: sqlite3.Connection, wait_s: float = 30.0) -> str:
    """``PRAGMA journal_mode=WAL``; the switch of a new file needs an exclusive lock and
    reports "database is locked" at once (without the busy timeout) when another connection
    switches it at the same moment: retried for up to ``wait_s`` seconds."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            (mode,) = conn.execute("PRAGMA journal_mode=WAL").fetchone()
            return str(mode)
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _drop_tables(cur: sqlite3.Cursor, table: str) -> None:
    """Drop a version's list table and its assignments table."""
    for statement in _statements(
        _query("drop_list_table.sql", table=table, assignments=assignments_table_name(table))
    ):
        cur.execute(statement)


def _upgrade_view(cur: sqlite3.Cursor) -> None:
    """A view ``recommendations`` from before experiments (no ``variant``) gets ``variant`` and
    ``experiment`` as NULL columns after the others, over the same live table
    (``upgrade_view.sql``): the live version keeps being served, and the next swap points the
    view at a table that stores them."""
    columns = {
        name for (name,) in cur.execute("SELECT name FROM pragma_table_info(?)", (VIEW_NAME,))
    }
    if not columns or "variant" in columns:
        return
    live = cur.execute(
        "SELECT table_name FROM recommendation_versions WHERE status = 'live'"
    ).fetchone()
    if live is None:
        logger.warning(
            "view %s predates experiments but no version is live: the next publish replaces it",
            VIEW_NAME,
        )
        return
    for statement in _statements(_query("upgrade_view.sql", view=VIEW_NAME, table=live[0])):
        cur.execute(statement)
    logger.warning(
        "view %s upgraded: variant and experiment (NULL) added to the live version %s",
        VIEW_NAME,
        live[0],
    )


# =================================================================================================
# Transactions and SQL files
# =================================================================================================


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Cursor]:
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


def _chunk_columns(chunk: pd.DataFrame, null: object) -> list[list[Any]]:
    """Columns of a prepared chunk as Python lists, nulls (None/NaN) replaced by ``null``."""
    columns: list[list[Any]] = []
    for name in chunk.columns:
        values = chunk[name]
        listed = values.tolist()
        if values.isna().any():
            listed = [
                null if value is None or value is pd.NA or value != value else value
                for value in listed
            ]
        columns.append(listed)
    return columns


def _ident(name: str) -> str:
    if not _IDENT_RE.match(name):
        raise ServingError(f"invalid SQLite identifier {name!r}")
    return f'"{name}"'


def _query(name: str, **identifiers: str) -> str:
    """A SQLite SQL file; placeholders (if any are given) are filled with quoted identifiers."""
    text = sql_text("sqlite", name)
    if not identifiers:
        return text
    return text.format(**{key: _ident(value) for key, value in identifiers.items()})


def _statements(script: str) -> list[str]:
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
