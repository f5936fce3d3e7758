"""Confidence matrix: event weights, value scaling, id maps, strongest event type."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.features.matrix import build_matrix, event_weights

WEIGHTS = {"view": 1.0, "purchase": 10.0, "rating": 1.0}


def _events(rows):
    return pd.DataFrame(rows, columns=["user_id", "item_id", "event_type", "value"])


def test_weights_sum_per_pair_and_ratings_scale_by_value():
    events = _events([("u1", "a", "view", None), ("u1", "a", "purchase", 20.0),
                      ("u2", "b", "rating", 4.0), ("u2", "a", "unknown", None)])
    assert list(event_weights(events, WEIGHTS)) == [1.0, 10.0, 4.0, 0.0]
    m = build_matrix(events, WEIGHTS)
    assert list(m.user_ids) == ["u1", "u2"] and list(m.item_ids) == ["a", "b"]
    assert m.confidence.toarray().tolist() == [[11.0, 0.0], [0.0, 4.0]]
    types = m.event_types
    assert types[int(m.strongest[0, 0])] == "purchase"
    assert types[int(m.strongest[1, 1])] == "rating"


def test_fixed_index_drops_unknown_ids_and_lookups_return_minus_one():
    events = _events([("u1", "a", "view", None), ("zz", "a", "view", None)])
    m = build_matrix(events, WEIGHTS, user_ids=np.array(["u1"], dtype=object),
                     item_ids=np.array(["a", "b"], dtype=object))
    assert m.shape == (1, 2) and m.confidence.nnz == 1
    assert list(m.user_index(np.array(["u1", "zz"], dtype=object))) == [0, -1]
    assert list(m.item_index(np.array(["b", "c"], dtype=object))) == [1, -1]
