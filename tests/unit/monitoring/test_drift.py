"""Drift (PSI): known answers worked out by hand on tiny inputs, the bins' edge cases (empty
bins, values outside the reference, missing values, unseen levels, ties), the status
thresholds, JSON round trips, and a profile of events that names the planted change."""

from __future__ import annotations

import datetime as dt
import json
import math

import numpy as np
import pandas as pd
import pytest

from pipeline.monitoring.drift import (
    EPSILON,
    PSI_ALERT,
    PSI_WARN,
    CategoryBins,
    DriftProfile,
    QuantileBins,
    bins_from_dict,
    categorical_psi,
    numeric_psi,
    psi,
    status,
)

UTC = dt.timezone.utc
#: 4 equal-frequency bins on the reference: {1}, {2}, {3}, {4}, a quarter each.
QUARTERS = np.repeat([1.0, 2.0, 3.0, 4.0], 10)


def _term(current: float, reference: float, eps: float = EPSILON) -> float:
    """One bin's (c - r) * ln(c / r), both shares floored at eps: the definition, by hand."""
    c, r = max(current, eps), max(reference, eps)
    return (c - r) * math.log(c / r)


# ---- psi and the bins, known answers -------------------------------------------------------
def test_identical_samples_give_exactly_zero():
    assert psi([0.25, 0.25, 0.5, 0.0], [0.25, 0.25, 0.5, 0.0]) == 0.0
    assert numeric_psi(QUARTERS, QUARTERS, n_bins=4) == 0.0
    values = np.random.default_rng(7).lognormal(size=500)
    assert numeric_psi(values, values) == 0.0
    labels = ["a", "b", "b", None, "c"]
    assert categorical_psi(labels, labels) == 0.0


def test_quantile_edges_are_equal_frequency_and_right_closed():
    bins = QuantileBins.fit(QUARTERS, n_bins=4)
    assert bins.edges == (1.0, 2.0, 3.0)
    assert bins.size == 5 and bins.labels()[-1] == "<missing>"
    # an edge value belongs to the bin below it: (-inf, 1], (1, 2], (2, 3], (3, inf), missing
    assert bins.counts([1.0, 1.5, 2.0, 3.5]).tolist() == [1, 2, 0, 1, 0]
    assert QuantileBins.fit(np.arange(1.0, 9.0), n_bins=4).edges == (2.0, 4.0, 6.0)


def test_planted_shift_known_psi():
    current = np.repeat([1.0, 2.0, 3.0, 4.0], [1, 2, 3, 4])
    bins = QuantileBins.fit(QUARTERS, n_bins=4)
    assert bins.shares(current) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.0])
    expected = (
        (0.1 - 0.25) * math.log(0.1 / 0.25)
        + (0.2 - 0.25) * math.log(0.2 / 0.25)
        + (0.3 - 0.25) * math.log(0.3 / 0.25)
        + (0.4 - 0.25) * math.log(0.4 / 0.25)
    )
    # the missing bin is empty on both sides: eps against eps, a term of 0
    assert numeric_psi(QUARTERS, current, n_bins=4) == pytest.approx(expected, rel=1e-12)
    assert psi([0.25] * 4, [0.1, 0.2, 0.3, 0.4]) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.228, abs=1e-3)  # "warn"


def test_an_empty_bin_counts_as_epsilon():
    current = np.repeat([1.0, 2.0], 5)  # shares 0.5, 0.5, 0, 0 (and no missing)
    expected = 2 * (0.5 - 0.25) * math.log(0.5 / 0.25) + 2 * (1e-4 - 0.25) * math.log(1e-4 / 0.25)
    assert numeric_psi(QUARTERS, current, n_bins=4) == pytest.approx(expected, rel=1e-12)
    wider = 2 * (0.5 - 0.25) * math.log(0.5 / 0.25) + 2 * (1e-2 - 0.25) * math.log(1e-2 / 0.25)
    assert numeric_psi(QUARTERS, current, n_bins=4, eps=1e-2) == pytest.approx(wider, rel=1e-12)


def test_shares_are_floored_not_renormalised():
    # all mass moves from bin 0 to bin 1: (eps - 1) ln(eps) + (1 - eps) ln(1 / eps)
    expected = (1e-4 - 1.0) * math.log(1e-4 / 1.0) + (1.0 - 1e-4) * math.log(1.0 / 1e-4)
    assert psi([1.0, 0.0], [0.0, 1.0]) == pytest.approx(expected, rel=1e-12)
    # a share below eps counts as eps, so these two are the same as identical
    assert psi([0.5, 0.5, 0.0], [0.5, 0.5, 5e-5]) == 0.0


