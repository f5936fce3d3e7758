"""Validation at landing: rows are checked before they enter the lake, and a run's validate
stage checks only what ingest did not."""

from __future__ import annotations

import datetime as dt
import os

import pandas as pd
import pytest

from pipeline.core.config import DEFAULT_EVENT_WEIGHTS, REPO_ROOT
from pipeline.lake import validate as validate_module
from pipeline.lake.ingest import ingest_landing, read_manifest
from pipeline.lake.snapshot import load_snapshot, write_snapshot
from pipeline.lake.validate import suite_digest, validate_events_file

UTC = dt.timezone.utc
SUITE = REPO_ROOT / "expectations" / "events.json"
ALLOWED = sorted(DEFAULT_EVENT_WEIGHTS)
NOW = dt.datetime(2024, 1, 10, tzinfo=UTC)
CUTOFF = dt.datetime(2024, 1, 9, tzinfo=UTC)
HEADER = "event_id,user_id,item_id,event_type,timestamp,value,device\n"


def _good_rows(n: int, prefix: str = "g", day: int | None = None) -> str:
    return "".join(
        f"{prefix}{k},u{k % 7},i{k % 5},view,2024-01-0{day or 1 + k % 7}T10:00:00Z,1,mobile\n"
        for k in range(n)
    )


def _ingest(landing, lake):
    return ingest_landing(
        landing,
        lake,
        ingested_at=NOW,
        settle_seconds=0.0,
        suite_path=SUITE,
        allowed_event_types=ALLOWED,
    )


def test_bad_rows_stay_out_of_the_lake_and_a_corrected_resend_gets_in(tmp_path):
    landing, lake = tmp_path / "landing", tmp_path / "lake" / "events"
    landing.mkdir()
    bad = (
        "b1,u1,i1,teleport,2024-01-07T10:00:00Z,1,mobile\n"  # event type not allowed
        "b2,u2,i2,view,2024-01-07T11:00:00Z,-5,mobile\n"
    )  # negative value
    (landing / "day1.csv").write_text(HEADER + _good_rows(98) + bad)
    report = _ingest(landing, lake)
    assert report.rows_new == 98 and report.rows_rejected == 2
    snapshot = load_snapshot(lake, CUTOFF, 30)
    assert not {"b1", "b2"} & set(snapshot["event_id"])
    quarantine = pd.read_parquet(next((tmp_path / "lake" / "quarantine").glob("day1.csv.*")))
    reasons = dict(zip(quarantine["event_id"], quarantine["reason"], strict=True))
    assert "expect_column_values_to_be_in_set(event_type)" in reasons["b1"]
    assert "expect_column_values_to_be_between(value)" in reasons["b2"]
    record = read_manifest(tmp_path / "lake")[0]
    assert record["validated"] == suite_digest(SUITE, ALLOWED)

    # The sender fixes the two rows and sends them again, same event ids: they get in
    # (they never entered the lake, so deduplication cannot swallow them).
    (landing / "day1-fixed.csv").write_text(
        HEADER + "b1,u1,i1,click,2024-01-07T10:00:00Z,1,mobile\n"
        "b2,u2,i2,view,2024-01-07T11:00:00Z,5,mobile\n"
    )
    again = _ingest(landing, lake)
    assert again.rows_new == 2 and again.rows_rejected == 0
    assert {"b1", "b2"} <= set(load_snapshot(lake, CUTOFF, 30)["event_id"])


def test_too_many_bad_rows_reject_the_file_before_anything_enters(tmp_path):
    landing, lake = tmp_path / "landing", tmp_path / "lake" / "events"
    landing.mkdir()
    bad = "".join(f"b{k},u1,i1,teleport,2024-01-02T10:00:00Z,1,mobile\n" for k in range(20))
    (landing / "day1.csv").write_text(HEADER + _good_rows(80) + bad)
    with pytest.raises(Exception, match="day1.csv") as caught:
        _ingest(landing, lake)
    assert "20 of 100 rows" in str(caught.value)
    assert not lake.exists() or not list(lake.rglob("*.parquet"))


def _snapshot(tmp_path, lake):
    path = tmp_path / "run" / "events_raw.parquet"
    write_snapshot(lake, CUTOFF, 30, path)
    return path


def test_validate_skips_rows_validated_at_ingest_and_links_the_snapshot(tmp_path, monkeypatch):
    landing, lake = tmp_path / "landing", tmp_path / "lake" / "events"
    landing.mkdir()
    (landing / "day1.csv").write_text(HEADER + _good_rows(60))
    _ingest(landing, lake)
    raw = _snapshot(tmp_path, lake)

    def no_gx(*args, **kwargs):
        raise AssertionError("nothing needed the suite again")

    monkeypatch.setattr(validate_module, "_SuiteRunner", no_gx)
    clean = tmp_path / "run" / "events.parquet"
    report = validate_events_file(
        raw,
        clean_path=clean,
        suite_path=SUITE,
        cutoff=CUTOFF,
        allowed_event_types=ALLOWED,
        quarantine_path=tmp_path / "run" / "quarantine.parquet",
        validated_sources=["day1.csv"],
    )
    assert report.passed and report.rows == 60 and report.bad_rows == 0
    assert os.path.samefile(raw, clean)  # the snapshot itself: nothing rewritten


def test_validate_checks_only_rows_from_files_not_validated_at_ingest(tmp_path):
    landing, lake = tmp_path / "landing", tmp_path / "lake" / "events"
    landing.mkdir()
    # ingested without the suite (as before landing validation existed): a negative value
    (landing / "old.csv").write_text(
        HEADER + _good_rows(50, "o") + "o-bad,u1,i1,view,2024-01-03T10:00:00Z,-1,mobile\n"
    )
    ingest_landing(landing, lake, ingested_at=NOW, settle_seconds=0.0)
    (landing / "new.csv").write_text(HEADER + _good_rows(50, "n", day=7))  # not late
    _ingest(landing, lake)
    raw = _snapshot(tmp_path, lake)
    clean = tmp_path / "run" / "events.parquet"
    quarantine = tmp_path / "run" / "quarantine.parquet"
    report = validate_events_file(
        raw,
        clean_path=clean,
        suite_path=SUITE,
        cutoff=CUTOFF,
        allowed_event_types=ALLOWED,
        quarantine_path=quarantine,
        validated_sources=["new.csv"],
    )
    assert report.rows == 101 and report.bad_rows == 1
    assert pd.read_parquet(quarantine)["event_id"].tolist() == ["o-bad"]
    assert len(pd.read_parquet(clean)) == 100
