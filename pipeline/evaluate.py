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

from pipeline.matrix import InteractionMatrix, build_matrix

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HoldoutSplit:
    """Train matrix, and truth (users x items, 1 where engaged in the holdout) on the same ids."""

    train: InteractionMatrix
    truth: sp.csr_matrix
    train_events: pd.DataFrame
    holdout_start: dt.datetime

    @property
    def eval_rows(self) -> np.ndarray:
        """Rows of users with at least one new item in the holdout."""
        return np.flatnonzero(np.diff(self.truth.indptr) > 0)


def split_holdout(events: pd.DataFrame, cutoff: dt.datetime, holdout_days: int,
                  weights: Mapping[str, float]) -> HoldoutSplit:
    """Split events at ``cutoff - holdout_days``; truth excludes items seen before."""
    start = cutoff - dt.timedelta(days=holdout_days)
    train_events = events[events["timestamp"] < start]
    test_events = events[(events["timestamp"] >= start) & (events["timestamp"] < cutoff)]
    train = build_matrix(train_events, weights)
    test = build_matrix(test_events, weights, user_ids=train.user_ids, item_ids=train.item_ids)
    truth = (test.confidence > 0).astype(np.float32).tocsr()
    truth = (truth - truth.multiply(train.confidence > 0)).tocsr()
    truth.eliminate_zeros()
    return HoldoutSplit(train, truth, train_events, start)


def ranking_metrics(top: np.ndarray, truth: sp.csr_matrix, k: int = 10) -> dict[str, float]:
    """Mean precision, recall, nDCG, MAP and hit rate at ``k``.

    ``top`` is users x >=k item columns (-1 = no item); ``truth`` is users x items on the
    same rows. Users with an empty truth row are skipped.
    """
    top = top[:, :k]
    relevant = np.diff(truth.indptr)
    users = np.flatnonzero(relevant > 0)
    if len(users) == 0:
        return {m: float("nan") for m in ("precision", "recall", "ndcg", "map", "hit_rate")}
    top, relevant = top[users], relevant[users]
    truth = truth[users]
    rows = np.repeat(np.arange(len(users)), top.shape[1])
    cols = top.ravel()
    hit = np.zeros(len(cols), bool)
    ok = cols >= 0
    hit[ok] = np.asarray(truth[rows[ok], cols[ok]]).ravel() > 0
    hits = hit.reshape(top.shape).astype(np.float64)
    discounts = 1.0 / np.log2(np.arange(2, top.shape[1] + 2))
    dcg = hits @ discounts
    ideal = np.cumsum(discounts)[np.minimum(relevant, top.shape[1]) - 1]
    precision_at = np.cumsum(hits, axis=1) / np.arange(1, top.shape[1] + 1)
    ap = (precision_at * hits).sum(axis=1) / np.minimum(relevant, top.shape[1])
    return {"precision": float(hits.sum(axis=1).mean() / k),
            "recall": float((hits.sum(axis=1) / relevant).mean()),
            "ndcg": float((dcg / ideal).mean()),
            "map": float(ap.mean()),
            "hit_rate": float((hits.sum(axis=1) > 0).mean())}


def top_by_scores(scores: np.ndarray, seen: sp.csr_matrix, k: int) -> np.ndarray:
    """Top-``k`` columns per row of a dense score matrix, excluding seen items."""
    scores = np.array(scores, dtype=np.float64, copy=True)
    coo = seen.tocoo()
    scores[coo.row, coo.col] = -np.inf
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    top = np.take_along_axis(part, order, axis=1)
    return np.where(np.take_along_axis(scores, top, axis=1) == -np.inf, -1, top)


def popularity_top(split: HoldoutSplit, rows: np.ndarray, k: int, days: int | None
                   ) -> np.ndarray:
    """Baseline: the most popular unseen items (distinct users, optionally last ``days``)."""
    events = split.train_events
    if days is not None:
        events = events[events["timestamp"] >= split.holdout_start - dt.timedelta(days=days)]
    counts = (events.groupby("item_id", observed=True)["user_id"].nunique()
              .reindex(split.train.item_ids).fillna(0).to_numpy(np.float64))
    # Ties broken by item order so the baseline is deterministic.
    scores = np.broadcast_to(counts - np.arange(len(counts)) * 1e-9, (len(rows), len(counts)))
    return top_by_scores(scores, split.train.confidence[rows], k)


def evaluate_models(split: HoldoutSplit, recommenders: Mapping[str, Callable[[np.ndarray, int],
                                                                             np.ndarray]],
                    k: int = 10) -> pd.DataFrame:
    """One row per model: metrics at ``k`` on the warm users of the holdout."""
    rows = split.eval_rows
    truth = split.truth[rows]
    records = []
    for name, recommend in recommenders.items():
        metrics = ranking_metrics(recommend(rows, k), truth, k)
        records.append({"model": name, "users": len(rows), **metrics})
        logger.info("holdout %s: %s", name, {m: round(v, 4) for m, v in metrics.items()})
    return pd.DataFrame.from_records(records).set_index("model")
