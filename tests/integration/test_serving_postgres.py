"""Serving layer against a real PostgreSQL (a throwaway database per test, see conftest.pg_dsn)."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pandas as pd
import psycopg2
import psycopg2.sql
import pytest
from psycopg2 import errors as pg_errors

from pipeline.core.config import DEFAULT_USER
from pipeline.serving import postgres as serving_pg
from pipeline.serving import store as serving

pytestmark = pytest.mark.integration

LOGICAL_DATE = dt.datetime(2024, 5, 1, tzinfo=dt.timezone.utc)
UNUSED = Path("unused.sqlite")
CMS_QUERY = "SELECT item_id, reason FROM recommendations WHERE user_id = %s ORDER BY rank"
#: How long the tests wait for an event at most, and a blocking reader holds the view at most
#: (the server then ends its session): a swap that ignored its lock timeout would wait that long.
HOLD_LIMIT_S = 20
#: Slack over the lock timeout for one CMS query on a loaded, shared CI machine; far below
#: HOLD_LIMIT_S, so a reader stuck behind an untimed swap still blows past the bound.
READER_WAIT_SLACK_S = 1.5


def _publish(lists: pd.DataFrame, dsn: str, model_version: str, **kwargs) -> serving.PublishResult:
    return serving.publish_lists(
        lists,
        dsn=dsn,
        sqlite_path=UNUSED,
        model_version=model_version,
        logical_date=LOGICAL_DATE,
        **kwargs,
    )


def _expected_view(lists: pd.DataFrame, model_version: str) -> pd.DataFrame:
    expected = lists.assign(model_version=model_version, variant=None, experiment=None)[
        list(serving.VIEW_COLUMNS)
    ]
    expected = expected.sort_values(["user_id", "rank"]).reset_index(drop=True)
    expected["score"] = expected["score"].astype("float32").astype("float64")  # real
    expected["generated_at"] = expected["generated_at"].astype("datetime64[us, UTC]")
    return expected


@contextmanager
def _connect(dsn: str, *, autocommit: bool = True) -> Iterator[psycopg2.extensions.connection]:
    with closing(psycopg2.connect(dsn)) as conn:
        conn.autocommit = autocommit
        yield conn


def _query(dsn: str, statement: str, params: tuple = ()) -> list[tuple]:
    with _connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(statement, params)
        return cur.fetchall()


def _version_tables(dsn: str) -> set[str]:
    return {
        name
        for (name,) in _query(
            dsn,
            "SELECT tablename FROM pg_tables WHERE schemaname = 'recs' "
            "AND tablename LIKE 'recommendations\\_v%%'",
        )
    }


def _catalog(dsn: str) -> list[tuple]:
    return _query(
        dsn,
        "SELECT version, status, model_version, dropped_at IS NOT NULL "
        "FROM recs.recommendation_versions ORDER BY version",
    )


def _wait_until(condition: Callable[[], object], timeout_s: float) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout_s`` passed (False)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def swap_retries(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The swap attempts that hit the lock timeout and were retried, in order (each backs off)."""
    retried: list[int] = []
    backoff = serving.backoff_delay

    def record(attempt: int) -> float:
        retried.append(attempt)
        return backoff(attempt)

    monkeypatch.setattr(serving, "backoff_delay", record)  # the swap loop's
    return retried


def test_publish_then_read_back_exactly(pg_dsn: str, make_lists: Callable) -> None:
    lists = make_lists(n_users=4, n_ranks=5)

    result = _publish(lists, pg_dsn, "m-1")

    assert result == serving.PublishResult(
        version=1, table="recommendations_v1", rows=25, users=5, model_version="m-1"
    )
    pd.testing.assert_frame_equal(
        serving.read_all(dsn=pg_dsn, sqlite_path=UNUSED), _expected_view(lists, "m-1")
    )
    live = serving.live_version(dsn=pg_dsn, sqlite_path=UNUSED)
    assert (live["version"], live["status"], live["rows"], live["users"]) == (1, "live", 25, 5)
    assert live["logical_date"] == LOGICAL_DATE
    column_types = _query(
        pg_dsn,
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = 'recs' AND table_name = 'recommendations' "
        "ORDER BY ordinal_position",
    )
    assert column_types == [
        ("user_id", "text"),
        ("rank", "smallint"),
        ("item_id", "text"),
        ("score", "real"),
        ("reason", "text"),
        ("source", "text"),
        ("model_version", "text"),
        ("generated_at", "timestamp with time zone"),
        ("variant", "text"),
        ("experiment", "text"),
    ]


