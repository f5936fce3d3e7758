"""Confidence matrix: event weights, value scaling, id maps, strongest event type."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.features.matrix import build_matrix, event_weights

WEIGHTS = {"view": 1.0, "purchase": 10.0, "rating": 1.0}


def _events(rows):
    return pd.DataFrame(rows, columns=["user_id", "item_id", "event_type", "value"])


def test_weights_sum_per_pair_and_ratings_scale_by_value():
    events = _events(
        [
            ("u1", "a", "view", None),
            ("u1", "a", "purchase", 20.0),
            ("u2", "b", "rating", 4.0),
            ("u2", "a", "unknown", None),
        ]
    )
    assert list(event_weights(events, WEIGHTS)) == [1.0, 10.0, 4.0, 0.0]
    m = build_matrix(events, WEIGHTS)
    assert list(m.user_ids) == ["u1", "u2"] and list(m.item_ids) == ["a", "b"]
    assert m.confidence.toarray().tolist() == [[11.0, 0.0], [0.0, 4.0]]
    types = m.event_types
    assert types[int(m.strongest[0, 0])] == "purchase"
    assert types[int(m.strongest[1, 1])] == "rating"


def test_fixed_index_drops_unknown_ids_and_lookups_return_minus_one():
    events = _events([("u1", "a", "view", None), ("zz", "a", "view", None)])
    m = build_matrix(
        events,
        WEIGHTS,
        user_ids=np.array(["u1"], dtype=object),
        item_ids=np.array(["a", "b"], dtype=object),
    )
    assert m.shape == (1, 2) and m.confidence.nnz == 1
    assert list(m.user_index(np.array(["u1", "zz"], dtype=object))) == [0, -1]
    assert list(m.item_index(np.array(["b", "c"], dtype=object))) == [1, -1]


def test_encoded_events_give_the_string_matrix_in_the_run_shape():
    from pipeline.core.ids import EncodedEvents

    events = _events(
        [
            ("u2", "b", "view", None),
            ("u1", "a", "purchase", 20.0),
            ("u1", "a", "view", None),
            ("u3", "c", "unknown", None),
            ("u2", "a", "rating", 3.0),
        ]
    )
    events["timestamp"] = pd.Timestamp("2024-01-01", tz="UTC")
    by_string = build_matrix(events, WEIGHTS)
    encoded = EncodedEvents.from_frame(events, WEIGHTS)
    space = (np.arange(encoded.shape[0]), np.arange(encoded.shape[1]))
    by_code = build_matrix(encoded.frame, WEIGHTS, *space)
    # u3 and c only had a zero-weight event: the run's shape keeps them as empty row/column
    assert by_code.shape == (3, 3) and by_string.shape == (2, 2)
    assert (by_code.confidence[:2, :2] != by_string.confidence).nnz == 0
    assert (by_code.strongest[:2, :2] != by_string.strongest).nnz == 0
    assert by_code.confidence[2].nnz == 0
    named = by_code.relabel(encoded.users.ids, encoded.items.ids)
    assert named.user_index(["u3", "u1", "x"]).tolist() == [2, 0, -1]
    with pytest.raises(ValueError, match="need user_ids"):
        build_matrix(encoded.frame, WEIGHTS)


def test_pair_order_gives_build_matrix_of_the_events_before_each_cutoff():
    import datetime as dt

    import numpy as np

    from pipeline.core.config import DEFAULT_EVENT_WEIGHTS
    from pipeline.features.matrix import PairOrder, build_matrix

    rng = np.random.default_rng(11)
    n = 3_000
    types = np.array(["view", "click", "rating", "purchase", "impression"])
    events = pd.DataFrame(
        {
            "user_id": rng.integers(0, 40, n).astype(np.int32),
            "item_id": rng.integers(0, 25, n).astype(np.int32),
            "event_type": pd.Categorical(rng.choice(types, n)),
            "value": rng.choice([np.nan, 1.0, 3.0, 5.0], n),
            "timestamp": pd.Timestamp("2024-01-01", tz="UTC")
            + pd.to_timedelta(rng.integers(0, 30 * 86_400, n), unit="s"),
        }
    )
    users, items = np.arange(42), np.arange(25)
    order = PairOrder(events, DEFAULT_EVENT_WEIGHTS, users, items)
    start = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    for days in (0, 3, 10, 17.5, 31):
        cutoff = start + dt.timedelta(days=days)
        want = build_matrix(
            events[events["timestamp"] < cutoff], DEFAULT_EVENT_WEIGHTS, users, items
        )
        got = order.before(cutoff)
        assert got.shape == want.shape and got.event_types == want.event_types
        for name in ("confidence", "strongest"):
            a, b = getattr(got, name), getattr(want, name)
            np.testing.assert_array_equal(a.indptr, b.indptr)
            np.testing.assert_array_equal(a.indices, b.indices)
            np.testing.assert_array_equal(a.data, b.data)
