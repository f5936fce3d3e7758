"""The deployable recommender: ALS factors + id maps + fallback list, saved as one folder.

``AlsRecommender`` follows scikit-learn's estimator rules: hyperparameters are constructor
arguments stored unchanged, ``fit`` returns ``self`` and learned state ends in ``_``. Its
``recommend`` gives each user ``n`` unseen items with a score, a human-readable reason (the
item in the user's history closest to the recommendation in factor space) and a ``source``;
users it has never seen, and short lists, are filled from the popularity fallback.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pipeline.core.arrays import run_starts

logger = logging.getLogger(__name__)

#: How a reason names what the user did with the history item.
VERBS = {
    "view": "viewed",
    "click": "opened",
    "like": "liked",
    "share": "shared",
    "add_to_cart": "added",
    "purchase": "bought",
    "rating": "rated",
}
HISTORY_FOR_REASONS = 20  # strongest history items considered when explaining a pick
PAIRS_PER_CHUNK = 20_000  # bounds the (pairs x n x factors) similarity block
PAIRS_PER_BLOCK = 8_192  # (row, row) pairs whose vectors row_dots gathers at a time


class ListRecommender(ABC):
    """What every deployable model shares: chunked ``recommend`` and the ``__default__`` list.

    Subclasses provide ``_recommend_chunk(users, n)`` and ``popular_`` (item_id, score,
    reason; best first).
    """

    chunk_users = 5_000  # users scored at a time: bounds memory as the user base grows
    progress_seconds = 10.0  # at most one progress line this often
    bundle_dir_: Path | None = None  # the folder it was loaded from (models.bundle)

    def recommend(self, user_ids: pd.Series | np.ndarray | list, n: int) -> pd.DataFrame:
        """Ranked lists: user_id, rank (1..n), item_id, score, reason, source."""
        users = pd.unique(pd.Series(user_ids, dtype="string").dropna()).astype(object)
        parts, started, reported = [], time.perf_counter(), time.perf_counter()
        for first in range(0, len(users), self.chunk_users):
            parts.append(self._recommend_chunk(users[first : first + self.chunk_users], n))
            done, now = min(first + self.chunk_users, len(users)), time.perf_counter()
            if now - reported >= self.progress_seconds or (done == len(users) and first):
                reported = now
                logger.info(
                    "%s: lists for %d of %d users (%.0f users/s)",
                    type(self).__name__,
                    done,
                    len(users),
                    done / (now - started),
                )
        if not parts:
            return empty_lists()
        return pd.concat(parts, ignore_index=True)

    @abstractmethod
    def use_threads(self, threads: int) -> None:
        """Threads of the compiled loops that make lists (0: every CPU): a worker process
        of several takes its share. The lists do not depend on it."""

    def default_list(self, n: int) -> pd.DataFrame:
        """The ``__default__`` rows: the popularity fallback."""
        top = self.popular_.head(n)
        return pd.DataFrame(
            {
                "rank": np.arange(1, len(top) + 1, dtype=np.int16),
                "item_id": top["item_id"].astype(object).to_numpy(),
                "score": top["score"].astype(np.float32).to_numpy(),
                "reason": top["reason"].astype(object).to_numpy(),
                "source": "popular",
            }
        )

    @abstractmethod
    def _recommend_chunk(self, users: np.ndarray, n: int) -> pd.DataFrame:
        """Lists for one chunk of users, in the columns of :meth:`recommend`."""

    @abstractmethod
    def _fallback_candidates(self, users: np.ndarray, n: int) -> pd.DataFrame:
        """Non-personal items for ``users``: user_id, item_id, score, reason, source, order."""

    @abstractmethod
    def _seen(self, user_ids: pd.Series, item_ids: pd.Series) -> np.ndarray:
        """Per pair, whether the user has already engaged with the item."""

    def _fill_from_fallback(
        self, personal: pd.DataFrame, users: np.ndarray, n: int
    ) -> pd.DataFrame:
        """Top up lists shorter than ``n`` (all of them, for unknown users) with fallback
        items the user has not seen and the list does not hold yet."""
        have = personal.groupby("user_id", sort=False).size().reindex(users, fill_value=0)
        short = have[have < n].index.to_numpy(dtype=object)
        if len(short):
            cand = self._fallback_candidates(short, n)
            cand = cand[~self._seen(cand["user_id"], cand["item_id"])]
            cand = cand.merge(personal[["user_id", "item_id"]], how="left", indicator=True)
            cand = cand[cand["_merge"] == "left_only"].drop(columns="_merge")
            cand = cand.sort_values(["user_id", "order"], kind="stable")
            cand["rank"] = (
                cand.groupby("user_id", sort=False).cumcount()
                + cand["user_id"].map(have).to_numpy()
                + 1
            )
            cand = cand[cand["rank"] <= n].drop(columns="order")
            personal = pd.concat([personal, cand], ignore_index=True)
        personal["rank"] = personal["rank"].astype(np.int16)
        personal["score"] = personal["score"].astype(np.float32)
        return personal.sort_values(["user_id", "rank"], kind="stable")[
            ["user_id", "rank", "item_id", "score", "reason", "source"]
        ].reset_index(drop=True)


def item_labels(item_ids: np.ndarray, items: pd.DataFrame | None) -> pd.DataFrame:
    labels = pd.DataFrame({"item_id": item_ids})
    if items is not None and "title" in items:
        side = items.drop_duplicates("item_id").set_index("item_id")
        labels["title"] = labels["item_id"].map(side["title"]).astype("string")
        if "category" in side:
            labels["category"] = labels["item_id"].map(side["category"]).astype("string")
    if "title" not in labels:
        labels["title"] = pd.Series(pd.NA, index=labels.index, dtype="string")
    labels["title"] = labels["title"].fillna(labels["item_id"].astype("string"))
    return labels


def row_dots(
    left: np.ndarray, left_rows: np.ndarray, right: np.ndarray, right_rows: np.ndarray
) -> np.ndarray:
    """``left[left_rows[k]] . right[right_rows[k]]`` for every k, as float32: ``np.einsum``
    over blocks of :data:`PAIRS_PER_BLOCK` pairs, so that the gathered rows stay in cache
    (each dot product is the same however many pairs share a call)."""
    out = np.empty(len(left_rows), np.float32)
    for lo in range(0, len(left_rows), PAIRS_PER_BLOCK):
        hi = lo + PAIRS_PER_BLOCK
        out[lo:hi] = np.einsum("pf,pf->p", left[left_rows[lo:hi]], right[right_rows[lo:hi]])
    return out


def normalise_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.maximum(norms, 1e-12)


def empty_lists() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": pd.Series(dtype=object),
            "rank": pd.Series(dtype=np.int16),
            "item_id": pd.Series(dtype=object),
            "score": pd.Series(dtype=np.float32),
            "reason": pd.Series(dtype=object),
            "source": pd.Series(dtype=object),
        }
    )


def ranked_within(
    groups: np.ndarray, scores: np.ndarray, ties: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Order rows by group, best score first within a group, ties by ``ties`` (ascending),
    stably: the positions in that order and each one's rank in its group (1 = best). What a
    multi-key ``sort_values`` and ``groupby().cumcount()`` give, by ``np.lexsort``; or, when
    each group is one run of rows, the scores are float32 without NaN and the ties distinct
    non-negative integers within a group, by one sort of a 64-bit key per row (group, score,
    tie), the same order in a third of the time."""
    order = _order_by_key(groups, scores, ties)
    if order is None:
        order = np.lexsort((ties, -np.asarray(scores), groups))
    grouped = np.asarray(groups)[order]
    positions = np.arange(len(order))
    first = np.r_[True, grouped[1:] != grouped[:-1]] if len(order) else np.zeros(0, bool)
    rank = positions - np.maximum.accumulate(np.where(first, positions, 0)) + 1
    return order, rank


