"""Hyperparameter search for the two-stage recommender: expanding-window time-series CV.

Fold ``f`` of ``n_folds`` tests on the ``horizon_days`` window ending
``(f - 1) * horizon_days`` before the cutoff and trains on every event before that window
(expanding: earlier folds see less history). Nothing at or after the cutoff is read, so the
period the tuned model will serve is never seen. Every user active in a test window is
scored (warm users with the model's lists, cold users with its cold-start list), by nDCG@k.
The folds are cut by days, not rows (scikit-learn's ``TimeSeriesSplit`` cuts by rows, so a
fold would end mid-day and its test window would vary with traffic).

The search is Optuna's: a TPE sampler over the bounded space :data:`SEARCH_SPACE` (seeded,
so the same events and seed choose the same parameters), starting from the current
parameters (trial 0), and a median pruner that stops a trial after a fold when its CV score
so far is below the median of the finished trials' at that fold: a weak point costs one fit
(the oldest fold, the smallest) instead of ``n_folds``, which buys more trials in the same
``budget_minutes``. The search stops when the next trial would overrun the budget.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import optuna
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
#: Random trials before TPE models the space. Optuna's default (10) is more than a nightly
#: budget usually runs; 5 lets the model steer the later half of a short search.
SAMPLER_STARTUP_TRIALS = 5
#: Finished trials before the pruner may stop one: the median of fewer is mostly noise.
PRUNER_STARTUP_TRIALS = 3


@dataclass(frozen=True)
class TuningResult:
    """Best parameters, their mean CV score, and every trial (one row each; ``pruned``
    trials stopped after a fold and have no ``score``)."""

    best_params: dict
    best_score: float
    trials: pd.DataFrame = field(repr=False)
    folds: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        pruned = int(self.trials["pruned"].sum()) if "pruned" in self.trials else 0
        return {
            "best_params": self.best_params,
            "best_score": round(self.best_score, 6),
            "trials": len(self.trials),
            "pruned": pruned,
            "folds": self.folds,
        }


def expanding_folds(
    cutoff: dt.datetime, n_folds: int, horizon_days: int
) -> list[tuple[dt.datetime, dt.datetime]]:
    """(test start, test end) per fold, oldest first; every test end is <= ``cutoff``."""
    if n_folds < 1 or horizon_days < 1:
        raise ValueError("n_folds and horizon_days must be >= 1")
    step = dt.timedelta(days=horizon_days)
    return [(cutoff - step * f, cutoff - step * (f - 1)) for f in range(n_folds, 0, -1)]


def score_fold(
    events: EncodedEvents,
    start: dt.datetime,
    end: dt.datetime,
    params: Mapping[str, object],
    items: pd.DataFrame | None,
    users: pd.DataFrame | None,
    weights: Mapping[str, float],
    k: int = 10,
) -> float:
    """nDCG@k of a :class:`TwoStageRecommender` with ``params``, fitted on the events
    before ``start``, on the window ``[start, end)`` (NaN when nobody is active in it)."""
    frame = events.frame
    truth = window_truth_frame(frame[frame["timestamp"] < end], start, end)
    truth = pd.DataFrame(
        {
            "user_id": events.users.decode(truth["user_id"]),
            "item_id": events.items.decode(truth["item_id"]),
        }
    )
    if truth.empty:
        return float("nan")
    model = TwoStageRecommender(**params).fit(events, start, weights, items, users)
    lists = model.recommend(truth["user_id"].unique(), k)
    return float(user_metrics(lists, truth, k)["ndcg"].mean())


def score_params(
    events: EncodedEvents,
    folds: list[tuple[dt.datetime, dt.datetime]],
    params: Mapping[str, object],
    items: pd.DataFrame | None,
    users: pd.DataFrame | None,
    weights: Mapping[str, float],
    k: int = 10,
) -> list[float]:
    """nDCG@k of a :class:`TwoStageRecommender` with ``params`` on each fold."""
    return [
        score_fold(events, start, end, params, items, users, weights, k) for start, end in folds
    ]


def tune_twostage(
    events: EncodedEvents | pd.DataFrame,
    cutoff: dt.datetime,
    base_params: Mapping[str, object],
    budget_minutes: float,
    items: pd.DataFrame | None = None,
    users: pd.DataFrame | None = None,
    weights: Mapping[str, float] = DEFAULT_EVENT_WEIGHTS,
    n_folds: int = 3,
    horizon_days: int = 14,
    max_trials: int = 50,
    random_state: int = 42,
    space: Mapping[str, tuple] = SEARCH_SPACE,
    k: int = 10,
) -> TuningResult:
    """Optuna search over ``space`` within ``budget_minutes``; trial 0 is ``base_params``.

    Only the names of ``space`` that ``base_params`` has are searched (a name the model
    does not take cannot be tuned), and each one's choices include its base value, so that
    trial 0 is a point of the space. The mean over the folds is a trial's score; after each
    fold but the last, the mean so far is reported to the pruner (a mean, not the fold's own
    score: later folds train on more history and score differently, and the pruner compares
    a trial's best report with the others' at the same fold)."""
    if not isinstance(events, EncodedEvents):
        events = EncodedEvents.from_frame(events[events["timestamp"] < cutoff], weights)
    events = events.before(cutoff)
    folds = expanding_folds(cutoff, n_folds, horizon_days)
    choices = {
        name: tuple(values) if base_params[name] in values else (*values, _plain(base_params[name]))
        for name, values in space.items()
        if name in base_params
    }
    _route_optuna_logs()
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(
            seed=random_state, n_startup_trials=SAMPLER_STARTUP_TRIALS
        ),
        pruner=optuna.pruners.MedianPruner(
            n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=0
        ),
    )
    study.enqueue_trial({name: _plain(base_params[name]) for name in choices})
    started, longest = time.perf_counter(), 0.0
    records: list[dict] = []
    tried: list[dict] = []  # each trial's params as passed (the table turns None into NaN)
    for number in range(max_trials):
        elapsed = time.perf_counter() - started
        if number > 0 and elapsed + longest > budget_minutes * 60:
            break
        trial = study.ask()
        params = {
            **base_params,
            **{name: trial.suggest_categorical(name, values) for name, values in choices.items()},
        }
        t0 = time.perf_counter()
        scores, pruned = _run_folds(trial, events, folds, params, items, users, weights, k)
        seconds = time.perf_counter() - t0
        longest = max(longest, seconds)
        mean = (
            float(np.nanmean(scores)) if not pruned and np.isfinite(scores).any() else float("nan")
        )
        if pruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        elif math.isnan(mean):  # every fold window empty: nothing to learn from
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, mean)
        tried.append({name: _plain(params[name]) for name in base_params})
        records.append(
            {
                "trial": number,
                "score": mean,
                "seconds": seconds,
                **{f"fold{f}": s for f, s in enumerate(scores)},
                "pruned": pruned,
                **{name: params[name] for name in base_params},
            }
        )
        logger.info(
            "tuning trial %d: ndcg@%d %.4f (folds %s)%s in %.1fs",
            number,
            k,
            mean,
            [round(s, 4) for s in scores if not math.isnan(s)],
            f", pruned after fold {len([s for s in scores if s == s]) - 1}" if pruned else "",
            seconds,
        )
    trials = pd.DataFrame.from_records(records)
    best = trials.loc[trials["score"].fillna(-np.inf).idxmax()]
    best_params = tried[int(best["trial"])]
    logger.info(
        "tuning done: %d trials (%d pruned) in %.0fs, best ndcg@%d %.4f with %s",
        len(trials),
        int(trials["pruned"].sum()),
        time.perf_counter() - started,
        k,
        best["score"],
        best_params,
    )
    return TuningResult(
        best_params,
        float(best["score"]),
        trials,
        [(s.isoformat(), e.isoformat()) for s, e in folds],
    )


def _run_folds(
    trial: optuna.trial.Trial,
    events: EncodedEvents,
    folds: list[tuple[dt.datetime, dt.datetime]],
    params: Mapping[str, object],
    items: pd.DataFrame | None,
    users: pd.DataFrame | None,
    weights: Mapping[str, float],
    k: int,
) -> tuple[list[float], bool]:
    """Each fold's score (NaN for the folds a pruned trial did not run) and whether the
    pruner stopped the trial. An empty fold (NaN) is not reported: the pruner would take it
    for a failed trial."""
    scores = [float("nan")] * len(folds)
    for step, (start, end) in enumerate(folds):
        scores[step] = score_fold(events, start, end, params, items, users, weights, k)
        done = [s for s in scores[: step + 1] if not math.isnan(s)]
        if step < len(folds) - 1 and not math.isnan(scores[step]):
            trial.report(float(np.mean(done)), step)
            if trial.should_prune():
                return scores, True
    return scores, False


class _ToModuleLogger(logging.Handler):
    """Hands Optuna's records to this module's logger, so they go where ours go (the Airflow
    task log, the CLI's stderr) in our format, instead of through Optuna's own handler."""

    def emit(self, record: logging.LogRecord) -> None:
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)


def _route_optuna_logs() -> None:
    """Optuna logs every trial at INFO on its own stderr handler; our trial lines say the
    same (with fold scores), so keep its warnings only, through :class:`_ToModuleLogger`.
    Idempotent: the handler is added once per process."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.logging.disable_default_handler()
    library = logging.getLogger("optuna")
    if not any(isinstance(h, _ToModuleLogger) for h in library.handlers):
        library.addHandler(_ToModuleLogger())


def _plain(value):
    """NumPy scalars -> Python scalars (JSON- and MLflow-friendly)."""
    return value.item() if isinstance(value, np.generic) else value