def test_psi_rejects_mismatched_bins_and_is_nan_for_an_empty_sample():
    with pytest.raises(ValueError):
        psi([0.5, 0.5], [1.0])
    with pytest.raises(ValueError):
        psi([1.0], [1.0], eps=0.0)
    bins = QuantileBins.fit(QUARTERS, n_bins=4)
    assert np.isnan(bins.shares([])).all()
    assert math.isnan(numeric_psi(QUARTERS, [], n_bins=4))
    assert status(numeric_psi(QUARTERS, [], n_bins=4)) == "unknown"


def test_values_outside_the_reference_range_land_in_the_outer_bins():
    bins = QuantileBins.fit(QUARTERS, n_bins=4)
    assert bins.counts([-100.0, 0.0, -np.inf, 4.5, 1e9, np.inf]).tolist() == [3, 0, 0, 3, 0]
    current = [0.0, 5.0]  # half below, half above the reference
    expected = _term(0.5, 0.25) + _term(0.0, 0.25) + _term(0.0, 0.25) + _term(0.5, 0.25)
    assert numeric_psi(QUARTERS, current, n_bins=4) == pytest.approx(expected, rel=1e-12)


def test_missing_values_have_their_own_bin():
    reference = [1.0, 2.0, np.nan, np.nan]  # edges from the non-missing values only
    bins = QuantileBins.fit(reference, n_bins=2)
    assert bins.edges == (1.0,)
    assert bins.shares(reference).tolist() == [0.25, 0.25, 0.5]
    current = pd.Series([1, 2, 2, None], dtype="Int64")  # nullable: NA is missing too
    assert bins.counts(current).tolist() == [1, 2, 1]
    expected = 0.0 + (0.5 - 0.25) * math.log(0.5 / 0.25) + (0.25 - 0.5) * math.log(0.25 / 0.5)
    assert numeric_psi(reference, current, n_bins=2) == pytest.approx(expected, rel=1e-12)


def test_unseen_levels_and_missing_values_have_their_own_bins():
    reference = ["a"] * 5 + ["b"] * 5
    bins = CategoryBins.fit(reference)
    assert bins.levels == ("a", "b")
    assert bins.labels() == ["a", "b", "<other>", "<missing>"]
    current = ["a"] * 5 + ["c"] * 2 + ["d"] + [None, np.nan]
    assert bins.counts(current).tolist() == [5, 0, 3, 2]
    expected = (
        0.0
        + (1e-4 - 0.5) * math.log(1e-4 / 0.5)
        + (0.3 - 1e-4) * math.log(0.3 / 1e-4)
        + (0.2 - 1e-4) * math.log(0.2 / 1e-4)
    )
    assert categorical_psi(reference, current) == pytest.approx(expected, rel=1e-12)
    assert categorical_psi(
        pd.Series(reference, dtype="string"), pd.Series(current, dtype="string")
    ) == pytest.approx(expected)


def test_category_levels_are_compared_as_text_in_natural_order():
    bins = CategoryBins.fit([3, 10, 2, None])
    assert bins.levels == ("2", "3", "10")
    assert bins.counts([3.0, "3", np.int64(3), 7, None]).tolist() == [0, 3, 0, 1, 1]
    top = CategoryBins.fit(["x"] * 3 + ["y"] * 2 + ["z"], max_levels=2)
    assert top.levels == ("x", "y") and top.counts(["z"]).tolist() == [0, 0, 1, 0]


@pytest.mark.parametrize(
    "values, edges, counts",
    [
        ([0] * 90 + [1] * 7 + [2] * 3, (0.0,), [90, 10, 0]),  # mostly zeros: 0 | more
        ([0] * 50 + [1] * 30 + [2] * 20, (0.0, 1.0, 2.0), [50, 30, 20, 0, 0]),  # a bin per count
        ([5.0] * 10, (5.0,), [10, 0, 0]),  # constant
        ([np.nan] * 4, (), [0, 4]),  # nothing but missing: one open bin and the missing one
    ],
)
def test_tied_discrete_features_get_one_bin_per_frequent_value(values, edges, counts):
    bins = QuantileBins.fit(values)
    assert bins.edges == edges
    assert bins.counts(values).tolist() == counts
    assert numeric_psi(values, values) == 0.0


@pytest.mark.parametrize(
    "value, expected",
    [
        (0.0, "ok"),
        (PSI_WARN - 1e-12, "ok"),
        (PSI_WARN, "warn"),
        (PSI_ALERT - 1e-12, "warn"),
        (PSI_ALERT, "alert"),
        (12.0, "alert"),
        (math.nan, "unknown"),
    ],
)
def test_status_thresholds(value, expected):
    assert status(value) == expected


