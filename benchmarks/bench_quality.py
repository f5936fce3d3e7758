"""Recommendation quality on MovieLens-100k: two-stage vs simple baselines, global time cutoffs.

For each cutoff every method sees only the events before it; the score is nDCG@10 on the
items each user rated in the next ``HORIZON_DAYS`` days (for users seen before the cutoff,
only items they had not rated yet). Every user active in that window is scored: users with
history ("warm") get each method's personal list; users without history ("cold") get the
two-stage model's cold-start list for the two-stage row, and the 30-day popularity list for
the personal baselines (which cannot score them).

The "two-stage" row is the model the nightly DAG publishes with its default Params (seed 42,
no tuning). The full run also fits it with other seeds and prints their mean and range, so
that a gap can be told apart from seed noise (~100 returning users per cutoff).
``python -m benchmarks.bench_quality --tune MINUTES`` adds a row for the model tuned by
expanding-window CV strictly before each cutoff (the ``tune`` Param), never on the test window.
"""

from __future__ import annotations

import datetime as dt
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

CUTOFFS = ("1998-01-15", "1998-02-15", "1998-03-15")
HORIZON_DAYS = 30
K = 10
SEED = 42  # the nightly DAG's default seed: the published lists
OTHER_SEEDS = (7, 123)  # full run only: for the seed mean and range
TUNE_FOLDS = 3
PUBLISHED = "two-stage"


def run(quick: bool = False, tune_minutes: float = 0.0) -> None:
    from pipeline.core.metrics import paired_bootstrap
    from pipeline.lake.demo.movielens import load_movielens_100k

    data = load_movielens_100k(_cache_dir())
    seeds = (SEED,) if quick else (SEED, *OTHER_SEEDS)
    print(
        f"MovieLens-100k ({len(data.events):,} ratings); nDCG@{K} on the users active in the "
        f"{HORIZON_DAYS} days after each cutoff; two-stage with the DAG's default params, "
        f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
        + (
            f"; tuned for {tune_minutes:g} min per cutoff on {TUNE_FOLDS} expanding folds"
            if tune_minutes
            else ""
        ),
        flush=True,
    )
    results, timings, notes, diffs = [], {}, [], []
    for cutoff in CUTOFFS:
        frame, seconds, note, diff = _evaluate_cutoff(data, _utc(cutoff), seeds, tune_minutes)
        diffs.append(diff)
        results.append(frame.assign(cutoff=cutoff))
        for method, value in seconds.items():
            timings[method] = timings.get(method, 0.0) + value
        notes.append(note)
        print(f"  {note}", flush=True)
    table = pd.concat(results, ignore_index=True)
    for scope in ("all", "warm", "cold"):
        _print_table(table, scope)
    print("\nper cutoff:\n" + "\n".join(f"  {n}" for n in notes))
    pooled = np.concatenate(diffs)
    low, high = paired_bootstrap(pooled, np.zeros_like(pooled))
    print(
        f"  all cutoffs pooled ({len(pooled)} user-windows): two-stage minus the best baseline "
        f"of each cutoff {pooled.mean():+.4f} (95% paired bootstrap {low:+.4f} .. {high:+.4f})"
    )
    print(
        "fit+recommend seconds (sum over cutoffs): "
        + ", ".join(f"{m} {s:.1f}" for m, s in timings.items())
    )


