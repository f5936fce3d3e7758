"""Item-kNN: a sparse item x item similarity (cosine or BM25) and user scores from it.

The similarity comes from implicit's ``CosineRecommender`` / ``BM25Recommender`` (C++ all-pairs
top-K), with the self-similarity removed so an item never recommends itself. Scoring is one
sparse product, ``history @ similarity``: any user x item weight matrix works as history
(all of a user's items, or only the most recent ones).
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import scipy.sparse as sp

from pipeline.models.base import active_part, ranked_within

logger = logging.getLogger(__name__)

METHODS = ("cosine", "bm25")


class ItemKnn:
    """Top-``k`` neighbours per item; ``fit(user_items)`` learns ``similarity_`` (items x items)."""

    def __init__(
        self,
        k: int = 100,
        method: str = "cosine",
        bm25_k1: float = 1.2,
        bm25_b: float = 0.75,
        num_threads: int = 0,
        max_users: int | None = None,
        random_state: int = 42,
    ) -> None:
        self.k = k
        self.method = method
        self.bm25_k1 = bm25_k1
        self.bm25_b = bm25_b
        self.num_threads = num_threads
        self.max_users = max_users
        self.random_state = random_state

    def get_params(self) -> dict:
        return {
            "k": self.k,
            "method": self.method,
            "bm25_k1": self.bm25_k1,
            "bm25_b": self.bm25_b,
            "max_users": self.max_users,
            "random_state": self.random_state,
        }

    def fit(self, user_items: sp.csr_matrix) -> ItemKnn:
        """Learn the similarity from a users x items weight matrix (binarised for cosine).

        Empty rows and columns (users and items of the run's id space first seen later) are
        left out of the fit, as if the matrix held only the active ones; they get no
        neighbours. With more active users than ``max_users``, the similarity is learnt from
        a seeded sample of ``max_users`` of them (its cost grows with the users' histories,
        while a large sample already sees each item's co-occurrences; items only the left-out
        users touched get no neighbours)."""
        from implicit.nearest_neighbours import BM25Recommender, CosineRecommender

        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        user_items = sp.csr_matrix(user_items, dtype=np.float32)
        rows, cols = active_part(user_items)
        if self.max_users is not None and len(rows) > self.max_users:
            rng = np.random.default_rng(self.random_state)
            rows = np.sort(rng.choice(rows, self.max_users, replace=False))
            logger.info("item-kNN learnt from a sample of %d active users", len(rows))
        counts = sp.csr_matrix(user_items[rows][:, cols])
        if self.method == "cosine":
            counts = (counts > 0).astype(np.float32).tocsr()
            model = CosineRecommender(K=self.k + 1, num_threads=self.num_threads)
        else:
            model = BM25Recommender(
                K=self.k + 1, K1=self.bm25_k1, B=self.bm25_b, num_threads=self.num_threads
            )
        with warnings.catch_warnings():  # implicit converts its own normalised copy to CSR
            warnings.filterwarnings("ignore", message="Method expects CSR input")
            model.fit(counts, show_progress=False)
        similarity = sp.csr_matrix(model.similarity, dtype=np.float32)
        similarity.setdiag(0.0)
        similarity.eliminate_zeros()
        similarity = _keep_top_k(similarity.tocsr(), self.k).tocoo()
        n_items = user_items.shape[1]
        self.similarity_ = sp.csr_matrix(
            (similarity.data, (cols[similarity.row], cols[similarity.col])),
            shape=(n_items, n_items),
            dtype=np.float32,
        )
        self.similarity_.sum_duplicates()  # canonical (sorted), for lookups without a copy
        logger.info(
            "item-kNN (%s) fitted: %d items, %d neighbour pairs",
            self.method,
            similarity.shape[0],
            self.similarity_.nnz,
        )
        return self

    def score(self, history: sp.csr_matrix) -> sp.csr_matrix:
        """users x items scores: the summed similarity of each item to the history items."""
        return (sp.csr_matrix(history, dtype=np.float32) @ self.similarity_).tocsr()


def top_k_sparse(
    scores: sp.csr_matrix, k: int, exclude: sp.csr_matrix | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, column, score) of the ``k`` best positive entries per row, best first.

    ``exclude`` (same shape) removes entries (e.g. items already seen). Ties go to the lower
    column, so the result is deterministic.
    """
    scores = sp.csr_matrix(scores)
    if exclude is not None:
        scores = scores - scores.multiply(sp.csr_matrix(exclude) > 0)
    coo = scores.tocoo()
    # Sort only what can make a top k: each long row's k-th largest value is a floor (ties
    # with it stay, so the result is the same as sorting everything).
    floor = np.full(scores.shape[0], -np.inf, dtype=np.float64)
    lengths = np.diff(scores.indptr)
    for r in np.flatnonzero(lengths > k):
        values = scores.data[scores.indptr[r] : scores.indptr[r + 1]]
        floor[r] = np.partition(values, lengths[r] - k)[lengths[r] - k]
    keep = (coo.data > 0) & (coo.data >= floor[coo.row])
    row, col, val = coo.row[keep], coo.col[keep], coo.data[keep]
    order = ranked_within(row, val, col)[0]  # by row, best value first, ties to the lower column
    row, col, val = row[order], col[order], val[order]
    starts = np.r_[0, np.flatnonzero(np.diff(row)) + 1]
    position = np.arange(len(row)) - np.repeat(starts, np.diff(np.r_[starts, len(row)]))
    top = position < k
    return row[top].astype(np.int64), col[top].astype(np.int64), val[top].astype(np.float32)


def _keep_top_k(matrix: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """The ``k`` best positive entries per row (ties to the lower column) as a matrix."""
    if np.diff(matrix.indptr).max(initial=0) <= k:  # the usual case: implicit kept k + 1
        kept = sp.csr_matrix(matrix, dtype=np.float32, copy=True)  # and the diagonal went
        kept.data[kept.data < 0] = 0.0
        kept.eliminate_zeros()
        return kept
    row, col, val = top_k_sparse(matrix, k)
    return sp.csr_matrix((val, (row, col)), shape=matrix.shape, dtype=np.float32)
