"""Validation history: one file-backed GX project under the data dir, a Checkpoint's actions per
validation (one per landing file, one per run's ``validate``), one Data Docs site across runs,
and the validation log the monitor reads."""

from __future__ import annotations

import datetime as dt
import json
import logging
import multiprocessing
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import DEFAULT_EVENT_WEIGHTS, REPO_ROOT
from pipeline.lake.ingest import ingest_landing
from pipeline.lake.validate import (
    LandingValidator,
    data_docs_dir,
    read_validation_log,
    validate_events,
    validate_events_file,
)
from pipeline.monitoring.health import validation_health

SUITE = REPO_ROOT / "expectations" / "events.json"
ALLOWED = sorted(DEFAULT_EVENT_WEIGHTS)
CUTOFF = dt.datetime(2024, 6, 1, tzinfo=dt.timezone.utc)
SECRET_USER = "user-7f3a-secret"


def make_events(n: int = 40, source: str = "day1.csv") -> pd.DataFrame:
    types = ["view", "click", "like", "purchase"]
    return pd.DataFrame(
        {
            "event_id": pd.array([f"{source}-e{i:04d}" for i in range(n)], dtype="string"),
            "user_id": pd.array([f"u{i % 7}" for i in range(n)], dtype="string"),
            "item_id": pd.array([f"i{i % 11}" for i in range(n)], dtype="string"),
            "event_type": pd.array([types[i % 4] for i in range(n)], dtype="string"),
            "timestamp": pd.Series(
                pd.date_range("2024-05-01", periods=n, freq="h", tz="UTC")
            ).astype("datetime64[us, UTC]"),
            "value": np.arange(n, dtype="float64"),
            "device": pd.array(["mobile"] * n, dtype="string"),
            "session_id": pd.array([f"s{i // 5}" for i in range(n)], dtype="string"),
            "source_file": pd.array([source] * n, dtype="string"),
            "source_row": np.arange(1, n + 1, dtype="int64"),
        }
    )


def with_bad_rows(events: pd.DataFrame) -> pd.DataFrame:
    """Two bad rows: an unknown event type of SECRET_USER, a negative value."""
    events = events.copy()
    events.loc[1, ["user_id", "event_type"]] = [SECRET_USER, "teleport"]
    events.loc[2, "value"] = -5.0
    return events


def run(events: pd.DataFrame, data_dir: Path, cutoff: dt.datetime = CUTOFF):
    return validate_events(
        events,
        suite_path=SUITE,
        cutoff=cutoff,
        allowed_event_types=ALLOWED,
        max_bad_row_share=0.1,
        quarantine_path=data_dir / "runs" / f"{cutoff:%Y%m%d}" / "quarantine.parquet",
        data_docs_dir=data_docs_dir(data_dir),
    )


def pages(data_dir: Path) -> list[Path]:
    return sorted((data_docs_dir(data_dir) / "validations").rglob("*.html"))


def test_two_runs_share_one_site_whose_index_lists_both(tmp_path):
    _, first = run(with_bad_rows(make_events()), tmp_path, CUTOFF)
    _, second = run(make_events(), tmp_path, CUTOFF + dt.timedelta(days=1))

    index = data_docs_dir(tmp_path) / "index.html"
    assert first.data_docs_path == second.data_docs_path == index.resolve()
    html = index.read_text()
    assert "validate-cutoff-2024-06-01T000000Z" in html
    assert "validate-cutoff-2024-06-02T000000Z" in html
    assert len(pages(tmp_path)) == 2
    # the project: great_expectations.yml, the suite, a Checkpoint with both actions
    project = tmp_path / "gx"
    assert (project / "great_expectations.yml").is_file()
    checkpoint = json.loads((project / "checkpoints" / "events.json").read_text())
    assert [a["type"] for a in checkpoint["actions"]] == [
        "update_data_docs",
        "recs_validation_log",
    ]
    suite = json.loads((project / "expectations" / "events.json").read_text())
    in_set = [
        e
        for e in suite["expectations"]
        if e["type"] == "expect_column_values_to_be_in_set"
        and e["kwargs"]["column"] == "event_type"
    ]
    assert sorted(in_set[0]["kwargs"]["value_set"]) == ALLOWED  # the override applies


