"""Right to erasure end to end on the embedded SQLite serving DB: ``pipeline.serving.erasure``
(lake side, serving tables of every kept version, the ``erasures`` record, the retry after a
crash) and the ``forget-user`` command."""

from __future__ import annotations

import datetime as dt
import sqlite3

import pandas as pd
import pytest

from pipeline.cli import main
from pipeline.core.config import DEFAULT_USER, Settings
from pipeline.core.errors import ServingError
from pipeline.lake.ingest import ingest_landing
from pipeline.lake.snapshot import load_snapshot
from pipeline.serving import erasure
from pipeline.serving.erasure import read_erasures
from pipeline.serving.store import publish_lists, read_all, read_user_list

UTC = dt.timezone.utc
NOW = dt.datetime(2024, 1, 10, tzinfo=UTC)
FORGOTTEN = "u001"


@pytest.fixture
def settings(tmp_path, make_lists, monkeypatch):
    """A data dir with a lake (two users' events) and three published versions (the oldest
    dropped by keep_versions=2)."""
    monkeypatch.setenv("RECS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("AIRFLOW_CONN_RECS_SERVING", raising=False)
    settings = Settings()
    landing = settings.landing_events_dir
    landing.mkdir(parents=True)
    (landing / "a.csv").write_text(
        "event_id,user_id,item_id,event_type,timestamp\n"
        f"e1,{FORGOTTEN},i1,view,2024-01-01T10:00:00Z\n"
        "e2,u000,i1,view,2024-01-01T11:00:00Z\n"
    )
    ingest_landing(landing, settings.lake_events_dir, ingested_at=NOW, settle_seconds=0)
    for day in (1, 2, 3):
        publish_lists(
            make_lists(n_users=3, generated_at=pd.Timestamp(f"2024-01-0{day}", tz="UTC")),
            dsn=None,
            sqlite_path=settings.serving_sqlite_path,
            model_version=str(day),
            keep_versions=2,
            logical_date=dt.datetime(2024, 1, day, tzinfo=UTC),
        )
    return settings


def _serving_rows(settings, user: str) -> int:
    with sqlite3.connect(settings.serving_sqlite_path) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND (name GLOB "
                "'recommendations_v[0-9]*' OR name GLOB 'recommendation_assignments_v[0-9]*')"
            )
        ]
        return sum(
            conn.execute(f'SELECT count(*) FROM "{t}" WHERE user_id = ?', (user,)).fetchone()[0]
            for t in tables
        )


def test_forget_users_removes_them_everywhere_and_records_counts_only(settings):
    before = read_all(dsn=None, sqlite_path=settings.serving_sqlite_path)
    assert _serving_rows(settings, FORGOTTEN) == 6  # live and the kept retired version

    result = erasure.forget_users(
        settings, [FORGOTTEN], requested_by="dpo alice", reason="ticket GDPR-17", now=NOW
    )
    assert result["recorded"] and result["users"] == 1
    assert result["removed"]["lake_events"] == 1
    assert result["removed"]["serving_list_rows"] == 6
    assert _serving_rows(settings, FORGOTTEN) == 0
    after = read_all(dsn=None, sqlite_path=settings.serving_sqlite_path)
    pd.testing.assert_frame_equal(
        after, before[before["user_id"] != FORGOTTEN].reset_index(drop=True)
    )
    # the CMS now gets the fallback list for them, like any unknown user
    assert set(
        read_user_list(FORGOTTEN, dsn=None, sqlite_path=settings.serving_sqlite_path)["user_id"]
    ) == {DEFAULT_USER}
    events = load_snapshot(settings.lake_events_dir, NOW, 365)
    assert FORGOTTEN not in set(events["user_id"])

    records = read_erasures(dsn=None, sqlite_path=settings.serving_sqlite_path)
    assert len(records) == 1
    record = records.iloc[0]
    assert (record["requested_by"], record["reason"], record["users"]) == (
        "dpo alice",
        "ticket GDPR-17",
        1,
    )
    assert record["requested_at"] == pd.Timestamp(NOW)
    assert record["removed"] == result["removed"] and record["model_versions"] == []
    assert FORGOTTEN not in records.to_json()
    assert not list((settings.data_dir / "lake" / "_erased" / "pending").glob("*"))


def test_a_crashed_erasure_is_completed_by_its_retry_and_recorded_once(settings, monkeypatch):
    real = erasure.forget_serving_users

    def down(*args, **kwargs):
        raise ServingError("serving DB unreachable")

    monkeypatch.setattr(erasure, "forget_serving_users", down)
    with pytest.raises(ServingError):
        erasure.forget_users(settings, [FORGOTTEN], requested_by="dpo", request_id="req-1")
    assert _serving_rows(settings, FORGOTTEN) == 6  # the lake side is done, serving is not
    monkeypatch.setattr(erasure, "forget_serving_users", real)

    result = erasure.forget_users(settings, [FORGOTTEN], requested_by="dpo", request_id="req-2")
    assert result["request_id"] == "req-1"  # the interrupted request, resumed
    assert result["removed"]["lake_events"] == 1  # counted by the first attempt
    assert result["removed"]["serving_list_rows"] == 6
    records = read_erasures(dsn=None, sqlite_path=settings.serving_sqlite_path)
    assert records["request_id"].tolist() == ["req-1"]


def test_a_retried_request_is_recorded_once(settings):
    first = erasure.forget_users(settings, [FORGOTTEN], requested_by="dpo", request_id="r")
    again = erasure.forget_users(settings, [FORGOTTEN], requested_by="dpo", request_id="r")
    assert first["recorded"] and not again["recorded"]
    assert again["erasure_id"] == first["erasure_id"]
    assert len(read_erasures(dsn=None, sqlite_path=settings.serving_sqlite_path)) == 1


def test_the_cli_counts_in_a_dry_run_and_never_prints_the_ids(settings, capsys):
    assert main(["forget-user", "--user-id", FORGOTTEN, "--by", "dpo", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run" in out and "serving_list_rows" in out and FORGOTTEN not in out
    assert _serving_rows(settings, FORGOTTEN) == 6  # nothing changed
    assert read_erasures(dsn=None, sqlite_path=settings.serving_sqlite_path).empty

    ids = settings.data_dir / "ids.txt"
    ids.write_text(f"{FORGOTTEN}\n\n")
    assert main(["forget-user", "--from-file", str(ids), "--by", "dpo", "--reason", "T-1"]) == 0
    out = capsys.readouterr().out
    assert "recorded" in out and FORGOTTEN not in out
    assert _serving_rows(settings, FORGOTTEN) == 0

    assert main(["forget-user", "--user-id", "__default__", "--by", "dpo"]) == 1
    assert "fallback list" in capsys.readouterr().err
