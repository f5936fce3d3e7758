"""The ``monitoring`` table on both serving backends: a monitor re-run replaces its rows,
other runs and sources stay, non-finite values become NULL, and reads filter by date."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pytest

from pipeline.serving import store

DAY1 = dt.datetime(2024, 3, 1, tzinfo=dt.timezone.utc)
DAY2 = DAY1 + dt.timedelta(days=1)


def _rows(psi: float) -> pd.DataFrame:
    return pd.DataFrame({
        "metric": ["psi", "psi", "volume_ratio"],
        "subject": ["user.recency_days", "event.device", ""],
        "value": [psi, float("nan"), 0.4],
        "status": ["ok" if psi < 0.1 else "alert", "unknown", "alert"],
        "window_start": [DAY1 - dt.timedelta(days=7)] * 3,
        "window_end": [DAY1] * 3,
        "reference": ["champion 3: 2024-01-01 .. 2024-02-01"] * 3,
        "model_version": ["3"] * 3,
    })


@pytest.fixture(params=["sqlite", "postgres"])
def target(request, tmp_path) -> dict:
    if request.param == "sqlite":
        return {"dsn": None, "sqlite_path": tmp_path / "serving.sqlite"}
    return {"dsn": request.getfixturevalue("pg_dsn"), "sqlite_path": tmp_path / "unused"}


def test_empty_before_the_first_run(target):
    assert store.read_monitoring(**target).empty


def test_a_rerun_replaces_its_rows_and_keeps_the_others(target):
    store.record_monitoring(_rows(0.05), run_date=DAY1, source="monitor", **target)
    store.record_monitoring(_rows(0.07), run_date=DAY2, source="monitor", **target)
    store.record_monitoring(_rows(0.30), run_date=DAY1, source="monitor", **target)
    store.record_monitoring(_rows(0.01), run_date=DAY1, source="impact", **target)

    frame = store.read_monitoring(**target)
    assert len(frame) == 9  # day 1 and day 2 of the monitor, day 1 of impact
    day1 = frame[(frame.run_date == DAY1) & (frame.source == "monitor")]
    recency = day1.set_index("subject").loc["user.recency_days"]
    assert recency["value"] == pytest.approx(0.30) and recency["status"] == "alert"
    assert pd.isna(day1.set_index("subject").loc["event.device", "value"])
    assert recency["window_start"] == DAY1 - dt.timedelta(days=7)
    assert recency["model_version"] == "3"

    later = store.read_monitoring(since=DAY2, **target)
    assert set(later.run_date) == {DAY2} and len(later) == 3
    assert set(store.read_monitoring(source="impact", **target).source) == {"impact"}
