"""Tuning: the earlier random search against Optuna (TPE sampler, median pruning), same budget.

MovieLens-100k, the development cutoffs only (``bench_quality.DEV_CUTOFFS``, whose 30-day
windows end before the quality benchmark's first cutoff). At each cutoff both searches run
with the same time budget on the events before it, over the nightly's folds (3 expanding
folds of ``holdout_days`` = 14 days, seed 42, starting from the DAG's default params); then
each one's chosen params are fitted on every event before the cutoff and scored by nDCG@10 on
the users active in the next 30 days, beside the untuned default params. The two searches
take turns going first (the machine is shared: a slow spell should not fall on one of them
only). Printed per cutoff and summed: trials, trials per minute, pruned trials, the CV score
of the chosen params and their dev-cutoff score.

``python -m benchmarks tuning`` (5 minutes per search and cutoff, ~35 min in all);
``--quick``: 1 minute, the first cutoff only. ``RECS_BENCH_TUNING_MINUTES`` sets the budget.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from collections.abc import Mapping

import numpy as np
import pandas as pd

FOLDS = 3
FOLD_DAYS = 14  # Settings.holdout_days: the nightly tune stage's horizon
SEED = 42
logger = logging.getLogger(__name__)


def run(quick: bool = False) -> None:
    from benchmarks.bench_quality import DEV_CUTOFFS, HORIZON_DAYS, K, _cache_dir, _utc
    from pipeline.core.config import DEFAULT_EVENT_WEIGHTS
    from pipeline.core.metrics import user_metrics, window_truth_frame
    from pipeline.evaluation.tuning import tune_twostage
    from pipeline.lake.demo.movielens import load_movielens_100k
    from pipeline.models.twostage import TwoStageRecommender

    minutes = float(os.environ.get("RECS_BENCH_TUNING_MINUTES", 1.0 if quick else 5.0))
    cutoffs = DEV_CUTOFFS[:1] if quick else DEV_CUTOFFS
    data = load_movielens_100k(_cache_dir())
    events = data.events
    base = TwoStageRecommender(random_state=SEED).get_params()
    print(
        f"MovieLens-100k, dev cutoffs {', '.join(cutoffs)}; {minutes:g} min per search and "
        f"cutoff, {FOLDS} expanding folds of {FOLD_DAYS} days, seed {SEED}; dev score: "
        f"nDCG@{K} over the next {HORIZON_DAYS} days (all active users / warm users)",
        flush=True,
    )
    searches = {"random (before)": random_search, "optuna (TPE + pruning)": tune_twostage}
    rows = []
    for turn, day in enumerate(cutoffs):
        cutoff = _utc(day)
        train = events[events["timestamp"] < cutoff]
        truth = window_truth_frame(events, cutoff, cutoff + dt.timedelta(days=HORIZON_DAYS))
        users = truth["user_id"].unique()
        warm = np.isin(users, train["user_id"].unique())

        def dev_score(
            params: Mapping, truth=truth, users=users, warm=warm, cutoff=cutoff, train=train
        ) -> tuple[float, float]:
            model = TwoStageRecommender(**params).fit(
                train, cutoff, DEFAULT_EVENT_WEIGHTS, data.items, data.users
            )
            per_user = user_metrics(model.recommend(users, K), truth, K)["ndcg"]
            per_user = per_user.reindex(users).fillna(0.0).to_numpy()
            return float(per_user.mean()), float(per_user[warm].mean())

        all_users, warm_users = dev_score(base)
        rows.append(
            {
                "cutoff": day,
                "search": "default params (no search)",
                "trials": 0,
                "pruned": 0,
                "minutes": 0.0,
                "cv": float("nan"),
                "dev": all_users,
                "dev_warm": warm_users,
            }
        )
        print(
            f"\n{day}: {len(users)} users ({int(warm.sum())} warm); default params "
            f"{all_users:.4f} / {warm_users:.4f}",
            flush=True,
        )
        order = list(searches) if turn % 2 == 0 else list(reversed(searches))
        for name in order:
            started = time.perf_counter()
            result = searches[name](
                train,
                cutoff,
                base,
                minutes,
                data.items,
                data.users,
                DEFAULT_EVENT_WEIGHTS,
                n_folds=FOLDS,
                horizon_days=FOLD_DAYS,
                random_state=SEED,
            )
            spent = (time.perf_counter() - started) / 60
            all_users, warm_users = dev_score(result.best_params)
            trials = result.trials
            pruned = int(trials["pruned"].sum()) if "pruned" in trials else 0
            rows.append(
                {
                    "cutoff": day,
                    "search": name,
                    "trials": len(trials),
                    "pruned": pruned,
                    "minutes": spent,
                    "cv": result.best_score,
                    "dev": all_users,
                    "dev_warm": warm_users,
                }
            )
            changed = {k: v for k, v in result.best_params.items() if v != base[k]}
            print(
                f"  {name:<24} {len(trials):>3} trials ({pruned} pruned) in {spent:.1f} min "
                f"= {len(trials) / spent:.2f}/min; CV {result.best_score:.4f}; dev "
                f"{all_users:.4f} / {warm_users:.4f}; chose {changed or 'the defaults'}",
                flush=True,
            )
    _print_table(pd.DataFrame(rows), cutoffs)


def _print_table(table: pd.DataFrame, cutoffs) -> None:
    print(
        f"\n{'search':<28}"
        + "".join(f"{c:>15}" for c in cutoffs)
        + f"{'mean':>9}{'trials/min':>12}{'pruned':>8}"
    )
    for name, group in table.groupby("search", sort=False):
        group = group.set_index("cutoff").loc[list(cutoffs)]
        minutes = group["minutes"].sum()
        rate = f"{group['trials'].sum() / minutes:.2f}" if minutes else "-"
        pruned = f"{group['pruned'].sum()}/{group['trials'].sum()}" if minutes else "-"
        print(
            f"{name:<28}"
            + "".join(
                f"{a:.4f} / {w:.3f}".rjust(15) for a, w in zip(group["dev"], group["dev_warm"])
            )
            + f"{group['dev'].mean():>9.4f}{rate:>12}{pruned:>8}"
        )
    print("(dev nDCG@10 all users/warm users per cutoff; mean over cutoffs of all users)")


def random_search(
    events,
    cutoff: dt.datetime,
    base_params: Mapping[str, object],
    budget_minutes: float,
    items,
    users,
    weights,
    n_folds: int = 3,
    horizon_days: int = 14,
    max_trials: int = 50,
    random_state: int = 42,
):
    """The search ``pipeline.evaluation.tuning`` ran before Optuna (kept here as the
    baseline): uniform random points of the space, every trial on every fold, trial 0 the
    base params, stopping when the next trial would overrun the budget."""
    from pipeline.core.ids import EncodedEvents
    from pipeline.evaluation.tuning import (
        SEARCH_SPACE,
        TuningResult,
        expanding_folds,
        score_params,
    )

    if not isinstance(events, EncodedEvents):
        events = EncodedEvents.from_frame(events[events["timestamp"] < cutoff], weights)
    events = events.before(cutoff)
    folds = expanding_folds(cutoff, n_folds, horizon_days)
    rng = np.random.default_rng(random_state)
    started, longest = time.perf_counter(), 0.0
    records, tried = [], []
    for trial in range(max_trials):
        if trial > 0 and time.perf_counter() - started + longest > budget_minutes * 60:
            break
        params = (
            dict(base_params)
            if trial == 0
            else {
                **base_params,
                **{
                    name: _plain(values[int(rng.integers(len(values)))])
                    for name, values in SEARCH_SPACE.items()
                },
            }
        )
        t0 = time.perf_counter()
        scores = score_params(events, folds, params, items, users, weights)
        longest = max(longest, time.perf_counter() - t0)
        mean = float(np.nanmean(scores)) if np.isfinite(scores).any() else float("nan")
        tried.append(params)
        records.append(
            {
                "trial": trial,
                "score": mean,
                "seconds": time.perf_counter() - t0,
                **{f"fold{f}": s for f, s in enumerate(scores)},
            }
        )
        logger.info("random trial %d: %.4f %s", trial, mean, scores)
    trials = pd.DataFrame.from_records(records)
    best = int(trials["score"].fillna(-np.inf).idxmax())
    return TuningResult(
        {name: tried[best][name] for name in base_params}, float(trials.loc[best, "score"]), trials
    )


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.WARNING)
    run(quick="--quick" in sys.argv[1:])
