"""Drift and health alerts on the seeded synthetic clickstream: quiet on stationary data,
and each planted drift (popularity shift, new-item flood, device mix, volume drop) crosses the
alert threshold on the metric that names it."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pytest

from pipeline.lake.demo.drift import DriftPlan, plant_drift
from pipeline.lake.demo.synthetic import generate_clickstream
from pipeline.monitor import MonitorOptions, drift_table
from pipeline.monitoring.health import HEALTH_THRESHOLDS, health_table, new_item_share

UTC = dt.timezone.utc
START = dt.datetime(2024, 1, 1, tzinfo=UTC)
REFERENCE = START + dt.timedelta(days=28)  # the champion's cutoff
AS_OF = START + dt.timedelta(days=42)  # two weeks later
#: Stationary worlds x monitored days checked for false alarms.
SEEDS = range(8)
DAYS = (35, 38, 42)


def _events(seed: int, plan: DriftPlan | None = None) -> pd.DataFrame:
    data = generate_clickstream(n_users=1500, n_items=300, n_days=42, start=START, seed=seed)
    if plan is not None:
        data = plant_drift(data, plan)
    events = data.events.copy()
    events["timestamp"] = pd.to_datetime(events["timestamp"], utc=True)
    return events


def test_stationary_data_raises_no_alert():
    """False-alarm rate: 0 alerts in 768 checks (8 worlds x 3 days x 32 features with
    enough values); the README states it with the warnings (PSI >= 0.1) seen."""
    alerts, checked = [], 0
    for seed in SEEDS:
        events = _events(seed)
        for day in DAYS:
            rows = drift_table(events, REFERENCE, events, START + dt.timedelta(days=day))
            checked += int((rows["status"] != "unknown").sum())
            alerts += [
                (seed, day, r.subject, round(r.value, 3))
                for r in rows[rows["status"] == "alert"].itertuples()
            ]
    assert checked >= 700
    assert alerts == []


@pytest.mark.parametrize(
    ("plan", "feature"),
    [
        (DriftPlan(start=AS_OF - dt.timedelta(days=10), popularity_shift=1.0), "event.item"),
        (
            DriftPlan(start=AS_OF - dt.timedelta(days=10), device_mix={"tv": 0.8, "mobile": 0.2}),
            "event.device",
        ),
    ],
)
def test_each_planted_drift_alerts_on_its_feature(plan, feature):
    events = _events(1, plan)
    rows = drift_table(events, REFERENCE, events, AS_OF, MonitorOptions()).set_index("subject")
    assert rows.loc[feature, "status"] == "alert", rows.sort_values("value").tail(5)
    quiet = drift_table(_events(1), REFERENCE, _events(1), AS_OF).set_index("subject")
    assert quiet.loc[feature, "status"] == "ok"


def test_a_flood_of_new_items_alerts_on_the_new_item_share():
    plan = DriftPlan(start=AS_OF - dt.timedelta(days=10), new_items=60, new_item_share=0.5)
    events = _events(3, plan)
    past = events[
        (events.timestamp >= REFERENCE - dt.timedelta(days=7)) & (events.timestamp < REFERENCE)
    ]
    now = events[(events.timestamp >= AS_OF - dt.timedelta(days=7)) & (events.timestamp < AS_OF)]
    share = new_item_share(past["item_id"], now["item_id"])
    assert share == pytest.approx(0.5, abs=0.05)
    assert HEALTH_THRESHOLDS["new_item_share"].status(share) == "alert"
    steady = _events(3)
    steady_now = steady[
        (steady.timestamp >= AS_OF - dt.timedelta(days=7)) & (steady.timestamp < AS_OF)
    ]
    steady_past = steady[
        (steady.timestamp >= REFERENCE - dt.timedelta(days=7)) & (steady.timestamp < REFERENCE)
    ]
    assert new_item_share(steady_past["item_id"], steady_now["item_id"]) < 0.1


def test_a_volume_drop_alerts_on_the_volume_ratio():
    plan = DriftPlan(start=AS_OF - dt.timedelta(days=1), volume=0.3)
    table = health_table(_events(2, plan)["timestamp"], [], AS_OF).set_index("metric")
    assert table.loc["volume_ratio", "status"] == "alert"
    assert table.loc["volume_ratio", "value"] == pytest.approx(0.3, abs=0.1)
    steady = health_table(_events(2)["timestamp"], [], AS_OF).set_index("metric")
    assert steady.loc["volume_ratio", "status"] == "ok"
