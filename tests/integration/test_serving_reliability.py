"""What the CMS relies on, proven against real PostgreSQL: readers during publishes, a publisher
killed mid-COPY, an unreachable server, long reader transactions, the reader role after swaps,
and a view upgrade in place. Each test gets a throwaway database (``pg_dsn``)."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import psycopg2
import pytest
from psycopg2 import errors as pg_errors
from psycopg2 import sql

from pipeline.core.config import DEFAULT_USER
from pipeline.serving import postgres as serving_pg
from pipeline.serving import store as serving

pytestmark = pytest.mark.integration

UNUSED = Path("/nonexistent/serving.sqlite")
LOGICAL_DATE = dt.datetime(2024, 5, 1, tzinfo=dt.timezone.utc)
REPO = Path(__file__).resolve().parents[2]
#: The CMS lookup with the fallback in one statement (README, "Serving contract").
CMS_ONE_QUERY = (
    "SELECT user_id, rank, item_id, reason, model_version FROM recommendations "
    "WHERE user_id = CASE WHEN EXISTS (SELECT 1 FROM recommendations WHERE user_id = %(u)s) "
    "THEN %(u)s ELSE %(default)s END ORDER BY rank"
)
#: How long the tests wait for an event at most, and a blocking reader holds the view at most
#: (the server then ends its session): a swap that ignored its lock timeout would wait that long.
HOLD_LIMIT_S = 20
#: Slack over the lock timeout for one CMS query on a loaded, shared CI machine; far below
#: HOLD_LIMIT_S, so a reader stuck behind an untimed swap still blows past the bound.
READER_WAIT_SLACK_S = 1.5


def _publish(
    lists: pd.DataFrame, dsn: str, model_version: str, **kwargs: object
) -> serving.PublishResult:
    return serving.publish_lists(
        lists,
        dsn=dsn,
        sqlite_path=UNUSED,
        model_version=model_version,
        logical_date=LOGICAL_DATE,
        **kwargs,
    )


def _query(dsn: str, statement: str, params: tuple | None = None) -> list[tuple]:
    with contextlib.closing(psycopg2.connect(dsn)) as conn, conn.cursor() as cur:
        cur.execute(statement, params)
        rows = cur.fetchall()
        conn.commit()
        return rows


def _catalog(dsn: str) -> list[tuple]:
    return _query(
        dsn,
        "SELECT version, status, model_version, dropped_at IS NOT NULL "
        "FROM recs.recommendation_versions ORDER BY version",
    )


def _version_tables(dsn: str) -> set[str]:
    return {
        name
        for (name,) in _query(
            dsn,
            "SELECT tablename FROM pg_tables WHERE schemaname = 'recs' "
            "AND tablename LIKE 'recommendations_v%%'",
        )
    }


# =================================================================================================
# Readers during publishes
# =================================================================================================


class _Readers:
    """CMS-style reader threads, each on its own connection, recording any broken answer."""

    def __init__(self, dsn: str, expected: dict[str, tuple[int, int]], n_threads: int = 3):
        self.dsn, self.expected = dsn, expected  # model_version -> (users incl. default, N)
        self.problems: list[str] = []
        self.seen: set[str] = set()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(k,)) for k in range(n_threads)]

    def _run(self, index: int) -> None:
        rng = random.Random(index)
        try:
            with contextlib.closing(psycopg2.connect(self.dsn)) as conn:
                conn.autocommit = True  # like a pooled CMS: one statement, one snapshot
                with conn.cursor() as cur:
                    cur.execute("SET search_path = recs")
                    while not self.stop.is_set():
                        if index == 0:
                            self._check_whole_view(cur)
                        else:
                            user = rng.choice([f"u{rng.randrange(3000):03d}", "nobody"])
                            self._check_one_list(cur, user)
        except psycopg2.Error as exc:
            self.problems.append(f"reader {index} error: {str(exc).strip()}")

    def _check_whole_view(self, cur: psycopg2.extensions.cursor) -> None:
        cur.execute(
            "SELECT model_version, count(*), count(DISTINCT user_id), min(rank), "
            "max(rank) FROM recommendations GROUP BY model_version"
        )
        rows = cur.fetchall()
        if len(rows) != 1:
            self.problems.append(f"view mixes or lacks versions: {rows}")
            return
        version, n_rows, n_users, low, high = rows[0]
        users, ranks = self.expected[version]
        self.seen.add(version)
        if (n_rows, n_users, low, high) != (users * ranks, users, 1, ranks):
            self.problems.append(f"{version}: incomplete view {rows[0]}")

    def _check_one_list(self, cur: psycopg2.extensions.cursor, user: str) -> None:
        cur.execute(CMS_ONE_QUERY, {"u": user, "default": DEFAULT_USER})
        rows = cur.fetchall()
        versions = {row[4] for row in rows}
        if len(versions) != 1:
            self.problems.append(f"list for {user}: versions {versions}")
            return
        (version,) = versions
        self.seen.add(version)
        ranks = [row[1] for row in rows]
        if ranks != list(range(1, self.expected[version][1] + 1)):
            self.problems.append(f"list for {user} in {version}: ranks {ranks}")

    def wait_until_seen(self, version: str) -> None:
        """Until a reader has read ``version`` (or a reader found a problem)."""
        _wait_for(
            lambda: version in self.seen or self.problems,
            HOLD_LIMIT_S,
            f"a reader to see {version}",
        )

    def __enter__(self) -> _Readers:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=10)


def test_readers_see_a_complete_old_or_new_list_set_never_empty_or_mixed(
    pg_dsn: str, make_lists: Callable
) -> None:
    shapes = [(1500, 3), (1200, 5), (2000, 2), (1000, 4), (1800, 6)]
    expected = {f"m-{k}": (users + 1, ranks) for k, (users, ranks) in enumerate(shapes)}
    _publish(make_lists(*shapes[0]), pg_dsn, "m-0")

    with _Readers(pg_dsn, expected) as readers:
        for k, shape in enumerate(shapes[1:], start=1):
            readers.wait_until_seen(f"m-{k - 1}")
            _publish(make_lists(*shape), pg_dsn, f"m-{k}", keep_versions=2)
        readers.wait_until_seen("m-4")

    assert not readers.problems, readers.problems[:5]
    # The readers really straddled the swaps: they read every version as it went by.
    assert readers.seen == set(expected), readers.seen
    assert serving.live_version(dsn=pg_dsn, sqlite_path=UNUSED)["model_version"] == "m-4"


# =================================================================================================
# A publisher killed in the middle of its COPY
# =================================================================================================

_SLOW_PUBLISHER = textwrap.dedent("""
    import datetime as dt, sys, time
    import numpy as np, pandas as pd
    from pipeline.serving import postgres as serving_pg
    from pipeline.serving import store as serving

    dsn, users = sys.argv[1], int(sys.argv[2])
    render = serving_pg.render_csv
    serving_pg.render_csv = lambda chunk: (time.sleep(0.05), render(chunk))[1]  # a slow network
    serving_pg.LOAD_CHUNK_ROWS = 2000
    ids = np.array([f"k{u}" for u in range(users)] + ["__default__"], dtype=object)
    lists = pd.DataFrame({
        "user_id": np.repeat(ids, 10), "rank": np.tile(np.arange(1, 11), len(ids)),
        "item_id": [f"i{k}" for k in range(len(ids) * 10)], "score": 1.0,
        "reason": "because", "source": "als",
        "generated_at": pd.Timestamp("2024-05-01", tz="UTC")})
    print("publishing", flush=True)
    serving.publish_lists(lists, dsn=dsn, sqlite_path=None, model_version="m-killed",
                          logical_date=dt.datetime(2024, 5, 1, tzinfo=dt.timezone.utc))
    print("finished", flush=True)
