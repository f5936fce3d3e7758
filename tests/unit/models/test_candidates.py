"""Candidates: union of ALS, kNN and popular, never a seen item; recall known answer."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pipeline.features.matrix import build_matrix
from pipeline.models.candidates import CandidateGenerator, candidate_recall, gather


def _two_communities(n_users=40, n_items=20, seed=0):
    rng = np.random.default_rng(seed)
    rows = [
        (f"u{u:02d}", f"i{i:02d}", "view", np.nan)
        for u in range(n_users)
        for i in (range(10) if u < 20 else range(10, 20))
        if rng.random() < 0.6
    ]
    return pd.DataFrame(rows, columns=["user_id", "item_id", "event_type", "value"])


@pytest.fixture(scope="module")
def fitted():
    matrix = build_matrix(_two_communities(), {"view": 1.0})
    recent = (matrix.confidence > 0).astype(np.float32).tocsr()
    gen = CandidateGenerator(
        n_als=4, n_knn=4, n_popular=3, knn_k=5, factors=8, iterations=10, random_state=1
    ).fit(matrix, recent, np.array([0, 10, 1, 11]))
    return matrix, gen


def test_candidates_are_unseen_flagged_and_community_aware(fitted):
    matrix, gen = fitted
    pairs = gen.generate(np.array([0, 25]))
    seen = matrix.confidence[pairs["row"].to_numpy(), pairs["item"].to_numpy()]
    assert np.asarray(seen).ravel().max() == 0
    assert not pairs.duplicated(["row", "item"]).any()
    flags = pairs[["from_als", "from_knn", "from_popular"]].sum(axis=1)
    assert (flags >= 1).all()
    knn = pairs[pairs["from_knn"] > 0]
    assert ((knn["row"] == 0) == (knn["item"] < 10)).all()  # kNN stays in the community
    assert pairs.loc[pairs["from_als"] == 0, "als_rank"].eq(5).all()
    popular = pairs[pairs["from_popular"] > 0]
    assert set(popular["item"]) <= {0, 10, 1}  # n_popular=3 of the 4 given


def test_als_scores_match_the_factor_dot_product(fitted):
    _, gen = fitted
    pairs = gen.generate(np.array([3]))
    users = np.asarray(gen.als_.user_factors)[3]
    expected = np.asarray(gen.als_.item_factors)[pairs["item"].to_numpy()] @ users
    assert pairs["als_score"].to_numpy() == pytest.approx(expected, rel=1e-5)


def test_candidate_recall_known_answer():
    pairs = pd.DataFrame(
        {
            "row": [0, 0, 1],
            "item": [1, 2, 0],
            "from_als": [1.0, 0.0, 0.0],
            "from_knn": [0.0, 1.0, 0.0],
            "from_popular": [0.0, 0.0, 1.0],
        }
    )
    truth = sp.csr_matrix(np.array([[0, 1, 0, 1], [0, 0, 0, 1], [0, 0, 0, 0]], np.float32))
    got = candidate_recall(pairs, truth)
    assert got["all"] == pytest.approx((0.5 + 0.0) / 2)
    assert got["als"] == pytest.approx(0.25) and got["knn"] == 0 and got["popular"] == 0
    assert got["candidates"] == pytest.approx(1.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gather_reads_every_cell_like_a_dense_lookup(seed):
    """Rows of any length (empty ones too), unsorted indices and duplicates (summed)."""
    rng = np.random.default_rng(seed)
    matrix = sp.random(30, 200, density=0.3, random_state=seed, format="csr", dtype=np.float32)
    matrix[rng.integers(0, 30, 5)] = 0.0  # some empty rows
    matrix.eliminate_zeros()
    coo = matrix.tocoo()
    shuffled = rng.permutation(coo.nnz)
    twice = np.r_[shuffled, shuffled[:40]]  # 40 duplicates; columns unsorted within rows
    twice = twice[np.argsort(coo.row[twice], kind="stable")]
    indptr = np.r_[0, np.cumsum(np.bincount(coo.row[twice], minlength=30))]
    messy = sp.csr_matrix((coo.data[twice], coo.col[twice], indptr), shape=matrix.shape)
    assert not messy.has_canonical_format
    dense = messy.toarray()
    rows, cols = rng.integers(0, 30, 5_000), rng.integers(0, 200, 5_000)
    np.testing.assert_array_equal(gather(messy, rows, cols), dense[rows, cols])
    np.testing.assert_array_equal(gather(matrix, rows, cols), matrix.toarray()[rows, cols])
    assert gather(sp.csr_matrix((30, 200), dtype=np.float32), rows, cols).sum() == 0
    assert gather(matrix, rows[:0], cols[:0]).shape == (0,)