def test_read_user_list_matches_cms_query_and_falls_back(pg_dsn: str, make_lists: Callable) -> None:
    lists = make_lists(n_users=2, n_ranks=4)
    _publish(lists, pg_dsn.replace("postgresql://", "postgres://", 1), "m-1")  # both schemes

    own = serving.read_user_list("u001", dsn=pg_dsn, sqlite_path=UNUSED)
    fallback = serving.read_user_list("nobody", dsn=pg_dsn, sqlite_path=UNUSED)

    with _connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute("SET search_path = recs")
        cur.execute(CMS_QUERY, ("u001",))
        cms_rows = cur.fetchall()
    assert list(own["rank"]) == [1, 2, 3, 4]
    assert list(own["item_id"]) == [item for item, _ in cms_rows]
    assert set(fallback["user_id"]) == {DEFAULT_USER}
    assert list(fallback["item_id"]) == list(
        lists.loc[lists["user_id"] == DEFAULT_USER].sort_values("rank")["item_id"]
    )


def test_second_publish_swaps_model_version(pg_dsn: str, make_lists: Callable) -> None:
    _publish(make_lists(n_ranks=3), pg_dsn, "m-1")
    second = make_lists(n_users=5, n_ranks=2, item_prefix="new")

    result = _publish(second, pg_dsn, "m-2")

    assert result.version == 2
    pd.testing.assert_frame_equal(
        serving.read_all(dsn=pg_dsn, sqlite_path=UNUSED), _expected_view(second, "m-2")
    )
    assert [row[:3] for row in _catalog(pg_dsn)] == [(1, "retired", "m-1"), (2, "live", "m-2")]


def test_keep_versions_drops_old_tables(pg_dsn: str, make_lists: Callable) -> None:
    for number in range(1, 5):
        _publish(make_lists(), pg_dsn, f"m-{number}", keep_versions=2)

    assert _version_tables(pg_dsn) == {"recommendations_v3", "recommendations_v4"}
    assert _catalog(pg_dsn) == [
        (1, "retired", "m-1", True),
        (2, "retired", "m-2", True),
        (3, "retired", "m-3", False),
        (4, "live", "m-4", False),
    ]


def _duplicate_rank(lists: pd.DataFrame) -> pd.DataFrame:
    lists.loc[(lists["user_id"] == "u001") & (lists["rank"] == 2), "rank"] = 1
    return lists


def _no_default(lists: pd.DataFrame) -> pd.DataFrame:
    return lists.loc[lists["user_id"] != DEFAULT_USER].reset_index(drop=True)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (_no_default, "no fallback list"),
        (_duplicate_rank, "ranks that are not 1..N"),
    ],
)
def test_invalid_lists_leave_old_version_live(
    pg_dsn: str, make_lists: Callable, breakage: Callable, message: str
) -> None:
    good = make_lists()
    _publish(good, pg_dsn, "m-1")

    with pytest.raises(serving.ListValidationError, match=message):
        _publish(breakage(make_lists(item_prefix="bad")), pg_dsn, "m-bad")

    pd.testing.assert_frame_equal(
        serving.read_all(dsn=pg_dsn, sqlite_path=UNUSED), _expected_view(good, "m-1")
    )
    assert _version_tables(pg_dsn) == {"recommendations_v1"}
    assert _catalog(pg_dsn) == [(1, "live", "m-1", False), (2, "failed", "m-bad", True)]
    assert _publish(make_lists(n_ranks=2), pg_dsn, "m-2").version == 3
    assert serving.live_version(dsn=pg_dsn, sqlite_path=UNUSED)["model_version"] == "m-2"


