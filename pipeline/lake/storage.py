"""The lake on disk: part-file layout, Arrow schemas, durable writes and the watermark.

Events live in ``<lake>/event_date=D/part-<sha16>[-<batch>].parquet`` (``<sha16>``: the
landing file's sha256 prefix); a part file is never overwritten and in-flight files are
dotfiles. Each lake row is an event (:data:`~pipeline.core.schema.LAKE_EVENT_COLUMNS`: the
event columns and the feedback columns ``position``, ``placement``) plus its lineage
(``source_file``, ``source_row``) and ``ingested_at``; quarantine rows add a ``reason``. Part
files written before the feedback columns existed lack them: readers pass
:data:`LAKE_SCHEMA`, which reads them as nulls. Durable writes go to a temp file that is
fsynced and renamed into place, then the folder is fsynced. The watermark is the newest event
time in the lake (None for an empty lake). Scans that filter (snapshots) read the lake as one
``pyarrow.dataset`` (:func:`lake_dataset`); code that works file by file lists the part files
(:func:`lake_part_files`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline.core.schema import LAKE_EVENT_DTYPES

LINEAGE_COLUMNS = ("source_file", "source_row")
INGESTED_AT = "ingested_at"
REASON = "reason"


def _schema(with_reason: bool = False) -> pa.Schema:
    columns = {
        **LAKE_EVENT_DTYPES,
        "source_file": "string",
        "source_row": "int64",
        INGESTED_AT: "datetime64[us, UTC]",
    }
    if with_reason:
        columns[REASON] = "string"
    empty = pd.DataFrame({c: pd.Series(dtype=d) for c, d in columns.items()})
    return pa.Schema.from_pandas(empty, preserve_index=False)


LAKE_SCHEMA = _schema()
QUARANTINE_SCHEMA = _schema(with_reason=True)


def to_lake_table(
    frame: pd.DataFrame, ingested_at: pd.Timestamp, *, with_reason: bool = False
) -> pa.Table:
    out = frame.assign(
        **{INGESTED_AT: pd.Series(ingested_at, index=frame.index).astype("datetime64[us, UTC]")}
    )
    schema = QUARANTINE_SCHEMA if with_reason else LAKE_SCHEMA
    return pa.Table.from_pandas(
        out[schema.names].reset_index(drop=True), schema=schema, preserve_index=False
    )


def write_table(table: pa.Table, path: Path, *, durable: bool) -> None:
    if durable:
        durable_write(path, lambda fh: pq.write_table(table, fh))
    else:  # staging: read back once, soon deleted
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path, compression="none")


def durable_write(path: Path, write: Any) -> None:
    """Write via a temp file, fsync it, rename it into place and fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def lake_part_files(lake_dir: Path) -> list[Path]:
    """Every part file of the lake, by date then name (in-flight dotfiles excluded)."""
    return sorted(p for p in lake_dir.glob("event_date=*/*.parquet") if not p.name.startswith("."))


#: The partition column of the lake's folders (``event_date=YYYY-MM-DD``), read as a date.
PARTITION = "event_date"
_PARTITIONING = ds.partitioning(pa.schema([(PARTITION, pa.date32())]), flavor="hive")


def lake_dataset(lake_dir: Path) -> ds.Dataset | None:
    """The lake's part files as one dataset (None when there is no lake yet).

    Hive partitioning makes ``event_date`` a column that a scan filter prunes whole folders
    by (their files are never opened); :data:`LAKE_SCHEMA` is the dataset's schema, so a part
    written before the feedback columns existed reads them as nulls. Its files are exactly
    :func:`lake_part_files` (``event_date=*/*.parquet``, in path order, in-flight dotfiles
    left out), so nothing else that lands under the folder is ever read."""
    if not lake_dir.is_dir():
        return None
    return ds.dataset(
        [str(p) for p in lake_part_files(lake_dir)],
        format="parquet",
        partitioning=_PARTITIONING,
        partition_base_dir=str(lake_dir),
        schema=LAKE_SCHEMA.append(pa.field(PARTITION, pa.date32())),
    )


def part_path(lake_dir: Path, day: str, tag: str, batch: int) -> Path:
    """``event_date=D/part-<sha16>[-<batch>].parquet``; never an existing file's name."""
    folder = lake_dir / f"event_date={day}"
    path = folder / (f"part-{tag}.parquet" if batch == 0 else f"part-{tag}-{batch}.parquet")
    retry = 0
    while path.exists():  # defensive: a part file is never overwritten
        retry += 1
        path = folder / f"part-{tag}-{batch}-r{retry}.parquet"
    return path


def lake_watermark(lake_dir: Path) -> pd.Timestamp | None:
    """The newest event time in the lake (any date), or None when the lake is empty."""
    return newest_event(lake_part_files(lake_dir))


def newest_event(parts: list[Path]) -> pd.Timestamp | None:
    """Newest ``timestamp`` in the part files of the newest date partition (``parts`` sorted)."""
    if not parts:
        return None
    newest_day = parts[-1].parent.name
    return max(
        pd.Timestamp(pq.read_table(p, columns=["timestamp"]).column("timestamp").to_pandas().max())
        for p in parts
        if p.parent.name == newest_day
    )
