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
    return pd.DataFrame(
        {
            "metric": ["psi", "psi", "volume_ratio"],
            "subject": ["user.recency_days", "event.device", ""],
            "value": [psi, float("nan"), 0.4],
            "status": ["ok" if psi < 0.1 else "alert", "unknown", "alert"],
            "window_start": [DAY1 - dt.timedelta(days=7)] * 3,
            "window_end": [DAY1] * 3,
            "reference": ["champion 3: 2024-01-01 .. 2024-02-01"] * 3,
            "model_version": ["3"] * 3,
        }
    )


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


def _impact_rows(day: dt.datetime, clicks: int) -> pd.DataFrame:
    from pipeline.monitoring.impact import METRIC_COLUMNS

    row = {name: 0 for name in METRIC_COLUMNS}
    row.update(
        users_served=10,
        users_active=4,
        impressions=20,
        clicks=clicks,
        ctr=clicks / 20,
        engaged_share=float("nan"),
        revenue=12.5,
    )
    return pd.DataFrame(
        [{"day": day, "cutoff": DAY1, "model_version": "3", "variant": "model", **row}]
    )


def test_impact_rows_are_replaced_per_attributed_days(target):
    assert store.read_impact(**target).empty
    both = pd.concat([_impact_rows(DAY1, 2), _impact_rows(DAY2, 3)], ignore_index=True)
    assert (
        store.record_impact(both, start=DAY1, end=DAY2 + dt.timedelta(days=1), as_of=DAY2, **target)
        == 2
    )
    # A later run attributes day 2 again (late feedback): only day 2 is replaced.
    store.record_impact(
        _impact_rows(DAY2, 5),
        start=DAY2,
        end=DAY2 + dt.timedelta(days=1),
        as_of=DAY2 + dt.timedelta(days=1),
        **target,
    )
    frame = store.read_impact(**target).set_index("day")
    assert frame.loc[pd.Timestamp(DAY1), "clicks"] == 2
    assert frame.loc[pd.Timestamp(DAY2), "clicks"] == 5
    assert frame.loc[pd.Timestamp(DAY2), "ctr"] == pytest.approx(0.25)
    assert pd.isna(frame.loc[pd.Timestamp(DAY2), "engaged_share"])
    assert frame.loc[pd.Timestamp(DAY2), "computed_as_of"] == pd.Timestamp(
        DAY2 + dt.timedelta(days=1)
    )
    assert len(store.read_impact(since=DAY2, **target)) == 1