def test_the_validation_log_has_one_line_per_run_with_its_counts(tmp_path):
    run(with_bad_rows(make_events()), tmp_path, CUTOFF)
    run(make_events(), tmp_path, CUTOFF + dt.timedelta(days=1))

    first, second = read_validation_log(tmp_path)
    assert first["kind"] == "validate" and first["source"] == CUTOFF.isoformat()
    assert first["rows"] == 40 and first["rows_rejected"] == 2 and first["success"] is False
    assert first["unexpected"]["expect_column_values_to_be_in_set(event_type)"] == 1
    assert first["unexpected"]["expect_column_values_to_be_between(value)"] == 1
    assert first["unexpected"]["expect_column_values_to_not_be_null(user_id)"] == 0
    assert set(first["failed"]) == {
        "expect_column_values_to_be_in_set(event_type)",
        "expect_column_values_to_be_between(value)",
    }
    assert first["page"].endswith(".html")
    assert second["success"] is True and second["rows_rejected"] == 0 and not second["failed"]


def test_no_user_id_reaches_the_project_or_its_docs(tmp_path):
    run(with_bad_rows(make_events()), tmp_path)

    for path in (tmp_path / "gx").rglob("*"):
        if path.is_file() and path.suffix in {".html", ".json", ".jsonl", ".yml"}:
            assert SECRET_USER not in path.read_text(errors="replace"), path


def test_a_chunked_snapshot_gives_one_result(tmp_path):
    events = with_bad_rows(make_events(100))
    raw = tmp_path / "events_raw.parquet"
    events.to_parquet(raw, index=False)
    report = validate_events_file(
        raw,
        clean_path=tmp_path / "events.parquet",
        suite_path=SUITE,
        cutoff=CUTOFF,
        allowed_event_types=ALLOWED,
        quarantine_path=tmp_path / "quarantine.parquet",
        data_docs_dir=data_docs_dir(tmp_path),
        chunk_rows=30,  # four chunks
    )

    assert report.passed and report.bad_rows == 2
    assert len(pages(tmp_path)) == 1
    (record,) = read_validation_log(tmp_path)
    assert record["rows"] == 100 and record["rows_rejected"] == 2


def test_a_landing_file_in_chunks_gives_one_result(tmp_path):
    validator = LandingValidator(SUITE, ALLOWED, data_docs_dir(tmp_path))
    events = with_bad_rows(make_events(90))
    latest = dt.datetime(2024, 6, 1, tzinfo=dt.timezone.utc)
    for start in range(0, 90, 30):
        validator.split(events.iloc[start : start + 30], latest_valid=latest, source="day1.csv")
    assert read_validation_log(tmp_path) == []  # nothing yet: the file may have more chunks
    validator.split(make_events(10, "day2.csv"), latest_valid=latest, source="day2.csv")
    (day1,) = read_validation_log(tmp_path)  # the next file's chunks finished day1.csv
    assert day1["kind"] == "ingest" and day1["source"] == "day1.csv"
    assert day1["rows"] == 90 and day1["rows_rejected"] == 2
    validator.finish("day2.csv")
    validator.finish("day2.csv")  # nothing pending: a no-op
    assert [r["source"] for r in read_validation_log(tmp_path)] == ["day1.csv", "day2.csv"]
    assert len(pages(tmp_path)) == 2


