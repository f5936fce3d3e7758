"""The whole nightly run on a large synthetic log: where the hours and the gigabytes go.

A seeded synthetic clickstream (:func:`pipeline.lake.demo.synthetic.generate_clickstream`,
~58 events per user) is written to a throwaway data folder with its own MLflow store. All
days but the last land first and are ingested into the lake (the history, not timed as part
of the night); then the last day lands and the nightly stages run in order, **each in its own
fresh process**, as Airflow runs its tasks (``pipeline.nightly``: ingest, validate,
build_features, tune, train, evaluate, register, publish to the embedded SQLite serving
file; the publish benchmark covers PostgreSQL). So each stage's peak RSS is its own.

Printed per size: each stage's seconds, share of the night and peak RSS; the whole night
against one plain two-stage fit of the same events (its own process), i.e. what the
pipeline costs on top of training the model once; lists per second; and, between sizes, how
time and peak memory grew against the number of events.

Sizes: ``--quick`` 5k users x 2k items over 90 days; the default 50k x 10k over 90 days
(the table kept from earlier sessions); ``RECS_BENCH_NIGHTLY_SIZES`` picks others, e.g.
``50000x100000x365,200000x100000x365,1000000x100000x365`` (users x items x days).
Run with ``python -m benchmarks nightly [--quick]``. Each stage's time and peak go to
stderr as it ends; ``RECS_BENCH_NIGHTLY_FIT=0`` skips the comparison fit (at 1M users it
costs as much as ``train``).

A large size's history takes a while to generate and ingest; it can be prepared once and the
night run on it later (once: the night ingests the landing day):
``python -m benchmarks.bench_nightly prepare USERS ITEMS DAYS FOLDER``, then
``python -m benchmarks.bench_nightly night FOLDER``. After the night, ``side-by-side FOLDER``
runs ``train`` and ``evaluate`` again, one after the other and then side by side as the DAG
runs them, and prints both wall times.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._child import run_child

STAGES = (
    "ingest",
    "validate",
    "build_features",
    "tune",
    "label_windows",
    "train",
    "evaluate",
    "register",
    "publish",
)
START = "2024-01-01"
DEFAULT_SIZES = ((50_000, 10_000, 90),)
QUICK_SIZES = ((5_000, 2_000, 90),)
PREPARED = "prepared.json"


def _sizes(quick: bool) -> tuple[tuple[int, int, int], ...]:
    spec = os.environ.get("RECS_BENCH_NIGHTLY_SIZES")
    if quick or not spec:
        return QUICK_SIZES if quick else DEFAULT_SIZES
    return tuple(tuple(int(part) for part in size.split("x")) for size in spec.split(","))


def run(quick: bool) -> None:
    """Print stage seconds and peak RSS of one night per size, and the growth between sizes."""
    rows = []
    for n_users, n_items, days in _sizes(quick):
        with tempfile.TemporaryDirectory(prefix="bench-nightly-") as tmp:
            rows.append(_night(n_users, n_items, days, Path(tmp)))
        _print_night(rows[-1])
    for small, large in zip(rows, rows[1:], strict=False):
        events = large["events"] / small["events"]
        print(
            f"{small['users']:,} -> {large['users']:,} users: events x{events:.1f}, night "
            f"x{large['total'] / small['total']:.1f}, peak RSS "
            f"x{large['peak'] / small['peak']:.1f}",
            flush=True,
        )


def run_prepared(root: Path) -> None:
    """The night on a folder made by the ``prepare`` command (usable once)."""
    record = root / PREPARED
    prepared = json.loads(record.read_text())
    if prepared.get("night_started"):
        raise SystemExit(
            f"{root}: its night already ran (the landing day is in the lake); "
            "prepare the folder again"
        )
    record.write_text(json.dumps({**prepared, "night_started": time.time()}))
    _print_night(_night(prepared["users"], prepared["items"], prepared["days"], root, prepared))


def _night(n_users: int, n_items: int, days: int, root: Path, prepared: dict | None = None) -> dict:
    if prepared is None:
        prepared, _ = run_child(
            "benchmarks.bench_nightly",
            ["prepare", str(n_users), str(n_items), str(days), str(root)],
        )
    prepared = {k: v for k, v in prepared.items() if k in ("events", "new_events", "history_s")}
    stages, peaks = {}, {}
    for name in STAGES:
        started = time.perf_counter()
        result, rss = run_child("benchmarks.bench_nightly", ["stage", name, str(root)])
        stages[name], peaks[name] = time.perf_counter() - started, rss
        print(
            f"  ({n_users:,} users) {name}: {stages[name]:.1f} s, peak RSS {rss / 2**30:.2f} GB",
            file=sys.stderr,
            flush=True,
        )  # progress on long sizes
        if name == "publish":
            prepared["rows"], prepared["published_users"] = (
                result.get("rows", 0),
                result.get("users", 0),
            )
            prepared["list_seconds"] = result.get("seconds", 0.0)
    fit, fit_rss = (
        ({"seconds": float("nan")}, 0)
        if os.environ.get("RECS_BENCH_NIGHTLY_FIT") == "0"
        else run_child("benchmarks.bench_nightly", ["fit", str(root)])
    )
    return {
        **prepared,
        "users": n_users,
        "items": n_items,
        "days": days,
        "stages": stages,
        "peaks": peaks,
        "total": sum(stages.values()),
        "peak": max(peaks.values()),
        "fit_s": fit["seconds"],
        "fit_rss": fit_rss,
    }


def _print_night(row: dict) -> None:
    gb = 2**30
    print(
        f"{row['users']:,} users x {row['items']:,} items, {row['days']} days: "
        f"{row['events']:,} events in the lake, {row['new_events']:,} landing tonight; "
        f"{row['rows']:,} rows published (history ingest {row['history_s']:.0f} s)",
        flush=True,
    )
    print(f"  {'stage':<16} {'seconds':>8} {'share':>7} {'peak RSS':>10}", flush=True)
    for name, seconds in row["stages"].items():
        print(
            f"  {name:<16} {seconds:>8.1f} {seconds / row['total']:>6.0%} "
            f"{row['peaks'][name] / gb:>8.2f} GB",
            flush=True,
        )
    users_per_s = row["published_users"] / max(row["list_seconds"], 1e-9)
    print(
        f"  {'whole night':<16} {row['total']:>8.1f}        {row['peak'] / gb:>8.2f} GB"
        + (
            f"  = {row['total'] / row['fit_s']:.1f}x one two-stage fit ({row['fit_s']:.1f} s, "
            f"{row['fit_rss'] / gb:.2f} GB)"
            if row["fit_s"] == row["fit_s"]
            else "  (no comparison fit)"
        )
        + f"; publish {users_per_s:,.0f} users/s",
        flush=True,
    )


# ---- the child processes ---------------------------------------------------------------
def _environment(root: Path) -> None:
    os.environ.update(
        RECS_DATA_DIR=str(root / "data"),
        RECS_LANDING_SETTLE_SECONDS="0",
        MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
        MLFLOW_ARTIFACT_ROOT=str(root / "mlartifacts"),
        MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false",
        MLFLOW_LOGGING_LEVEL="WARNING",
        MLFLOW_CONFIGURE_LOGGING="false",
    )
    os.environ.pop("AIRFLOW_CONN_RECS_SERVING", None)
    import logging

    logging.basicConfig(level=logging.WARNING)


def _cutoff(root: Path) -> dt.datetime:
    from pipeline.core.config import as_utc

    return as_utc(json.loads((root / "night.json").read_text())["cutoff"])


def _prepare(n_users: int, n_items: int, days: int, root: Path) -> dict:
    """The history lands and is ingested; then the last day lands."""
    root.mkdir(parents=True, exist_ok=True)
    _environment(root)
    from pipeline import nightly
    from pipeline.core.config import Settings, as_utc
    from pipeline.lake.demo import write_landing
    from pipeline.lake.demo.synthetic import generate_clickstream

    data = generate_clickstream(n_users=n_users, n_items=n_items, n_days=days, start=START, seed=1)
    cutoff = as_utc(START) + dt.timedelta(days=days)
    last_day = data.events["timestamp"] >= cutoff - dt.timedelta(days=1)
    landing = root / "data" / "landing"
    write_landing(
        dataclasses.replace(data, events=data.events[~last_day]), landing, name="history", fmt="csv"
    )
    started = time.perf_counter()
    nightly.ingest(Settings(), cutoff - dt.timedelta(days=1))
    history_s = time.perf_counter() - started
    write_landing(
        dataclasses.replace(data, events=data.events[last_day]), landing, name="tonight", fmt="csv"
    )
    (root / "night.json").write_text(json.dumps({"cutoff": cutoff.isoformat()}))
    prepared = {
        "events": int(len(data.events)),
        "new_events": int(last_day.sum()),
        "history_s": history_s,
        "users": n_users,
        "items": n_items,
        "days": days,
    }
    (root / PREPARED).write_text(json.dumps(prepared))
    return prepared


def _stage(name: str, root: Path) -> dict:
    _environment(root)
    from pipeline import nightly
    from pipeline.core.config import Settings

    settings, cutoff = Settings(), _cutoff(root)
    if not hasattr(nightly, name):  # a stage the code of a before/after comparison lacks
        return {"skipped": name}
    if name == "publish":
        decision = json.loads((settings.run_dir(cutoff) / "register.json").read_text())
        return nightly.publish(settings, cutoff, decision=decision)
    return getattr(nightly, name)(settings, cutoff)


def _fit(root: Path) -> dict:
    """One plain two-stage fit of the night's events (as ``train`` does, without the run)."""
    _environment(root)
    from pipeline.core.config import Settings
    from pipeline.lake.readers import read_side_file
    from pipeline.models.twostage import TwoStageRecommender

    settings, cutoff = Settings(), _cutoff(root)
    try:
        from pipeline.core.ids import EncodedEvents

        events = EncodedEvents.read(settings.run_dir(cutoff))
    except ImportError:  # the code before ids were encoded (a before/after comparison)
        import pandas as pd

        events = pd.read_parquet(settings.run_dir(cutoff) / "events.parquet")
    started = time.perf_counter()
    TwoStageRecommender(random_state=settings.seed).fit(
        events,
        cutoff,
        settings.event_weights,
        read_side_file(settings.landing_dir / "items.csv"),
        read_side_file(settings.landing_dir / "users.csv"),
    )
    return {"seconds": time.perf_counter() - started}


