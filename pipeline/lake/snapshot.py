"""Reading the lake back: the run's point-in-time snapshot.

A run sees the events with ``cutoff - lookback_days <= timestamp < cutoff`` (event fields,
the feedback fields ``position`` / ``placement`` and lineage; a part file written before the
feedback fields existed reads them as nulls), sorted by time then event id, read one date
partition at a time:
:func:`load_snapshot` returns them as a DataFrame, :func:`write_snapshot` streams them to a
Parquet file (written to a temp file and renamed) and returns a :class:`Snapshot`.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.schema import LAKE_EVENT_COLUMNS, LAKE_EVENT_DTYPES
from pipeline.lake.storage import LAKE_SCHEMA, LINEAGE_COLUMNS, lake_part_files

logger = logging.getLogger(__name__)

SNAPSHOT_COLUMNS = list(LAKE_EVENT_COLUMNS) + list(LINEAGE_COLUMNS)


def _snapshot_parts(lake_dir: Path, start: dt.datetime, cutoff: dt.datetime
                    ) -> dict[str, list[Path]]:
    days: dict[str, list[Path]] = {}
    for part in lake_part_files(lake_dir):
        day = dt.date.fromisoformat(part.parent.name.split("=", 1)[1])
        if start.date() <= day <= cutoff.date():
            days.setdefault(day.isoformat(), []).append(part)
    return days


def _snapshot_day(parts: list[Path], start: dt.datetime, cutoff: dt.datetime) -> pd.DataFrame:
    frame = _snapshot_day_table(parts, start, cutoff).to_pandas()
    return frame.astype({**LAKE_EVENT_DTYPES, "source_file": "string", "source_row": "int64"})


def _snapshot_day_table(parts: list[Path], start: dt.datetime, cutoff: dt.datetime
                        ) -> pa.Table:
    """One day's events in the window, sorted by time then event id (a stable sort), in
    Arrow: no Python object per event. Read with :data:`LAKE_SCHEMA`, so a column a part
    file lacks (``position`` / ``placement`` in older parts) reads as nulls."""
    table = pa.concat_tables([pq.read_table(p, columns=SNAPSHOT_COLUMNS, schema=LAKE_SCHEMA)
                              for p in parts])
    stamps = table.column("timestamp")
    inside = pc.and_(pc.greater_equal(stamps, pa.scalar(start, type=stamps.type)),
                     pc.less(stamps, pa.scalar(cutoff, type=stamps.type)))
    table = table.filter(inside)
    order = pc.sort_indices(table, sort_keys=[("timestamp", "ascending"),
                                              ("event_id", "ascending")])
    return table.take(order)


def load_snapshot(lake_dir: Path, cutoff: dt.datetime, lookback_days: int) -> pd.DataFrame:
    """Events with ``cutoff - lookback_days <= timestamp < cutoff``: the run's point in time."""
    start = cutoff - dt.timedelta(days=lookback_days)
    days = _snapshot_parts(lake_dir, start, cutoff)
    frames = [_snapshot_day(parts, start, cutoff) for _, parts in sorted(days.items())]
    if not frames:
        return _empty_snapshot()
    frame = pd.concat(frames, ignore_index=True)
    logger.info("snapshot: %d events from %d days, window [%s, %s)", len(frame), len(days),
                start.isoformat(), cutoff.isoformat())
    return frame


@dataclass(frozen=True)
class Snapshot:
    """What :func:`write_snapshot` wrote: the run's window and the events in it."""

    path: Path
    start: dt.datetime
    cutoff: dt.datetime
    rows: int
    newest: pd.Timestamp | None  # the newest event in the window (None: empty window)


def write_snapshot(lake_dir: Path, cutoff: dt.datetime, lookback_days: int, path: Path
                   ) -> Snapshot:
    """Stream the run's snapshot (see :func:`load_snapshot`) to Parquet, one day at a time."""
    start = cutoff - dt.timedelta(days=lookback_days)
    days = _snapshot_parts(lake_dir, start, cutoff)
    schema = pa.Schema.from_pandas(_empty_snapshot(), preserve_index=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    rows, newest = 0, None
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for _, parts in sorted(days.items()):
                table = _snapshot_day_table(parts, start, cutoff).select(schema.names)
                writer.write_table(table.cast(schema))
                rows += table.num_rows
                if table.num_rows:  # days ascend, rows sorted by time: the last is the newest
                    newest = pd.Timestamp(table.column("timestamp")[-1].as_py())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.info("snapshot: %d events from %d days, window [%s, %s) -> %s", rows, len(days),
                start.isoformat(), cutoff.isoformat(), path)
    return Snapshot(path, start, cutoff, rows, newest)


def _empty_snapshot() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=LAKE_EVENT_DTYPES.get(c, "string"))
                         for c in SNAPSHOT_COLUMNS}).astype({"source_row": "int64"})