""")


def _wait_for(condition: Callable[[], object], timeout_s: float, what: str) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _copy_progress(dsn: str) -> tuple[int, int] | None:
    """(backend pid, tuples copied) of the publisher's COPY in this database, if running."""
    rows = _query(
        dsn,
        "SELECT p.pid, p.tuples_processed FROM pg_stat_progress_copy p "
        "JOIN pg_stat_activity a USING (pid) "
        "WHERE p.datname = current_database() "
        "AND a.application_name = 'recs-pipeline-serving'",
    )
    return (rows[0][0], rows[0][1]) if rows and rows[0][1] > 0 else None


def test_publisher_killed_mid_copy_leaves_the_old_version_and_a_retry_cleans_up(
    pg_dsn: str, make_lists: Callable
) -> None:
    old = make_lists(n_users=20, n_ranks=3)
    _publish(old, pg_dsn, "m-1")
    before = serving.read_all(dsn=pg_dsn, sqlite_path=UNUSED)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    publisher = subprocess.Popen(
        [sys.executable, "-c", _SLOW_PUBLISHER, pg_dsn, "30000"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        backend, copied = _wait_for(lambda: _copy_progress(pg_dsn), 60, "the COPY to start")
        os.kill(publisher.pid, signal.SIGKILL)
        publisher.wait(timeout=10)
    finally:
        if publisher.poll() is None:
            publisher.kill()
    assert 0 < copied < 300_010  # killed mid-COPY, not before or after
    # The server notices the lost client, rolls the load back and ends the backend.
    _wait_for(
        lambda: not _query(pg_dsn, "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (backend,)),
        30,
        "the killed publisher's backend to end",
    )

    pd.testing.assert_frame_equal(serving.read_all(dsn=pg_dsn, sqlite_path=UNUSED), before)
    assert serving.live_version(dsn=pg_dsn, sqlite_path=UNUSED)["model_version"] == "m-1"
    assert _catalog(pg_dsn) == [(1, "live", "m-1", False), (2, "loading", "m-killed", False)]
    assert _version_tables(pg_dsn) == {"recommendations_v1"}  # CREATE TABLE rolled back too

    new = make_lists(n_users=25, n_ranks=4, item_prefix="new")
    result = _publish(new, pg_dsn, "m-retry")

    assert result.version == 3
    assert serving.live_version(dsn=pg_dsn, sqlite_path=UNUSED)["model_version"] == "m-retry"
    assert _catalog(pg_dsn) == [
        (1, "retired", "m-1", False),
        (2, "failed", "m-killed", True),
        (3, "live", "m-retry", False),
    ]
    assert _query(pg_dsn, "SELECT error FROM recs.recommendation_versions WHERE version = 2") == [
        ("abandoned by an interrupted publish",)
    ]
    assert _version_tables(pg_dsn) == {"recommendations_v1", "recommendations_v3"}


# =================================================================================================
# PostgreSQL unreachable
# =================================================================================================


def _closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_server_is_a_clear_error_and_the_retry_is_idempotent(
    pg_dsn: str, make_lists: Callable
) -> None:
    parts = urllib.parse.urlsplit(pg_dsn)
    port = _closed_port()
    down = urllib.parse.urlunsplit(parts._replace(netloc=f"postgres:s3cret@127.0.0.1:{port}"))
    database = parts.path.lstrip("/")
    lists = make_lists(n_users=10, n_ranks=4)

    with pytest.raises(serving.ServingConnectionError) as caught:
        _publish(lists, down, "m-1")
    message = str(caught.value)

    assert "host=127.0.0.1" in message and f"port={port}" in message
    assert f"dbname={database}" in message and "s3cret" not in message
    with pytest.raises(serving.ServingConnectionError, match=f"port={port}"):
        serving.ensure_schema(dsn=down, sqlite_path=UNUSED)
    # Nothing was created on the real server by the failed attempt.
    assert _query(pg_dsn, "SELECT count(*) FROM pg_namespace WHERE nspname = 'recs'") == [(0,)]

    first = _publish(lists, pg_dsn, "m-1")
    view_after_first = serving.read_all(dsn=pg_dsn, sqlite_path=UNUSED)
    second = _publish(lists, pg_dsn, "m-1")  # the retry of a retry: same rows again

    assert (first.version, second.version) == (1, 2)
    pd.testing.assert_frame_equal(
        serving.read_all(dsn=pg_dsn, sqlite_path=UNUSED), view_after_first
    )
    assert len(view_after_first) == 11 * 4
    assert _catalog(pg_dsn) == [(1, "retired", "m-1", False), (2, "live", "m-1", False)]


def test_a_server_that_never_answers_is_given_up_after_the_connect_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(serving_pg, "CONNECT_TIMEOUT_S", 1)  # (libpq < 13 makes that 2 s)
    caught: list[Exception] = []

    def read(dsn: str) -> None:
        try:
            serving.read_all(dsn=dsn, sqlite_path=UNUSED)
        except Exception as exc:  # noqa: BLE001 (checked below)
            caught.append(exc)

    # The kernel completes the TCP handshake on a listening socket; nothing ever answers.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        reader = threading.Thread(
            target=read, args=(f"postgresql://postgres@127.0.0.1:{port}/db",), daemon=True
        )
        reader.start()
        reader.join(timeout=HOLD_LIMIT_S)  # without a connect timeout: forever
        assert not reader.is_alive(), f"still connecting after {HOLD_LIMIT_S} s"

    assert len(caught) == 1 and isinstance(caught[0], serving.ServingConnectionError), caught
    assert "timeout expired" in str(caught[0]) and f"port={port}" in str(caught[0])


# =================================================================================================
# A reader holding a long transaction
# =================================================================================================


def _cms_probe(dsn: str, stop: threading.Event, latencies: list[float], errors: list[str]) -> None:
    try:
        with contextlib.closing(psycopg2.connect(dsn)) as conn, conn.cursor() as cur:
            conn.autocommit = True
            cur.execute("SET search_path = recs")
            while not stop.is_set():
                started = time.monotonic()
                cur.execute(CMS_ONE_QUERY, {"u": "u001", "default": DEFAULT_USER})
                if not cur.fetchall():
                    errors.append("empty list")
                latencies.append(time.monotonic() - started)
                time.sleep(0.005)
    except psycopg2.Error as exc:
        errors.append(str(exc).strip())


def test_a_long_reader_transaction_delays_the_cms_at_most_the_lock_timeout(
    pg_dsn: str, make_lists: Callable
) -> None:
    lock_timeout_s = 0.4
    _publish(make_lists(), pg_dsn, "m-1")
    # E.g. a report that selected from the view, still open; the server ends it after
    # HOLD_LIMIT_S, which is how long a swap without the lock timeout would wait (and succeed).
    holder = psycopg2.connect(
        pg_dsn, options=f"-c idle_in_transaction_session_timeout={HOLD_LIMIT_S * 1000}"
    )
    with holder.cursor() as cur:
        cur.execute("SELECT count(*) FROM recs.recommendations")
    stop, latencies, errors = threading.Event(), [], []
    probe = threading.Thread(target=_cms_probe, args=(pg_dsn, stop, latencies, errors), daemon=True)
    probe.start()
    try:
        _wait_for(lambda: latencies or errors, HOLD_LIMIT_S, "the CMS probe's first query")
        with pytest.raises(serving.SwapLockTimeout):
            _publish(
                make_lists(n_ranks=4),
                pg_dsn,
                "m-2",
                lock_timeout_ms=int(lock_timeout_s * 1000),
                swap_attempts=2,
            )
    finally:
        stop.set()
        probe.join(timeout=10)
        holder.close()

    assert not errors, errors[:3]
    # The CMS did queue behind the swap's lock request (else this test proves nothing) ...
    assert max(latencies) > 0.5 * lock_timeout_s
    # ... but for about the lock timeout at most, not as long as the reader held the view.
    assert max(latencies) < lock_timeout_s + READER_WAIT_SLACK_S
    assert serving.live_version(dsn=pg_dsn, sqlite_path=UNUSED)["model_version"] == "m-1"


# =================================================================================================
# The reader role after swaps
# =================================================================================================

_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")


@contextlib.contextmanager
def _cms_login(dsn: str) -> Iterator[str]:
    """A throwaway LOGIN role that is a member of cms_reader (the README's recipe)."""
    name = f"cms_app_{uuid.uuid4().hex[:8]}"
    with contextlib.closing(psycopg2.connect(dsn)) as admin:
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute(
                sql.SQL("CREATE ROLE {} LOGIN IN ROLE cms_reader").format(sql.Identifier(name))
            )
        try:
            parts = urllib.parse.urlsplit(dsn)
            yield urllib.parse.urlunsplit(
                parts._replace(
                    netloc=f"{name}@{parts.hostname}:{parts.port or 5432}",
                    query="options=-csearch_path%3Drecs",
                )
            )
        finally:
            with admin.cursor() as cur:
                cur.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                    (name,),
                )
                cur.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def test_cms_reader_can_read_only_the_view_also_after_two_swaps(
    pg_dsn: str, make_lists: Callable
) -> None:
    for k in range(1, 4):
        _publish(make_lists(n_ranks=k + 1), pg_dsn, f"m-{k}")
    serving.record_promotion(
        dsn=pg_dsn,
        sqlite_path=UNUSED,
        model_name="recommender",
        model_version="3",
        decision="promoted",
        reason="test",
    )

    granted = _query(
        pg_dsn,
        """
        SELECT n.nspname || '.' || c.relname, p.privilege
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        CROSS JOIN unnest(%s::text[]) AS p(privilege)
        WHERE n.nspname IN ('recs', 'public') AND c.relkind IN ('r', 'v', 'm', 'S', 'p', 'f')
          AND has_table_privilege('cms_reader', c.oid, p.privilege)
        ORDER BY 1, 2""",
        (list(_PRIVILEGES),),
    )
    assert granted == [
        ("recs.recommendation_assignments", "SELECT"),
        ("recs.recommendations", "SELECT"),
    ]
    assert _query(
        pg_dsn,
        "SELECT has_schema_privilege('cms_reader', 'recs', 'USAGE'), "
        "has_schema_privilege('cms_reader', 'recs', 'CREATE'), "
        "has_schema_privilege('cms_reader', 'public', 'CREATE')",
    ) == [(True, False, False)]

    with _cms_login(pg_dsn) as cms_dsn, contextlib.closing(psycopg2.connect(cms_dsn)) as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(
                "SELECT item_id, reason FROM recommendations WHERE user_id = %s ORDER BY rank",
                ("u001",),
            )
            assert len(cur.fetchall()) == 4  # the live list (m-3), through the unqualified view
            cur.execute("SELECT count(*) FROM recommendation_assignments")
            assert cur.fetchone() == (0,)  # no experiment ran: nobody is assigned
            for statement in (
                "SELECT count(*) FROM recs.recommendations_v3",
                "SELECT count(*) FROM recs.recommendation_assignments_v3",
                "SELECT count(*) FROM recs.recommendations_v1",
                "SELECT count(*) FROM recs.recommendation_versions",
                "SELECT count(*) FROM recs.model_promotions",
                "UPDATE recommendations SET reason = 'x'",
                "DELETE FROM recommendations",
                "CREATE TABLE recs.sneaky (x int)",
                "CREATE TABLE public.sneaky (x int)",
            ):
                with pytest.raises(pg_errors.InsufficientPrivilege):
                    cur.execute(statement)


# =================================================================================================
# A view created by an older table layout is replaced in the swap transaction
# =================================================================================================


def test_swap_recreates_a_view_that_cannot_be_replaced_in_place(
    pg_dsn: str, make_lists: Callable
) -> None:
    _publish(make_lists(n_ranks=2), pg_dsn, "m-1")
    # The layout before this release: all eight columns stored, default collation.
    _query(
        pg_dsn,
        """
        CREATE TABLE recs.legacy AS SELECT (user_id COLLATE "default") AS user_id, rank, item_id,
            score, reason, source, model_version, generated_at FROM recs.recommendations;
        DROP VIEW recs.recommendations;
        CREATE VIEW recs.recommendations AS SELECT * FROM recs.legacy;
        GRANT SELECT ON recs.recommendations TO cms_reader;
        SELECT 1""",
    )
    expected = {"m-1": (4, 2), "m-2": (4, 3)}

    with _Readers(pg_dsn, expected, n_threads=2) as readers:
        readers.wait_until_seen("m-1")
        _publish(make_lists(n_ranks=3), pg_dsn, "m-2")
        readers.wait_until_seen("m-2")

    assert not readers.problems, readers.problems[:5]
    assert readers.seen == {"m-1", "m-2"}
    assert _query(
        pg_dsn, "SELECT has_table_privilege('cms_reader', 'recs.recommendations', 'SELECT')"
    ) == [(True,)]
    assert _query(
        pg_dsn,
        "SELECT collation_name FROM information_schema.columns WHERE "
        "table_schema = 'recs' AND table_name = 'recommendations' AND "
        "column_name = 'user_id'",
    ) == [("C",)]