def run_side_by_side(root: Path) -> None:
    """``train`` and ``evaluate`` again on a folder whose night ran, one after the other and
    then side by side, as the DAG runs them (LocalExecutor, ``parallelism = 2``): what the
    two cost in wall time on this machine when they share its cores."""
    from concurrent.futures import ThreadPoolExecutor

    def timed(name: str) -> tuple[float, int]:
        started = time.perf_counter()
        _, rss = run_child("benchmarks.bench_nightly", ["stage", name, str(root)])
        return time.perf_counter() - started, rss

    alone = {name: timed(name) for name in ("train", "evaluate")}
    started = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        both = dict(zip(("train", "evaluate"), pool.map(timed, ("train", "evaluate"))))
    wall = time.perf_counter() - started
    gb = 2**30
    one_after_other = sum(seconds for seconds, _ in alone.values())
    print(
        f"{root}: train {alone['train'][0]:.1f} s + evaluate {alone['evaluate'][0]:.1f} s one "
        f"after the other = {one_after_other:.1f} s; side by side {wall:.1f} s wall "
        f"({wall / one_after_other:.2f}x; train {both['train'][0]:.1f} s, evaluate "
        f"{both['evaluate'][0]:.1f} s), peak RSS {both['train'][1] / gb:.2f} + "
        f"{both['evaluate'][1] / gb:.2f} GB",
        flush=True,
    )


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "night":
        run_prepared(Path(args[0]))
        sys.exit(0)
    if command == "side-by-side":
        run_side_by_side(Path(args[0]))
        sys.exit(0)
    if command == "prepare":
        out = _prepare(int(args[0]), int(args[1]), int(args[2]), Path(args[3]))
    elif command == "stage":
        out = _stage(args[0], Path(args[1]))
    else:
        out = _fit(Path(args[0]))
    print(json.dumps(out, default=str))
