"""Shared model helpers with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.models.base import ranked_within


def test_ranked_within_matches_a_stable_multi_key_sort():
    groups = np.array([2, 1, 2, 1, 2, 1, 2])
    scores = np.array([0.5, 0.9, 0.5, 0.1, 0.7, 0.9, 0.5], np.float32)
    ties = np.array([3, 4, 1, 0, 2, 2, 1])
    order, rank = ranked_within(groups, scores, ties)
    frame = pd.DataFrame({"g": groups, "s": scores, "t": ties})
    expected = frame.sort_values(["g", "s", "t"], ascending=[True, False, True], kind="stable")
    assert order.tolist() == expected.index.tolist() == [5, 1, 3, 4, 2, 6, 0]
    assert rank.tolist() == [1, 2, 3, 1, 2, 3, 4]
    empty_order, empty_rank = ranked_within(np.zeros(0), np.zeros(0), np.zeros(0))
    assert len(empty_order) == len(empty_rank) == 0
