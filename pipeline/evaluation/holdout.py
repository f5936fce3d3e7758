"""Time-based holdout evaluation: ranking metrics at K for the model and the baselines.

The last ``holdout_days`` before the cutoff are the test period. A model is fitted on the
events before it and asked for K items per user; the truth is what each user engaged with in
the test period and had not engaged with before. Only users with history before the holdout
are scored here (warm users): cold users get the popularity list by design.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pipeline.core.ids import EncodedEvents
from pipeline.core.metrics import ranking_metrics, top_diversity, top_from_lists
from pipeline.features.matrix import InteractionMatrix, build_matrix, with_history
from pipeline.features.popularity import count_distinct

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HoldoutSplit:
    """Train matrix, and truth (users x items, 1 where engaged in the holdout) on the same ids."""

    train: InteractionMatrix
    truth: sp.csr_matrix
    train_events: pd.DataFrame
    holdout_start: dt.datetime
    encoded: EncodedEvents | None = None  # the events before the holdout, when encoded

    @property
    def eval_rows(self) -> np.ndarray:
        """Rows of users with at least one new item in the holdout."""
        return np.flatnonzero(np.diff(self.truth.indptr) > 0)


def split_holdout(
    events: EncodedEvents | pd.DataFrame,
    cutoff: dt.datetime,
    holdout_days: int,
    weights: Mapping[str, float],
    max_users: int | None = None,
    seed: int = 0,
) -> HoldoutSplit:
    """Split events at ``cutoff - holdout_days``; truth excludes items seen before, and users
    and items without history before the holdout (new users are scored elsewhere). With
    ``max_users``, truth keeps a seeded sample of that many of its users (``eval_rows``).

    On :class:`EncodedEvents` the train and truth matrices have the run's one shape, rows
    and columns named by the id maps; on a frame of string ids, the train events' ids."""
    start = cutoff - dt.timedelta(days=holdout_days)
    encoded = events if isinstance(events, EncodedEvents) else None
    frame = encoded.frame if encoded is not None else events
    train_mask = (frame["timestamp"] < start).to_numpy()
    train_events = frame[train_mask]
    test_events = frame[~train_mask & (frame["timestamp"] < cutoff).to_numpy()]
    if encoded is not None:
        space = (np.arange(encoded.shape[0]), np.arange(encoded.shape[1]))
        train = build_matrix(train_events, weights, *space)
        test = build_matrix(test_events, weights, *space)
    else:
        train = build_matrix(train_events, weights)
        test = build_matrix(test_events, weights, user_ids=train.user_ids, item_ids=train.item_ids)
    truth = (test.confidence > 0).astype(np.float32).tocsr()
    truth = (truth - truth.multiply(train.confidence > 0)).tocsr()
    truth = with_history(truth, train)
    truth = _sample_rows(truth, max_users, seed)
    if encoded is not None:
        train = train.relabel(encoded.users.ids, encoded.items.ids)
        # the same rows as train_events, not a second copy of them (GBs at a million users)
        encoded = EncodedEvents(train_events, encoded.users, encoded.items)
    return HoldoutSplit(train, truth, train_events, start, encoded)


def _sample_rows(truth: sp.csr_matrix, max_users: int | None, seed: int) -> sp.csr_matrix:
    """``truth`` with only a seeded sample of ``max_users`` of its non-empty rows left."""
    rows = np.flatnonzero(np.diff(truth.indptr) > 0)
    if max_users is None or len(rows) <= max_users:
        return truth
    keep = np.zeros(truth.shape[0], np.float32)
    keep[np.random.default_rng(seed).choice(rows, max_users, replace=False)] = 1.0
    logger.info(
        "holdout: scoring a seeded sample of %d of its %d returning users", max_users, len(rows)
    )
    sampled = sp.csr_matrix(truth.multiply(keep[:, None]))
    sampled.eliminate_zeros()
    return sampled


#: Cells (rows x items) of one block of :func:`top_by_scores`: its float64 copy and its
#: partition indices take about 1 GB, however many items there are.
BLOCK_CELLS = 2**26


