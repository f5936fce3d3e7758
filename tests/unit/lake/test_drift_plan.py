"""Planted drift: untouched past, each knob's effect after the start, determinism, speed-safe
invariants (unique ids, dtypes, funnel, publication)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.lake.demo import DemoData
from pipeline.lake.demo import synthetic as syn
from pipeline.lake.demo.drift import DriftPlan, plant_drift

START = pd.Timestamp("2024-01-16", tz="UTC")  # day 16 of the 30-day window

KNOBS = {
    "popularity": {"popularity_shift": 1.0},
    "new_items": {"new_items": 20, "new_item_share": 0.5},
    "devices": {"device_mix": {"tv": 0.7, "mobile": 0.3}},
    "volume": {"volume": 0.3},
    "all": {
        "popularity_shift": 0.5,
        "new_items": 5,
        "new_item_share": 0.2,
        "device_mix": {"tablet": 1.0},
        "volume": 0.5,
        "seed": 7,
    },
}


@pytest.fixture(scope="module")
def data() -> DemoData:
    return syn.generate_clickstream(n_users=300, n_items=100, n_days=30, seed=3)


def _before(events: pd.DataFrame) -> pd.DataFrame:
    return events[events["timestamp"] < START]


def _after(events: pd.DataFrame) -> pd.DataFrame:
    return events[events["timestamp"] >= START]


def test_defaults_return_equal_frames(data: DemoData) -> None:
    out = plant_drift(data, DriftPlan(start=START))
    pd.testing.assert_frame_equal(out.events, data.events)
    pd.testing.assert_frame_equal(out.items, data.items)
    pd.testing.assert_frame_equal(out.users, data.users)


@pytest.mark.parametrize("knobs", list(KNOBS.values()), ids=list(KNOBS))
def test_events_before_start_are_unchanged(data: DemoData, knobs: dict) -> None:
    out = plant_drift(data, DriftPlan(start=START, **knobs))
    pd.testing.assert_frame_equal(_before(out.events), _before(data.events))
    pd.testing.assert_frame_equal(out.users, data.users)
    pd.testing.assert_frame_equal(out.items.iloc[: len(data.items)], data.items)
    assert out.events.dtypes.equals(data.events.dtypes)
    assert out.items.dtypes.equals(data.items.dtypes)
    assert out.events["event_id"].is_unique
    assert set(out.events["event_id"]) <= set(data.events["event_id"])
    assert len(_after(out.events)) > 0
    assert not _after(out.events).equals(_after(data.events))  # the knob did change something


@pytest.mark.parametrize("knobs", list(KNOBS.values()), ids=list(KNOBS))
def test_funnel_prices_and_publication_stay_consistent(data: DemoData, knobs: dict) -> None:
    out = plant_drift(data, DriftPlan(start=START, **knobs))
    events = out.events
    keys = ["user_id", "item_id", "session_id"]
    for later, earlier in [
        ("click", "view"),
        ("add_to_cart", "click"),
        ("purchase", "add_to_cart"),
    ]:
        first = events[events["event_type"] == earlier].groupby(keys)["timestamp"].min()
        late = events[events["event_type"] == later].join(first.rename("earlier"), on=keys)
        assert (late["earlier"] < late["timestamp"]).all()  # NaT (no earlier step) fails too
    merged = events.merge(out.items, on="item_id", how="left", validate="many_to_one")
    assert (merged["timestamp"] >= merged["published_at"]).all()  # NaT (unknown item) fails
    priced = merged[merged["event_type"].isin(["add_to_cart", "purchase"])]
    assert np.allclose(priced["value"], priced["price"])


def test_popularity_shift_demotes_the_head(data: DemoData) -> None:
    top10 = _before(data.events)["item_id"].value_counts().index[:10]
    share_before = _before(data.events)["item_id"].isin(top10).mean()
    share_untouched = _after(data.events)["item_id"].isin(top10).mean()
    out = plant_drift(data, DriftPlan(start=START, popularity_shift=1.0))
    share_after = _after(out.events)["item_id"].isin(top10).mean()
    # measured: 0.311 before start, 0.311 after without drift, 0.051 after with the shift
    assert share_before == pytest.approx(0.31, abs=0.03)
    assert share_untouched == pytest.approx(share_before, abs=0.03)
    assert share_after < 0.25 * share_before
    assert share_after == pytest.approx(0.05, abs=0.03)
    assert set(out.events["item_id"]) <= set(data.items["item_id"])
    assert len(out.events) == len(data.events)


def test_new_items_flood(data: DemoData) -> None:
    out = plant_drift(data, DriftPlan(start=START, new_items=20, new_item_share=0.5))
    new = out.items.iloc[len(data.items) :]
    assert len(out.items) == len(data.items) + 20
    assert list(new["item_id"]) == [f"i{n}" for n in range(100, 120)]
    assert out.items["item_id"].is_unique
    assert (new["published_at"] == START).all()
    assert set(new["category"]) <= set(data.items["category"])
    assert (new["price"] > 0).all() and new["available"].all()
    after = _after(out.events)
    share = after["item_id"].isin(new["item_id"]).mean()
    assert share == pytest.approx(0.5, abs=0.05)  # measured 0.490
    assert not _before(out.events)["item_id"].isin(new["item_id"]).any()
    assert after["item_id"][after["item_id"].isin(new["item_id"])].nunique() >= 15


def test_device_mix_is_applied_per_session(data: DemoData) -> None:
    out = plant_drift(data, DriftPlan(start=START, device_mix={"tv": 1.0}))
    after = _after(out.events)
    assert (after["device"] == "tv").all()
    assert _after(data.events)["device"].ne("tv").mean() > 0.9
    assert (after.groupby("session_id")["device"].nunique() == 1).all()
    started_after = out.events.groupby("session_id")["timestamp"].min() >= START
    sessions = out.events[out.events["session_id"].isin(started_after[started_after].index)]
    assert (sessions.groupby("session_id")["device"].nunique() == 1).all()

    mixed = _after(
        plant_drift(data, DriftPlan(start=START, device_mix={"tv": 0.7, "mobile": 0.3})).events
    )
    assert set(mixed["device"]) == {"tv", "mobile"}
    per_session = mixed.groupby("session_id")["device"].first().value_counts(normalize=True)
    assert per_session["tv"] == pytest.approx(0.7, abs=0.05)
    assert (mixed.groupby("session_id")["device"].nunique() == 1).all()


def test_volume_drops_whole_sessions(data: DemoData) -> None:
    out = plant_drift(data, DriftPlan(start=START, volume=0.3))
    ratio = len(_after(out.events)) / len(_after(data.events))
    assert ratio == pytest.approx(0.3, abs=0.05)  # measured 0.2995
    sizes_in = data.events.groupby("session_id").size()
    sizes_out = out.events.groupby("session_id").size()
    assert (sizes_in.reindex(sizes_out.index) == sizes_out).all()  # kept sessions are whole
    assert set(_before(data.events)["session_id"]) <= set(sizes_out.index)
    assert out.events.index.equals(pd.RangeIndex(len(out.events)))


def test_sessionless_events_group_by_user_and_day(data: DemoData) -> None:
    events = data.events.assign(session_id=pd.NA).astype(data.events.dtypes.to_dict())
    bare = DemoData(events=events, items=data.items, users=data.users)
    out = plant_drift(bare, DriftPlan(start=START, volume=0.3, device_mix={"tv": 1.0}))
    sizes_in = (
        _after(events)
        .groupby([_after(events)["user_id"], _after(events)["timestamp"].dt.date])
        .size()
    )
    after = _after(out.events)
    sizes_out = after.groupby([after["user_id"], after["timestamp"].dt.date]).size()
    assert 0.2 < len(sizes_out) / len(sizes_in) < 0.4
    assert (sizes_in.reindex(sizes_out.index) == sizes_out).all()
    assert (after["device"] == "tv").all()


def test_same_seed_same_output_and_different_seed_differs(data: DemoData) -> None:
    knobs = KNOBS["all"] | {"seed": 11}
    first = plant_drift(data, DriftPlan(start=START, **knobs))
    again = plant_drift(data, DriftPlan(start="2024-01-16T00:00:00Z", **knobs))
    pd.testing.assert_frame_equal(first.events, again.events)
    pd.testing.assert_frame_equal(first.items, again.items)
    other = plant_drift(data, DriftPlan(start=START, **(knobs | {"seed": 12})))
    assert not other.events["event_id"].equals(first.events["event_id"])
    assert not other.events["device"].equals(first.events["device"])
    pd.testing.assert_frame_equal(_before(other.events), _before(first.events))


def test_plan_validation_and_description() -> None:
    plan = DriftPlan(
        start="2024-01-16",
        popularity_shift=0.5,
        new_items=20,
        new_item_share=0.5,
        device_mix={"tv": 3, "mobile": 1},
        volume=0.3,
        seed=4,
    )
    assert (
        str(plan)
        == plan.describe()
        == (
            "drift from 2024-01-16T00:00:00Z: popularity_shift=0.5, new_items=20 at share 0.5, "
            "device_mix={tv: 0.75, mobile: 0.25}, volume=0.3 (seed 4)"
        )
    )
    assert str(DriftPlan(start=START)) == "drift from 2024-01-16T00:00:00Z: none (seed 0)"
    assert plan.start_utc == START
    for bad in (
        {"popularity_shift": 1.5},
        {"volume": -0.1},
        {"new_item_share": 0.2},
        {"new_items": -1},
        {"device_mix": {"toaster": 1.0}},
        {"device_mix": {"tv": 0}},
    ):
        with pytest.raises(ValueError):
            DriftPlan(start=START, **bad)