def test_ingest_records_one_result_per_landing_file(tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    header = "event_id,user_id,item_id,event_type,timestamp,value,device\n"
    for name, bad in (
        ("day1.csv", ""),
        ("day2.csv", "b0,u1,i1,teleport,2024-01-02T10:00:00Z,1,mobile\n"),
    ):
        rows = "".join(
            f"{name}{k},u{k % 7},i{k % 5},view,2024-01-0{1 + k % 7}T10:00:00Z,1,mobile\n"
            for k in range(60)
        )
        rows += bad  # an event type without a weight
        (landing / name).write_text(header + rows)
    report = ingest_landing(
        landing,
        tmp_path / "lake" / "events",
        ingested_at=dt.datetime(2024, 1, 10, tzinfo=dt.timezone.utc),
        settle_seconds=0.0,
        chunk_rows=25,  # three chunks a file
        suite_path=SUITE,
        allowed_event_types=ALLOWED,
        data_docs_dir=data_docs_dir(tmp_path),
    )
    assert report.rows_rejected == 1
    log = read_validation_log(tmp_path)
    assert [(r["source"], r["rows"], r["rows_rejected"]) for r in log] == [
        ("day1.csv", 60, 0),
        ("day2.csv", 61, 1),
    ]
    assert [r["success"] for r in log] == [True, False]
    assert len(pages(tmp_path)) == 2
    # the chunks' own results stay in the in-memory context: the project stores two
    assert len(list((tmp_path / "gx" / "uncommitted" / "validations").rglob("*.json"))) == 2


def test_a_docs_failure_never_fails_the_validation(tmp_path, monkeypatch, caplog):
    from pipeline.lake import gx_context

    def broken(self, suite, results):
        raise OSError("disk full")

    monkeypatch.setattr(gx_context.ValidationProject, "record", broken)
    with caplog.at_level(logging.WARNING, logger="pipeline.lake.validate"):
        clean, report = run(with_bad_rows(make_events()), tmp_path)
    assert report.passed and len(clean) == 38 and report.data_docs_path is None
    assert "Recording the validation" in caplog.text


def _record_in_child(data_dir: str, day: int, queue) -> None:
    try:
        cutoff = CUTOFF + dt.timedelta(days=day)
        _, report = run(make_events(), Path(data_dir), cutoff)
        queue.put(str(report.data_docs_path))
    except BaseException as exc:  # reported to the parent
        import traceback

        queue.put(f"error: {exc!r} {traceback.format_exc()}")


def test_two_processes_create_and_record_at_once(tmp_path, monkeypatch):
    # spawned children get this process's sys.path: an earlier test that loaded an MLflow
    # model left its artifact's code folder in front, where `pipeline` has no expectations/
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "/artifacts/code" not in p])
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    children = [
        ctx.Process(target=_record_in_child, args=(str(tmp_path), d, queue)) for d in (0, 1)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=240)
    outcomes = [queue.get(timeout=5) for _ in children]
    assert all(o == str((data_docs_dir(tmp_path) / "index.html").resolve()) for o in outcomes), (
        outcomes
    )
    assert len(read_validation_log(tmp_path)) == 2
    assert len(pages(tmp_path)) == 2
    html = (data_docs_dir(tmp_path) / "index.html").read_text()
    assert "validate-cutoff-2024-06-01" in html and "validate-cutoff-2024-06-02" in html


@pytest.mark.parametrize("limit", ["KEEP_DAYS", "KEEP_RESULTS"])
def test_old_results_leave_the_site(tmp_path, monkeypatch, limit):
    from pipeline.lake import gx_context

    monkeypatch.setattr(gx_context, limit, {"KEEP_DAYS": 0, "KEEP_RESULTS": 1}[limit])
    run(make_events(), tmp_path, CUTOFF)
    run(make_events(), tmp_path, CUTOFF + dt.timedelta(days=1))
    assert len(pages(tmp_path)) == 1
    html = (data_docs_dir(tmp_path) / "index.html").read_text()
    assert "2024-06-02" in html and "2024-06-01T000000Z" not in html
    assert len(read_validation_log(tmp_path)) == 2  # the log keeps every record


def test_monitor_rows_from_the_validation_log():
    log = [
        {"run_time": "2024-05-01T02:00:00+00:00", "success": False, "rows": 10, "rows_rejected": 9},
        {
            "run_time": "2024-06-01T02:00:00+00:00",
            "success": False,
            "rows": 100,
            "rows_rejected": 2,
        },
        {"run_time": "2024-06-02T02:00:00+00:00", "success": True, "rows": 100, "rows_rejected": 0},
    ]
    rows = validation_health(log, days=7).set_index("metric")
    assert rows.loc["validation_failed_share", "value"] == pytest.approx(0.5)  # May is out
    assert rows.loc["validation_failed_share", "status"] == "ok"
    assert rows.loc["validation_bad_row_share", "value"] == pytest.approx(0.01)
    assert rows.loc["validation_bad_row_share", "status"] == "ok"
    empty = validation_health([], days=7)
    assert set(empty["status"]) == {"unknown"}