def _evaluate_cutoff(data, cutoff: dt.datetime, seeds: tuple[int, ...], tune_minutes: float):
    from pipeline.core.config import DEFAULT_EVENT_WEIGHTS
    from pipeline.core.metrics import paired_bootstrap, user_metrics, window_truth_frame
    from pipeline.models.twostage import TwoStageRecommender

    events = data.events
    train = events[events["timestamp"] < cutoff]
    truth = window_truth_frame(events, cutoff, cutoff + dt.timedelta(days=HORIZON_DAYS))
    users = truth["user_id"].unique()
    warm = np.isin(users, train["user_id"].unique())
    lists, seconds = {}, {}
    for name, method in _baselines().items():
        started = time.perf_counter()
        lists[name] = method(train, cutoff, users)
        seconds[name] = time.perf_counter() - started
    models = {}
    for seed in seeds:
        started = time.perf_counter()
        models[seed] = TwoStageRecommender(random_state=seed).fit(
            train, cutoff, DEFAULT_EVENT_WEIGHTS, data.items, data.users
        )
        name = PUBLISHED if seed == SEED else f"two-stage seed {seed}"
        lists[name] = models[seed].recommend(users, K)
        if seed == SEED:
            seconds[PUBLISHED] = time.perf_counter() - started
    tuned = ""
    if tune_minutes > 0:
        from pipeline.evaluation.tuning import tune_twostage

        started = time.perf_counter()
        result = tune_twostage(
            train,
            cutoff,
            TwoStageRecommender().get_params(),
            tune_minutes,
            data.items,
            data.users,
            DEFAULT_EVENT_WEIGHTS,
            n_folds=TUNE_FOLDS,
            horizon_days=HORIZON_DAYS,
        )
        model = TwoStageRecommender(**result.best_params).fit(
            train, cutoff, DEFAULT_EVENT_WEIGHTS, data.items, data.users
        )
        lists["two-stage, tuned"] = model.recommend(users, K)
        seconds["two-stage, tuned"] = time.perf_counter() - started
        tuned = f", tuning ran {len(result.trials)} trials"
    rows, per_user = [], {}
    for name, frame in lists.items():
        per_user[name] = user_metrics(frame, truth, K)["ndcg"].reindex(users).fillna(0.0)
        rows.append(
            {
                "method": name,
                "all": per_user[name].mean(),
                "warm": per_user[name][warm].mean(),
                "cold": per_user[name][~warm].mean(),
            }
        )
    frame = pd.DataFrame(rows)
    best = (
        frame[~frame["method"].str.startswith("two-stage")]
        .sort_values("all", ascending=False)["method"]
        .iloc[0]
    )
    low, high = paired_bootstrap(per_user[PUBLISHED].to_numpy(), per_user[best].to_numpy())
    recall = models[SEED].training_.get("candidate_recall", {}).get("all", float("nan"))
    note = (
        f"{cutoff.date()}: {len(users)} users ({int(warm.sum())} warm); two-stage minus "
        f"{best}: {per_user[PUBLISHED].mean() - per_user[best].mean():+.4f} "
        f"(95% paired bootstrap {low:+.4f} .. {high:+.4f}); candidate recall "
        f"{recall:.3f}; cold-start list {models[SEED].cold_.get_params()}{tuned}"
    )
    return frame, seconds, note, per_user[PUBLISHED].to_numpy() - per_user[best].to_numpy()


# ---- baselines -----------------------------------------------------------------------------
def _baselines() -> dict:
    return {
        "popularity (all time)": lambda t, c, u: _popular_lists(t, c, u, None),
        "popularity (30 days)": lambda t, c, u: _popular_lists(t, c, u, 30),
        "ALS (implicit)": lambda t, c, u: _personal_lists(t, c, u, "als"),
        "item-kNN cosine": lambda t, c, u: _personal_lists(t, c, u, "cosine"),
        "item-kNN BM25": lambda t, c, u: _personal_lists(t, c, u, "bm25"),
        "BPR (implicit)": lambda t, c, u: _personal_lists(t, c, u, "bpr"),
    }


def _popular_lists(
    train: pd.DataFrame, cutoff: dt.datetime, users: np.ndarray, days: int | None
) -> pd.DataFrame:
    """Most distinct users (optionally in the last ``days``), minus each user's seen items."""
    window = (
        train if days is None else train[train["timestamp"] >= cutoff - dt.timedelta(days=days)]
    )
    counts = window.groupby("item_id", observed=True)["user_id"].nunique()
    ranked = counts.rename("n").reset_index().sort_values(["n", "item_id"], ascending=[False, True])
    top = ranked["item_id"].astype(object).to_numpy()[: K + 300]
    cand = pd.DataFrame(
        {
            "user_id": np.repeat(users, len(top)),
            "item_id": np.tile(top, len(users)),
            "order": np.tile(np.arange(len(top)), len(users)),
        }
    )
    seen = train[["user_id", "item_id"]].drop_duplicates().astype(object)
    cand = cand.merge(seen.assign(seen=True), how="left", on=["user_id", "item_id"])
    cand = cand[cand["seen"].isna()].sort_values(["user_id", "order"])
    cand["rank"] = cand.groupby("user_id").cumcount() + 1
    return cand[cand["rank"] <= K][["user_id", "rank", "item_id"]]


