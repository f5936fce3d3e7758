"""Item-kNN: neighbours from co-occurrence, no self-similarity, deterministic top-k."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from pipeline.models.knn import ItemKnn, _keep_top_k, top_k_sparse


def _blocks() -> sp.csr_matrix:
    """Users 0-2 take items 0-1, users 3-5 take items 2-3; nobody mixes the blocks."""
    rows = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    cols = [0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3]
    return sp.csr_matrix((np.ones(12, np.float32), (rows, cols)), shape=(6, 4))


@pytest.mark.parametrize("method", ["cosine", "bm25"])
def test_neighbours_stay_in_their_block_and_exclude_self(method):
    sim = ItemKnn(k=3, method=method).fit(_blocks()).similarity_.toarray()
    assert np.all(np.diag(sim) == 0)
    assert sim[0, 1] > 0 and sim[2, 3] > 0
    assert sim[0, 2] == 0 and sim[1, 3] == 0


def test_scores_sum_similarity_to_the_history():
    knn = ItemKnn(k=3).fit(_blocks())
    history = sp.csr_matrix(np.array([[1, 0, 0, 0]], np.float32))
    scores = knn.score(history).toarray()[0]
    assert scores[1] == pytest.approx(1.0) and scores[2] == 0 and scores[3] == 0


def test_top_k_sparse_orders_excludes_and_breaks_ties_by_column():
    scores = sp.csr_matrix(np.array([[0.5, 0.9, 0.5, 0.1], [0, 0, 0, 0], [0.2, 0, 0.3, 0]]))
    exclude = sp.csr_matrix(np.array([[0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]))
    row, col, val = top_k_sparse(scores, 2, exclude)
    assert row.tolist() == [0, 0, 2, 2]
    assert col.tolist() == [0, 2, 2, 0]  # 0.5 tie -> lower column first
    assert val.tolist() == pytest.approx([0.5, 0.5, 0.3, 0.2])


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="method"):
        ItemKnn(method="jaccard").fit(_blocks())


@pytest.mark.parametrize("k", [1, 3, 40])
def test_top_k_sparse_matches_a_full_sort_on_long_rows_with_ties(k):
    scores = sp.random(60, 80, density=0.6, random_state=k, format="csr", dtype=np.float32)
    scores.data = np.round(scores.data * 4) - 1  # many ties, explicit zeros and negatives
    exclude = sp.random(60, 80, density=0.1, random_state=k + 1, format="csr")
    row, col, val = top_k_sparse(scores, k, exclude)
    dense = np.where(exclude.toarray() > 0, 0.0, scores.toarray())
    for r in range(dense.shape[0]):
        positive = np.flatnonzero(dense[r] > 0)
        expected = positive[np.lexsort((positive, -dense[r, positive]))][:k]
        np.testing.assert_array_equal(col[row == r], expected)
        np.testing.assert_array_equal(val[row == r], dense[r, expected].astype(np.float32))


def test_empty_rows_and_columns_change_nothing_and_get_no_neighbours():
    """A run's matrices hold its whole id space: users and items first seen later are empty
    rows and columns, and the fit must equal the fit on the active part alone."""
    import scipy.sparse as sp

    from pipeline.models.base import fit_als

    rng = np.random.default_rng(3)
    active = sp.random(40, 30, density=0.2, random_state=rng, format="csr", dtype=np.float32)
    active.data[:] = rng.integers(1, 5, active.nnz)
    rows, cols = np.array([0, 2, 3] + list(range(5, 42))), np.array([1] + list(range(3, 32)))
    full = sp.csr_matrix(
        (active.tocoo().data, (rows[active.tocoo().row], cols[active.tocoo().col])), shape=(42, 32)
    )
    for method in ("cosine", "bm25"):
        small = ItemKnn(k=5, method=method).fit(active).similarity_
        big = ItemKnn(k=5, method=method).fit(full).similarity_
        assert big.shape == (32, 32)
        assert (big[cols][:, cols] != small).nnz == 0
        assert big[[0, 2]].nnz == 0 and big[:, [0, 2]].nnz == 0
    kwargs = dict(factors=4, regularization=0.1, alpha=1.0, iterations=3, random_state=0)
    small, big = fit_als(active, **kwargs), fit_als(full, **kwargs)
    np.testing.assert_array_equal(np.asarray(big.user_factors)[rows], small.user_factors)
    np.testing.assert_array_equal(np.asarray(big.item_factors)[cols], small.item_factors)
    assert not np.asarray(big.user_factors)[[1, 4]].any()
    assert not np.asarray(big.item_factors)[[0, 2]].any()


@pytest.mark.parametrize("k", [3, 80])
def test_keeping_the_top_k_is_the_same_with_and_without_rows_longer_than_k(k):
    """Rows no longer than k keep every positive entry (the shortcut) exactly as the full
    top-k selection would."""
    scores = sp.random(50, 80, density=0.5, random_state=k, format="csr", dtype=np.float32)
    scores.data = np.round(scores.data * 4) - 1  # ties, explicit zeros and negatives
    row, col, val = top_k_sparse(scores, k)
    expected = sp.csr_matrix((val, (row, col)), shape=scores.shape)
    kept = _keep_top_k(scores, k)
    assert (kept != expected).nnz == 0 and kept.dtype == np.float32
    assert np.diff(scores.indptr).max() <= k or k == 3  # k=80 takes the shortcut


def test_max_users_learns_from_a_seeded_sample_of_the_active_users():
    rng = np.random.default_rng(0)
    dense = (rng.random((60, 25)) < 0.2).astype(np.float32)
    dense[5] = 0.0  # an empty row is never sampled
    matrix = sp.csr_matrix(dense)
    full = ItemKnn(k=5).fit(matrix).similarity_
    all_active = ItemKnn(k=5, max_users=59).fit(matrix).similarity_
    assert (full != all_active).nnz == 0  # a cap at the active users changes nothing
    sampled = ItemKnn(k=5, max_users=20, random_state=7).fit(matrix)
    again = ItemKnn(k=5, max_users=20, random_state=7).fit(matrix)
    assert (sampled.similarity_ != again.similarity_).nnz == 0  # seeded
    active = np.flatnonzero(np.diff(matrix.indptr) > 0)
    chosen = np.sort(np.random.default_rng(7).choice(active, 20, replace=False))
    only = sp.csr_matrix(matrix.multiply(np.isin(np.arange(60), chosen)[:, None]))
    expected = ItemKnn(k=5).fit(only).similarity_
    assert (sampled.similarity_ != expected).nnz == 0  # learnt from those users only
    assert (sampled.similarity_ != full).nnz > 0
