"""Served-list history: every published list set, kept in the lake for attribution.

``publish`` swaps the serving view and keeps only ``keep_versions`` list tables in the serving
DB; the impact of a list is measured days later, so every publish also writes what it served
here, one Parquet file per publish::

    lake/served/cutoff_date=YYYY-MM-DD/served-<cutoff>.parquet

columns ``user_id, rank, item_id, variant, experiment, model_version, cutoff, published_at``
(strings dictionary-encoded, zstd: about 3 bytes a row). A list set is live from its
``cutoff`` (the logical time it was computed for, not the wall clock, so simulated and
backfilled worlds attribute correctly) until the next served cutoff. Rows are sorted by
``user_id``, so erasing a user rewrites files by a filter on one sorted column. A re-publish
of the same cutoff replaces its file (atomically); ``__default__`` rows are kept (what a user
without a list saw).
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.config import as_utc
from pipeline.lake.storage import durable_write

logger = logging.getLogger(__name__)

SERVED_COLUMNS = (
    "user_id",
    "rank",
    "item_id",
    "variant",
    "experiment",
    "model_version",
    "cutoff",
    "published_at",
)
_SCHEMA = pa.schema(
    [
        ("user_id", pa.dictionary(pa.int32(), pa.string())),
        ("rank", pa.int16()),
        ("item_id", pa.dictionary(pa.int32(), pa.string())),
        ("variant", pa.dictionary(pa.int8(), pa.string())),
        ("experiment", pa.dictionary(pa.int8(), pa.string())),
        ("model_version", pa.dictionary(pa.int8(), pa.string())),
        ("cutoff", pa.timestamp("us", tz="UTC")),
        ("published_at", pa.timestamp("us", tz="UTC")),
    ]
)


def served_dir(lake_root: Path) -> Path:
    return lake_root / "served"


def served_path(lake_root: Path, cutoff: dt.datetime) -> Path:
    cutoff = as_utc(cutoff)
    return (
        served_dir(lake_root)
        / f"cutoff_date={cutoff:%Y-%m-%d}"
        / f"served-{cutoff:%Y%m%dT%H%M%S}.parquet"
    )


def write_served(
    lake_root: Path,
    lists: pd.DataFrame,
    *,
    cutoff: dt.datetime,
    published_at: dt.datetime,
    model_version: str | None = None,
) -> Path:
    """Record one publish: ``lists`` has user_id, rank, item_id and optionally variant,
    experiment and model_version (else ``model_version`` for every row)."""
    cutoff = as_utc(cutoff)
    frame = pd.DataFrame(
        {
            "user_id": lists["user_id"].astype(str).to_numpy(),
            "rank": lists["rank"].astype("int16").to_numpy(),
            "item_id": lists["item_id"].astype(str).to_numpy(),
            "variant": _column(lists, "variant"),
            "experiment": _column(lists, "experiment"),
            "model_version": (
                _column(lists, "model_version")
                if "model_version" in lists
                else pd.Series(model_version, index=lists.index, dtype=object).to_numpy()
            ),
            "cutoff": pd.Timestamp(cutoff),
            "published_at": pd.Timestamp(as_utc(published_at)),
        }
    ).sort_values(["user_id", "rank"], kind="stable")
    table = pa.Table.from_pandas(frame, schema=_SCHEMA, preserve_index=False)
    path = served_path(lake_root, cutoff)
    path.parent.mkdir(parents=True, exist_ok=True)
    durable_write(path, lambda fh: pq.write_table(table, fh, compression="zstd"))
    logger.info(
        "served history: %d rows for %d users at %s -> %s",
        len(frame),
        frame["user_id"].nunique(),
        cutoff.isoformat(),
        path,
    )
    return path


def read_served(
    lake_root: Path, start: dt.datetime | None = None, end: dt.datetime | None = None
) -> pd.DataFrame:
    """Served rows whose list set was live at some time in ``[start, end)``: the sets with a
    cutoff in the range, plus the one live at ``start`` (the newest cutoff before it).
    Columns: :data:`SERVED_COLUMNS` plus ``live_until`` (the next cutoff, NaT for the
    newest), strings as plain objects."""
    paths = sorted(served_dir(lake_root).glob("cutoff_date=*/served-*.parquet"))
    if not paths:
        return _empty()
    cutoffs = [
        pd.Timestamp(
            dt.datetime.strptime(p.stem.removeprefix("served-"), "%Y%m%dT%H%M%S"), tz="UTC"
        )
        for p in paths
    ]
    order = sorted(range(len(paths)), key=lambda i: cutoffs[i])
    paths, cutoffs = [paths[i] for i in order], [cutoffs[i] for i in order]
    until = [*cutoffs[1:], pd.NaT]
    keep = []
    for path, cutoff, next_cutoff in zip(paths, cutoffs, until, strict=True):
        if end is not None and cutoff >= pd.Timestamp(as_utc(end)):
            continue
        if (
            start is not None
            and not pd.isna(next_cutoff)
            and next_cutoff <= pd.Timestamp(as_utc(start))
        ):
            continue
        frame = pq.read_table(path).to_pandas()
        for column in ("user_id", "item_id", "variant", "experiment", "model_version"):
            frame[column] = frame[column].astype(object)
        keep.append(
            frame.assign(
                live_until=pd.Series(next_cutoff, index=frame.index, dtype="datetime64[us, UTC]")
            )
        )
    return pd.concat(keep, ignore_index=True) if keep else _empty()


def _empty() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in (*SERVED_COLUMNS, "live_until")})


def _column(lists: pd.DataFrame, name: str):
    if name not in lists:
        return pd.Series(None, index=lists.index, dtype=object).to_numpy()
    return lists[name].astype(object).where(lists[name].notna(), None).to_numpy()