def _personal_lists(
    train: pd.DataFrame, cutoff: dt.datetime, users: np.ndarray, kind: str
) -> pd.DataFrame:
    """Top-K of an implicit model for warm users; 30-day popularity for cold ones."""
    from implicit.cpu.als import AlternatingLeastSquares
    from implicit.cpu.bpr import BayesianPersonalizedRanking
    from implicit.nearest_neighbours import BM25Recommender, CosineRecommender

    from pipeline.core.config import DEFAULT_EVENT_WEIGHTS
    from pipeline.features.matrix import build_matrix

    matrix = build_matrix(train, DEFAULT_EVENT_WEIGHTS)
    model = {
        "als": lambda: AlternatingLeastSquares(
            factors=64, regularization=0.05, alpha=2.0, iterations=15, random_state=42
        ),
        # one thread: implicit's multi-threaded BPR updates race, so scores would vary
        "bpr": lambda: BayesianPersonalizedRanking(
            factors=64, iterations=100, random_state=42, num_threads=1
        ),
        "cosine": lambda: CosineRecommender(K=100),
        "bm25": lambda: BM25Recommender(K=100),
    }[kind]()
    with warnings.catch_warnings():  # implicit's kNN converts its own normalised copy to CSR
        warnings.filterwarnings("ignore", message="Method expects CSR input")
        model.fit(matrix.confidence, show_progress=False)
    rows = matrix.user_index(users)
    warm_rows = rows[rows >= 0]
    ids, _ = model.recommend(
        warm_rows, matrix.confidence[warm_rows], N=K, filter_already_liked_items=True
    )
    ids = np.asarray(ids).reshape(len(warm_rows), -1)
    personal = pd.DataFrame(
        {
            "user_id": np.repeat(users[rows >= 0], ids.shape[1]),
            "rank": np.tile(np.arange(1, ids.shape[1] + 1), len(warm_rows)),
            "col": ids.ravel(),
        }
    )
    personal = personal[personal["col"] >= 0]
    personal["item_id"] = matrix.item_ids[personal["col"].to_numpy()]
    cold = _popular_lists(train, cutoff, users[rows < 0], 30)
    return pd.concat([personal.drop(columns="col"), cold], ignore_index=True)


# ---- output --------------------------------------------------------------------------------
def _print_table(table: pd.DataFrame, scope: str) -> None:
    wide = table.pivot(index="method", columns="cutoff", values=scope)
    wide = wide[list(CUTOFFS)]
    seeds = [m for m in wide.index if m.startswith("two-stage seed ")]
    baselines = [m for m in table["method"].drop_duplicates() if not m.startswith("two-stage")]
    models = [PUBLISHED] + [m for m in wide.index if m == "two-stage, tuned"]
    if seeds:
        runs = wide.loc[[PUBLISHED, *seeds]]
        wide.loc[f"two-stage, mean of {len(runs)} seeds"] = runs.mean()
        wide.loc["two-stage, worst seed"] = runs.min()
        models += [f"two-stage, mean of {len(runs)} seeds", "two-stage, worst seed"]
    wide["mean"] = wide.mean(axis=1)
    wide = wide.loc[baselines + models]
    title = {
        "all": "all active users",
        "warm": "warm users only (history before the cutoff)",
        "cold": "cold users only (no history; baselines use 30-day popularity)",
    }[scope]
    print(f"\nnDCG@{K}, {title}")
    print(f"  {'method':<28}" + "".join(f"{c:>12}" for c in wide.columns))
    for method, row in wide.iterrows():
        print(f"  {method:<28}" + "".join(f"{v:>12.4f}" for v in row))
    best_baseline = wide.loc[baselines].max()
    for model in models:
        wins = [c for c in CUTOFFS if wide.loc[model, c] > best_baseline[c]]
        print(f"  {model} beats every baseline at: {', '.join(wins) or 'none'} (of {len(CUTOFFS)})")


def _cache_dir() -> Path:
    root = os.environ.get("RECS_DATA_DIR")
    return (
        Path(root) / "cache" if root else Path(__file__).resolve().parent.parent / "data" / "cache"
    )


def _utc(day: str) -> dt.datetime:
    return dt.datetime.fromisoformat(day).replace(tzinfo=dt.timezone.utc)


# ---- development cutoffs (model selection; never the CUTOFFS above) -----------------------
DEV_CUTOFFS = ("1997-11-15", "1997-12-01", "1997-12-15")  # 30-day windows end < 1998-01-15


