"""Shared model helpers with known answers; ALS warm starts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pipeline.models.base import fit_als, ranked_within


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


def _taste_blocks() -> sp.csr_matrix:
    """Two groups of users with their own items, plus user 6 and item 6 (empty until later)."""
    rng = np.random.default_rng(5)
    dense = np.zeros((7, 7), np.float32)
    dense[:3, :3] = rng.integers(1, 4, (3, 3))
    dense[3:6, 3:6] = rng.integers(1, 4, (3, 3))
    return sp.csr_matrix(dense)


ALS = {"factors": 4, "regularization": 0.05, "alpha": 2.0, "random_state": 1}


def test_a_warm_start_continues_from_the_given_factors():
    """From converged factors one more sweep barely moves them; one sweep from a random
    start is far from them: the warm start is used, not replaced by a random one."""
    matrix = _taste_blocks()
    converged = fit_als(matrix, iterations=50, **ALS)
    start = (converged.user_factors, converged.item_factors)
    warm = fit_als(matrix, iterations=1, warm_start=start, **ALS)
    cold = fit_als(matrix, iterations=1, **ALS)
    scores = converged.user_factors @ converged.item_factors.T
    assert np.abs(warm.user_factors @ warm.item_factors.T - scores).max() < 0.02
    assert np.abs(cold.user_factors @ cold.item_factors.T - scores).max() > 0.1


def test_a_warm_start_learns_users_and_items_it_did_not_know():
    older = _taste_blocks()
    newer = older.tolil()
    newer[6, 0], newer[6, 1], newer[0, 6] = 3.0, 2.0, 1.0  # a new user and a new item
    first = fit_als(older, iterations=15, **ALS)
    assert not first.user_factors[6].any() and not first.item_factors[6].any()
    later = fit_als(
        newer.tocsr(), iterations=5, warm_start=(first.user_factors, first.item_factors), **ALS
    )
    assert later.user_factors[6].any() and later.item_factors[6].any()
    scores = later.user_factors[6] @ later.item_factors.T
    assert scores[[0, 1, 2]].min() > scores[[3, 4, 5]].max()  # the new user joins group 1


def test_a_warm_start_must_fit_the_matrix():
    matrix = _taste_blocks()
    small = fit_als(matrix[:, :6], iterations=2, **ALS)
    with pytest.raises(ValueError, match="warm start factors"):
        fit_als(matrix, iterations=2, warm_start=(small.user_factors, small.item_factors), **ALS)