def test_status_custom_thresholds():
    assert [status(v, warn=0.2, alert=0.5) for v in (0.19, 0.2, 0.49, 0.5)] == [
        "ok",
        "warn",
        "warn",
        "alert",
    ]


def test_bins_round_trip_through_json():
    reference = np.random.default_rng(3).normal(size=300)
    current = np.r_[np.random.default_rng(4).normal(0.5, 1.0, size=300), [np.nan] * 5]
    numeric = QuantileBins.fit(reference)
    labels = ["a", "b", "a", None, "c"]
    category = CategoryBins.fit(labels)
    for bins, ref, cur in (
        (numeric, reference, current),
        (category, labels, ["a", "z", None, "b", "b"]),
    ):
        back = bins_from_dict(json.loads(json.dumps(bins.to_dict())))
        assert back == bins and type(back).from_dict(bins.to_dict()) == bins
        assert psi(back.shares(ref), back.shares(cur)) == psi(bins.shares(ref), bins.shares(cur))
    with pytest.raises(ValueError):
        QuantileBins.from_dict(category.to_dict())
    with pytest.raises(ValueError):
        bins_from_dict({"kind": "histogram"})


# ---- a profile of events --------------------------------------------------------------------
AS_OF = dt.datetime(2024, 3, 1, tzinfo=UTC)
SHIFT = dt.timedelta(days=28)  # whole weeks: the shifted events keep their hours and weekdays
#: ten users' devices, repeated: 60% desktop, 30% mobile, 10% tablet
DEVICES = ["desktop"] * 6 + ["mobile"] * 3 + ["tablet"]


def _events(
    devices: list[str] = DEVICES, popular: bool = False, shift: dt.timedelta = dt.timedelta(0)
) -> pd.DataFrame:
    """40 users x 5 events in the 20 days before ``AS_OF + shift``, no randomness. User k is
    on ``devices[k % 10]`` throughout; items are spread evenly over 20, or with ``popular``
    three of each user's five events go to item i0."""
    rows = []
    for k in range(40):
        for j in range(5):
            item = "i0" if popular and j < 3 else f"i{(5 * k + j) % 20}"
            when = (
                AS_OF + shift - dt.timedelta(days=1 + (k + 3 * j) % 20, hours=(7 * k + 5 * j) % 24)
            )
            rows.append(
                (
                    f"u{k}",
                    item,
                    "purchase" if j == 4 else "view",
                    when,
                    10.0 + k % 3 if j == 4 else np.nan,
                    devices[k % len(devices)],
                    f"u{k}-s{j // 3}",
                )
            )
    frame = pd.DataFrame(
        rows,
        columns=["user_id", "item_id", "event_type", "timestamp", "value", "device", "session_id"],
    )
    return frame.astype(
        {
            "user_id": "string",
            "item_id": "string",
            "event_type": "string",
            "timestamp": "datetime64[us, UTC]",
            "device": "string",
            "session_id": "string",
        }
    )


def test_profile_features_and_against_itself_every_psi_is_zero():
    events = _events()
    profile = DriftProfile.from_events(events, AS_OF)
    names = list(profile.features)
    assert {
        "user.recency_days",
        "user.frequency_30d",
        "user.device_mobile_share",
        "user.sessions",
        "item.users_total",
        "item.popularity_7d",
        "item.trend",
        "event.event_type",
        "event.device",
        "event.hour",
        "event.weekday",
    } <= set(names)
    assert "user.user_id" not in names and not any(n.startswith("item.category") for n in names)
    assert profile.features["user.recency_days"].reference_n == 40
    assert profile.features["item.users_total"].reference_n == 20
    assert profile.features["event.device"].reference_n == 200
    assert profile.features["event.hour"].bins.levels[:2] == ("0", "1")

    result = profile.compare(events, AS_OF)
    assert list(result.columns) == ["feature", "group", "psi", "status", "reference_n", "current_n"]
    assert sorted(result["feature"]) == sorted(names)
    assert (result["psi"] == 0.0).all() and (result["status"] == "ok").all()
    assert (result["reference_n"] == result["current_n"]).all()
    assert set(result["group"]) == {"user", "item", "event"}


