"""Publish's lists: where each user's time goes, and users/s with 1 and 2 worker processes.

A seeded synthetic world (:func:`pipeline.lake.demo.synthetic.generate_clickstream`, 90 days,
~58 events per user, cutoff 14 days before the end) and the two-stage model fitted on it
with its defaults, **once**: the bundle, the consumed pairs and the item side table are kept
in ``$RECS_BENCH_LISTS_DIR`` (default ``/tmp/recs-bench-lists``) under ``<users>x<items>``,
so that runs before and after a change list the same model's users (``--refit`` fits again).

Each step runs in its own process (its peak RSS is its own):

* ``breakdown``: the lists publish makes (``recommend_with_rules``: candidate_multiplier x
  N candidates per user, then the business rules) for every user seen before the cutoff, in
  one process, with each sub-step timed (exclusive seconds: ALS top-N, kNN scores and
  top-N, popular candidates, the candidate union, stage-one scores, feature rows, the
  ranker's predict, the top-N sorts, reasons, the frames around them, the fallback fill,
  the rules);
* ``workers W`` for W in 1 and 2: the same lists the way ``publish`` makes them with
  ``publish_workers`` = W (W > 1: worker processes that each load the model from its
  bundle), users/s, the workers' model load time, peak RSS of the parent and of the
  largest worker, and a digest of the lists: all runs must print the same digest.

``--save LISTS.parquet`` / ``--compare LISTS.parquet`` keep one run's lists and check a
later run's against them, row for row (e.g. before and after a change).

Sizes: 50k users x 100k items (~2.9M events; the fit takes a few minutes, once);
``--quick``: 10k x 20k. Run with ``python -m benchmarks lists [--quick]`` or
``python -m benchmarks.bench_lists [--quick] [--users N --items M] [--save F | --compare F]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import os
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

from benchmarks._child import run_child

SIZE = (50_000, 100_000)
QUICK_SIZE = (10_000, 20_000)
DAYS = 90
HOLDOUT_DAYS = 14
N = 10
CANDIDATE_MULTIPLIER = 3
MAX_PER_CATEGORY = 3
WORKERS = (1, 2)


def _root(n_users: int, n_items: int) -> Path:
    base = Path(os.environ.get("RECS_BENCH_LISTS_DIR", "/tmp/recs-bench-lists"))
    return base / f"{n_users}x{n_items}"


def run(quick: bool, size: tuple[int, int] | None = None, refit: bool = False, **kw) -> None:
    """Fit once (cached), then the breakdown and the worker runs, each in its own process."""
    n_users, n_items = size or (QUICK_SIZE if quick else SIZE)
    root = _root(n_users, n_items)
    if refit or not (root / "ready.json").exists():
        prepared, rss = run_child("benchmarks.bench_lists", ["prepare", str(root)])
        print(
            f"prepared {n_users:,} users x {n_items:,} items: {prepared['events']:,} events, "
            f"fit {prepared['fit_s']:.0f} s, peak RSS {rss / 2**30:.2f} GB",
            flush=True,
        )
    extra = [*(["--save", kw["save"]] if kw.get("save") else [])]
    extra += ["--compare", kw["compare"]] if kw.get("compare") else []
    result, rss = run_child("benchmarks.bench_lists", ["breakdown", str(root), *extra])
    _print_breakdown(result, rss)
    digests = {result["digest"]}
    for workers in WORKERS:
        out, rss = run_child("benchmarks.bench_lists", ["workers", str(root), str(workers)])
        digests.add(out["digest"])
        print(
            f"publish_workers={workers}: {out['users']:,} users in {out['seconds']:.1f} s = "
            f"{out['users'] / out['seconds']:,.0f} users/s; model load per worker "
            f"{out['load_s']:.1f} s; peak RSS parent {rss / 2**30:.2f} GB, largest worker "
            f"{out['child_rss'] / 2**30:.2f} GB; lists {out['digest'][:12]}",
            flush=True,
        )
    print(
        "lists identical across runs" if len(digests) == 1 else f"LISTS DIFFER: {digests}",
        flush=True,
    )


def _print_breakdown(result: dict, rss: int) -> None:
    total = result["seconds"]
    print(
        f"{result['users']:,} users ({result['warm']:,} with a personal list), "
        f"{result['items']:,} items, {result['candidates']:,} candidates "
        f"({result['candidates'] / max(result['warm'], 1):.0f} per personal user), "
        f"{result['rows']:,} rows; model load {result['load_s']:.1f} s; peak RSS "
        f"{rss / 2**30:.2f} GB",
        flush=True,
    )
    print(f"  {'sub-step':<22} {'seconds':>8} {'share':>6} {'us/user':>8}", flush=True)
    for name, seconds in result["steps"].items():
        print(
            f"  {name:<22} {seconds:>8.2f} {seconds / total:>6.0%} "
            f"{1e6 * seconds / result['users']:>8.0f}",
            flush=True,
        )
    print(
        f"  {'all (one process)':<22} {total:>8.2f}        "
        f"{1e6 * total / result['users']:>8.0f}  = {result['users'] / total:,.0f} users/s"
        + (f"; {result['compared']}" if result.get("compared") else ""),
        flush=True,
    )


# ---- the steps (each in its own process) ------------------------------------------------


def _prepare(root: Path) -> dict:
    import pandas as pd

    from pipeline.core.config import DEFAULT_EVENT_WEIGHTS
    from pipeline.lake.demo.synthetic import generate_clickstream
    from pipeline.models.twostage import TwoStageRecommender
    from pipeline.serving.rules import build_consumed

    n_users, n_items = (int(part) for part in root.name.split("x"))
    data = generate_clickstream(n_users=n_users, n_items=n_items, n_days=DAYS, seed=1)
    events = data.events
    last = events["timestamp"].max().floor("D").to_pydatetime()
    cutoff = last - dt.timedelta(days=HOLDOUT_DAYS - 1)
    train = events[events["timestamp"] < cutoff]
    started = time.perf_counter()
    model = TwoStageRecommender().fit(train, cutoff, DEFAULT_EVENT_WEIGHTS, data.items, data.users)
    fit_s = time.perf_counter() - started
    root.mkdir(parents=True, exist_ok=True)
    model.save(root / "model")
    build_consumed(train).to_parquet(root / "consumed.parquet", index=False)
    data.items.to_parquet(root / "items.parquet", index=False)
    users = pd.unique(train["user_id"].astype(str))
    pd.DataFrame({"user_id": users}).to_parquet(root / "users.parquet", index=False)
    info = {"events": len(train), "fit_s": fit_s, "cutoff": cutoff.isoformat()}
    (root / "ready.json").write_text(json.dumps(info))
    return info


def _inputs(root: Path) -> tuple:
    import pandas as pd

    info = json.loads((root / "ready.json").read_text())
    users = pd.read_parquet(root / "users.parquet")["user_id"].to_numpy(object)
    rules = {
        "candidate_multiplier": CANDIDATE_MULTIPLIER,
        "consumed": pd.read_parquet(root / "consumed.parquet"),
        "items": pd.read_parquet(root / "items.parquet"),
        "n": N,
        "max_per_category": MAX_PER_CATEGORY,
        "item_ttl_days": None,
        "cutoff": dt.datetime.fromisoformat(info["cutoff"]),
    }
    return users, rules


def _digest(lists) -> str:
    digest = hashlib.sha256()
    for column in ("user_id", "rank", "item_id", "score", "reason", "source"):
        values = lists[column].to_numpy()
        digest.update(
            values.tobytes() if values.dtype != object else "\x1f".join(map(str, values)).encode()
        )
    return digest.hexdigest()


class _Steps:
    """Exclusive wall time of wrapped functions (nested calls are charged to the inner one)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.stack: list[float] = []  # time spent in children of each open call

    def wrap(self, owner, name: str, label: str) -> None:
        inner = getattr(owner, name, None)
        if inner is None:
            return
        steps = self

        def timed(*args, **kwargs):
            steps.stack.append(0.0)
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - started
                children = steps.stack.pop()
                steps.seconds[label] += elapsed - children
                if steps.stack:
                    steps.stack[-1] += elapsed

        setattr(owner, name, timed)


