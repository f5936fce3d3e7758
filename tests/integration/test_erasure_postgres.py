"""Right to erasure against a real PostgreSQL: the serving deletes (every kept version's lists
and assignments, a plain DELETE that never waits for CMS readers) and the ``erasures`` table."""

from __future__ import annotations

import datetime as dt
import threading
from contextlib import closing
from pathlib import Path

import pandas as pd
import psycopg2
import pytest

from pipeline.core.config import DEFAULT_USER
from pipeline.serving.erasure import forget_serving_users, read_erasures, record_erasure
from pipeline.serving.store import publish_lists, read_all, read_assignments

pytestmark = pytest.mark.integration

UNUSED = Path("unused.sqlite")
UTC = dt.timezone.utc
GONE = "u001"


def _publish(dsn: str, lists: pd.DataFrame, version: int) -> None:
    assignments = pd.DataFrame(
        {
            "user_id": ["u000", GONE, "u002"],
            "experiment": "ab",
            "variant": ["model", "model", "holdout"],
        }
    )
    publish_lists(
        lists,
        dsn=dsn,
        sqlite_path=UNUSED,
        model_version=str(version),
        logical_date=dt.datetime(2024, 5, version, tzinfo=UTC),
        assignments=assignments,
    )


def _rows(dsn: str, user: str) -> dict[str, int]:
    with closing(psycopg2.connect(dsn)) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'recs' AND tablename "
            "~ '^recommendation(s|_assignments)_v[0-9]+$' ORDER BY 1"
        )
        tables = [row[0] for row in cur.fetchall()]
        counts = {}
        for table in tables:
            cur.execute(f"SELECT count(*) FROM recs.{table} WHERE user_id = %s", (user,))
            counts[table] = cur.fetchone()[0]
        return counts


def test_forget_deletes_from_every_kept_version_without_waiting_for_readers(pg_dsn, make_lists):
    for version in (1, 2):
        _publish(pg_dsn, make_lists(n_users=4), version)
    before = read_all(dsn=pg_dsn, sqlite_path=UNUSED)
    assert sum(_rows(pg_dsn, GONE).values()) == 2 * 3 + 2  # lists of 2 versions + assignments

    dry = forget_serving_users([GONE], dsn=pg_dsn, sqlite_path=UNUSED, dry_run=True)
    assert (dry["serving_list_rows"], dry["serving_assignment_rows"]) == (6, 2)
    assert sum(_rows(pg_dsn, GONE).values()) == 8  # a dry run deletes nothing

    # A CMS reader in the middle of a transaction on the view: a swap would queue behind it;
    # the DELETE does not (ROW EXCLUSIVE vs ACCESS SHARE).
    with closing(psycopg2.connect(pg_dsn)) as reader:
        with reader.cursor() as cur:
            cur.execute("SELECT count(*) FROM recs.recommendations")
        done = threading.Event()
        result = {}

        def forget():
            result.update(
                forget_serving_users([GONE, "never-seen"], dsn=pg_dsn, sqlite_path=UNUSED)
            )
            done.set()

        thread = threading.Thread(target=forget)
        thread.start()
        assert done.wait(20), "the erasure waited for a reader"
        thread.join()
        with reader.cursor() as cur:  # the reader's transaction goes on
            cur.execute(
                "SELECT count(*) FROM recs.recommendations WHERE user_id = %s", (DEFAULT_USER,)
            )
            assert cur.fetchone()[0] == 3
        reader.rollback()

    assert result == {
        "serving_list_rows": 6,
        "serving_assignment_rows": 2,
        "serving_other_rows": 0,
        "serving_tables": 4,
    }
    assert set(_rows(pg_dsn, GONE).values()) == {0}
    after = read_all(dsn=pg_dsn, sqlite_path=UNUSED)
    pd.testing.assert_frame_equal(after, before[before["user_id"] != GONE].reset_index(drop=True))
    assert GONE not in set(read_assignments(dsn=pg_dsn, sqlite_path=UNUSED)["user_id"])
    again = forget_serving_users([GONE], dsn=pg_dsn, sqlite_path=UNUSED)
    assert again["serving_list_rows"] == again["serving_assignment_rows"] == 0


def test_erasures_are_recorded_once_per_request_with_counts_only(pg_dsn):
    assert read_erasures(dsn=pg_dsn, sqlite_path=UNUSED).empty  # before anything exists
    asked = dt.datetime(2024, 5, 3, 12, tzinfo=UTC)
    first = record_erasure(
        request_id="airflow:manual__1",
        requested_at=asked,
        requested_by="manual by alice",
        reason="GDPR-17",
        users=2,
        removed={"lake_events": 12, "serving_list_rows": 20},
        model_versions=["3", "4"],
        dsn=pg_dsn,
        sqlite_path=UNUSED,
    )
    again = record_erasure(
        request_id="airflow:manual__1",
        requested_at=asked,
        requested_by="manual by alice",
        reason="GDPR-17",
        users=2,
        removed={"lake_events": 0},
        model_versions=[],
        dsn=pg_dsn,
        sqlite_path=UNUSED,
    )
    assert first[1] and not again[1] and again[0] == first[0]
    records = read_erasures(dsn=pg_dsn, sqlite_path=UNUSED)
    assert len(records) == 1
    row = records.iloc[0]
    assert row["requested_at"] == pd.Timestamp(asked) and row["requested_by"] == "manual by alice"
    assert row["removed"] == {"lake_events": 12, "serving_list_rows": 20}
    assert row["model_versions"] == ["3", "4"] and row["users"] == 2
    with closing(psycopg2.connect(pg_dsn)) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = "
            "'recs' AND table_name = 'erasures'"
        )
        assert "user_id" not in {r[0] for r in cur.fetchall()}
        cur.execute("SELECT has_table_privilege('cms_reader', 'recs.erasures', 'SELECT')")
        assert cur.fetchone()[0] is False