def test_ensure_schema_is_idempotent(pg_dsn: str, make_lists: Callable) -> None:
    # The role is cluster-wide: it may exist from another database or test run already.
    _query(
        pg_dsn,
        "DO $$ BEGIN CREATE ROLE cms_reader NOLOGIN; "
        "EXCEPTION WHEN duplicate_object THEN NULL; END $$; SELECT 1",
    )
    for _ in range(3):
        serving.ensure_schema(dsn=pg_dsn, sqlite_path=UNUSED)
    _publish(make_lists(), pg_dsn, "m-1")
    serving.ensure_schema(dsn=pg_dsn, sqlite_path=UNUSED)

    assert serving.live_version(dsn=pg_dsn, sqlite_path=UNUSED)["model_version"] == "m-1"
    settings = _query(
        pg_dsn,
        "SELECT s.setconfig FROM pg_db_role_setting s "
        "JOIN pg_roles r ON r.oid = s.setrole "
        "JOIN pg_database d ON d.oid = s.setdatabase "
        "WHERE r.rolname = 'cms_reader' AND d.datname = current_database()",
    )
    assert settings == [(["search_path=recs"],)]


def test_cms_reader_reads_the_view_and_nothing_else(pg_dsn: str, make_lists: Callable) -> None:
    _publish(make_lists(), pg_dsn, "m-1")
    _publish(make_lists(n_ranks=2), pg_dsn, "m-2")
    serving.record_promotion(
        dsn=pg_dsn,
        sqlite_path=UNUSED,
        model_name="recommender",
        model_version="2",
        decision="promoted",
        reason="test",
    )

    with _connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute("SET ROLE cms_reader")
        cur.execute("SET search_path = recs")  # what ALTER ROLE ... SET gives a cms_reader login
        cur.execute(CMS_QUERY, ("u000",))
        assert len(cur.fetchall()) == 2
        cur.execute(CMS_QUERY.replace("recommendations", "recs.recommendations"), ("x",))
        assert cur.fetchall() == []
        for statement in (
            "SELECT count(*) FROM recs.recommendations_v2",
            "SELECT count(*) FROM recs.recommendations_v1",
            "SELECT count(*) FROM recs.recommendation_versions",
            "SELECT count(*) FROM recs.model_promotions",
            # (only base-table columns: the constant ones are not updatable for anyone)
            "INSERT INTO recs.recommendations (user_id, rank, item_id) VALUES ('x', 1, 'y')",
            "UPDATE recs.recommendations SET reason = 'hacked'",
            "DELETE FROM recs.recommendations",
            "CREATE TABLE recs.sneaky (x int)",
        ):
            with pytest.raises(pg_errors.InsufficientPrivilege):
                cur.execute(statement)
        cur.execute("RESET ROLE")


def test_a_repeatable_read_reader_sees_the_complete_new_list_after_a_swap(
    pg_dsn: str, make_lists: Callable
) -> None:
    """The README's claim: a REPEATABLE READ transaction whose snapshot predates a swap
    reads, after it, the new table through the view (the view's definition is catalog
    state, read fresh) and all of its rows (COPY FREEZE writes them frozen: visible to every
    snapshot), so each lookup is one complete list set, never an empty one. (A transaction
    that has already read the view holds it: the swap waits for it, see SwapLockTimeout.)"""
    _publish(make_lists(), pg_dsn, "m-1")
    before = _query(pg_dsn, "SELECT count(*) FROM recs.recommendations WHERE user_id = 'u000'")
    with _connect(pg_dsn, autocommit=False) as conn, conn.cursor() as cur:
        cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        cur.execute("SET LOCAL search_path = recs")
        cur.execute("SELECT 1")  # the snapshot is taken here, before the swap
        _publish(make_lists(n_ranks=2), pg_dsn, "m-2")  # another connection swaps
        cur.execute(
            "SELECT count(*), min(model_version), max(model_version) FROM recs.recommendations"
        )
        count, low, high = cur.fetchone()
        cur.execute(CMS_QUERY, ("u000",))
        after = cur.fetchall()
        conn.rollback()
    assert before != [(2,)] and len(after) == 2 and (low, high) == ("m-2", "m-2")
    assert count == len(make_lists(n_ranks=2))