def _instrument(steps: _Steps) -> None:
    from pipeline.models import base, candidates, knn, ranker, twostage
    from pipeline.serving import rules

    gen = candidates.CandidateGenerator
    for owner, name, label in (
        (gen, "_from_als", "ALS top-N"),
        (knn.ItemKnn, "score", "kNN scores"),
        (gen, "_from_knn", "kNN top-N"),
        (gen, "_from_popular", "popular candidates"),
        (gen, "generate", "union, kNN features"),
        (gen, "als_scores", "stage-one scores"),
        (ranker, "pair_features", "feature rows"),
        (ranker.Ranker, "predict", "ranker predict"),
        (twostage.TwoStageRecommender, "_personal", "frames"),
        (twostage, "ranked_within", "top-N sorts"),
        (knn, "ranked_within", "kNN top-N"),
        (twostage.TwoStageRecommender, "_explain", "reasons"),
        (base.ListRecommender, "_fill_from_fallback", "fallback fill"),
        (rules, "_apply_chunk", "rules"),
    ):
        steps.wrap(owner, name, label)


def _breakdown(root: Path, save: str | None, compare: str | None) -> dict:
    import pandas as pd

    from pipeline.core.config import DEFAULT_USER
    from pipeline.models.bundle import load_recommender
    from pipeline.serving.rules import recommend_with_rules

    users, rules = _inputs(root)
    started = time.perf_counter()
    model = load_recommender(root / "model")
    load_s = time.perf_counter() - started
    steps = _Steps()
    _instrument(steps)
    counted = {"candidates": 0}
    generate = type(model.generator_).generate

    def counting(self, rows):
        frame = generate(self, rows)
        counted["candidates"] += len(frame)
        return frame

    type(model.generator_).generate = counting
    started = time.perf_counter()
    lists, _ = recommend_with_rules(
        model.recommend, users, fallback=model.popular_, default_user=DEFAULT_USER, **rules
    )
    seconds = time.perf_counter() - started
    step_s = dict(steps.seconds)
    step_s["other"] = seconds - sum(step_s.values())
    matrix = model.matrix_
    rows = matrix.user_index(users.astype(object))
    warm = int((rows >= 0).sum())
    result = {
        "users": len(users),
        "warm": warm,
        "items": int(matrix.shape[1]),
        "candidates": counted["candidates"],
        "rows": len(lists),
        "load_s": load_s,
        "seconds": seconds,
        "steps": step_s,
        "digest": _digest(lists),
    }
    if save:
        lists.to_parquet(save, index=False)
    if compare:
        before = pd.read_parquet(compare)
        pd.testing.assert_frame_equal(
            before.reset_index(drop=True), lists.reset_index(drop=True), check_dtype=False
        )
        result["compared"] = f"identical to {compare} ({len(before):,} rows)"
    return result