def test_a_device_mix_change_names_event_device_first():
    current_devices = ["desktop"] * 2 + ["mobile"] * 7 + ["tablet"]  # 20% / 70% / 10%
    # one lake frame holding both windows; each side reads its own 28 days
    events = pd.concat([_events(), _events(current_devices, shift=SHIFT)], ignore_index=True)
    profile = DriftProfile.from_events(events, AS_OF, window=SHIFT)
    assert profile.features["event.device"].reference_n == 200
    result = profile.compare(events, AS_OF + SHIFT)

    top = result.iloc[0]
    assert (top["feature"], top["group"], top["status"]) == ("event.device", "event", "alert")
    # levels desktop, mobile, tablet, then other and missing (empty on both sides)
    expected = (
        (0.2 - 0.6) * math.log(0.2 / 0.6)
        + (0.7 - 0.3) * math.log(0.7 / 0.3)
        + (0.1 - 0.1) * math.log(0.1 / 0.1)
    )
    assert top["psi"] == pytest.approx(expected, rel=1e-12)
    assert (top["reference_n"], top["current_n"]) == (200, 200)
    # each user stays on one device, so only their device shares move too, and by less
    moved = result[result["psi"] > 0]
    assert list(moved["feature"]) == [
        "event.device",
        "user.device_desktop_share",
        "user.device_mobile_share",
    ]
    assert (result.loc[result["psi"] == 0, "status"] == "ok").all()


def test_a_popularity_shift_moves_the_item_features():
    events = pd.concat([_events(), _events(popular=True, shift=SHIFT)], ignore_index=True)
    profile = DriftProfile.from_events(events, AS_OF, window=SHIFT)
    result = profile.compare(events, AS_OF + SHIFT).set_index("feature")
    item = result[result["group"] == "item"]
    assert result.loc["item.users_total", "status"] == "alert"
    assert result.loc["item.popularity_7d", "status"] == "alert"
    assert item["psi"].max() >= PSI_ALERT
    # what happened when did not change: the event mix is the same
    event = result[result["group"] == "event"]
    assert (event["psi"] == 0.0).all() and (event["status"] == "ok").all()


def test_extra_numeric_feature_such_as_scores():
    profile = DriftProfile.from_events(_events(), AS_OF)
    scores = np.linspace(0.0, 1.0, 101)
    feature = profile.add_numeric("score", scores)
    assert feature.group == "model" and feature.reference_n == 101
    same = profile.compare_values("score", scores)
    assert same == {
        "feature": "score",
        "group": "model",
        "psi": 0.0,
        "status": "ok",
        "reference_n": 101,
        "current_n": 101,
    }
    shifted = profile.compare_values("score", scores[scores >= 0.5])
    assert shifted["status"] == "alert" and shifted["current_n"] == 51
    with pytest.raises(KeyError):
        profile.compare_values("nope", scores)

    # compare() reports an extra feature only when its current values are given
    assert "score" not in set(profile.compare(_events(), AS_OF)["feature"])
    result = profile.compare(_events(), AS_OF, extra={"score": scores[scores >= 0.5]})
    assert result.iloc[0]["feature"] == "score" and result.iloc[0]["psi"] == shifted["psi"]
    with pytest.raises(KeyError):
        profile.compare(_events(), AS_OF, extra={"nope": scores})


def test_profile_round_trips_through_json():
    events = pd.concat(
        [_events(), _events(DEVICES[::-1], popular=True, shift=SHIFT)], ignore_index=True
    )
    profile = DriftProfile.from_events(events, AS_OF, window=SHIFT, n_bins=5)
    profile.add_numeric("score", np.linspace(0.0, 1.0, 11))
    profile.add_categorical("segment", ["a", "b", "b", None])
    back = DriftProfile.from_dict(json.loads(json.dumps(profile.to_dict())))
    assert (back.as_of, back.window, back.n_bins) == (AS_OF, SHIFT, 5)
    assert list(back.features) == list(profile.features)
    extra = {"score": np.linspace(0.3, 1.0, 8), "segment": ["a", "c", None]}
    expected = profile.compare(events, AS_OF + SHIFT, extra=extra)
    assert (expected["psi"] > 0).any()
    pd.testing.assert_frame_equal(back.compare(events, AS_OF + SHIFT, extra=extra), expected)
    with pytest.raises(ValueError):
        DriftProfile.from_dict({**profile.to_dict(), "version": 99})


def test_optional_columns_may_be_absent_and_an_empty_window_is_unknown():
    events = _events().drop(columns=["session_id", "value"])
    profile = DriftProfile.from_events(events, AS_OF)
    assert profile.features["user.sessions"].counts[-1] == 40  # all missing
    assert (profile.compare(events, AS_OF)["psi"] == 0.0).all()

    profile = DriftProfile.from_events(_events(), AS_OF, window=SHIFT)
    later = profile.compare(_events(), AS_OF + 2 * SHIFT)  # no events in that window
    assert (later["status"] == "unknown").all() and (later["current_n"] == 0).all()