def run_dev(objectives: tuple[str, ...] = ("rank:ndcg", "binary:logistic")) -> None:
    """Score cold-start options and ranker objectives on DEV_CUTOFFS (default params)."""
    from pipeline.core.config import DEFAULT_EVENT_WEIGHTS
    from pipeline.core.metrics import user_metrics, window_truth_frame
    from pipeline.lake.demo.movielens import load_movielens_100k
    from pipeline.models.coldstart import COLD_OPTIONS, SegmentPopularity, select_cold_start
    from pipeline.models.twostage import TwoStageRecommender

    data = load_movielens_100k(_cache_dir())
    events = data.events
    print(f"dev cutoffs {', '.join(DEV_CUTOFFS)}; nDCG@{K} over the next {HORIZON_DAYS} days")
    for day in DEV_CUTOFFS:
        cutoff = _utc(day)
        train = events[events["timestamp"] < cutoff]
        truth = window_truth_frame(events, cutoff, cutoff + dt.timedelta(days=HORIZON_DAYS))
        users = truth["user_id"].unique()
        warm = np.isin(users, train["user_id"].unique())

        def score(frame, mask, truth=truth, users=users):
            per_user = user_metrics(frame, truth, K)["ndcg"].reindex(users).fillna(0.0)
            return per_user[mask].mean()

        cold_users = users[~warm]
        print(f"\n{day}: {len(users)} users ({int(warm.sum())} warm, {len(cold_users)} cold)")
        pop30 = _popular_lists(train, cutoff, users, 30)
        print(f"  cold  popularity (30 days) baseline   {score(pop30, ~warm):.4f}")
        for days, segment in COLD_OPTIONS:
            model = SegmentPopularity(
                days=days, segment=tuple(filter(None, segment.split("|"))), shrinkage=50.0, n_keep=K
            ).fit(train, cutoff, data.users)
            lists = model.lists_for(cold_users).assign(rank=lambda f: f["order"] + 1)
            print(
                f"  cold  {days:>3}d {segment or 'global':<18}          {score(lists, ~warm):.4f}"
            )
        for horizon in (14, 30):
            chosen = select_cold_start(train, cutoff, data.users, horizon_days=horizon)
            print(f"  cold  select_cold_start(horizon={horizon}) -> {chosen}")
        print(f"  warm  popularity (30 days) baseline   {score(pop30, warm):.4f}")
        for objective in objectives:
            model = TwoStageRecommender(objective=objective).fit(
                train, cutoff, DEFAULT_EVENT_WEIGHTS, data.items, data.users
            )
            lists = model.recommend(users, K)
            print(
                f"  two-stage {objective:<16} warm {score(lists, warm):.4f} "
                f"cold {score(lists, ~warm):.4f} (cold params {model.cold_.get_params()})",
                flush=True,
            )


#: (label_days, label_windows, label_stride_days) compared by ``--dev``; the first is the default.
LABEL_OPTIONS = ((14, 6, 7), (21, 6, 7), (30, 6, 7), (30, 3, 10), (14, 3, 10))
#: Seeds averaged per cell: one seed's nDCG moves by up to ~0.03 (ALS init, XGBoost sampling).
LABEL_SEEDS = (42, 7, 123)


def variant_scores(
    variants: Mapping[str, Mapping], cutoffs=DEV_CUTOFFS, seeds=LABEL_SEEDS
) -> pd.DataFrame:
    """Warm-user nDCG@K (HORIZON_DAYS) of the two-stage model for each named parameter
    ``variant`` (no tuning), dev cutoff and seed, plus the 30-day popularity baseline
    (option "popularity (30 days)"): columns cutoff, option, seed, warm, seconds."""
    from pipeline.core.config import DEFAULT_EVENT_WEIGHTS
    from pipeline.core.metrics import user_metrics, window_truth_frame
    from pipeline.lake.demo.movielens import load_movielens_100k
    from pipeline.models.twostage import TwoStageRecommender

    data = load_movielens_100k(_cache_dir())
    events = data.events
    rows = []
    for day in cutoffs:
        cutoff = _utc(day)
        train = events[events["timestamp"] < cutoff]
        truth = window_truth_frame(events, cutoff, cutoff + dt.timedelta(days=HORIZON_DAYS))
        users = truth["user_id"].unique()
        warm_users = users[np.isin(users, train["user_id"].unique())]

        def warm_ndcg(lists, truth=truth, warm_users=warm_users):
            return user_metrics(lists, truth, K)["ndcg"].reindex(warm_users).fillna(0.0).mean()

        pop = warm_ndcg(_popular_lists(train, cutoff, warm_users, 30))
        rows.extend(
            {
                "cutoff": day,
                "option": "popularity (30 days)",
                "seed": seed,
                "warm": pop,
                "seconds": 0.0,
            }
            for seed in seeds
        )
        for name, params in variants.items():
            for seed in seeds:
                started = time.perf_counter()
                model = TwoStageRecommender(**{**params, "random_state": seed}).fit(
                    train, cutoff, DEFAULT_EVENT_WEIGHTS, data.items, data.users
                )
                rows.append(
                    {
                        "cutoff": day,
                        "option": name,
                        "seed": seed,
                        "warm": warm_ndcg(model.recommend(warm_users, K)),
                        "seconds": time.perf_counter() - started,
                    }
                )
                print(
                    f"  {day} {name:<20} seed {seed:<4} warm {rows[-1]['warm']:.4f} "
                    f"(pop30 {pop:.4f}, {rows[-1]['seconds']:.0f}s)",
                    flush=True,
                )
    return pd.DataFrame(rows)