def _workers(root: Path, workers: int) -> dict:
    from pipeline.core.config import DEFAULT_USER
    from pipeline.models.bundle import SavedLists, load_recommender
    from pipeline.serving import rules as serving_rules
    from pipeline.serving.rules import recommend_with_rules

    serving_rules.MIN_PARALLEL_USERS = 0  # workers even where publish would list in-process
    loads: list[float] = []

    class _Loads(logging.Handler):  # the workers' model load times, from their log lines
        def emit(self, record: logging.LogRecord) -> None:
            if record.msg.startswith("worker %d: model loaded"):
                loads.append(float(record.args[1]))

    logger = logging.getLogger("pipeline.serving.rules")
    logger.setLevel(logging.INFO)
    logger.addHandler(_Loads())
    users, rules = _inputs(root)
    started = time.perf_counter()
    model = load_recommender(root / "model")  # the parent's copy, as publish loads it
    load_s = time.perf_counter() - started
    threads = max(1, len(os.sched_getaffinity(0)) // workers)  # as publish shares the CPUs
    recommend = SavedLists.of(model, threads) if workers > 1 else model.recommend
    started = time.perf_counter()
    lists, _ = recommend_with_rules(
        recommend,
        users,
        fallback=model.popular_,
        default_user=DEFAULT_USER,
        workers=workers,
        **rules,
    )
    seconds = time.perf_counter() - started
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {
        "users": len(users),
        "seconds": seconds,
        "load_s": max(loads) if loads else load_s,
        "child_rss": children,
        "digest": _digest(lists),
    }


def main(argv: list[str]) -> None:
    if argv and argv[0] in ("prepare", "breakdown", "workers"):
        step, root, *rest = argv
        if step == "prepare":
            out = _prepare(Path(root))
        elif step == "workers":
            out = _workers(Path(root), int(rest[0]))
        else:
            parser = argparse.ArgumentParser()
            parser.add_argument("--save")
            parser.add_argument("--compare")
            args = parser.parse_args(rest)
            out = _breakdown(Path(root), args.save, args.compare)
        print(json.dumps(out, default=float))
        return
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_lists")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--users", type=int)
    parser.add_argument("--items", type=int)
    parser.add_argument("--refit", action="store_true")
    parser.add_argument("--save", help="keep the breakdown run's lists in this Parquet file")
    parser.add_argument("--compare", help="check the lists against this Parquet file")
    args = parser.parse_args(argv)
    size = (args.users, args.items) if args.users and args.items else None
    run(args.quick, size, args.refit, save=args.save, compare=args.compare)


if __name__ == "__main__":
    main(sys.argv[1:])
