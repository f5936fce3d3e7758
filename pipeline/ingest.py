"""Ingest: landing files -> Parquet lake partitioned by event date, deduplicated by ``event_id``.

Landing files are CSV/TSV, JSON lines or Parquet, optionally gzipped, with the columns of the
event contract (``pipeline.schema``). Each file is read, checked for the required columns,
normalised (types, UTC timestamps, derived ``event_id``), stripped of consent-withdrawn events
and of any column outside the contract (so personal data such as e-mail or IP never enters the
lake), and merged into its date partitions. Every partition write is atomic (temp file +
``os.replace``) and merging keeps the first copy of each ``event_id``, so a retried or repeated
ingest leaves the lake unchanged.

Rows whose ids or timestamp cannot be read are kept out of the lake and written, with the reason,
to ``lake/rejected/``; the validation stage deals with everything else.
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import DataError
from pipeline.schema import EVENT_COLUMNS, EVENT_DTYPES, REQUIRED_COLUMNS

logger = logging.getLogger(__name__)

LINEAGE_COLUMNS = ("source_file", "source_row")
_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
             ".parquet": "parquet", ".pq": "parquet"}
_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f"}


@dataclass
class IngestReport:
    """What one ingest did; small enough for XCom."""

    files: int = 0
    rows_read: int = 0
    rows_new: int = 0
    rows_duplicate: int = 0
    rows_no_consent: int = 0
    rows_rejected: int = 0
    partitions_written: int = 0
    dropped_columns: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def list_landing_files(landing_events_dir: Path) -> list[Path]:
    """Landing files we know how to read, in a stable order (dotfiles are in-flight writes)."""
    if not landing_events_dir.exists():
        return []
    return sorted(p for p in landing_events_dir.iterdir()
                  if p.is_file() and not p.name.startswith(".") and _file_format(p) is not None)


def ingest_landing(landing_events_dir: Path, lake_dir: Path) -> IngestReport:
    """Ingest every landing file into the lake; idempotent."""
    started = time.perf_counter()
    report = IngestReport()
    files = list_landing_files(landing_events_dir)
    if not files:
        raise DataError(f"no event files in {landing_events_dir} "
                        "(expected *.csv, *.tsv, *.jsonl, *.parquet, optionally .gz)")
    frames = []
    for path in files:
        raw = read_event_file(path)
        events, rejected, no_consent, dropped = normalise_events(raw, source=path.name)
        report.files += 1
        report.rows_read += len(raw)
        report.rows_no_consent += no_consent
        report.rows_rejected += len(rejected)
        report.dropped_columns = sorted(set(report.dropped_columns) | set(dropped))
        _write_rejected(rejected, lake_dir.parent / "rejected", path.name)
        frames.append(events)
        logger.info("read %s: %d rows, %d rejected, %d without consent",
                    path.name, len(raw), len(rejected), no_consent)
    events = pd.concat(frames, ignore_index=True)
    new, duplicate, partitions = write_partitions(events, lake_dir)
    report.rows_new, report.rows_duplicate, report.partitions_written = new, duplicate, partitions
    report.seconds = round(time.perf_counter() - started, 3)
    logger.info("ingest: %d files, %d rows read, %d new, %d duplicate, %d partitions in %.1fs",
                report.files, report.rows_read, new, duplicate, partitions, report.seconds)
    return report


# ---- reading -----------------------------------------------------------------------------

def _file_format(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return _SUFFIXES.get(suffixes[-1]) if suffixes else None


def read_event_file(path: Path) -> pd.DataFrame:
    """Read one landing file as strings (Parquet keeps its types); errors name the file."""
    fmt = _file_format(path)
    if fmt is None:
        raise DataError("unsupported file type", file=str(path))
    if path.stat().st_size == 0:
        raise DataError("file is empty (0 bytes)", file=str(path))
    try:
        if fmt == "parquet":
            frame = pd.read_parquet(path)
        elif fmt == "jsonl":
            frame = pd.read_json(path, lines=True, dtype=False, compression="infer")
        else:
            frame = pd.read_csv(path, sep="\t" if fmt == "tsv" else ",", dtype=str,
                                keep_default_na=False, na_values=[""], compression="infer",
                                encoding="utf-8")
    except (UnicodeDecodeError, ValueError, OSError, EOFError, gzip.BadGzipFile,
            pd.errors.ParserError) as exc:
        raise DataError(f"cannot be read as {fmt}: {exc}", file=str(path)) from exc
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"missing required column(s) {missing}; found {list(frame.columns)}",
                        file=str(path), column=missing[0])
    return frame


# ---- normalising -------------------------------------------------------------------------

def normalise_events(raw: pd.DataFrame, *, source: str
                     ) -> tuple[pd.DataFrame, pd.DataFrame, int, list[str]]:
    """Contract-typed events, rejected rows (with ``reason``), no-consent count, dropped columns."""
    frame = raw.reset_index(drop=True)
    dropped = [c for c in frame.columns if c not in EVENT_COLUMNS and c != "consent"]
    consent = _parse_bool(frame["consent"]) if "consent" in frame else None
    out = pd.DataFrame(index=frame.index)
    for column in EVENT_COLUMNS:
        if column == "timestamp":
            out[column] = parse_timestamps(frame[column])
        elif column == "value":
            out[column] = (pd.to_numeric(frame[column], errors="coerce").astype("float64")
                           if column in frame else np.nan)
        else:
            values = frame[column] if column in frame else pd.Series(pd.NA, index=frame.index)
            out[column] = _clean_text(values)
    out["event_type"] = out["event_type"].str.lower()
    out["source_file"] = pd.Series(source, index=frame.index, dtype="string")
    out["source_row"] = np.arange(1, len(frame) + 1, dtype="int64")

    no_consent = consent.eq(False).to_numpy() if consent is not None else np.zeros(len(out), bool)
    out = out[~no_consent]
    reason = pd.Series("", index=out.index, dtype="string")
    reason = reason.mask(out["timestamp"].isna() & (reason == ""), "timestamp unreadable")
    for column in ("user_id", "item_id", "event_type"):
        reason = reason.mask(out[column].isna() & (reason == ""), f"{column} missing")
    bad = reason != ""
    rejected = out[bad].assign(reason=reason[bad])
    events = out[~bad].copy()
    missing_id = events["event_id"].isna()
    if missing_id.any():
        events.loc[missing_id, "event_id"] = derive_event_ids(events[missing_id])
    return events.astype(EVENT_DTYPES), rejected, int(no_consent.sum()), dropped


def parse_timestamps(values: pd.Series) -> pd.Series:
    """ISO-8601 (any offset) or epoch seconds/milliseconds -> UTC; unreadable -> NaT."""
    if pd.api.types.is_datetime64_any_dtype(values):
        parsed = values if values.dt.tz is not None else values.dt.tz_localize("UTC")
        return parsed.dt.tz_convert("UTC").astype("datetime64[us, UTC]")
    numeric = pd.to_numeric(values, errors="coerce")
    result = pd.Series(pd.NaT, index=values.index, dtype="datetime64[us, UTC]")
    is_num = numeric.notna()
    if is_num.any():
        epoch = numeric[is_num].astype("float64")
        millis = epoch.abs() > 1e11  # epoch seconds reach 1e11 only in the year 5138
        seconds = epoch.where(~millis, epoch / 1000.0)
        result[is_num] = pd.to_datetime(seconds, unit="s", utc=True, errors="coerce")
    text = ~is_num & values.notna()
    if text.any():
        result[text] = pd.to_datetime(values[text].astype(str), utc=True, format="ISO8601",
                                      errors="coerce")
    return result


def derive_event_ids(events: pd.DataFrame) -> pd.Series:
    """Deterministic id from the other fields, for files that carry no ``event_id``."""
    parts = [events[c].astype("string").fillna("") for c in
             ("user_id", "item_id", "event_type", "value", "session_id")]
    parts.insert(3, events["timestamp"].astype("int64").astype("string"))
    key = parts[0].str.cat(parts[1:], sep="\x1f")
    return key.map(lambda k: "h" + hashlib.sha1(k.encode()).hexdigest()[:20]).astype("string")


def _clean_text(values: pd.Series) -> pd.Series:
    text = values.astype("string").str.strip()
    return text.mask(text.isin(["", "nan", "NaN", "None", "null"]))


def _parse_bool(values: pd.Series) -> pd.Series:
    text = values.astype("string").str.strip().str.lower()
    return pd.Series(np.where(text.isin(_FALSE), False, np.where(text.isin(_TRUE), True, None)),
                     index=values.index, dtype="boolean")


# ---- writing -----------------------------------------------------------------------------

def partition_path(lake_dir: Path, day: dt.date) -> Path:
    return lake_dir / f"event_date={day.isoformat()}" / "part-0.parquet"


def write_partitions(events: pd.DataFrame, lake_dir: Path) -> tuple[int, int, int]:
    """Merge events into their date partitions; returns (new rows, duplicates, partitions)."""
    rows_in = len(events)
    events = events.drop_duplicates("event_id", keep="first")
    new_total, written = 0, 0
    days = events["timestamp"].dt.date
    for day, batch in events.groupby(days, sort=True):
        path = partition_path(lake_dir, day)
        existing = pd.read_parquet(path) if path.exists() else None
        if existing is not None:
            batch = batch[~batch["event_id"].isin(existing["event_id"])]
            if batch.empty:
                continue
            merged = pd.concat([existing, batch], ignore_index=True)
        else:
            merged = batch
        merged = merged.sort_values(["timestamp", "event_id"], kind="stable")
        _atomic_parquet(merged.reset_index(drop=True), path)
        new_total += len(batch)
        written += 1
    return new_total, rows_in - new_total, written


def _write_rejected(rejected: pd.DataFrame, folder: Path, source: str) -> None:
    path = folder / f"{source}.parquet"
    if rejected.empty:
        path.unlink(missing_ok=True)
        return
    _atomic_parquet(rejected.reset_index(drop=True), path)


def _atomic_parquet(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)


# ---- reading the lake back ---------------------------------------------------------------

def load_snapshot(lake_dir: Path, cutoff: dt.datetime, lookback_days: int) -> pd.DataFrame:
    """Events with ``cutoff - lookback_days <= timestamp < cutoff``: the run's point in time."""
    start = cutoff - dt.timedelta(days=lookback_days)
    paths = [p for p in sorted(lake_dir.glob("event_date=*/part-0.parquet"))
             if start.date() <= dt.date.fromisoformat(p.parent.name.split("=", 1)[1])
             <= cutoff.date()]
    columns = list(EVENT_COLUMNS) + list(LINEAGE_COLUMNS)
    if not paths:
        return pd.DataFrame({c: pd.Series(dtype=EVENT_DTYPES.get(c, "string"))
                             for c in columns}).astype({"source_row": "int64"})
    frame = pd.concat([pd.read_parquet(p, columns=columns) for p in paths], ignore_index=True)
    in_window = (frame["timestamp"] >= start) & (frame["timestamp"] < cutoff)
    frame = frame[in_window].sort_values(["timestamp", "event_id"], kind="stable")
    logger.info("snapshot: %d events from %d partitions, window [%s, %s)",
                len(frame), len(paths), start.isoformat(), cutoff.isoformat())
    return frame.reset_index(drop=True)


def read_side_file(path: Path) -> pd.DataFrame | None:
    """``items.csv`` / ``users.csv`` with string ids, or None when the file is absent."""
    if not path.exists():
        return None
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except (UnicodeDecodeError, ValueError, OSError, pd.errors.ParserError) as exc:
        raise DataError(f"cannot be read as CSV: {exc}", file=str(path)) from exc
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    key = "item_id" if path.name.startswith("item") else "user_id"
    if key not in frame:
        raise DataError(f"missing required column {key!r}", file=str(path), column=key)
    return frame.astype("string")
