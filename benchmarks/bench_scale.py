"""Training and serving at scale: the two-stage model against plain ALS on synthetic logs.

Seeded synthetic clickstreams (:func:`pipeline.lake.demo.synthetic.generate_clickstream`, 90 days,
~58 events per user); the cutoff is 14 days before the end. Each method runs in a fresh
subprocess (its peak RSS is its own) and does what the nightly run does with it:

* ``als``: the interaction matrix and implicit ALS (the obvious personal baseline), then
  lists for every user seen before the cutoff;
* ``two-stage``: :class:`pipeline.models.twostage.TwoStageRecommender` with its defaults (the
  published model: label windows, candidates, XGBoost ranker, cold start), then lists for
  the same users.

Printed per size: fit and list seconds, users/s, peak RSS, each as a ratio to ALS measured in
the same run, the two-stage fit's stage times, and nDCG@10 on the returning users active in
the 14 days after the cutoff, with 30-day popularity's (its own subprocess) alongside, so
that speed is never bought with quality unseen.

Sizes: 20k users x 5k items (~1.2M events) and 50k x 10k (~2.9M); ``--quick``: 5k x 2k.
Run with ``python -m benchmarks scale [--quick]``. ``RECS_BENCH_SCALE_PARAMS`` (a JSON object)
sets two-stage recipe fields, to compare a setting with the defaults, e.g.
``RECS_BENCH_SCALE_PARAMS='{"knn_max_users": 10000}'``; one method and size alone:
``python -m benchmarks.bench_scale two-stage 50000 10000`` (a JSON line).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import time

from benchmarks._child import run_child

SIZES = ((20_000, 5_000), (50_000, 10_000))
QUICK_SIZES = ((5_000, 2_000),)
DAYS = 90
HOLDOUT_DAYS = 14
K = 10
METHODS = ("als", "two-stage")


def run(quick: bool) -> None:
    """Print fit/list time, peak RSS and nDCG@10 of ALS and the two-stage model per size."""
    print(
        f"{'users':>7} {'events':>10} {'method':<10} {'fit s':>7} {'lists s':>8} "
        f"{'users/s':>8} {'peak RSS':>9} {'x ALS fit':>10} {'x ALS lists':>12} "
        f"{'x ALS RSS':>10} {'nDCG@10':>8}",
        flush=True,
    )
    for n_users, n_items in QUICK_SIZES if quick else SIZES:
        results = {
            m: run_child("benchmarks.bench_scale", [m, str(n_users), str(n_items)]) for m in METHODS
        }
        popularity = run_child(
            "benchmarks.bench_scale", ["popularity", str(n_users), str(n_items)]
        )[0]
        (base, base_rss) = results["als"]
        for method, (result, rss) in results.items():
            print(
                f"{n_users:>7,} {result['events']:>10,} {method:<10} {result['fit_s']:>7.1f} "
                f"{result['lists_s']:>8.1f} {result['users'] / result['lists_s']:>8,.0f} "
                f"{rss / 2**20:>7,.0f}MB {result['fit_s'] / base['fit_s']:>9.1f}x "
                f"{result['lists_s'] / base['lists_s']:>11.1f}x {rss / base_rss:>9.1f}x "
                f"{result['ndcg']:>8.4f}",
                flush=True,
            )
        two = results["two-stage"][0]
        print(
            f"{'':>7} two-stage fit: "
            + ", ".join(f"{k} {v:.1f}s" for k, v in two["stages"].items())
            + f"; {two['training']['pairs']:,} training pairs of "
            f"{two['training']['users']:,} (user, window) queries, {two['bags']} bag(s); "
            f"30-day popularity nDCG@10 {popularity['ndcg']:.4f} on the same "
            f"{popularity['eval_users']:,} returning users"
            + (f"; recipe fields set: {two['params']}" if two["params"] else ""),
            flush=True,
        )


def _measure(method: str, n_users: int, n_items: int) -> dict:
    """Generate the log, fit ``method`` at the cutoff, list every known user, score."""
    from pipeline.core.config import DEFAULT_EVENT_WEIGHTS
    from pipeline.core.metrics import user_metrics, window_truth_frame
    from pipeline.evaluation.holdout import popularity_lists
    from pipeline.lake.demo.synthetic import generate_clickstream

    data = generate_clickstream(n_users=n_users, n_items=n_items, n_days=DAYS, seed=1)
    events = data.events
    last = events["timestamp"].max().floor("D").to_pydatetime()
    cutoff = last - dt.timedelta(days=HOLDOUT_DAYS - 1)
    train = events[events["timestamp"] < cutoff]
    users = train["user_id"].unique()
    truth = window_truth_frame(events, cutoff, cutoff + dt.timedelta(days=HOLDOUT_DAYS))
    eval_users = truth["user_id"][truth["user_id"].isin(users)].unique()
    result = {"events": len(events), "users": len(users), "eval_users": len(eval_users)}

    def ndcg(frame):
        return float(user_metrics(frame, truth, K)["ndcg"].reindex(eval_users).fillna(0).mean())

    if method == "popularity":  # the quality reference only: lists for the scored users
        return {**result, "ndcg": ndcg(popularity_lists(train, cutoff, eval_users, K, 30))}
    started = time.perf_counter()
    if method == "als":
        from pipeline.features.matrix import build_matrix
        from pipeline.features.popularity import popular_items
        from pipeline.models.als import AlsRecommender

        model = AlsRecommender().fit(
            build_matrix(train, DEFAULT_EVENT_WEIGHTS), popular_items(train, cutoff, K)
        )
    else:
        from pipeline.models.twostage import TwoStageRecommender

        params = json.loads(os.environ.get("RECS_BENCH_SCALE_PARAMS") or "{}")
        model = TwoStageRecommender(**params).fit(
            train, cutoff, DEFAULT_EVENT_WEIGHTS, data.items, data.users
        )
        result.update(
            params=params,
            stages=model.timings_,
            training=model.training_,
            bags=len(model.ranker_.models_) if model.ranker_ is not None else 0,
        )
    fitted = time.perf_counter()
    lists = model.recommend(users, K)
    result.update(fit_s=fitted - started, lists_s=time.perf_counter() - fitted)
    result["ndcg"] = ndcg(lists[lists["user_id"].isin(eval_users)])
    return result


if __name__ == "__main__":
    step, users_arg, items_arg = sys.argv[1:]
    print(json.dumps(_measure(step, int(users_arg), int(items_arg)), default=float))
