"""Reading the lake back: the run's point-in-time snapshot.

A run sees the events with ``cutoff - lookback_days <= timestamp < cutoff`` (event fields,
the feedback fields ``position`` / ``placement`` and lineage; a part file written before the
feedback fields existed reads them as nulls), sorted by time then event id, read one date
partition at a time: :func:`load_snapshot` returns them as a DataFrame,
:func:`write_snapshot` streams them to a Parquet file (written to a temp file and renamed)
and returns a :class:`Snapshot`.

The lake is scanned as one ``pyarrow.dataset`` (:func:`~pipeline.lake.storage.lake_dataset`)
with the window as its filter, which the scan pushes down: partitions whose ``event_date`` is
outside the window's dates are never opened, row groups whose timestamp statistics fall
outside it are skipped, and the remaining rows are filtered as they are decoded, with a
day's part files read in parallel. A partition holds the events of its UTC date (ingest
derives it from the timestamp), so sorting each day by time and putting the days in date
order sorts the window; sorting day by day is also faster than sorting the window at once
(5M events: README, "Benchmarks").
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline.core.schema import LAKE_EVENT_COLUMNS, LAKE_EVENT_DTYPES
from pipeline.lake.storage import LAKE_SCHEMA, LINEAGE_COLUMNS, PARTITION, lake_dataset

logger = logging.getLogger(__name__)

SNAPSHOT_COLUMNS = list(LAKE_EVENT_COLUMNS) + list(LINEAGE_COLUMNS)
SNAPSHOT_DTYPES = {**LAKE_EVENT_DTYPES, "source_file": "string", "source_row": "int64"}


def _window(start: dt.datetime, cutoff: dt.datetime) -> ds.Expression:
    """``start <= timestamp < cutoff``, plus the partitions that can hold such events (the
    dates from ``start``'s to ``cutoff``'s): the part a scan prunes folders by."""
    stamp_type = LAKE_SCHEMA.field("timestamp").type
    day, stamp = ds.field(PARTITION), ds.field("timestamp")
    return (
        (day >= start.date())
        & (day <= cutoff.date())
        & (stamp >= pa.scalar(start, type=stamp_type))
        & (stamp < pa.scalar(cutoff, type=stamp_type))
    )


def _window_days(
    dataset: ds.Dataset, start: dt.datetime, cutoff: dt.datetime
) -> dict[dt.date, list[ds.Fragment]]:
    """The window's date partitions (oldest first) and their part files, from the folder
    names alone (no file is opened)."""
    days: dict[dt.date, list[ds.Fragment]] = {}
    day = ds.field(PARTITION)
    for fragment in dataset.get_fragments(filter=(day >= start.date()) & (day <= cutoff.date())):
        key = ds.get_partition_keys(fragment.partition_expression)[PARTITION]
        days.setdefault(key, []).append(fragment)
    return dict(sorted(days.items()))


def _day_tables(lake_dir: Path, start: dt.datetime, cutoff: dt.datetime) -> Iterator[pa.Table]:
    """The window's events one date partition at a time, oldest first, each sorted."""
    dataset = lake_dataset(lake_dir)
    if dataset is None:
        return
    rows = _window(start, cutoff)
    for fragments in _window_days(dataset, start, cutoff).values():
        day = ds.FileSystemDataset(fragments, dataset.schema, dataset.format, dataset.filesystem)
        yield _sorted(day.to_table(columns=SNAPSHOT_COLUMNS, filter=rows))


def _sorted(table: pa.Table) -> pa.Table:
    """Rows by time then event id (a stable sort: ties keep the part files' order), in Arrow:
    no Python object per event."""
    order = pc.sort_indices(
        table, sort_keys=[("timestamp", "ascending"), ("event_id", "ascending")]
    )
    return table.take(order)


def load_snapshot(lake_dir: Path, cutoff: dt.datetime, lookback_days: int) -> pd.DataFrame:
    """Events with ``cutoff - lookback_days <= timestamp < cutoff``: the run's point in time."""
    start = cutoff - dt.timedelta(days=lookback_days)
    days = list(_day_tables(lake_dir, start, cutoff))
    if not days:
        return _empty_snapshot()
    frame = pa.concat_tables(days).to_pandas().astype(SNAPSHOT_DTYPES)
    logger.info(
        "snapshot: %d events from %d days, window [%s, %s)",
        len(frame),
        len(days),
        start.isoformat(),
        cutoff.isoformat(),
    )
    return frame


@dataclass(frozen=True)
class Snapshot:
    """What :func:`write_snapshot` wrote: the run's window and the events in it."""

    path: Path
    start: dt.datetime
    cutoff: dt.datetime
    rows: int
    newest: pd.Timestamp | None  # the newest event in the window (None: empty window)


def window_users(lake_dir: Path, cutoff: dt.datetime, lookback_days: int) -> list[str]:
    """The distinct user ids with an event in the snapshot's window (sorted): the same
    pushed-down window as :func:`load_snapshot`, reading the ``user_id`` column only."""
    dataset = lake_dataset(lake_dir)
    if dataset is None:
        return []
    start = cutoff - dt.timedelta(days=lookback_days)
    users = dataset.to_table(columns=["user_id"], filter=_window(start, cutoff))["user_id"]
    return sorted(str(u) for u in pc.unique(users).to_pylist() if u is not None)


def write_snapshot(lake_dir: Path, cutoff: dt.datetime, lookback_days: int, path: Path) -> Snapshot:
    """Stream the run's snapshot (see :func:`load_snapshot`) to Parquet, one date partition
    at a time (memory bounded by a day's events, whatever the window)."""
    start = cutoff - dt.timedelta(days=lookback_days)
    schema = pa.Schema.from_pandas(_empty_snapshot(), preserve_index=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    rows, newest, days = 0, None, 0
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for table in _day_tables(lake_dir, start, cutoff):
                table = table.select(schema.names)
                writer.write_table(table.cast(schema))
                days += 1
                rows += table.num_rows
                if table.num_rows:  # days ascend, rows sorted by time: the last is the newest
                    newest = pd.Timestamp(table.column("timestamp")[-1].as_py())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.info(
        "snapshot: %d events from %d days, window [%s, %s) -> %s",
        rows,
        days,
        start.isoformat(),
        cutoff.isoformat(),
        path,
    )
    return Snapshot(path, start, cutoff, rows, newest)


def _empty_snapshot() -> pd.DataFrame:
    return pd.DataFrame(
        {c: pd.Series(dtype=LAKE_EVENT_DTYPES.get(c, "string")) for c in SNAPSHOT_COLUMNS}
    ).astype({"source_row": "int64"})
