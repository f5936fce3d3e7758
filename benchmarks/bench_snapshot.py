"""Snapshot scans: the lake read through ``pyarrow.dataset`` against the earlier reader.

A seeded synthetic lake is written once in a temp folder, laid out as ingest lays it out
(``event_date=D/part-<tag>.parquet``): 5M events over 90 days, each day's events in one part
per landing batch (3 batches, so 3 parts a day) plus a fourth, later batch of late events
(2% of each day's, a fourth part in its day's folder). Then, each in a fresh process (peak RSS is
its own), alternating old and new, three times:

* ``load_snapshot`` of the whole lake (the nightly's 365-day lookback) and of the last 28
  days (the monitor's windows: partition pruning has folders to skip);
* ``write_snapshot`` of the whole lake (what the nightly's ingest stage writes).

"old" is :func:`glob_snapshot` / :func:`glob_write_snapshot`, the reader before the dataset
(glob the ``event_date=*`` folders, keep the window's dates by folder name, read each day's
parts with ``pq.read_table``, filter, sort and concatenate day by day); "new" is
:mod:`pipeline.lake.snapshot`. Both must return the same frame (checked by a hash of every
cell). ``python -m benchmarks snapshot`` (~4 min); ``--quick``: 1M events.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from benchmarks._child import run_child

_START = "2024-01-01"
_DAYS = 90
_BATCHES = 3
_LATE_SHARE = 0.02
_ROUNDS = 3
WINDOWS = {
    "load, whole lake": ("load", 365),
    "load, last 28 days": ("load", 28),
    "write, whole lake": ("write", 365),
}


def run(quick: bool = False) -> None:
    size = 1_000_000 if quick else 5_000_000
    with tempfile.TemporaryDirectory(prefix="bench-snapshot-") as tmp:
        root = Path(tmp)
        made, made_rss = _child(["generate", str(size), str(root)])
        print(
            f"lake: {made['events']:,} events, {made['parts']} part files in {made['days']} "
            f"days ({made['mb']:.0f} MB), written in {made['seconds']:.0f}s "
            f"(peak RSS {made_rss / 2**20:,.0f} MB)",
            flush=True,
        )
        print(
            f"{'scan':<20} {'reader':<6} {'seconds':>8} {'peak RSS':>10} {'rows':>11}"
            f" {'x old time':>11} {'x old RSS':>10}",
            flush=True,
        )
        for label, (kind, days) in WINDOWS.items():
            best: dict[str, tuple[float, int, dict]] = {}
            for _ in range(_ROUNDS):
                for reader in ("old", "new"):
                    result, _ = _child([kind, reader, str(root), str(days)])
                    seconds, peak, _ = best.get(reader, (float("inf"), 0, {}))
                    best[reader] = (
                        min(seconds, result["seconds"]),
                        max(peak, result["peak_rss"]),
                        result,
                    )
            old, new = best["old"], best["new"]
            if old[2]["digest"] != new[2]["digest"]:
                raise AssertionError(f"{label}: the old and new readers disagree")
            for reader, (seconds, rss, result) in best.items():
                print(
                    f"{label:<20} {reader:<6} {seconds:>8.2f} {rss / 2**20:>8,.0f}MB "
                    f"{result['rows']:>11,} {seconds / old[0]:>10.2f}x "
                    f"{rss / old[1]:>9.2f}x",
                    flush=True,
                )
    print(
        f"(fastest of {_ROUNDS} runs and the largest peak RSS, taken as the scan returns; "
        "same rows, columns, dtypes and order from both readers)"
    )


def _child(args: list[str]) -> tuple[dict, int]:
    return run_child("benchmarks.bench_snapshot", args)


# ---- the lake --------------------------------------------------------------------------------
def _generate(size: int, root: Path) -> dict:
    import numpy as np

    from pipeline.lake.demo.synthetic import generate_clickstream
    from pipeline.lake.storage import part_path, to_lake_table, write_table

    started = time.perf_counter()
    events = generate_clickstream(
        n_users=max(1, size // 56),
        n_items=max(100, size // 200),
        n_days=_DAYS,
        start=_START,
        seed=1,
    ).events
    rng = np.random.default_rng(1)
    batch = rng.integers(0, _BATCHES, len(events))
    batch[rng.random(len(events)) < _LATE_SHARE] = _BATCHES  # late: lands with a later batch
    frame = events.assign(
        source_file=[f"batch{b}.csv" for b in batch],
        source_row=0,
        position=pd.array([pd.NA] * len(events), dtype="Int64"),
        placement=pd.array([pd.NA] * len(events), dtype="string"),
    )
    frame["source_row"] = frame.groupby("source_file").cumcount() + 1
    frame["event_date"] = frame["timestamp"].dt.date.astype(str)
    lake, parts = root / "lake" / "events", 0
    for number in range(_BATCHES + 1):
        ingested = pd.Timestamp(_START, tz="UTC") + pd.Timedelta(days=_DAYS + number)
        for day, rows in frame[batch == number].groupby("event_date", sort=True):
            write_table(
                to_lake_table(rows.drop(columns="event_date"), ingested),
                part_path(lake, day, f"{number:016x}", 0),
                durable=False,
            )
            parts += 1
    mb = sum(p.stat().st_size for p in lake.rglob("*.parquet")) / 2**20
    return {
        "events": len(frame),
        "parts": parts,
        "days": frame["event_date"].nunique(),
        "mb": mb,
        "seconds": time.perf_counter() - started,
    }


def _cutoff() -> dt.datetime:
    return dt.datetime.fromisoformat(_START).replace(tzinfo=dt.timezone.utc) + dt.timedelta(
        days=_DAYS
    )


def _scan(kind: str, reader: str, root: Path, days: int) -> dict:
    """Time one scan; its process's peak RSS as it returns (before the check's own copies)."""
    import resource

    from pipeline.lake import snapshot

    lake = root / "lake" / "events"
    started = time.perf_counter()
    if kind == "load":
        load = snapshot.load_snapshot if reader == "new" else glob_snapshot
        frame = load(lake, _cutoff(), days)
        seconds = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    else:
        write = snapshot.write_snapshot if reader == "new" else glob_write_snapshot
        write(lake, _cutoff(), days, root / f"snapshot-{reader}.parquet")
        seconds = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        frame = pd.read_parquet(root / f"snapshot-{reader}.parquet")
    digest = (
        str(frame.dtypes.to_dict())
        + str(list(frame.columns))
        + str(int(pd.util.hash_pandas_object(frame, index=True).sum()))
    )
    return {"seconds": seconds, "rows": len(frame), "digest": digest, "peak_rss": peak}


# ---- the reader before pyarrow.dataset (the baseline; tests compare against it too) --------
def glob_snapshot(lake_dir: Path, cutoff: dt.datetime, lookback_days: int) -> pd.DataFrame:
    """``load_snapshot`` as it was: glob the date folders, one day at a time."""
    from pipeline.lake.snapshot import _empty_snapshot

    start = cutoff - dt.timedelta(days=lookback_days)
    days = _glob_parts(lake_dir, start, cutoff)
    frames = [
        _glob_day_table(parts, start, cutoff)
        .to_pandas()
        .astype({**_lake_dtypes(), "source_file": "string", "source_row": "int64"})
        for _, parts in sorted(days.items())
    ]
    return pd.concat(frames, ignore_index=True) if frames else _empty_snapshot()


def glob_write_snapshot(lake_dir: Path, cutoff: dt.datetime, lookback_days: int, path: Path) -> int:
    """``write_snapshot`` as it was (rows written)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.lake.snapshot import _empty_snapshot

    start = cutoff - dt.timedelta(days=lookback_days)
    schema = pa.Schema.from_pandas(_empty_snapshot(), preserve_index=False)
    rows = 0
    with pq.ParquetWriter(path, schema) as writer:
        for _, parts in sorted(_glob_parts(lake_dir, start, cutoff).items()):
            table = _glob_day_table(parts, start, cutoff).select(schema.names)
            writer.write_table(table.cast(schema))
            rows += table.num_rows
    return rows