def _order_by_key(groups, scores, ties) -> np.ndarray | None:
    """``np.lexsort((ties, -scores, groups))`` by one sort of a packed key, or None when the
    key does not apply (see :func:`ranked_within`) or does not fit in 64 bits."""
    groups, scores, ties = np.asarray(groups), np.asarray(scores), np.asarray(ties)
    n = len(groups)
    if (
        n < 2
        or scores.dtype != np.float32
        or groups.dtype.kind not in "iu"
        or ties.dtype.kind not in "iu"
        or ties.min() < 0
        or np.isnan(scores).any()
    ):
        return None
    starts = run_starts(groups)
    run_values = groups[starts]
    by_value = np.argsort(run_values, kind="stable")
    if (run_values[by_value][1:] == run_values[by_value][:-1]).any():
        return None  # a group in several runs
    group_bits = max(int(len(starts) - 1).bit_length(), 1)
    tie_bits = max(int(ties.max()).bit_length(), 1)
    if group_bits + 32 + tie_bits > 64:
        return None
    code = np.empty(len(starts), np.uint64)
    code[by_value] = np.arange(len(starts), dtype=np.uint64)  # groups in ascending order
    code = np.repeat(code, np.diff(np.r_[starts, n]))
    bits = (scores + np.float32(0.0)).view(np.uint32)  # -0.0 -> 0.0: equal scores, equal bits
    ascending = np.where(bits >> 31, ~bits, bits | np.uint32(1 << 31))  # float order as uint
    descending = (~ascending).astype(np.uint64)
    key = (code << np.uint64(32 + tie_bits)) | (descending << np.uint64(tie_bits))
    key |= ties.astype(np.uint64)
    order = np.argsort(key)
    ordered = key[order]
    if (ordered[1:] == ordered[:-1]).any():
        return None  # repeated ties within a group: lexsort's stable order decides
    return order


