"""Hyperparameter search for the two-stage recommender: expanding-window time-series CV.

Fold ``f`` of ``n_folds`` tests on the ``horizon_days`` window ending
``(f - 1) * horizon_days`` before the cutoff and trains on every event before that window
(expanding: earlier folds see less history). Nothing at or after the cutoff is read, so the
period the tuned model will serve is never seen. Every user active in a test window is
scored (warm users with the model's lists, cold users with its cold-start list), by nDCG@k.

The search is random over a bounded space (:data:`SEARCH_SPACE`), starts from the current
parameters, and stops when the next trial would overrun ``budget_minutes``.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pipeline.core.config import DEFAULT_EVENT_WEIGHTS
from pipeline.core.ids import EncodedEvents
from pipeline.core.metrics import user_metrics, window_truth_frame
from pipeline.models.twostage import TwoStageRecommender

logger = logging.getLogger(__name__)

#: Bounded search space: ALS (stage one), XGBoost (stage two) and the objective.
SEARCH_SPACE: dict[str, tuple] = {
    "factors": (32, 64, 128),
    "regularization": (0.01, 0.05, 0.1, 0.5),
    "alpha": (0.5, 1.0, 2.0, 5.0, 10.0),
    "iterations": (10, 15, 25),
    "objective": ("binary:logistic", "rank:ndcg"),
    "max_depth": (3, 4, 6, 8),
    "learning_rate": (0.03, 0.05, 0.1, 0.2),
    "min_child_weight": (1.0, 5.0, 20.0),
    "subsample": (0.6, 0.8, 1.0),
    "n_estimators": (100, 300, 600),  # upper bound; early stopping picks the number of trees
    "label_halflife_days": (None, 14.0, 28.0, 56.0),  # ranker query weights by window age
}


@dataclass(frozen=True)
class TuningResult:
    """Best parameters, their mean CV score, and every trial (one row each)."""

    best_params: dict
    best_score: float
    trials: pd.DataFrame = field(repr=False)
    folds: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"best_params": self.best_params, "best_score": round(self.best_score, 6),
                "trials": len(self.trials), "folds": self.folds}


def expanding_folds(cutoff: dt.datetime, n_folds: int, horizon_days: int
                    ) -> list[tuple[dt.datetime, dt.datetime]]:
    """(test start, test end) per fold, oldest first; every test end is <= ``cutoff``."""
    if n_folds < 1 or horizon_days < 1:
        raise ValueError("n_folds and horizon_days must be >= 1")
    step = dt.timedelta(days=horizon_days)
    return [(cutoff - step * f, cutoff - step * (f - 1)) for f in range(n_folds, 0, -1)]


def sample_params(rng: np.random.Generator, space: Mapping[str, tuple] = SEARCH_SPACE
                  ) -> dict:
    """One random point of ``space`` (plain Python values)."""
    return {name: _plain(values[int(rng.integers(len(values)))])
            for name, values in space.items()}


def score_params(events: EncodedEvents, folds: list[tuple[dt.datetime, dt.datetime]],
                 params: Mapping[str, object], items: pd.DataFrame | None,
                 users: pd.DataFrame | None, weights: Mapping[str, float], k: int = 10
                 ) -> list[float]:
    """nDCG@k of a :class:`TwoStageRecommender` with ``params`` on each fold."""
    scores = []
    frame = events.frame
    for start, end in folds:
        truth = window_truth_frame(frame[frame["timestamp"] < end], start, end)
        truth = pd.DataFrame({"user_id": events.users.decode(truth["user_id"]),
                              "item_id": events.items.decode(truth["item_id"])})
        if truth.empty:
            scores.append(float("nan"))
            continue
        model = TwoStageRecommender(**params).fit(events, start, weights, items, users)
        lists = model.recommend(truth["user_id"].unique(), k)
        scores.append(float(user_metrics(lists, truth, k)["ndcg"].mean()))
    return scores


def tune_twostage(events: EncodedEvents | pd.DataFrame, cutoff: dt.datetime,
                  base_params: Mapping[str, object], budget_minutes: float,
                  items: pd.DataFrame | None = None,
                  users: pd.DataFrame | None = None,
                  weights: Mapping[str, float] = DEFAULT_EVENT_WEIGHTS, n_folds: int = 3,
                  horizon_days: int = 14, max_trials: int = 50, random_state: int = 42,
                  space: Mapping[str, tuple] = SEARCH_SPACE, k: int = 10) -> TuningResult:
    """Random search over ``space`` within ``budget_minutes``; trial 0 is ``base_params``."""
    if not isinstance(events, EncodedEvents):
        events = EncodedEvents.from_frame(events[events["timestamp"] < cutoff], weights)
    events = events.before(cutoff)
    folds = expanding_folds(cutoff, n_folds, horizon_days)
    rng = np.random.default_rng(random_state)
    started, longest = time.perf_counter(), 0.0
    records: list[dict] = []
    for trial in range(max_trials):
        elapsed = time.perf_counter() - started
        if trial > 0 and elapsed + longest > budget_minutes * 60:
            break
        params = dict(base_params) if trial == 0 else {**base_params, **sample_params(rng, space)}
        t0 = time.perf_counter()
        scores = score_params(events, folds, params, items, users, weights, k)
        longest = max(longest, time.perf_counter() - t0)
        mean = float(np.nanmean(scores)) if np.isfinite(scores).any() else float("nan")
        records.append({"trial": trial, "score": mean, "seconds": time.perf_counter() - t0,
                        **{f"fold{f}": s for f, s in enumerate(scores)}, **params})
        logger.info("tuning trial %d: ndcg@%d %.4f (folds %s) in %.1fs", trial, k, mean,
                    [round(s, 4) for s in scores], time.perf_counter() - t0)
    trials = pd.DataFrame.from_records(records)
    best = trials.loc[trials["score"].fillna(-np.inf).idxmax()]
    best_params = {name: _plain(best[name]) for name in base_params}
    logger.info("tuning done: %d trials in %.0fs, best ndcg@%d %.4f with %s", len(trials),
                time.perf_counter() - started, k, best["score"], best_params)
    return TuningResult(best_params, float(best["score"]), trials,
                        [(s.isoformat(), e.isoformat()) for s, e in folds])


def _plain(value):
    """NumPy scalars -> Python scalars (JSON- and MLflow-friendly)."""
    return value.item() if isinstance(value, np.generic) else value
