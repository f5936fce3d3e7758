"""Cold start: segment popularity shrunk to the global list; selection by time-series CV."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pytest

from pipeline.models.coldstart import SegmentPopularity, select_cold_start

UTC = dt.timezone.utc
CUTOFF = dt.datetime(2024, 1, 31, tzinfo=UTC)


def _events(rows):
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    frame["timestamp"] = pd.to_datetime(frame["timestamp"], utc=True)
    return frame


USERS = pd.DataFrame(
    {"user_id": ["y1", "y2", "o1", "o2", "o3"], "age_band": ["18-24", "18-24", "56+", "56+", "56+"]}
)
EVENTS = _events(
    [
        ("y1", "a", "2024-01-20"),
        ("y2", "a", "2024-01-21"),
        ("o1", "b", "2024-01-20"),
        ("o2", "b", "2024-01-21"),
        ("o3", "b", "2024-01-22"),
        ("o3", "c", "2024-01-22"),
        ("o1", "z", "2023-06-01"),  # outside the 30-day window
        ("o2", "late", "2024-02-05"),
    ]
)  # after the cutoff: never used


def test_segment_lists_with_shrinkage_known_answer():
    model = SegmentPopularity(days=30, segment=("age_band",), shrinkage=5.0).fit(
        EVENTS, CUTOFF, USERS
    )
    assert list(model.global_["item_id"]) == ["b", "a", "c"]
    young = model.segments_[model.segments_["segment"] == "18-24"].set_index("item_id")
    # (2 + 5 * 2/5) / (2 + 5) for a, (0 + 5 * 3/5) / 7 for b
    assert young.loc["a", "score"] == pytest.approx(4 / 7)
    assert young.loc["b", "score"] == pytest.approx(3 / 7)
    assert list(young.sort_values("order").index[:2]) == ["a", "b"]


def test_users_without_a_known_segment_get_the_global_list():
    model = SegmentPopularity(days=30, segment=("age_band",), shrinkage=5.0).fit(
        EVENTS, CUTOFF, USERS
    )
    lists = model.lists_for(["y1", "stranger"])
    assert lists[lists["user_id"] == "stranger"]["item_id"].tolist() == ["b", "a", "c"]
    assert lists[lists["user_id"] == "y1"]["item_id"].iloc[0] == "a"
    assert lists["reason"].str.startswith("popular").all()
    assert "late" not in set(lists["item_id"]) and "z" not in set(lists["item_id"])


def test_a_segment_nobody_was_active_in_gets_the_global_list():
    users = pd.concat([USERS, pd.DataFrame({"user_id": ["m1"], "age_band": ["35-44"]})])
    model = SegmentPopularity(days=30, segment=("age_band",), shrinkage=5.0).fit(
        EVENTS, CUTOFF, users
    )
    assert "35-44" not in set(model.segments_["segment"])
    lists = model.lists_for(["m1", "o1"])
    assert lists[lists["user_id"] == "m1"]["item_id"].tolist() == ["b", "a", "c"]
    assert lists[lists["user_id"] == "o1"]["item_id"].iloc[0] == "b"
    assert lists.groupby("user_id").size().to_dict() == {"m1": 3, "o1": 3}


def test_selection_prefers_the_segment_that_predicts_new_users():
    # Every week young newcomers take "a" and old newcomers "b"; globally "b" leads.
    rows, n = [], 0
    for week in range(6):
        day = dt.date(2024, 1, 1) + dt.timedelta(days=7 * week)
        for band, item, count in (("18-24", "a", 2), ("56+", "b", 3)):
            for _ in range(count):
                rows.append((f"u{n}", band, item, day.isoformat()))
                n += 1
    frame = pd.DataFrame(rows, columns=["user_id", "age_band", "item_id", "timestamp"])
    events = _events(frame[["user_id", "item_id", "timestamp"]].values.tolist())
    users = frame[["user_id", "age_band"]]
    chosen = select_cold_start(
        events,
        dt.datetime(2024, 2, 12, tzinfo=UTC),
        users,
        horizon_days=7,
        shrinkage=1.0,
        options=((14, ""), (14, "age_band")),
    )
    assert chosen["segment"] == ("age_band",) and chosen["days"] == 14


def _weekly(pattern):
    """Six weeks of newcomers: ``pattern`` is (age band, item, users per week)."""
    rows, n = [], 0
    for week in range(6):
        day = dt.date(2024, 1, 1) + dt.timedelta(days=7 * week)
        for band, item, count in pattern:
            for _ in range(count):
                rows.append((f"u{n}", band, item, day.isoformat()))
                n += 1
    frame = pd.DataFrame(rows, columns=["user_id", "age_band", "item_id", "timestamp"])
    return _events(frame[["user_id", "item_id", "timestamp"]].values.tolist()), frame[
        ["user_id", "age_band"]
    ]


def test_default_options_start_with_plain_30_day_popularity():
    from pipeline.models.coldstart import COLD_HORIZON_DAYS, COLD_OPTIONS

    assert COLD_OPTIONS[0] == (30, "")
    assert COLD_HORIZON_DAYS == 30 and all(days >= 30 for days, _ in COLD_OPTIONS)


def test_selection_keeps_the_default_without_a_clear_win():
    # Both bands take the same item: segments cannot beat the global list.
    events, users = _weekly((("18-24", "a", 2), ("56+", "a", 3)))
    chosen = select_cold_start(
        events,
        dt.datetime(2024, 2, 12, tzinfo=UTC),
        users,
        horizon_days=7,
        shrinkage=1.0,
        options=((14, ""), (14, "age_band")),
    )
    assert chosen["segment"] == () and chosen["days"] == 14


def test_selection_needs_the_minimum_gain():
    events, users = _weekly((("18-24", "a", 2), ("56+", "b", 3)))
    chosen = select_cold_start(
        events,
        dt.datetime(2024, 2, 12, tzinfo=UTC),
        users,
        horizon_days=7,
        shrinkage=1.0,
        min_gain=1.0,
        options=((14, ""), (14, "age_band")),
    )
    assert chosen["segment"] == ()
