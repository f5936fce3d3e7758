"""Ingest + validate throughput and peak memory on synthetic clickstreams (1M and 5M events).

Each measurement runs in a fresh subprocess, so its peak RSS (``os.wait4`` rusage) is its own:

* ``baseline``: ``pd.read_csv`` of the landing CSV + ``to_parquet`` (what a naive loader does);
* ``pipeline``: ``ingest_landing`` (hash, stage, dedupe against the lake, commit, manifest) +
  ``write_snapshot`` + ``validate_events_file`` (the GX suite), as the nightly run does;
  then what the next run pays to load the lake's event-id index, with the per-part hash
  caches and rebuilding them.

Quick mode: 200k events. Run with ``python -m benchmarks ingest [--quick]``.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._child import run_child

_START = "2024-01-01"
_DAYS = 60


def run(quick: bool) -> None:
    """Print events/s and peak RSS for the baseline and the pipeline at each size."""
    sizes = [200_000] if quick else [1_000_000, 5_000_000]
    print(
        f"{'events':>10} {'step':<10} {'seconds':>8} {'events/s':>11} {'peak RSS':>10}"
        f" {'x baseline time':>16} {'x baseline RSS':>15}",
        flush=True,
    )
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
            root = Path(tmp)
            events = int(_child(["generate", str(size), str(root)])[0]["events"])
            base, base_rss = _child(["baseline", str(root)])
            pipe, pipe_rss = _child(["pipeline", str(root)])
            for name, result, rss in (("baseline", base, base_rss), ("pipeline", pipe, pipe_rss)):
                print(
                    f"{events:>10,} {name:<10} {result['seconds']:>8.1f} "
                    f"{events / result['seconds']:>11,.0f} {rss / 2**20:>8,.0f}MB "
                    f"{result['seconds'] / base['seconds']:>15.2f}x "
                    f"{rss / base_rss:>14.2f}x",
                    flush=True,
                )
            print(
                f"{'':>10} pipeline detail: ingest {pipe['ingest_s']:.1f}s, snapshot "
                f"{pipe['snapshot_s']:.1f}s, validate {pipe['validate_s']:.1f}s "
                f"(+ GX import {pipe['gx_import_s']:.1f}s, not timed); "
                f"{pipe['rows_new']:,} new rows, {pipe['bad_rows']:,} quarantined, "
                f"CSV {pipe['csv_mb']:.0f} MB",
                flush=True,
            )
            print(
                f"{'':>10} next run's lake index load: {pipe['index_s']:.2f}s with the "
                f"per-part hash caches, {pipe['index_rebuild_s']:.2f}s rebuilding them "
                f"({pipe['index_rebuild_s'] / max(pipe['index_s'], 1e-9):.1f}x)",
                flush=True,
            )


def _child(args: list[str]) -> tuple[dict, int]:
    return run_child("benchmarks.bench_ingest", args)


def _generate(size: int, root: Path) -> dict:
    from pipeline.lake.demo import write_landing
    from pipeline.lake.demo.synthetic import generate_clickstream

    data = generate_clickstream(
        n_users=max(1, size // 56),
        n_items=max(100, size // 200),
        n_days=_DAYS,
        start=_START,
        seed=1,
    )
    write_landing(data, root / "landing", name="clicks", fmt="csv")
    return {"events": len(data.events)}


def _baseline(root: Path) -> dict:
    import pandas as pd

    started = time.perf_counter()
    frame = pd.read_csv(root / "landing" / "events" / "clicks.csv")
    frame.to_parquet(root / "baseline.parquet", index=False)
    return {"seconds": time.perf_counter() - started}


def _pipeline(root: Path) -> dict:
    from pipeline.core.config import REPO_ROOT
    from pipeline.core.timing import StageClock
    from pipeline.lake.event_ids import CACHE_FOLDERS, load_lake_index
    from pipeline.lake.ingest import ingest_landing
    from pipeline.lake.snapshot import write_snapshot
    from pipeline.lake.validate import _import_gx, validate_events_file

    imported = time.perf_counter()
    _import_gx()  # a one-off ~5 s per process: reported apart from the throughput
    gx_import_s = time.perf_counter() - imported
    landing, lake, run = root / "landing" / "events", root / "lake" / "events", root / "run"
    shutil.rmtree(root / "lake", ignore_errors=True)
    cutoff = dt.datetime.fromisoformat(_START).replace(tzinfo=dt.timezone.utc) + dt.timedelta(
        days=_DAYS
    )
    started = time.perf_counter()
    report = ingest_landing(landing, lake, settle_seconds=0)
    ingested = time.perf_counter()
    write_snapshot(lake, cutoff, 365, run / "events_raw.parquet")
    snapshotted = time.perf_counter()
    validation = validate_events_file(
        run / "events_raw.parquet",
        clean_path=run / "events.parquet",
        suite_path=REPO_ROOT / "expectations" / "events.json",
        cutoff=cutoff,
        allowed_event_types=["view", "click", "like", "share", "add_to_cart", "purchase", "rating"],
        quarantine_path=run / "quarantine.parquet",
    )
    done = time.perf_counter()
    clock = StageClock()
    load_lake_index(lake)  # what the next run pays before its files
    index_s = clock.lap("index")
    for folder in CACHE_FOLDERS:  # event ids and content keys
        shutil.rmtree(lake / folder, ignore_errors=True)
    clock.lap("remove caches")
    load_lake_index(lake)  # a lake without the hash caches
    rebuild_s = clock.lap("rebuild")
    return {
        "seconds": done - started,
        "ingest_s": ingested - started,
        "index_s": index_s,
        "index_rebuild_s": rebuild_s,
        "snapshot_s": snapshotted - ingested,
        "validate_s": done - snapshotted,
        "gx_import_s": gx_import_s,
        "rows_new": report.rows_new,
        "bad_rows": validation.bad_rows,
        "csv_mb": (landing / "clicks.csv").stat().st_size / 2**20,
    }


if __name__ == "__main__":
    step, *rest = sys.argv[1:]
    if step == "generate":
        result = _generate(int(rest[0]), Path(rest[1]))
    elif step == "baseline":
        result = _baseline(Path(rest[0]))
    else:
        result = _pipeline(Path(rest[0]))
    print(json.dumps(result))
