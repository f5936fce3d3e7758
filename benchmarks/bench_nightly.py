"""The whole nightly run on a large synthetic log: where the hours go, stage by stage.

A seeded synthetic clickstream (90 days) lands as CSV in a throwaway data folder with its own
MLflow store; the nightly stages then run in order in one fresh subprocess, as the DAG's tasks
call them (``pipeline.nightly``: ingest, validate, build_features, train, evaluate, register,
publish to the embedded SQLite serving file; the publish benchmark covers PostgreSQL). Printed:
each stage's seconds and share of the run, the process's peak RSS after it (so the stage that
raised the peak shows), and the whole run against a plain two-stage fit of
the same events measured in the same subprocess, i.e. what the pipeline costs on top of
training the model once (evaluation's second fit, the champion gate, rules, writes).

Sizes: 50k users x 10k items (~2.9M events); ``--quick``: 5k x 2k.
Run with ``python -m benchmarks nightly [--quick]``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._child import run_child

STAGES = ("ingest", "validate", "build_features", "tune", "train", "evaluate", "register",
          "publish")
DAYS = 90
START = "2024-01-01"


def run(quick: bool) -> None:
    """Print stage seconds of one nightly run and its ratio to one model fit."""
    n_users, n_items = (5_000, 2_000) if quick else (50_000, 10_000)
    with tempfile.TemporaryDirectory(prefix="bench-nightly-") as tmp:
        result, rss = run_child("benchmarks.bench_nightly", [str(n_users), str(n_items), tmp])
    total = sum(result["stages"].values())
    print(f"{n_users:,} users, {result['events']:,} events, {result['rows']:,} rows published; "
          f"peak RSS {rss / 2**20:,.0f} MB", flush=True)
    print(f"{'stage':<16} {'seconds':>8} {'share':>7} {'peak RSS so far':>16}", flush=True)
    for name, seconds in result["stages"].items():
        print(f"{name:<16} {seconds:>8.1f} {seconds / total:>6.0%} "
              f"{result['peaks'][name] / 2**20:>13,.0f} MB", flush=True)
    print(f"{'whole run':<16} {total:>8.1f}  = {total / result['fit_s']:.1f}x one two-stage fit "
          f"of the same events ({result['fit_s']:.1f} s, same process)", flush=True)


def _measure(n_users: int, n_items: int, root: Path) -> dict:
    os.environ.update(RECS_DATA_DIR=str(root / "data"), RECS_LANDING_SETTLE_SECONDS="0",
                      MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
                      MLFLOW_ARTIFACT_ROOT=str(root / "mlartifacts"),
                      MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false", MLFLOW_LOGGING_LEVEL="WARNING")
    os.environ.pop("AIRFLOW_CONN_RECS_SERVING", None)
    import logging

    from pipeline import nightly
    from pipeline.core.config import Settings, as_utc
    from pipeline.lake.demo import write_landing
    from pipeline.lake.demo.synthetic import generate_clickstream
    from pipeline.models.twostage import TwoStageRecommender

    logging.basicConfig(level=logging.WARNING)
    data = generate_clickstream(n_users=n_users, n_items=n_items, n_days=DAYS, start=START,
                                seed=1)
    write_landing(data, root / "data" / "landing", name="clicks", fmt="csv")
    cutoff = as_utc(START) + dt.timedelta(days=DAYS)
    settings = Settings()
    stages, peaks = {}, {}
    for name in STAGES:
        started = time.perf_counter()
        out = getattr(nightly, name)(settings, cutoff)
        stages[name] = time.perf_counter() - started
        peaks[name] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    events = data.events[data.events["timestamp"] < cutoff]
    TwoStageRecommender(random_state=settings.seed).fit(
        events, cutoff, settings.event_weights, data.items, data.users)
    return {"events": len(data.events), "stages": stages, "peaks": peaks,
            "rows": out.get("rows", 0),
            "fit_s": time.perf_counter() - started}


if __name__ == "__main__":
    users_arg, items_arg, folder = sys.argv[1:]
    print(json.dumps(_measure(int(users_arg), int(items_arg), Path(folder)), default=float))