def top_by_scores(
    scores: np.ndarray, seen: sp.csr_matrix, k: int, chunk_rows: int | None = None
) -> np.ndarray:
    """Top-``k`` columns per row of a dense score matrix, excluding seen items; a block of
    ``chunk_rows`` rows at a time (default: :data:`BLOCK_CELLS` cells; the float64 copy of
    every row was GBs at 50k users, and 2,048 rows of 100k items were 3 GB)."""
    if chunk_rows is None:
        chunk_rows = max(1, BLOCK_CELLS // max(scores.shape[1], 1))
    if len(scores) > chunk_rows:
        return np.vstack(
            [
                top_by_scores(scores[s : s + chunk_rows], seen[s : s + chunk_rows], k, chunk_rows)
                for s in range(0, len(scores), chunk_rows)
            ]
        )
    scores = np.array(scores, dtype=np.float64, copy=True)
    coo = seen.tocoo()
    scores[coo.row, coo.col] = -np.inf
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    top = np.take_along_axis(part, order, axis=1)
    return np.where(np.take_along_axis(scores, top, axis=1) == -np.inf, -1, top)


def popularity_top(split: HoldoutSplit, rows: np.ndarray, k: int, days: int | None) -> np.ndarray:
    """Baseline: the most popular unseen items (distinct users, optionally last ``days``)."""
    events = split.train_events
    if days is not None:
        events = events[events["timestamp"] >= split.holdout_start - dt.timedelta(days=days)]
    keys = (
        np.arange(split.train.shape[1])
        if events["item_id"].dtype.kind in "iu"
        else split.train.item_ids
    )  # encoded events: codes are the columns
    counts = (
        events.groupby("item_id", observed=True)["user_id"]
        .nunique()
        .reindex(keys)
        .fillna(0)
        .to_numpy(np.float64)
    )
    # Ties broken by item order so the baseline is deterministic (and every score distinct).
    return top_unseen(counts - np.arange(len(counts)) * 1e-9, split.train.confidence[rows], k)


#: Leading items of the ranking :func:`top_unseen` searches for each row's unseen top-k.
HEAD_EXTRA = 256


def top_unseen(
    scores: np.ndarray, seen: sp.csr_matrix, k: int, chunk_rows: int = 8_192
) -> np.ndarray:
    """Top-``k`` columns of one score vector shared by every row, excluding each row's seen
    items: :func:`top_by_scores` of the vector broadcast to every row (equal when the scores
    are distinct), without a dense users x items block.

    The items are ranked once; a row's top-k are the first ``k`` of that ranking it has not
    seen, so they lie among the first ``k`` + ``HEAD_EXTRA`` unless the row saw more than
    ``HEAD_EXTRA`` of those: such rows (heavy users) take the dense path. At 200k users x
    100k items this took the evaluate stage's two popularity baselines from ~180 s to
    seconds."""
    scores = np.asarray(scores, np.float64)
    n_items = len(scores)
    k = min(k, n_items)
    seen = sp.csr_matrix(seen)
    head = np.argsort(-scores, kind="stable")[: min(n_items, k + HEAD_EXTRA)]
    width = len(head)
    position = np.full(n_items, width, np.int64)  # where each item is in the head
    position[head] = np.arange(width)
    top = np.full((seen.shape[0], k), -1, np.int64)
    for first in range(0, seen.shape[0], chunk_rows):
        block = seen[first : first + chunk_rows].tocoo()
        n_rows = block.shape[0]
        unseen = np.ones((n_rows, width), bool)
        at = position[block.col]
        inside = at < width
        unseen[block.row[inside], at[inside]] = False
        rank = np.cumsum(unseen, axis=1)
        row, col = np.nonzero(unseen & (rank <= k))  # row by row, best first
        top[first + row, rank[row, col] - 1] = head[col]
        if width < n_items:  # rows with fewer than k unseen in the head: the dense path
            short = np.flatnonzero(rank[:, -1] < k)
            if len(short):
                dense = np.broadcast_to(scores, (len(short), n_items))
                top[first + short] = top_by_scores(dense, seen[first + short], k)
    return top


def evaluate_models(
    split: HoldoutSplit,
    recommenders: Mapping[str, Callable[[np.ndarray, int], np.ndarray]],
    k: int = 10,
    diversity: bool = False,
) -> pd.DataFrame:
    """One row per model: metrics at ``k`` on the warm users of the holdout (with
    ``diversity``, also catalog coverage and popularity bias, see :func:`top_diversity`)."""
    rows = split.eval_rows
    truth = split.truth[rows]
    records = []
    catalog = np.asarray((split.train.confidence > 0).sum(axis=0)).ravel()
    for name, recommend in recommenders.items():
        top = recommend(rows, k)
        metrics = ranking_metrics(top, truth, k)
        if diversity:
            metrics.update(top_diversity(top, catalog, k))
        records.append({"model": name, "users": len(rows), **metrics})
        logger.info("holdout %s: %s", name, {m: round(v, 4) for m, v in metrics.items()})
    return pd.DataFrame.from_records(records).set_index("model")


# ---- id-level evaluation of published-shape lists (warm and cold users alike) -------------


def segment_audit(per_user: Mapping[str, pd.DataFrame], segments: pd.DataFrame) -> pd.DataFrame:
    """Bias audit: mean metrics per model x segment column x segment value.

    ``per_user`` maps model name -> :func:`user_metrics` frame; ``segments`` is indexed by
    user_id with one column per segmentation (e.g. ``user_type`` new/returning, ``gender``).
    """
    records = []
    for model, frame in per_user.items():
        joined = frame.join(segments, how="left")
        for column in segments.columns:
            labels = joined[column].astype("string").fillna("unknown")
            for value, group in joined.groupby(labels, sort=True):
                records.append(
                    {
                        "model": model,
                        "segment": column,
                        "value": value,
                        "users": len(group),
                        **{m: float(group[m].mean()) for m in frame.columns},
                    }
                )
    return pd.DataFrame.from_records(records)


def lists_to_top(
    lists: pd.DataFrame, user_ids: np.ndarray, matrix: InteractionMatrix, k: int
) -> np.ndarray:
    """Ranked id lists -> users x ``k`` item columns of ``matrix`` (-1 = empty/unknown)."""
    return top_from_lists(lists, user_ids, matrix.item_ids, k)


def popularity_lists(
    events: pd.DataFrame,
    cutoff: dt.datetime,
    user_ids: np.ndarray,
    k: int,
    days: int | None = None,
    chunk_users: int = 2_000,
) -> pd.DataFrame:
    """Non-personal baseline for any users (cold too): the most popular items (distinct
    users, optionally in the last ``days`` before ``cutoff``) each user has not seen;
    ``chunk_users`` users at a time (each gets k + the heaviest user's history candidates)."""
    events = events[events["timestamp"] < cutoff]
    window = (
        events if days is None else events[events["timestamp"] >= cutoff - dt.timedelta(days=days)]
    )
    counts = count_distinct(window)
    ranked = counts.rename("n").reset_index().sort_values(["n", "item_id"], ascending=[False, True])
    user_ids = pd.unique(np.asarray(user_ids, dtype=object))
    ranking = ranked["item_id"].astype(object).to_numpy()
    # every asked user's distinct items, found in one pass over the events (not one per chunk)
    seen = events[events["user_id"].isin(user_ids)][["user_id", "item_id"]].drop_duplicates()
    chunk_of = pd.Series(np.arange(len(user_ids)) // chunk_users, index=user_ids)
    by_chunk = dict(tuple(seen.groupby(seen["user_id"].map(chunk_of).to_numpy())))
    empty = seen.head(0)
    parts = [
        _unseen_top(
            by_chunk.get(s // chunk_users, empty), user_ids[s : s + chunk_users], ranking, k
        )
        for s in range(0, len(user_ids), chunk_users)
    ]  # users x depth rows per chunk
    if not parts:
        return pd.DataFrame(columns=["user_id", "rank", "item_id"])
    return (
        pd.concat(parts, ignore_index=True)
        .sort_values(["user_id", "rank"], kind="stable")
        .reset_index(drop=True)
    )


def _unseen_top(
    seen: pd.DataFrame, user_ids: np.ndarray, ranking: np.ndarray, k: int
) -> pd.DataFrame:
    """The first ``k`` items of ``ranking`` each user has no event with (``seen``: the
    users' distinct (user_id, item_id) pairs)."""
    depth = k + int(seen.groupby("user_id", observed=True).size().max()) if len(seen) else k
    top = ranking[:depth]
    cand = pd.DataFrame(
        {
            "user_id": np.repeat(user_ids, len(top)),
            "item_id": np.tile(top, len(user_ids)),
            "order": np.tile(np.arange(len(top)), len(user_ids)),
        }
    )
    cand = cand.merge(seen.astype(object).assign(seen=True), how="left", on=["user_id", "item_id"])
    cand = cand[cand["seen"].isna()].sort_values(["user_id", "order"], kind="stable")
    cand["rank"] = cand.groupby("user_id").cumcount() + 1
    return cand[cand["rank"] <= k][["user_id", "rank", "item_id"]].reset_index(drop=True)