def test_cms_reader_can_make_temp_tables_until_public_loses_temp(
    pg_dsn: str, make_lists: Callable
) -> None:
    """PUBLIC has TEMP on a new database, so cms_reader can create temporary tables; the
    README's one line for a strictly read-only reader takes it away."""
    _publish(make_lists(), pg_dsn, "m-1")
    with _connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute("SET ROLE cms_reader")
        cur.execute("CREATE TEMP TABLE scratch (x int)")
        cur.execute("DROP TABLE scratch")
        cur.execute("RESET ROLE")
        cur.execute("SELECT current_database()")
        (database,) = cur.fetchone()
        cur.execute(
            psycopg2.sql.SQL("REVOKE TEMP ON DATABASE {} FROM PUBLIC").format(
                psycopg2.sql.Identifier(database)
            )
        )
    with _connect(pg_dsn) as conn, conn.cursor() as cur:  # a new session: privileges re-read
        cur.execute("SET ROLE cms_reader")
        cur.execute("SET search_path = recs")
        with pytest.raises(pg_errors.InsufficientPrivilege):
            cur.execute("CREATE TEMP TABLE scratch (x int)")
        cur.execute(CMS_QUERY, ("u000",))  # reading still works
        assert cur.fetchall()


def test_record_promotion_stores_metrics_as_jsonb(pg_dsn: str) -> None:
    promotion_id = serving.record_promotion(
        dsn=pg_dsn,
        sqlite_path=UNUSED,
        model_name="recommender",
        model_version="7",
        decision="promoted",
        reason="ndcg@10 +4%",
        metrics={"ndcg_at_10": 0.31, "bad": float("inf")},
        triggered_by="nightly",
        decided_at=LOGICAL_DATE,
    )

    assert _query(
        pg_dsn,
        "SELECT decided_at, metrics FROM recs.model_promotions WHERE id = %s",
        (promotion_id,),
    ) == [(LOGICAL_DATE, {"ndcg_at_10": 0.31, "bad": None})]


def _check_snapshot(rows: list[tuple], expected_rows: dict[str, int]) -> str | None:
    """None when ``rows`` (user_id, rank, model_version) is one complete list set."""
    versions = {version for _, _, version in rows}
    if len(versions) != 1:
        return f"mixed or empty result: {versions}"
    (version,) = versions
    if len(rows) != expected_rows[version]:
        return f"{version}: {len(rows)} rows, expected {expected_rows[version]}"
    by_user: dict[str, list[int]] = {}
    for user, rank, _ in rows:
        by_user.setdefault(user, []).append(rank)
    bad = [user for user, ranks in by_user.items() if ranks != list(range(1, len(ranks) + 1))]
    return f"{version}: broken ranks for {bad[:3]}" if bad else None


def test_concurrent_reader_only_sees_complete_lists(pg_dsn: str, make_lists: Callable) -> None:
    shapes = [(30, 3), (20, 5), (40, 2), (25, 4), (35, 6), (15, 3)]
    expected_rows = {f"m-{i}": (users + 1) * ranks for i, (users, ranks) in enumerate(shapes)}
    _publish(make_lists(*shapes[0]), pg_dsn, "m-0")
    stop = threading.Event()
    problems: list[str] = []
    seen = {version: threading.Event() for version in expected_rows}

    def read_loop() -> None:
        try:
            with _connect(pg_dsn) as conn, conn.cursor() as cur:
                cur.execute("SET search_path = recs")
                while not stop.is_set():
                    cur.execute(
                        "SELECT user_id, rank, model_version FROM recommendations "
                        "ORDER BY user_id, rank"
                    )
                    rows = cur.fetchall()
                    cur.execute(CMS_QUERY, ("u003",))
                    personal = cur.fetchall()
                    problem = _check_snapshot(rows, expected_rows)
                    if problem:
                        problems.append(problem)
                    else:
                        seen[rows[0][2]].set()
                    if not personal:
                        problems.append("empty personal list")
        except psycopg2.Error as exc:
            problems.append(f"reader error: {exc}")
        finally:
            for event in seen.values():  # a dead reader holds up nobody
                event.set()

    reader = threading.Thread(target=read_loop, daemon=True)
    reader.start()
    try:
        for index, shape in enumerate(shapes[1:], start=1):
            # Each swap happens under a reader that has read the version it replaces.
            assert seen[f"m-{index - 1}"].wait(HOLD_LIMIT_S), problems[:5]
            _publish(make_lists(*shape), pg_dsn, f"m-{index}", keep_versions=1, lock_timeout_ms=500)
        assert seen["m-5"].wait(HOLD_LIMIT_S), problems[:5]
    finally:
        stop.set()
        reader.join(timeout=10)

    assert not problems, problems[:5]
    assert serving.live_version(dsn=pg_dsn, sqlite_path=UNUSED)["model_version"] == "m-5"
    assert _version_tables(pg_dsn) == {"recommendations_v6"}


