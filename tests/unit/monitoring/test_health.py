"""Data-health metrics on tiny inputs with known answers."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from pipeline.monitoring import health

AS_OF = dt.datetime(2024, 3, 10, tzinfo=dt.timezone.utc)


def _events(per_day: dict[int, int]) -> pd.Series:
    """``per_day[k]`` events at noon of the k-th day before AS_OF (1 = the last full day)."""
    stamps = [
        pd.Timestamp(AS_OF) - pd.Timedelta(days=k) + pd.Timedelta(hours=12)
        for k, n in per_day.items()
        for _ in range(n)
    ]
    return pd.Series(pd.to_datetime(stamps, utc=True))


def test_daily_counts_fill_empty_days_and_ignore_the_future():
    ts = pd.concat([_events({1: 3, 3: 2}), pd.Series(pd.to_datetime([AS_OF], utc=True))])
    counts = health.daily_counts(ts, AS_OF, 4)
    assert counts.tolist() == [0, 2, 0, 3]
    assert counts.index[-1] == pd.Timestamp("2024-03-09", tz="UTC")


def test_volume_ratio_is_the_last_day_over_the_trailing_median():
    assert health.volume_ratio(pd.Series([10, 20, 30, 5])) == pytest.approx(5 / 20)
    assert np.isnan(health.volume_ratio(pd.Series([0, 0, 4])))
    assert np.isnan(health.volume_ratio(pd.Series([4])))


def test_last_ingest_shares_use_the_newest_batch_only():
    manifest = [
        {"ingested_at": "2024-03-08T00:00:00+00:00", "rows_read": 10, "rows_rejected": 10},
        {
            "ingested_at": "2024-03-09T00:00:00+00:00",
            "rows_read": 150,
            "rows_rejected": 3,
            "rows_future": 1,
            "rows_late": 2,
        },
        {"ingested_at": "2024-03-09T00:00:00+00:00", "rows_read": 50, "rows_late": 4},
    ]
    shares = health.last_ingest_shares(manifest)
    assert shares["quarantine_share"] == pytest.approx(10 / 200)
    assert shares["late_share"] == pytest.approx(6 / 200)
    assert np.isnan(health.last_ingest_shares([])["late_share"])


def test_thresholds_in_both_directions():
    volume = health.HEALTH_THRESHOLDS["volume_ratio"]
    assert [volume.status(v) for v in (0.4, 0.6, 1.0, 2.5, 3.5, float("nan"))] == [
        "alert",
        "warn",
        "ok",
        "warn",
        "alert",
        "unknown",
    ]


def test_health_table_flags_a_volume_drop_and_stale_input():
    steady = {k: 10 for k in range(2, 30)}
    table = health.health_table(_events({1: 2, **steady}), [], AS_OF).set_index("metric")
    assert table.loc["volume_ratio", "value"] == pytest.approx(0.2)
    assert table.loc["volume_ratio", "status"] == "alert"
    assert table.loc["newest_event_age", "value"] == pytest.approx(12 * 3600)
    assert table.loc["newest_event_age", "status"] == "ok"
    assert table.loc["quarantine_share", "status"] == "unknown"

    stale = health.health_table(_events({5: 10, **{k: 10 for k in range(6, 30)}}), [], AS_OF)
    stale = stale.set_index("metric")
    assert stale.loc["newest_event_age", "status"] == "alert"  # 4.5 days


def test_online_ratios_flag_a_ctr_drop_on_the_last_day():
    days = pd.to_datetime(["2024-03-01", "2024-03-02", "2024-03-03", "2024-03-04"], utc=True)
    daily = pd.DataFrame(
        {
            "day": np.repeat(days, 2),
            "variant": ["a", "b"] * 4,
            "clicks": [5, 5, 6, 4, 5, 5, 1, 1],
            "impressions": [50, 50] * 4,
            "converted_users": [2, 2, 2, 2, 2, 2, 2, 2],
            "users_active": [20, 20] * 4,
        }
    )
    rows = health.online_ratios(daily).set_index("metric")
    assert rows.loc["ctr_ratio", "value"] == pytest.approx(0.02 / 0.10)
    assert rows.loc["ctr_ratio", "status"] == "alert"
    assert rows.loc["conversion_ratio", "value"] == pytest.approx(1.0)
    assert rows.loc["conversion_ratio", "status"] == "ok"
    assert health.online_ratios(daily[daily.day == days[0]]).empty
