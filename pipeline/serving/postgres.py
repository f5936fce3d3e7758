"""The PostgreSQL serving backend (:class:`PostgresBackend`).

``dsn`` is a ``postgresql://`` (or ``postgres://``) URI or a libpq ``key=value`` string. Passwords
never appear in error messages or logs (:func:`describe_dsn`, :func:`scrub`).

Objects
-------
Everything lives in one schema, ``recs`` by default (the ``schema`` argument, then the
``RECS_SERVING_SCHEMA`` environment variable, override it):

* ``recs.recommendations_v<N>``: one table per publish; N comes from the catalog's identity
  sequence, so it only grows and is never reused. It loads :data:`PG_TABLE_COLUMNS`:
  ``generated_at`` is one value per publish, and so is ``model_version`` unless an experiment
  runs, so the view supplies them as constants (a third less to parse in the COPY); while an
  experiment runs, ``model_version``, ``variant`` and ``experiment`` are loaded per row too
  (:data:`PG_PER_ROW_COLUMNS`; the view's ``model_version`` falls back to the constant).
  ``user_id`` has the "C" collation, which makes the index build several times cheaper than a
  locale-aware sort;
* ``recs.recommendation_assignments_v<N>``: beside each version table, the experiment's
  assignments of its users (user_id, experiment, variant; empty without an experiment), loaded
  in the same transaction, swapped and dropped with it;
* ``recs.recommendation_versions``: the catalog (version, table_name, rows, users,
  model_version, logical_date, created_at, status ``loading|live|retired|failed``,
  published_at, retired_at, dropped_at, error); a unique partial index allows one live row;
* ``recs.model_promotions``: audit of promotion-gate decisions (``record_promotion``);
* ``recs.recommendations``: the view, ``SELECT <list columns>,
  coalesce(model_version, '<model_version>'), '<generated_at>'::timestamptz, variant,
  experiment FROM recs.recommendations_v<live>``;
* ``recs.recommendation_assignments``: the view of the live version's assignments.

The role ``cms_reader`` (cluster-wide, NOLOGIN, created idempotently) gets ``USAGE`` on the schema
and ``SELECT`` on the two views, nothing else: a view runs with its owner's privileges, so the
version tables, catalog and audit table stay unreadable to it. So that the CMS can name the view
unqualified, ``ensure_schema`` runs ``ALTER ROLE cms_reader IN DATABASE <db> SET search_path =
recs``; this applies to sessions that *log in* as ``cms_reader`` (an administrator gives it
``LOGIN PASSWORD ...``). A CMS login that is merely a *member* of ``cms_reader`` must set
``search_path=recs`` itself (``ALTER ROLE cms_app SET search_path = recs``, or
``options=-csearch_path=recs`` in its DSN), or query ``recs.recommendations``.

Publish steps
-------------
1. A session advisory lock for the schema (one publisher at a time; the promotion lock is
   another key), the idempotent migrations (``sql/postgres/0*.sql``).
2. The catalog row (status ``loading``) is inserted and committed: this reserves N.
3. One transaction: ``CREATE TABLE recs.recommendations_vN``; ``COPY ... FROM STDIN (FREEZE)``
   (CSV rendered by Arrow chunk by chunk from the frame, so memory stays bounded; frozen rows need
   no hint-bit writes by the first readers nor a later freeze by VACUUM); the contract checks
   run vectorised on the frame in a thread while the server parses the COPY, and the database
   confirms them: the COPY's row count, the ``__default__`` row count, and the unique index on
   (user_id, rank); ``ANALYZE``; then the assignments table the same way (COPY, unique index on
   user_id, ``ANALYZE``); commit. A failure rolls both tables back.
4. Swap, in a short transaction: ``SET LOCAL lock_timeout``; ``CREATE OR REPLACE VIEW`` for
   both views; grant ``SELECT`` on them to ``cms_reader``; catalog: new ``live``, old
   ``retired``. The view's
   ACCESS EXCLUSIVE lock waits behind readers that hold the view, and CMS readers queue behind
   that request, so ``lock_timeout`` bounds their wait; ``LockNotAvailable`` makes the attempt
   fail and the caller retry with backoff. When the view cannot be replaced in place (a column
   type or collation changed, e.g. the first publish after an upgrade), the same transaction
   drops and creates it instead.
5. Old version tables are dropped with the same lock timeout.

Readers must use READ COMMITTED (the default) or autocommit: a REPEATABLE READ transaction whose
snapshot predates a swap would see the new table without its rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import logging
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import pandas as pd
import psycopg2
import pyarrow as pa
import pyarrow.csv as pa_csv
from psycopg2 import errors as pg_errors
from psycopg2 import sql
from psycopg2.extensions import connection as PgConnection
from psycopg2.extensions import cursor as PgCursor
from psycopg2.extensions import parse_dsn

from pipeline.core.config import DEFAULT_USER
from pipeline.core.errors import ServingError
from pipeline.serving.contract import (
    ASSIGNMENTS_TABLE_RE,
    ASSIGNMENTS_VIEW,
    EXPERIMENT_LOCK_TIMEOUT_MS,
    LOAD_CHUNK_ROWS,
    PUBLISH_LOCK_WAIT_S,
    READ_LOCK_TIMEOUT_MS,
    READER_ROLE,
    TABLE_RE,
    VIEW_NAME,
    ListValidationError,
    NothingPublishedError,
    SchemaOutdated,
    ServingConnectionError,
    assignments_table_name,
    check_loaded,
    frame_stats,
    migration_names,
    needs_per_row,
    phases,
    sql_text,
    table_name,
)

logger = logging.getLogger(__name__)

__all__ = [
    "COPY_READ_BYTES",
    "CONNECT_TIMEOUT_S",
    "CsvChunkStream",
    "PG_PER_ROW_COLUMNS",
    "PG_TABLE_COLUMNS",
    "PostgresBackend",
    "connect",
    "describe_dsn",
    "normalize_dsn",
    "render_csv",
    "scrub",
]

COPY_READ_BYTES = 1 << 16
CONNECT_TIMEOUT_S = 5
#: ``maintenance_work_mem`` for the (user_id, rank) index build: an in-memory sort up to a few
#: million rows instead of a spill to disk (session-local, one index build at a time).
INDEX_BUILD_MEMORY = "256MB"

#: Columns loaded into a Postgres version table when no experiment runs; ``model_version`` and
#: ``generated_at`` are one value per version, so the view supplies them as constants instead of
#: storing them per row (``model_version``, ``variant`` and ``experiment`` stay NULL).
PG_TABLE_COLUMNS: tuple[str, ...] = ("user_id", "rank", "item_id", "score", "reason", "source")
#: Columns loaded while an experiment runs (or some row comes from another model version).
PG_PER_ROW_COLUMNS: tuple[str, ...] = PG_TABLE_COLUMNS + ("model_version", "variant", "experiment")
#: Columns of an assignments table, in COPY order.
PG_ASSIGNMENT_COLUMNS: tuple[str, ...] = ("user_id", "experiment", "variant")

#: Arrow types of a prepared list chunk as rendered for COPY (generated_at is ISO text already).
_ARROW_TYPES: dict[str, pa.DataType] = {
    "user_id": pa.string(),
    "rank": pa.int64(),
    "item_id": pa.string(),
    "score": pa.float64(),
    "reason": pa.string(),
    "source": pa.string(),
    "model_version": pa.string(),
    "generated_at": pa.string(),
    "variant": pa.string(),
    "experiment": pa.string(),
}


class PostgresBackend:
    """The serving store in schema ``schema`` of the database at ``dsn``
    (:class:`~pipeline.serving.contract.ServingBackend`)."""

    driver_error = psycopg2.Error

    def __init__(self, dsn: str, schema: str) -> None:
        self.dsn = dsn
        self.schema = schema
        self.target = f"{describe_dsn(dsn)} schema {schema}"
        self.view_label = f"{schema}.{VIEW_NAME}"
        self._recreate_view = False  # set once the view refused CREATE OR REPLACE

    # --------------------------------------------------------------------------- messages

    def redact(self, text: str) -> str:
        return scrub(text, self.dsn)

    def qualified(self, table: str) -> str:
        return f"{self.schema}.{table}"

    def _failure(self, what: str, exc: psycopg2.Error) -> ServingError:
        return ServingError(
            f"{what} on {describe_dsn(self.dsn)} failed: {self.redact(str(exc).strip())}"
        )

    # --------------------------------------------------------------------------- connections

    def connect(self, *, lock_timeout_ms: int) -> PgConnection:
        return connect(self.dsn, lock_timeout_ms=lock_timeout_ms)

    def _acquire_publish_lock(self, conn: PgConnection) -> None:
        """Session advisory lock: one publisher (or migration) per schema at a time."""
        _advisory_lock(
            conn,
            _advisory_key(self.schema),
            PUBLISH_LOCK_WAIT_S,
            f"another publish to schema {self.schema}",
        )

    # --------------------------------------------------------------------------- schema, locks

    def migrate(self, conn: PgConnection) -> None:
        with _transaction(conn) as cur:
            for name in migration_names("postgres"):
                cur.execute(_query(name, self.schema))
        _log_notices(conn)

    def ensure_schema(self) -> None:
        with contextlib.closing(self.connect(lock_timeout_ms=READ_LOCK_TIMEOUT_MS)) as conn:
            try:
                self._acquire_publish_lock(conn)
                self.migrate(conn)
            except psycopg2.Error as exc:
                raise self._failure("schema migration", exc) from None

    @contextlib.contextmanager
    def promotion_lock(self, wait_s: float) -> Iterator[None]:
        """A session advisory lock on another key than the publish lock."""
        with contextlib.closing(self.connect(lock_timeout_ms=READ_LOCK_TIMEOUT_MS)) as conn:
            try:
                _advisory_lock(
                    conn,
                    _advisory_key(f"{self.schema}/promotion"),
                    wait_s,
                    f"another run's promotion decision on schema {self.schema}",
                )
            except psycopg2.Error as exc:
                raise self._failure("promotion lock", exc) from None
            yield  # closing the session releases the lock

    # --------------------------------------------------------------------------- reads, audit

    def read_rows(self, name: str, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        with contextlib.closing(self.connect(lock_timeout_ms=READ_LOCK_TIMEOUT_MS)) as conn:
            conn.autocommit = True
            try:
                with conn.cursor() as cur:
                    cur.execute(_query(name, self.schema), dict(params) or None)
                    return cur.fetchall()
            except (pg_errors.UndefinedTable, pg_errors.InvalidSchemaName):
                raise NothingPublishedError(
                    f"nothing published yet in schema {self.schema} on {describe_dsn(self.dsn)}"
                ) from None
            except pg_errors.UndefinedColumn as exc:
                raise SchemaOutdated(
                    f"schema {self.schema} on {describe_dsn(self.dsn)} predates this code "
                    f"({str(exc).strip().splitlines()[0]}); a migration upgrades it"
                ) from None
            except psycopg2.Error as exc:
                raise self._failure(f"reading {self.view_label}", exc) from None

    def _migrating(self, conn: PgConnection, body: Callable[[Any], Any]) -> Any:
        """``body(cursor)`` in one transaction; when the schema or a table is missing (a
        database this code never wrote to, or an older schema), create it under the publish
        lock and run ``body`` once more."""
        for attempt in range(2):
            try:
                with _transaction(conn) as cur:
                    return body(cur)
            except (pg_errors.UndefinedTable, pg_errors.InvalidSchemaName):
                if attempt:
                    raise
                self._acquire_publish_lock(conn)
                self.migrate(conn)
        raise AssertionError("unreachable")  # pragma: no cover

    def replace_rows(self, table: str, key: Mapping[str, Any], rows: list[dict[str, Any]]) -> None:
        delete = _query(f"delete_{table}.sql", self.schema)
        insert = _query(f"insert_{table}.sql", self.schema)
        with contextlib.closing(self.connect(lock_timeout_ms=READ_LOCK_TIMEOUT_MS)) as conn:
            try:

                def body(cur) -> Any:
                    cur.execute(delete, dict(key))
                    cur.executemany(insert, rows)

                return self._migrating(conn, body)
            except psycopg2.Error as exc:
                raise self._failure(f"writing the {table} table", exc) from None

    def record_experiment(
        self,
        params: Mapping[str, Any],
        decide: Callable[[tuple[Any, ...] | None, list[tuple[Any, ...]]], bool],
    ) -> tuple[int, bool]:
        """``LOCK TABLE ... IN SHARE ROW EXCLUSIVE MODE`` excludes other writers (not readers)
        for the read-decide-insert transaction."""
        schema = self.schema
        key = {"name": params["name"], "version": params["version"]}
        with contextlib.closing(self.connect(lock_timeout_ms=EXPERIMENT_LOCK_TIMEOUT_MS)) as conn:
            try:

                def body(cur) -> Any:
                    cur.execute(_query("lock_experiments.sql", schema))
                    cur.execute(_query("experiment_version.sql", schema), key)
                    existing = cur.fetchone()
                    cur.execute(_query("latest_experiments.sql", schema))
                    latest = cur.fetchall()
                    if not decide(existing, latest):
                        return int(existing[0]), False
                    cur.execute(_query("insert_experiment.sql", schema), dict(params))
                    row = cur.fetchone()
                    if row is None:  # cannot happen under the table lock
                        raise ServingError(
                            f"experiment {params['name']!r} version {params['version']} "
                            "appeared while recording it"
                        )
                    return int(row[0]), True

                return self._migrating(conn, body)
            except pg_errors.LockNotAvailable:
                raise ServingError(
                    f"another writer held {schema}.experiments for over "
                    f"{EXPERIMENT_LOCK_TIMEOUT_MS} ms on {describe_dsn(self.dsn)}"
                ) from None
            except psycopg2.Error as exc:
                raise self._failure(
                    f"recording experiment {params['name']!r} version {params['version']}", exc
                ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def insert_promotion(self, params: Mapping[str, Any]) -> int:
        query = _query("insert_promotion.sql", self.schema)
        with contextlib.closing(self.connect(lock_timeout_ms=READ_LOCK_TIMEOUT_MS)) as conn:
            try:
                try:
                    with _transaction(conn) as cur:
                        cur.execute(query, dict(params))
                        (promotion_id,) = cur.fetchone()
                except (pg_errors.UndefinedTable, pg_errors.InvalidSchemaName):
                    self._acquire_publish_lock(conn)
                    self.migrate(conn)
                    with _transaction(conn) as cur:
                        cur.execute(query, dict(params))
                        (promotion_id,) = cur.fetchone()
            except psycopg2.Error as exc:
                raise self._failure(
                    f"recording the promotion of {params['model_name']} {params['model_version']}",
                    exc,
                ) from None
        return int(promotion_id)

    # --------------------------------------------------------------------------- erasure

    def forget_users(self, user_ids: list[str], *, dry_run: bool = False) -> dict[str, int]:
        """Delete the rows of ``user_ids`` from every table of the schema with a ``user_id``
        column (every kept version's lists and assignments, live included) with a plain
        ``DELETE`` in one transaction, under the publish lock (a publish in flight finishes
        first, so its table is included). CMS readers are never blocked: a ``DELETE`` takes
        ROW EXCLUSIVE, which does not conflict with their ACCESS SHARE, and no view moves.
        The tables are then vacuumed (the deleted tuples leave the data files at once rather
        than at autovacuum's leisure). Returns rows removed (or, with ``dry_run``, found) per
        table."""
        schema = self.schema
        found: dict[str, int] = {}
        with contextlib.closing(self.connect(lock_timeout_ms=READ_LOCK_TIMEOUT_MS)) as conn:
            try:
                self._acquire_publish_lock(conn)
                self.migrate(conn)
                with _transaction(conn) as cur:
                    cur.execute(_query("user_tables.sql", schema))
                    for (table,) in cur.fetchall():
                        target = sql.SQL("{}.{}").format(
                            sql.Identifier(schema), sql.Identifier(table)
                        )
                        if dry_run:
                            cur.execute(
                                sql.SQL("SELECT count(*) FROM {} WHERE user_id = ANY(%s)").format(
                                    target
                                ),
                                (list(user_ids),),
                            )
                            (found[table],) = cur.fetchone()
                        else:
                            cur.execute(
                                sql.SQL("DELETE FROM {} WHERE user_id = ANY(%s)").format(target),
                                (list(user_ids),),
                            )
                            found[table] = cur.rowcount
            except psycopg2.Error as exc:
                raise self._failure("erasing users from the serving tables", exc) from None
            conn.autocommit = True
            for table in (t for t, rows in found.items() if rows and not dry_run):
                try:
                    with conn.cursor() as cur:
                        cur.execute(
                            sql.SQL("VACUUM {}.{}").format(
                                sql.Identifier(schema), sql.Identifier(table)
                            )
                        )
                except psycopg2.Error as exc:  # autovacuum will do it
                    logger.warning(
                        "could not vacuum %s.%s after the erasure: %s",
                        schema,
                        table,
                        self.redact(str(exc).strip()),
                    )
        return found

    def insert_erasure(self, params: Mapping[str, Any]) -> tuple[int, bool]:
        """Record one erasure (creating the schema if needed); (id, inserted): a request
        already recorded is not recorded twice."""
        schema = self.schema
        with contextlib.closing(self.connect(lock_timeout_ms=READ_LOCK_TIMEOUT_MS)) as conn:
            try:

                def body(cur) -> Any:
                    cur.execute(_query("insert_erasure.sql", schema), dict(params))
                    row = cur.fetchone()
                    if row is not None:
                        return int(row[0]), True
                    cur.execute(
                        sql.SQL("SELECT id FROM {}.erasures WHERE request_id = %s").format(
                            sql.Identifier(schema)
                        ),
                        (params["request_id"],),
                    )
                    return int(cur.fetchone()[0]), False

                return self._migrating(conn, body)
            except psycopg2.Error as exc:
                raise self._failure("recording the erasure", exc) from None
        raise AssertionError("unreachable")  # pragma: no cover

    # --------------------------------------------------------------------------- pseudonyms

    def write_pseudonyms(self, pairs: pd.DataFrame, *, page_rows: int = 5_000) -> int:
        """Record ``pseudonym, user_id`` pairs (creating the schema if needed) in one
        transaction; pairs already recorded are kept. Returns how many were new."""
        from psycopg2.extras import execute_values

        rows = list(zip(pairs["pseudonym"].astype(str), pairs["user_id"].astype(str), strict=True))
        query = _query("insert_pseudonyms.sql", self.schema)
        with contextlib.closing(self.connect(lock_timeout_ms=READ_LOCK_TIMEOUT_MS)) as conn:
            try:

                def body(cur) -> Any:
                    added = 0
                    for first in range(0, len(rows), page_rows):
                        execute_values(
                            cur, query, rows[first : first + page_rows], page_size=page_rows
                        )
                        added += max(cur.rowcount, 0)
                    return added

                return self._migrating(conn, body)
            except psycopg2.Error as exc:
                raise self._failure("recording user pseudonyms", exc) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def read_pseudonyms(self) -> pd.DataFrame:
        """Every ``pseudonym, user_id`` pair (streamed with COPY); empty before the first."""
        buffer = io.BytesIO()
        with contextlib.closing(self.connect(lock_timeout_ms=READ_LOCK_TIMEOUT_MS)) as conn:
            try:
                with conn.cursor() as cur:
                    cur.copy_expert(
                        _query("read_pseudonyms.sql", self.schema).as_string(conn), buffer
                    )
            except (pg_errors.UndefinedTable, pg_errors.InvalidSchemaName):
                buffer = io.BytesIO()
            except psycopg2.Error as exc:
                raise self._failure("reading user pseudonyms", exc) from None
        buffer.seek(0)
        if not buffer.getbuffer().nbytes:
            return pd.DataFrame(
                {"pseudonym": pd.Series(dtype=object), "user_id": pd.Series(dtype=object)}
            )
        return pd.read_csv(
            buffer,
            header=None,
            names=["pseudonym", "user_id"],
            dtype=str,
            keep_default_na=False,
            na_filter=False,
        )

    # --------------------------------------------------------------------------- publish steps

    @contextlib.contextmanager
    def publishing(self, *, lock_timeout_ms: int) -> Iterator[PgConnection]:
        with contextlib.closing(self.connect(lock_timeout_ms=lock_timeout_ms)) as conn:
            self._acquire_publish_lock(conn)
            yield conn

    def fail_abandoned(self, conn: PgConnection) -> None:
        """Versions still ``loading`` while we hold the publish lock belong to a dead
        publisher."""
        with _transaction(conn) as cur:
            cur.execute(
                sql.SQL(
                    "UPDATE {}.recommendation_versions SET status = 'failed', "
                    "error = 'abandoned by an interrupted publish' WHERE status = 'loading'"
                ).format(sql.Identifier(self.schema))
            )
            if cur.rowcount:
                logger.warning(
                    "marked %d abandoned loading version(s) in %s as failed",
                    cur.rowcount,
                    self.schema,
                )

    def live_logical_date(self, conn: PgConnection) -> Any:
        with _transaction(conn) as cur:
            cur.execute(_query("live_version.sql", self.schema))
            live = cur.fetchone()
        return live[5] if live else None

    def reserve_version(
        self,
        conn: PgConnection,
        *,
        rows: int,
        users: int,
        model_version: str,
        logical_date: datetime,
    ) -> tuple[int, str]:
        params = {
            "schema": self.schema,
            "rows": rows,
            "users": users,
            "model_version": model_version,
            "logical_date": logical_date,
        }
        with _transaction(conn) as cur:
            cur.execute(_query("insert_version.sql", self.schema), params)
            version, table = cur.fetchone()
        if table != table_name(version):
            raise ServingError(f"catalog returned table {table!r} for version {version}")
        return int(version), str(table)

    def load_table(
        self,
        conn: PgConnection,
        table: str,
        frame: pd.DataFrame,
        *,
        assignments: pd.DataFrame,
        model_version: str,
    ) -> None:
        """Create, COPY, validate, index and analyze the version table and its assignments
        table in one transaction."""
        schema = self.schema
        columns = PG_PER_ROW_COLUMNS if needs_per_row(frame, model_version) else PG_TABLE_COLUMNS
        with (
            _transaction(conn) as cur,
            phases(logger) as phase,
            ThreadPoolExecutor(1, thread_name_prefix="recs-validate") as background,
        ):
            # The contract checks run on the frame in a thread while the server parses the COPY
            # (the COPY is server-bound, so they cost no wall time); the database then confirms
            # the row count, the fallback list and, through the unique index, one row per rank.
            checked = background.submit(frame_stats, frame)
            cur.execute(_query("create_list_table.sql", schema, table=table))
            cur.copy_expert(
                _query("copy_list_table.sql", schema, table=table, columns=columns),
                CsvChunkStream(frame, columns=columns),
                size=COPY_READ_BYTES,
            )
            copied = cur.rowcount
            phase("copy")
            stats = dataclasses.replace(checked.result(), n_rows=copied)
            check_loaded(stats, expected_rows=len(frame), table=table)
            phase("validate (wait)")
            try:
                cur.execute(
                    _query(
                        "index_list_table.sql",
                        schema,
                        table=table,
                        index=f"{table}_user_rank",
                        memory=INDEX_BUILD_MEMORY,
                    )
                )
            except pg_errors.UniqueViolation as exc:
                raise ListValidationError(
                    f"lists for {table} failed validation: two rows for one user and rank "
                    f"({str(exc).strip().splitlines()[-1]}); the live version is unchanged"
                ) from None
            phase("index")
            cur.execute(
                _query("count_user_rows.sql", schema, table=table), {"user_id": DEFAULT_USER}
            )
            (default_rows,) = cur.fetchone()
            if default_rows != stats.default_rows:
                raise ListValidationError(
                    f"lists for {table} failed validation: {default_rows} rows for "
                    f"{DEFAULT_USER!r} in the table, {stats.default_rows} in the frame; the live "
                    "version is unchanged"
                )
            cur.execute(_query("analyze_list_table.sql", schema, table=table))
            phase("analyze")
            self._load_assignments(cur, assignments_table_name(table), assignments)
            phase("assignments")

    def _load_assignments(self, cur: PgCursor, assignments: str, frame: pd.DataFrame) -> None:
        """Create, COPY, index and analyze a version's assignments table (inside the list
        table's transaction)."""
        schema = self.schema
        cur.execute(_query("create_assignments_table.sql", schema, assignments=assignments))
        if len(frame):
            cur.copy_expert(
                _query("copy_assignments_table.sql", schema, assignments=assignments),
                CsvChunkStream(frame, columns=PG_ASSIGNMENT_COLUMNS),
                size=COPY_READ_BYTES,
            )
            if cur.rowcount != len(frame):
                raise ListValidationError(
                    f"assignments for {assignments}: loaded {cur.rowcount} rows, expected "
                    f"{len(frame)}; the live version is unchanged"
                )
        try:
            cur.execute(
                _query(
                    "index_assignments_table.sql",
                    schema,
                    assignments=assignments,
                    index=f"{assignments}_user",
                )
            )
        except pg_errors.UniqueViolation as exc:
            raise ListValidationError(
                f"assignments for {assignments}: a user is assigned twice "
                f"({str(exc).strip().splitlines()[-1]}); the live version is unchanged"
            ) from None

    def try_swap(
        self,
        conn: PgConnection,
        version: int,
        table: str,
        *,
        lock_timeout_ms: int,
        model_version: str,
        generated_at: datetime,
    ) -> bool:
        """One attempt; when the view cannot be replaced in place (its columns' types or
        collations differ from the new table's, e.g. after an upgrade of the table DDL), it is
        dropped and created again in the same short transaction, in this attempt and the
        following ones: readers queued on the old view resolve the name again and read the new
        one."""
        constants = {"model_version": model_version, "generated_at": generated_at}
        mark = _query("mark_live.sql", self.schema)
        while True:
            statement = _query(
                "recreate_view.sql" if self._recreate_view else "swap_view.sql",
                self.schema,
                table=table,
                assignments=assignments_table_name(table),
                lock_timeout_ms=lock_timeout_ms,
                literals=constants,
            )
            try:
                with _transaction(conn) as cur:
                    cur.execute(statement)
                    cur.execute(mark, {"version": version})
                return True
            except pg_errors.InvalidTableDefinition as exc:
                if self._recreate_view:
                    raise
                logger.warning(
                    "view %s cannot be replaced in place (%s); recreating it in the "
                    "swap transaction",
                    self.view_label,
                    str(exc).strip(),
                )
                self._recreate_view = True
            except pg_errors.LockNotAvailable:
                return False

    def swap_blocked(self, lock_timeout_ms: int) -> str:
        return f"readers held the view past the {lock_timeout_ms} ms lock timeout"

    def abandon_version(self, conn: PgConnection, version: int, table: str, *, error: str) -> None:
        schema = self.schema
        try:
            if not conn.closed:
                conn.rollback()
            with _transaction(conn) as cur:
                cur.execute(_drop_tables(schema, table))
                cur.execute(
                    sql.SQL(
                        "UPDATE {}.recommendation_versions SET status = 'failed', "
                        "error = %s, dropped_at = now() WHERE version = %s AND "
                        "status <> 'live'"
                    ).format(sql.Identifier(schema)),
                    (error[:2000], version),
                )
            logger.warning(
                "publish of version %d failed; dropped %s.%s and marked it failed",
                version,
                schema,
                table,
            )
        except psycopg2.Error as exc:
            logger.warning(
                "could not clean up failed version %d (%s.%s): %s",
                version,
                schema,
                table,
                self.redact(str(exc).strip()),
            )

    def droppable_versions(self, conn: PgConnection) -> list[tuple[Any, ...]]:
        with _transaction(conn) as cur:
            cur.execute(_query("list_droppable_versions.sql", self.schema))
            return cur.fetchall()

    def drop_version(
        self, conn: PgConnection, version: int, table: str, *, lock_timeout_ms: int
    ) -> None:
        with _transaction(conn) as cur:
            cur.execute(
                "SELECT set_config('lock_timeout', %s, true)", (f"{int(lock_timeout_ms)}ms",)
            )
            cur.execute(_drop_tables(self.schema, table))
            cur.execute(
                sql.SQL(
                    "UPDATE {}.recommendation_versions SET dropped_at = now() WHERE version = %s"
                ).format(sql.Identifier(self.schema)),
                (version,),
            )


def _drop_tables(schema: str, table: str) -> sql.Composed:
    """``DROP TABLE IF EXISTS`` of a version's list table and its assignments table."""
    return sql.SQL("DROP TABLE IF EXISTS {}.{}, {}.{}").format(
        sql.Identifier(schema),
        sql.Identifier(table),
        sql.Identifier(schema),
        sql.Identifier(assignments_table_name(table)),
    )


# =================================================================================================
# Sessions, transactions, locks
# =================================================================================================


def connect(dsn: str, *, lock_timeout_ms: int) -> PgConnection:
    """Open a connection (UTC session, ``lock_timeout`` set) or raise
    :class:`ServingConnectionError` naming host and database."""
    normalized = normalize_dsn(dsn)
    try:
        conn = psycopg2.connect(
            normalized, connect_timeout=CONNECT_TIMEOUT_S, application_name="recs-pipeline-serving"
        )
    except psycopg2.Error as exc:
        raise ServingConnectionError(
            f"cannot connect to the serving database ({describe_dsn(dsn)}): "
            f"{scrub(str(exc).strip(), dsn)}"
        ) from None
    try:
        with conn.cursor() as cur:
            cur.execute("SET TIME ZONE 'UTC'")
            cur.execute("SET client_min_messages = warning")  # no "already exists, skipping"
            cur.execute(
                "SELECT set_config('lock_timeout', %s, false)", (f"{int(lock_timeout_ms)}ms",)
            )
        conn.commit()
    except psycopg2.Error as exc:
        conn.close()
        raise ServingConnectionError(
            f"cannot set up the session on the serving database ({describe_dsn(dsn)}): "
            f"{scrub(str(exc).strip(), dsn)}"
        ) from None
    return conn


@contextlib.contextmanager
def _transaction(conn: PgConnection) -> Iterator[PgCursor]:
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


def _log_notices(conn: PgConnection) -> None:
    for notice in conn.notices:
        logger.warning("serving DB: %s", notice.strip())
    del conn.notices[:]


def _advisory_key(schema: str) -> int:
    digest = hashlib.blake2b(f"pipeline.serving:{schema}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _advisory_lock(conn: PgConnection, key: int, wait_s: float, holder: str) -> None:
    """Take the session advisory lock ``key``, waiting at most ``wait_s`` seconds."""
    try:
        with _transaction(conn) as cur:
            cur.execute("SELECT set_config('lock_timeout', %s, true)", (f"{int(wait_s * 1000)}ms",))
            cur.execute("SELECT pg_advisory_lock(%s)", (key,))
    except pg_errors.LockNotAvailable:
        raise ServingError(f"{holder} held the lock for over {wait_s:g} s") from None


# =================================================================================================
# DSNs (no password in any message)
# =================================================================================================


def normalize_dsn(dsn: str) -> str:
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
            "dsn=None for the embedded SQLite file)"
        )
    parts = urllib.parse.urlsplit(f"postgresql://{rest}")
    pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    if any(key == "__extra__" for key, _ in pairs):
        query = urllib.parse.urlencode(
            [(key, value) for key, value in pairs if key != "__extra__"],
            quote_via=urllib.parse.quote,
        )
        parts = parts._replace(query=query)
    return urllib.parse.urlunsplit(parts)


def describe_dsn(dsn: str) -> str:
    """``host=... port=... dbname=... user=...`` for messages; never the password."""
    fields: dict[str, str] = {}
    try:
        fields = parse_dsn(normalize_dsn(dsn))
    except (psycopg2.Error, ServingError):
        try:
            parts = urllib.parse.urlsplit(dsn.strip())
            fields = {
                "host": parts.hostname or "",
                "dbname": parts.path.lstrip("/"),
                "user": parts.username or "",
            }
        except ValueError:
            return "an unparseable serving DSN"
    shown = [
        f"{key}={fields[key]}" for key in ("host", "port", "dbname", "user") if fields.get(key)
    ]
    return "postgres " + (" ".join(shown) if shown else "(libpq defaults)")


def scrub(message: str, dsn: str) -> str:
    """Remove the DSN's password (raw and URL-decoded) from a message."""
    secrets: set[str] = set()
    with contextlib.suppress(Exception):
        secrets.add(parse_dsn(normalize_dsn(dsn)).get("password") or "")
    with contextlib.suppress(Exception):
        raw = urllib.parse.urlsplit(dsn.strip()).password or ""
        secrets.update({raw, urllib.parse.unquote(raw)})
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        message = message.replace(secret, "***")
    return message


# =================================================================================================
# SQL files and COPY data
# =================================================================================================


def _query(
    name: str,
    schema: str,
    *,
    table: str | None = None,
    index: str | None = None,
    lock_timeout_ms: int | None = None,
    memory: str | None = None,
    literals: Mapping[str, Any] | None = None,
    assignments: str | None = None,
    columns: tuple[str, ...] | None = None,
) -> sql.Composed:
    """A Postgres SQL file with its placeholders filled as identifiers or literals (values in
    ``literals`` become :class:`psycopg2.sql.Literal`; DDL cannot take bind parameters)."""
    parts: dict[str, sql.Composable] = {
        "schema": sql.Identifier(schema),
        "schema_lit": sql.Literal(schema),
        "view": sql.Identifier(VIEW_NAME),
        "view_lit": sql.Literal(VIEW_NAME),
        "assignments_view": sql.Identifier(ASSIGNMENTS_VIEW),
        "assignments_view_lit": sql.Literal(ASSIGNMENTS_VIEW),
        "reader_role": sql.Identifier(READER_ROLE),
        "reader_role_lit": sql.Literal(READER_ROLE),
    }
    if table is not None:
        if not TABLE_RE.match(table):
            raise ServingError(f"invalid version table name {table!r}")
        parts["table"] = sql.Identifier(table)
    if assignments is not None:
        if not ASSIGNMENTS_TABLE_RE.match(assignments):
            raise ServingError(f"invalid assignments table name {assignments!r}")
        parts["assignments"] = sql.Identifier(assignments)
    if columns is not None:
        parts["columns"] = sql.SQL(", ").join(sql.Identifier(column) for column in columns)
    if index is not None:
        parts["index"] = sql.Identifier(index)
    if lock_timeout_ms is not None:
        parts["lock_timeout"] = sql.Literal(f"{int(lock_timeout_ms)}ms")
    if memory is not None:
        parts["memory"] = sql.Literal(memory)
    for key, value in (literals or {}).items():
        parts[key] = sql.Literal(value)
    return sql.SQL(sql_text("postgres", name)).format(**parts)


def render_csv(chunk: pd.DataFrame) -> bytes:
    """One chunk as CSV for ``COPY ... (FORMAT csv)``, rendered by Arrow's C++ writer.

    Arrow quotes every string and leaves nulls unquoted-empty, which is exactly COPY's CSV
    convention: ``""`` is an empty string, an empty field is NULL (NaN scores become NULL).
    """
    schema = pa.schema([(name, _ARROW_TYPES[name]) for name in chunk.columns])
    table = pa.Table.from_pandas(chunk, schema=schema, preserve_index=False, nthreads=1)
    sink = pa.BufferOutputStream()
    pa_csv.write_csv(table, sink, pa_csv.WriteOptions(include_header=False))
    return sink.getvalue().to_pybytes()


class CsvChunkStream:
    """File-like ``read()`` over CSV rendered one chunk of rows at a time (bounded memory)."""

    def __init__(
        self,
        frame: pd.DataFrame,
        chunk_rows: int | None = None,
        columns: tuple[str, ...] | None = None,
    ) -> None:
        chunk_rows = chunk_rows or LOAD_CHUNK_ROWS
        if columns is not None:
            frame = frame[list(columns)]
        self._chunks = (
            frame.iloc[start : start + chunk_rows] for start in range(0, len(frame), chunk_rows)
        )
        self._current = io.BytesIO()

    def read(self, size: int = -1) -> bytes:
        while True:
            data = self._current.read(size)
            if data:
                return data
            chunk = next(self._chunks, None)
            if chunk is None:
                return b""
            self._current = io.BytesIO(render_csv(chunk))