class _CmsProbe:
    """A CMS-style reader on its own connection that records how long each query took."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.ready = threading.Event()  # first query done (or the probe failed)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            with _connect(self.dsn) as conn, conn.cursor() as cur:
                cur.execute("SET search_path = recs")
                while not self.stop.is_set():
                    started = time.monotonic()
                    cur.execute(CMS_QUERY, ("u001",))
                    if not cur.fetchall():
                        self.errors.append("empty list")
                    self.latencies.append(time.monotonic() - started)
                    self.ready.set()
                    time.sleep(0.01)
        except psycopg2.Error as exc:
            self.errors.append(str(exc))
        finally:
            self.ready.set()

    def __enter__(self) -> _CmsProbe:
        self.thread.start()
        assert self.ready.wait(HOLD_LIMIT_S), "the CMS probe never ran a query"
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def _hold_view(dsn: str) -> psycopg2.extensions.connection:
    """A reader with an open transaction that selected from the view (holds ACCESS SHARE) until
    it ends the transaction, or for HOLD_LIMIT_S at most: then the server ends its session."""
    conn = psycopg2.connect(
        dsn, options=f"-c idle_in_transaction_session_timeout={HOLD_LIMIT_S * 1000}"
    )
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM recs.recommendations")
    return conn


def test_publish_retries_until_a_long_reader_commits(
    pg_dsn: str, make_lists: Callable, swap_retries: list[int]
) -> None:
    lock_timeout_s = 0.3
    _publish(make_lists(), pg_dsn, "m-1")
    outcome: dict[str, object] = {}

    def publish() -> None:
        try:
            outcome["result"] = _publish(
                make_lists(n_ranks=4),
                pg_dsn,
                "m-2",
                lock_timeout_ms=int(lock_timeout_s * 1000),
                swap_attempts=6,
            )
        except Exception as exc:  # noqa: BLE001 (reported below)
            outcome["error"] = exc

    publisher = threading.Thread(target=publish, daemon=True)
    holder = _hold_view(pg_dsn)
    try:
        with _CmsProbe(pg_dsn) as probe:
            publisher.start()
            # The reader lets go once the swap has timed out behind it twice (a swap without
            # the lock timeout would wait, with the CMS behind it, until HOLD_LIMIT_S).
            assert _wait_until(
                lambda: len(swap_retries) >= 2 or not publisher.is_alive(), HOLD_LIMIT_S
            ), "the swap never hit its lock timeout"
            assert swap_retries[:2] == [1, 2], (swap_retries, outcome)
            assert serving.live_version(dsn=pg_dsn, sqlite_path=UNUSED)["model_version"] == "m-1"
            holder.commit()
            publisher.join(timeout=HOLD_LIMIT_S)
    finally:
        holder.close()

    assert not publisher.is_alive()
    assert "error" not in outcome, outcome
    assert outcome["result"].model_version == "m-2"
    assert serving.live_version(dsn=pg_dsn, sqlite_path=UNUSED)["model_version"] == "m-2"
    assert not probe.errors
    # The CMS did queue behind the waiting swap (else the next check proves nothing) ...
    assert max(probe.latencies) > lock_timeout_s / 2
    # ... for about the lock timeout at most, not as long as the reader held the view.
    assert max(probe.latencies) < lock_timeout_s + READER_WAIT_SLACK_S


def test_publish_fails_cleanly_when_a_reader_never_lets_go(
    pg_dsn: str, make_lists: Callable, swap_retries: list[int]
) -> None:
    lock_timeout_s = 0.2
    old = make_lists()
    _publish(old, pg_dsn, "m-1")
    holder = _hold_view(pg_dsn)  # a swap without the lock timeout would succeed after 20 s
    try:
        with _CmsProbe(pg_dsn) as probe:
            with pytest.raises(serving.SwapLockTimeout, match="lock timeout in all 3 attempts"):
                _publish(
                    make_lists(n_ranks=4),
                    pg_dsn,
                    "m-2",
                    lock_timeout_ms=int(lock_timeout_s * 1000),
                    swap_attempts=3,
                )
    finally:
        holder.close()

    assert swap_retries == [1, 2]  # three attempts, then it gave up
    assert not probe.errors
    assert max(probe.latencies) > lock_timeout_s / 2  # the CMS queued behind the swap ...
    assert max(probe.latencies) < lock_timeout_s + READER_WAIT_SLACK_S  # ... not for long
    pd.testing.assert_frame_equal(
        serving.read_all(dsn=pg_dsn, sqlite_path=UNUSED), _expected_view(old, "m-1")
    )
    assert _catalog(pg_dsn) == [(1, "live", "m-1", False), (2, "failed", "m-2", True)]
    assert _version_tables(pg_dsn) == {"recommendations_v1"}
    # Once the reader is gone a retry goes through.
    assert _publish(make_lists(n_ranks=4), pg_dsn, "m-2").version == 3
    assert serving.live_version(dsn=pg_dsn, sqlite_path=UNUSED)["model_version"] == "m-2"


def test_missing_database_is_a_clear_error(pg_dsn: str) -> None:
    dsn = pg_dsn.rsplit("/", 1)[0].replace("postgres@", "postgres:hunter2@") + "/no_such_db_x"

    with pytest.raises(serving.ServingConnectionError) as caught:
        serving.read_all(dsn=dsn, sqlite_path=UNUSED)

    assert "no_such_db_x" in str(caught.value) and "127.0.0.1" in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_reads_before_first_publish(pg_dsn: str) -> None:
    assert serving.live_version(dsn=pg_dsn, sqlite_path=UNUSED) is None
    with pytest.raises(serving.NothingPublishedError):
        serving.read_all(dsn=pg_dsn, sqlite_path=UNUSED)
    serving.ensure_schema(dsn=pg_dsn, sqlite_path=UNUSED)
    assert serving.live_version(dsn=pg_dsn, sqlite_path=UNUSED) is None
    with pytest.raises(serving.NothingPublishedError):
        serving.read_user_list("u1", dsn=pg_dsn, sqlite_path=UNUSED)


def test_large_publish_streams_in_chunks(
    pg_dsn: str, make_lists: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(serving_pg, "LOAD_CHUNK_ROWS", 1000)
    lists = make_lists(n_users=2999, n_ranks=10)

    result = _publish(lists, pg_dsn, "m-big")

    assert (result.rows, result.users) == (30000, 3000)
    assert _query(pg_dsn, "SELECT count(*), count(DISTINCT user_id) FROM recs.recommendations") == [
        (30000, 3000)
    ]


def test_concurrent_publishers_are_serialised(pg_dsn: str, make_lists: Callable) -> None:
    _publish(make_lists(), pg_dsn, "m-0")
    results: list[serving.PublishResult] = []
    errors: list[Exception] = []

    def publish(model_version: str) -> None:
        try:
            results.append(_publish(make_lists(n_users=50, n_ranks=5), pg_dsn, model_version))
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(f"m-{i}",)) for i in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert not errors, errors
    assert sorted(result.version for result in results) == [2, 3]
    last = max(results, key=lambda result: result.version)
    assert (
        serving.live_version(dsn=pg_dsn, sqlite_path=UNUSED)["model_version"] == last.model_version
    )
    assert [status for _, status, _, _ in _catalog(pg_dsn)] == ["retired", "retired", "live"]


def test_publish_cleans_up_after_a_crashed_publisher(pg_dsn: str, make_lists: Callable) -> None:
    _publish(make_lists(), pg_dsn, "m-1")
    # A publisher that died after loading its table, before the swap.
    _query(
        pg_dsn,
        "INSERT INTO recs.recommendation_versions "
        "(version, table_name, rows, users, model_version, logical_date) "
        "SELECT v, 'recommendations_v' || v, 1, 1, 'm-dead', now() FROM (SELECT "
        "nextval(pg_get_serial_sequence('recs.recommendation_versions', 'version')) "
        "::int AS v) AS next_version; "
        "CREATE TABLE recs.recommendations_v2 (x int); SELECT 1",
    )

    result = _publish(make_lists(), pg_dsn, "m-3")

    assert result.version > 2
    assert _catalog(pg_dsn)[:2] == [(1, "retired", "m-1", False), (2, "failed", "m-dead", True)]
    assert "recommendations_v2" not in _version_tables(pg_dsn)