def _lake_dtypes() -> dict:
    from pipeline.core.schema import LAKE_EVENT_DTYPES

    return LAKE_EVENT_DTYPES


def _glob_parts(lake_dir: Path, start: dt.datetime, cutoff: dt.datetime) -> dict[str, list[Path]]:
    from pipeline.lake.storage import lake_part_files

    days: dict[str, list[Path]] = {}
    for part in lake_part_files(lake_dir):
        day = dt.date.fromisoformat(part.parent.name.split("=", 1)[1])
        if start.date() <= day <= cutoff.date():
            days.setdefault(day.isoformat(), []).append(part)
    return days


def _glob_day_table(parts: list[Path], start: dt.datetime, cutoff: dt.datetime):
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline.lake.snapshot import SNAPSHOT_COLUMNS
    from pipeline.lake.storage import LAKE_SCHEMA

    table = pa.concat_tables(
        [pq.read_table(p, columns=SNAPSHOT_COLUMNS, schema=LAKE_SCHEMA) for p in parts]
    )
    stamps = table.column("timestamp")
    inside = pc.and_(
        pc.greater_equal(stamps, pa.scalar(start, type=stamps.type)),
        pc.less(stamps, pa.scalar(cutoff, type=stamps.type)),
    )
    table = table.filter(inside)
    order = pc.sort_indices(
        table, sort_keys=[("timestamp", "ascending"), ("event_id", "ascending")]
    )
    return table.take(order)


if __name__ == "__main__":
    step, *rest = sys.argv[1:]
    if step == "generate":
        out = _generate(int(rest[0]), Path(rest[1]))
    else:
        out = _scan(step, rest[0], Path(rest[1]), int(rest[2]))
    print(json.dumps(out))