def empty_columns(confidence: sp.csr_matrix) -> np.ndarray | None:
    """Item columns nobody interacted with (items of the run's id space first seen after the
    matrix's cutoff), which ALS must never propose; None when there are none."""
    empty = np.flatnonzero(np.bincount(confidence.indices, minlength=confidence.shape[1]) == 0)
    return empty if len(empty) else None


def active_part(matrix: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of ``matrix`` with at least one stored entry, in order."""
    matrix = sp.csr_matrix(matrix)
    rows = np.flatnonzero(np.diff(matrix.indptr) > 0)
    cols = np.flatnonzero(np.bincount(matrix.indices, minlength=matrix.shape[1]) > 0)
    return rows, cols


def fit_als(
    confidence: sp.csr_matrix,
    *,
    factors: int,
    regularization: float,
    alpha: float,
    iterations: int,
    random_state: int,
    num_threads: int = 0,
    warm_start: tuple[np.ndarray, np.ndarray] | None = None,
):
    """Implicit ALS fitted on a users x items confidence matrix (no progress bar, no loss):
    the one place both the plain ALS model and the candidate generator build it.

    A run's matrices have its whole id space, so users and items first seen after the
    matrix's cutoff are empty rows and columns. ALS is fitted on the active part only (its
    random start, and so its factors, are those of a matrix of the active users and items,
    in code order) and the empty rows and columns get zero factors.

    ``warm_start``: (user factors, item factors) of an earlier fit on the same id space (an
    older cutoff) to start from instead of a random start; the users and items it did not
    know start at zero. ``iterations`` then counts the sweeps after that start."""
    from implicit.cpu.als import AlternatingLeastSquares  # lazy: implicit is slow to import

    if confidence.nnz == 0:
        raise ValueError("cannot train on an empty interaction matrix")
    model = AlternatingLeastSquares(
        factors=factors,
        regularization=regularization,
        alpha=alpha,
        iterations=iterations,
        random_state=random_state,
        num_threads=num_threads,
        calculate_training_loss=False,
    )
    rows, cols = active_part(confidence)
    if warm_start is not None:
        users, items = (np.asarray(f) for f in warm_start)
        if users.shape != (confidence.shape[0], factors) or items.shape != (
            confidence.shape[1],
            factors,
        ):
            raise ValueError(
                f"warm start factors {users.shape} and {items.shape} do not fit "
                f"a {confidence.shape} matrix with {factors} factors"
            )
        model.user_factors = np.ascontiguousarray(users[rows], dtype=np.float32)
        model.item_factors = np.ascontiguousarray(items[cols], dtype=np.float32)
    if len(rows) == confidence.shape[0] and len(cols) == confidence.shape[1]:
        model.fit(confidence, show_progress=False)
        return model
    model.fit(sp.csr_matrix(confidence[rows][:, cols]), show_progress=False)
    for name, index, size in (
        ("user_factors", rows, confidence.shape[0]),
        ("item_factors", cols, confidence.shape[1]),
    ):
        active = np.asarray(getattr(model, name))
        full = np.zeros((size, active.shape[1]), dtype=active.dtype)
        full[index] = active
        setattr(model, name, full)
    return model