def label_window_scores(
    options=LABEL_OPTIONS, cutoffs=DEV_CUTOFFS, seeds=LABEL_SEEDS
) -> pd.DataFrame:
    """:func:`variant_scores` of the label-window settings (label_days, label_windows,
    label_stride_days) in ``options``."""
    return variant_scores(
        {
            f"{d}d x{w} /{s}d": {"label_days": d, "label_windows": w, "label_stride_days": s}
            for d, w, s in options
        },
        cutoffs,
        seeds,
    )


def print_variants(scores: pd.DataFrame, title: str = "variant") -> None:
    """The variant table (seed means): per dev cutoff, mean, and the difference from the
    first variant; then the seed range per cell, for scale."""
    wide = scores.pivot_table(index="option", columns="cutoff", values="warm", aggfunc="mean")
    cutoffs = sorted(wide.columns)
    order = list(scores["option"].drop_duplicates())
    wide = wide.loc[order, cutoffs]
    wide["mean"] = wide.mean(axis=1)
    models = [o for o in order if o != "popularity (30 days)"]
    base = wide.loc[models[0]]
    n_seeds = scores["seed"].nunique() if "seed" in scores else 1
    print(
        f"\ntwo-stage {title}s, default params otherwise; warm nDCG@{K} over the next "
        f"{HORIZON_DAYS} days, mean of {n_seeds} seed(s)"
    )
    print(
        f"  {title:<20}"
        + "".join(f"{c.removeprefix('19'):>9}" for c in wide.columns)
        + f"{'vs first':>10}{'not worse':>11}"
    )
    for option, row in wide.iterrows():
        not_worse = int((row[cutoffs] >= base[cutoffs]).sum())
        print(
            f"  {option:<20}"
            + "".join(f"{v:>9.4f}" for v in row)
            + f"{row['mean'] - base['mean']:>+10.4f}{not_worse:>8}/{len(cutoffs)}"
        )
    if n_seeds > 1:
        spread = (
            scores[scores["option"].isin(models)]
            .pivot_table(
                index="option", columns="cutoff", values="warm", aggfunc=lambda v: v.max() - v.min()
            )
            .to_numpy()
        )
        print(
            f"  seed range (max - min) per cell: {spread.min():.4f} .. {spread.max():.4f} "
            f"(median {np.median(spread):.4f})"
        )


def print_label_windows(scores: pd.DataFrame) -> None:
    print_variants(scores, "label windows")


if __name__ == "__main__":
    import logging
    import sys

    logging.basicConfig(level=logging.WARNING)
    if "--dev-variants" in sys.argv[1:]:
        import json

        print_variants(variant_scores(json.loads(sys.argv[sys.argv.index("--dev-variants") + 1])))
    elif "--dev-labels" in sys.argv[1:]:
        print_label_windows(label_window_scores())
    elif "--dev" in sys.argv[1:]:
        run_dev()
        print_label_windows(label_window_scores())
    elif "--tune" in sys.argv[1:]:
        run(
            quick="--quick" in sys.argv[1:],
            tune_minutes=float(sys.argv[sys.argv.index("--tune") + 1]),
        )
    else:
        run(quick="--quick" in sys.argv[1:])
