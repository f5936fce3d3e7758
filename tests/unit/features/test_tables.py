"""Features: RFM, context and item popularity with known answers; nothing after the cutoff."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from pipeline.features.tables import build_item_features, build_user_features, segment_labels

UTC = dt.timezone.utc
CUTOFF = dt.datetime(2024, 2, 1, tzinfo=UTC)


def _events():
    rows = [
        # user, item, time, value, device, session
        ("u1", "a", "2024-01-31T20:00:00Z", 10.0, "mobile", "s1"),  # evening, Wednesday
        ("u1", "b", "2024-01-31T20:30:00Z", 5.0, "mobile", "s1"),
        ("u1", "a", "2024-01-06T09:00:00Z", None, "desktop", "s2"),  # morning, Saturday
        ("u2", "a", "2023-12-01T03:00:00Z", 100.0, None, None),  # night, 62 days before
        ("u2", "b", "2024-02-01T00:00:00Z", 999.0, "tv", "s9"),  # AT the cutoff: excluded
        ("u3", "c", "2024-03-01T00:00:00Z", 1.0, "tv", "s8"),  # after: user never seen
    ]
    frame = pd.DataFrame(
        rows, columns=["user_id", "item_id", "timestamp", "value", "device", "session_id"]
    )
    frame["timestamp"] = pd.to_datetime(frame["timestamp"], utc=True)
    frame["event_type"] = "view"
    return frame


def test_user_rfm_and_context_known_answers():
    users = build_user_features(_events(), CUTOFF).set_index("user_id")
    assert list(users.index) == ["u1", "u2"]  # u3 only acts after the cutoff
    u1, u2 = users.loc["u1"], users.loc["u2"]
    assert u1["recency_days"] == pytest.approx(3.5 / 24)
    assert (u1["frequency_7d"], u1["frequency_30d"], u1["frequency_90d"]) == (2, 3, 3)
    assert (u2["frequency_7d"], u2["frequency_30d"], u2["frequency_90d"]) == (0, 0, 1)
    assert u1["monetary"] == 15.0 and u2["monetary"] == 100.0  # 999 is after the cutoff
    assert u1["device_mobile_share"] == pytest.approx(2 / 3)
    assert u2["device_other_share"] == 1.0
    assert u1["daypart_evening_share"] == pytest.approx(2 / 3)
    assert u1["weekend_share"] == pytest.approx(1 / 3)
    assert u1["sessions"] == 2 and u1["events_per_session"] == 1.5
    assert u1["session_minutes"] == pytest.approx(15.0)


def test_item_popularity_windows_trend_and_age():
    items = pd.DataFrame(
        {
            "item_id": ["a", "b"],
            "category": ["News", "Sports"],
            "published_at": ["2024-01-01T00:00:00Z", None],
        }
    )
    feats = build_item_features(_events(), CUTOFF, items).set_index("item_id")
    assert list(feats.index) == ["a", "b"]
    assert (
        feats.loc["a", "popularity_1d"],
        feats.loc["a", "popularity_7d"],
        feats.loc["a", "popularity_30d"],
        feats.loc["a", "users_total"],
    ) == (1, 1, 1, 2)
    assert feats.loc["a", "age_days"] == pytest.approx(31.0)
    assert feats.loc["b", "age_days"] == pytest.approx(3.5 / 24)  # first seen, no published_at
    assert feats.loc["a", "category"] == "News"
    assert feats.loc["a", "trend"] > 1.0  # all of its recent activity is in the last week


def test_future_events_cannot_change_features():
    events = _events()
    base = build_user_features(events, CUTOFF)
    later = events.assign(timestamp=events["timestamp"])
    later.loc[len(later)] = [
        "u1",
        "z",
        pd.Timestamp("2024-05-01", tz="UTC"),
        1e6,
        "tv",
        "s",
        "view",
    ]
    pd.testing.assert_frame_equal(base, build_user_features(later, CUTOFF))


# ---- matrix-aligned features used by the ranker --------------------------------------------
def test_item_value_mean_and_newcomer_popularity():
    feats = build_item_features(_events(), CUTOFF).set_index("item_id")
    assert feats.loc["a", "value_mean"] == pytest.approx(55.0)  # (10 + 100) / 2, NaN skipped
    # u1 first acted 2024-01-06 (within 30 days) -> a newcomer; u2 (2023-12-01) is not
    assert feats.loc["a", "newcomer_popularity_30d"] == 1
    assert feats.loc["b", "newcomer_popularity_30d"] == 1


def test_recent_history_keeps_the_latest_distinct_items():
    import numpy as np

    from pipeline.features.tables import recent_history

    recent = recent_history(
        _events(),
        CUTOFF,
        np.array(["u1", "u2"], dtype=object),
        np.array(["a", "b", "c"], dtype=object),
        n_recent=1,
    ).toarray()
    assert recent.tolist() == [[0, 1, 0], [1, 0, 0]]  # u1's latest is b (20:30); u2's b is late


def test_recent_history_of_some_rows_is_the_full_one_on_those_rows():
    import numpy as np

    from pipeline.features.tables import recent_history

    rng = np.random.default_rng(3)
    events = pd.DataFrame(
        {
            "user_id": rng.integers(0, 30, 600),
            "item_id": rng.integers(0, 40, 600),
            "event_type": "view",
            "timestamp": pd.Timestamp("2024-01-01", tz="UTC")
            + pd.to_timedelta(rng.integers(0, 10_000, 600), unit="min"),
        }
    )
    cutoff = pd.Timestamp("2024-01-05", tz="UTC").to_pydatetime()
    users, items = np.arange(32), np.arange(40)
    full = recent_history(events, cutoff, users, items, n_recent=3).toarray()
    rows = np.array([0, 4, 5, 17, 31])
    some = recent_history(events, cutoff, users, items, n_recent=3, rows_only=rows).toarray()
    np.testing.assert_array_equal(some[rows], full[rows])
    assert some.sum() == full[rows].sum() and full[rows].sum() > 0


def test_category_affinity_shares():
    import numpy as np
    import scipy.sparse as sp

    from pipeline.features.tables import category_affinity, item_category_codes

    items = pd.DataFrame({"item_id": ["a", "b", "c"], "category": ["News", "Sports", "News"]})
    codes, names = item_category_codes(np.array(["a", "b", "c"], dtype=object), items)
    assert names == ("News", "Sports") and codes.tolist() == [0, 1, 0]
    conf = sp.csr_matrix(np.array([[1, 3, 1], [0, 0, 0]], np.float32))
    got = category_affinity(conf, codes, len(names))
    np.testing.assert_allclose(got, [[2 / 3, 1 / 3], [0, 0]], rtol=1e-6)


def test_feature_tables_ignore_events_after_the_cutoff():
    import numpy as np

    from pipeline.features.matrix import build_matrix
    from pipeline.features.tables import build_feature_tables

    users = pd.DataFrame({"user_id": ["u1", "u2", "u3"], "age_band": ["18-24", "56+", "56+"]})
    events = _events()
    past = events[events["timestamp"] < CUTOFF].assign(value=events["value"])
    matrix = build_matrix(past.assign(event_type="view"), {"view": 1.0})
    args = (CUTOFF, matrix.user_ids, matrix.item_ids, matrix.confidence, None, users)
    base = build_feature_tables(events, *args)
    later = pd.concat(
        [events, events.assign(timestamp=pd.Timestamp("2024-03-01", tz="UTC"), user_id="u2")],
        ignore_index=True,
    )
    again = build_feature_tables(later, *args)
    for name, array in base.arrays().items():
        np.testing.assert_array_equal(array, again.arrays()[name], err_msg=name)
    assert base.segment_names == ("age_band",)
    # last 30 days: only u1 (18-24) -> a and b have share 1 in 18-24, global share 1 of 1 user
    assert base.segment_popularity[-1].tolist() == [1.0, 1.0]


def test_feature_rows_compute_user_features_for_those_users_alone():
    import numpy as np

    from pipeline.features.matrix import build_matrix
    from pipeline.features.tables import build_feature_tables

    events = _events()
    past = events[events["timestamp"] < CUTOFF]
    matrix = build_matrix(past.assign(event_type="view"), {"view": 1.0})
    args = (CUTOFF, matrix.user_ids, matrix.item_ids, matrix.confidence)
    full = build_feature_tables(events, *args)
    rows = np.array([len(matrix.user_ids) - 1])
    some = build_feature_tables(events, *args, feature_rows=rows)
    assert some.user_names == full.user_names
    np.testing.assert_array_equal(some.user[rows], full.user[rows])  # same values for them
    others = np.setdiff1d(np.arange(len(matrix.user_ids)), rows)
    assert len(others) and np.isnan(some.user[others]).all()
    for name in ("item", "affinity", "segment_popularity", "user_taste"):
        np.testing.assert_array_equal(getattr(some, name), getattr(full, name), err_msg=name)


def test_segment_labels_per_id_with_repeats_unknown_ids_and_missing_attributes():
    users = pd.DataFrame(
        {
            "user_id": ["a", "b", "c", "a"],
            "age_band": ["18-24", None, "35-44", "99+"],
            "gender": ["F", "M", None, "M"],
        }
    )
    ids = np.array(["a", "b", "zz", "a", "c", None, "c"], dtype=object)
    assert segment_labels(users, ids, ("age_band",)).tolist() == [
        "18-24",
        None,
        None,
        "18-24",
        "35-44",
        None,
        "35-44",
    ]  # first row per user wins
    assert segment_labels(users, ids, ("age_band", "gender")).tolist() == [
        "18-24|F",
        None,
        None,
        "18-24|F",
        None,
        None,
        None,
    ]
    assert segment_labels(users, ids, ("income",)).tolist() == [None] * 7
    assert segment_labels(None, ids, ("age_band",)).tolist() == [None] * 7
    assert segment_labels(users, np.array([], dtype=object), ("gender",)).tolist() == []


def test_user_features_on_encoded_events_equal_those_on_ids():
    """build_features computes them on codes: the same numbers, rows named by code."""
    from pipeline.core.config import DEFAULT_EVENT_WEIGHTS
    from pipeline.core.ids import EncodedEvents

    events = _events()
    encoded = EncodedEvents.from_frame(events, DEFAULT_EVENT_WEIGHTS)
    by_id = build_user_features(events, CUTOFF)
    by_code = build_user_features(encoded.frame, CUTOFF)
    assert by_code["user_id"].tolist() == encoded.users.encode(by_id["user_id"]).tolist()
    pd.testing.assert_frame_equal(
        by_code.drop(columns="user_id"), by_id.drop(columns="user_id"), check_dtype=False
    )
    items_by_code = build_item_features(encoded.frame, CUTOFF)
    pd.testing.assert_frame_equal(
        items_by_code.drop(columns="item_id"),
        build_item_features(events, CUTOFF).drop(columns="item_id"),
        check_dtype=False,
    )


def test_user_features_on_codes_equal_those_on_ids_to_the_last_bit():
    """The per-user aggregates on codes (one numbering of the users, sessions by one sort of
    packed keys) add up the same numbers in the same order as pandas' groupbys on the ids:
    a seeded log with sessions missing, a session id two users share, devices missing."""
    from pipeline.core.config import DEFAULT_EVENT_WEIGHTS
    from pipeline.core.ids import EncodedEvents
    from pipeline.lake.demo.synthetic import generate_clickstream

    events = generate_clickstream(n_users=300, n_items=200, n_days=60, seed=5).events.copy()
    rng = np.random.default_rng(5)
    events["device"] = events["device"].astype(object)
    events.loc[rng.random(len(events)) < 0.05, "device"] = None
    events["session_id"] = events["session_id"].astype(object)
    events.loc[rng.random(len(events)) < 0.1, "session_id"] = None
    shared = events["user_id"].isin(events["user_id"].unique()[:2])
    events.loc[shared, "session_id"] = "shared"
    cutoff = events["timestamp"].max() - pd.Timedelta(days=7)
    encoded = EncodedEvents.from_frame(events, DEFAULT_EVENT_WEIGHTS)

    by_id = build_user_features(events, cutoff)
    by_code = build_user_features(encoded.frame, cutoff)

    assert by_code["user_id"].tolist() == encoded.users.encode(by_id["user_id"]).tolist()
    assert by_id["sessions"].notna().all() and by_id["device_other_share"].gt(0).any()
    pd.testing.assert_frame_equal(
        by_code.drop(columns="user_id"), by_id.drop(columns="user_id"), check_exact=True
    )
