"""Ingest: landing files -> Parquet lake partitioned by event date, each event exactly once.

**Formats.** CSV/TSV, JSON lines and Parquet, optionally gzipped (``.csv.gz``, ``.jsonl.gz``).
Files are streamed in chunks (``chunk_rows``; CSV via ``pyarrow.csv.open_csv``, Parquet by row
batches, JSON lines line by line), so memory is bounded by a chunk, not by a file.

**Column mapping.** A site's own layout is mapped onto the event contract without code changes:
a JSON object ``{"<their column>": "<contract column>"}`` (names are case-insensitive), e.g.
``{"uid": "user_id", "ts": "timestamp", "kind": "event_type"}``, or the long form
``{"columns": {...}, "files": {"<glob on the file name>": {...}}}`` whose per-file entries
extend/override ``columns`` for matching files. It is read from
``$RECS_DATA_DIR/landing/column_mapping.json`` when present and from ``RECS_COLUMN_MAPPING``
(inline JSON or the path of a JSON file; it wins over the file). Targets must be contract
columns; mapping a column that looks like personal data (``email`` ...) onto the contract is
refused, so PII cannot be smuggled in as an id.

**Normalising.** Timestamps in epoch seconds, epoch milliseconds or ISO-8601 with any offset
become UTC; ``event_type`` is lower-cased; a missing ``event_id`` is derived deterministically
from the other fields. ``consent=false`` events are dropped before anything is stored. Every
column outside the contract is dropped at the door (CSV columns are never even decoded); those
whose names look like personal data are logged as PII (``IngestReport.pii_columns``).

**Exactly once.** Each landing file is identified by the sha256 of its bytes and recorded in the
manifest ``lake/_manifest.jsonl`` (one JSON object per ingested file, rewritten atomically):
an unchanged file, or the same bytes under another name, is skipped. Event ids are
deduplicated against the whole lake (every date), so a replayed event -- even with another
timestamp -- is never stored twice. A file is processed in two phases: its chunks are
normalised into ``lake/_staging/<sha>/`` first; only when the whole file has been read and its
bad-row share is acceptable are the rows merged into the lake, as new part files
``event_date=D/part-<sha16>-<chunk>.parquet`` (written, fsynced and renamed atomically), and
only after that is the file added to the manifest. A crash at any point leaves either nothing
or durable rows that the retry recognises as duplicates, so the lake never double counts.

**Lateness and the future.** Each lake row carries ``ingested_at`` (the ingest's time, also in
the manifest). An event later than ``ingested_at + clock_skew`` is quarantined (clock bug or
garbage). An event older than the lake's watermark (its newest event before this ingest) minus
``allowed_lateness`` is "too late": it is kept out of the lake (a published past could
otherwise change under a re-run), counted in ``rows_late`` and quarantined with its reason, so
it can be backfilled on purpose (copy the quarantine file into the landing folder and ingest it
once with a larger ``RECS_ALLOWED_LATENESS_DAYS``). A late event within the window lands in its
own date partition. An empty lake has no watermark.

**Bad rows and bad files.** Rows that cannot be stored (unreadable timestamp or value, missing
ids, malformed line, invalid UTF-8 in a contract column, timestamp in the future) go to
``lake/quarantine/<file>.<sha12>.parquet`` with a ``reason`` per row (contract columns only:
a malformed line's raw text is not kept, it may hold personal data). When they exceed
``max_bad_row_share`` of a file's rows, the file fails. A file that cannot be read at all
(0 bytes, truncated gzip, corrupt Parquet, missing required column, unknown delimiter) fails
too. Failed files are not merged and not recorded, so they are retried on the next run; the
other files of the run are still ingested and then :class:`IngestFailed` names every failed
file (nothing is published from a failed ingest).

**Non-UTF-8.** Bytes that are not UTF-8 are decoded with replacement (U+FFFD); rows whose
contract columns contain a replaced byte are quarantined ("invalid UTF-8 in <column>"), the
others are kept (a Latin-1 ``name`` column that is dropped anyway costs nothing).

**Files still being written.** Producers should write to a dotfile and rename (dotfiles are
ignored). Otherwise: a text file modified in the last ``settle_seconds`` that does not end with
a newline, or a 0-byte file that young, is deferred to the next run (``files_deferred``); a file
that changes while it is read is deferred too. In an older file an unterminated last line that
does not parse is quarantined as a malformed row. A gzip file cut short always fails.
"""

from __future__ import annotations

import csv
import datetime as dt
import fcntl
import fnmatch
import gzip
import hashlib
import io
import json
import logging
import os
import re
import shutil
import time
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from pipeline.core.errors import DataError, IngestFailed
from pipeline.core.schema import (
    CONTRACT_INPUT_COLUMNS,
    EVENT_COLUMNS,
    EVENT_DTYPES,
    PII_NAME_PATTERN,
    REQUIRED_COLUMNS,
    parse_bool,
)

logger = logging.getLogger(__name__)

LINEAGE_COLUMNS = ("source_file", "source_row")
INGESTED_AT = "ingested_at"
REASON = "reason"
MANIFEST_NAME = "_manifest.jsonl"
DEFAULT_CHUNK_ROWS = 250_000
DEFAULT_CLOCK_SKEW = dt.timedelta(minutes=5)
DEFAULT_ALLOWED_LATENESS = dt.timedelta(days=3)
DEFAULT_SETTLE_SECONDS = 60.0
_JSON_CHUNK_ROWS = 100_000  # a JSON record costs ~1 kB of Python objects while parsed
_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
             ".parquet": "parquet", ".pq": "parquet"}
_MISSING_TEXT = ["", "nan", "NaN", "None", "null", "NULL"]
_NUMBER = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")
_REPLACEMENT = "\ufffd"
_MAX_LISTED = 20  # file names per list in IngestReport.to_dict


@dataclass
class IngestReport:
    """What one ingest did; small enough for XCom."""

    files: int = 0
    files_skipped: int = 0
    files_deferred: int = 0
    files_failed: int = 0
    rows_read: int = 0
    rows_new: int = 0
    rows_duplicate: int = 0
    rows_no_consent: int = 0
    rows_rejected: int = 0
    rows_late: int = 0
    rows_future: int = 0
    partitions_written: int = 0
    dropped_columns: list[str] = field(default_factory=list)
    pii_columns: list[str] = field(default_factory=list)
    rejected_reasons: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    deferred: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    quarantine_files: list[str] = field(default_factory=list)
    watermark: str | None = None
    ingested_at: str | None = None
    manifest_path: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """JSON-able summary; file-name lists are capped (XCom stays small)."""
        out = asdict(self)
        for key in ("skipped", "deferred", "failed", "quarantine_files"):
            if len(out[key]) > _MAX_LISTED:
                out[key] = out[key][:_MAX_LISTED] + [f"... {len(out[key]) - _MAX_LISTED} more"]
        return out


@dataclass(frozen=True)
class ColumnMapping:
    """Source column -> contract column, globally and per file-name glob (lower-case names)."""

    columns: Mapping[str, str] = field(default_factory=dict)
    files: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def for_file(self, name: str) -> dict[str, str]:
        """The mapping that applies to the file called ``name``."""
        mapping = dict(self.columns)
        for pattern, extra in self.files.items():
            if fnmatch.fnmatch(name, pattern):
                mapping.update(extra)
        return mapping


# ---- configuration ---------------------------------------------------------------------------

def load_column_mapping(file: Path | None = None, override: str | None = None) -> ColumnMapping:
    """Read the column mapping from ``file`` (when it exists) and ``override`` (JSON or a path).

    ``override`` entries win over the file's. Raises DataError naming the source when the JSON
    is malformed, a target is not a contract column, or a source looks like personal data.
    """
    merged = ColumnMapping()
    for source, text in ((file, _read_text(file)), (override, _override_text(override))):
        if text is None:
            continue
        try:
            config = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"column mapping is not valid JSON: {exc}", file=str(source)) from exc
        parsed = _parse_mapping(config, str(source))
        merged = ColumnMapping({**merged.columns, **parsed.columns},
                               {**merged.files, **parsed.files})
    return merged


def _read_text(path: Path | None) -> str | None:
    return path.read_text(encoding="utf-8") if path is not None and path.is_file() else None


def _override_text(value: str | None) -> str | None:
    if not value or not value.strip():
        return None
    value = value.strip()
    return value if value.startswith("{") else Path(value).expanduser().read_text(encoding="utf-8")


def _parse_mapping(config: Any, source: str) -> ColumnMapping:
    if not isinstance(config, dict):
        raise DataError("column mapping must be a JSON object", file=source)
    if "columns" in config or "files" in config:
        columns, files = config.get("columns", {}), config.get("files", {})
    else:
        columns, files = config, {}
    if not isinstance(files, dict):
        raise DataError('"files" must map file-name globs to mappings', file=source)
    return ColumnMapping(_check_pairs(columns, source),
                         {str(glob): _check_pairs(pairs, source) for glob, pairs in files.items()})


def _check_pairs(pairs: Any, source: str) -> dict[str, str]:
    if not isinstance(pairs, dict):
        raise DataError("a column mapping must map source column names to contract columns",
                        file=source)
    out: dict[str, str] = {}
    for src, dst in pairs.items():
        src_name, dst_name = str(src).strip().lower(), str(dst).strip().lower()
        if dst_name not in CONTRACT_INPUT_COLUMNS:
            raise DataError(f"mapping {src!r} -> {dst!r}: target is not a contract column "
                            f"({', '.join(CONTRACT_INPUT_COLUMNS)})", file=source, column=str(src))
        if is_pii_column(src_name):
            raise DataError(f"mapping {src!r} -> {dst!r}: the source looks like personal data and "
                            "may not enter the lake", file=source, column=str(src))
        out[src_name] = dst_name
    return out


def is_pii_column(name: str) -> bool:
    """True when a column name looks like personal data (email, ip, name, phone, address...)."""
    return bool(PII_NAME_PATTERN.search(name.strip().lower()))


# ---- the ingest -----------------------------------------------------------------------------

def list_landing_files(landing_events_dir: Path) -> list[Path]:
    """Landing files we know how to read, in a stable order (dotfiles are in-flight writes)."""
    if not landing_events_dir.exists():
        return []
    return sorted(p for p in landing_events_dir.iterdir()
                  if p.is_file() and not p.name.startswith(".") and _file_format(p) is not None)


def ingest_landing(landing_events_dir: Path, lake_dir: Path, *,
                   ingested_at: dt.datetime | None = None,
                   column_mapping: ColumnMapping | None = None,
                   allowed_lateness: dt.timedelta = DEFAULT_ALLOWED_LATENESS,
                   clock_skew: dt.timedelta = DEFAULT_CLOCK_SKEW,
                   settle_seconds: float = DEFAULT_SETTLE_SECONDS,
                   max_bad_row_share: float = 0.05,
                   chunk_rows: int = DEFAULT_CHUNK_ROWS) -> IngestReport:
    """Ingest every new landing file into the lake (see the module docstring); idempotent.

    ``ingested_at`` (default: now) is recorded per row and per file and bounds event times.
    Raises :class:`IngestFailed` (a DataError) after the other files are ingested when some file
    failed, and DataError when there is nothing to ingest and nothing in the lake.
    """
    started = time.perf_counter()
    now = pd.Timestamp(ingested_at or dt.datetime.now(dt.timezone.utc)).tz_convert("UTC")
    mapping = column_mapping or ColumnMapping()
    lake_root = lake_dir.parent
    report = IngestReport(ingested_at=now.isoformat(),
                          manifest_path=str(lake_root / MANIFEST_NAME))
    files = list_landing_files(landing_events_dir)
    with _ingest_lock(lake_root):
        shutil.rmtree(lake_root / "_staging", ignore_errors=True)  # leftovers of a crash
        manifest = read_manifest(lake_root)
        if not files and not manifest:
            raise DataError(f"no event files in {landing_events_dir} "
                            "(expected *.csv, *.tsv, *.jsonl, *.parquet, optionally .gz)")
        known = {record["sha256"] for record in manifest}
        index, watermark = _load_lake_index(lake_dir)
        report.watermark = watermark.isoformat() if watermark is not None else None
        late_before = watermark - allowed_lateness if watermark is not None else None
        policy = _Policy(now, now + clock_skew, late_before, settle_seconds, max_bad_row_share,
                         chunk_rows)
        errors: list[DataError] = []
        for path in files:
            try:
                _ingest_one(path, lake_dir, known, index, mapping.for_file(path.name), policy,
                            report)
            except DataError as exc:
                report.files_failed += 1
                report.failed.append(path.name)
                logger.error("ingest of %s failed: %s", path.name, exc)
                errors.append(exc)
    report.seconds = round(time.perf_counter() - started, 3)
    logger.info("ingest: %d files (%d skipped, %d deferred, %d failed), %d rows read, %d new, "
                "%d duplicate, %d late, %d quarantined, %d partitions in %.1fs",
                report.files, report.files_skipped, report.files_deferred, report.files_failed,
                report.rows_read, report.rows_new, report.rows_duplicate, report.rows_late,
                report.rows_rejected, report.partitions_written, report.seconds)
    if errors:
        lines = "\n".join(f"- {exc}" for exc in errors)
        raise IngestFailed(f"{len(errors)} landing file(s) could not be ingested (nothing from "
                           f"them entered the lake; they are retried on the next run):\n{lines}",
                           file=errors[0].file, row=errors[0].row, column=errors[0].column,
                           report=report)
    return report


@dataclass(frozen=True)
class _Policy:
    ingested_at: pd.Timestamp
    latest_valid: pd.Timestamp  # ingested_at + clock skew
    late_before: pd.Timestamp | None  # watermark - allowed lateness
    settle_seconds: float
    max_bad_row_share: float
    chunk_rows: int


def _ingest_one(path: Path, lake_dir: Path, known: set[str], index: EventIdIndex,
                mapping: dict[str, str], policy: _Policy, report: IngestReport) -> None:
    """Stage, check, commit and record one landing file (or skip/defer it)."""
    stat = path.stat()
    if _should_defer(path, stat, policy):
        report.files_deferred += 1
        report.deferred.append(path.name)
        logger.warning("deferred %s: modified %.0fs ago and looks incomplete (still being "
                       "written?); it is picked up by a later run", path.name,
                       policy.ingested_at.timestamp() - stat.st_mtime)
        return
    digest = file_sha256(path)
    if digest in known:
        report.files_skipped += 1
        report.skipped.append(path.name)
        logger.info("skipped %s: its content (sha256 %s) is already in the lake",
                    path.name, digest[:12])
        return
    lake_root = lake_dir.parent
    folder = _staging_dir(lake_root, digest)
    try:
        staged = _stage_file(path, mapping, policy, folder)
        if (path.stat().st_mtime_ns, path.stat().st_size) != (stat.st_mtime_ns, stat.st_size):
            shutil.rmtree(folder, ignore_errors=True)
            report.files_deferred += 1
            report.deferred.append(path.name)
            logger.warning("deferred %s: it changed while it was read", path.name)
            return
        staged.check_bad_share(path, policy.max_bad_row_share)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    committed = _commit_staged(staged, lake_dir, index, policy)
    quarantine = _write_quarantine(staged, committed, lake_root, path.name, digest)
    record = {
        "sha256": digest, "file": path.name, "bytes": stat.st_size,
        "mtime": dt.datetime.fromtimestamp(stat.st_mtime, dt.timezone.utc).isoformat(),
        "ingested_at": policy.ingested_at.isoformat(), "rows_read": staged.rows_read,
        "rows_new": committed.new, "rows_duplicate": committed.duplicate,
        "rows_no_consent": staged.no_consent, "rows_rejected": staged.bad_rows,
        "rows_late": committed.late, "rows_future": staged.future,
        "dropped_columns": staged.dropped, "pii_columns": staged.pii,
        "partitions": sorted(committed.partitions),
        "quarantine_file": quarantine.name if quarantine else None,
    }
    append_manifest(lake_root, record)  # only now: every row above is durable
    known.add(digest)
    shutil.rmtree(staged.folder, ignore_errors=True)
    _add_to_report(report, staged, committed, quarantine)
    logger.info("ingested %s (sha256 %s): %d rows, %d new, %d duplicate, %d late, "
                "%d quarantined, %d without consent", path.name, digest[:12], staged.rows_read,
                committed.new, committed.duplicate, committed.late, staged.bad_rows,
                staged.no_consent)


def _add_to_report(report: IngestReport, staged: _Staged, committed: _Committed,
                   quarantine: Path | None) -> None:
    report.files += 1
    report.rows_read += staged.rows_read
    report.rows_new += committed.new
    report.rows_duplicate += committed.duplicate
    report.rows_no_consent += staged.no_consent
    report.rows_rejected += staged.bad_rows
    report.rows_late += committed.late
    report.rows_future += staged.future
    report.partitions_written += len(committed.partitions)
    report.dropped_columns = sorted(set(report.dropped_columns) | set(staged.dropped))
    report.pii_columns = sorted(set(report.pii_columns) | set(staged.pii))
    for reason, count in staged.reasons.items():
        report.rejected_reasons[reason] = report.rejected_reasons.get(reason, 0) + count
    if committed.late:
        report.rejected_reasons["late"] = report.rejected_reasons.get("late", 0) + committed.late
    if quarantine is not None:
        report.quarantine_files.append(str(quarantine))


def _should_defer(path: Path, stat: os.stat_result, policy: _Policy) -> bool:
    """Young and incomplete-looking: 0 bytes, or plain text without a final newline."""
    age = policy.ingested_at.timestamp() - stat.st_mtime
    if age >= policy.settle_seconds:
        return False
    if stat.st_size == 0:
        return True
    if path.suffix.lower() == ".gz" or _file_format(path) == "parquet":
        return False
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) not in (b"\n", b"\r")


def file_sha256(path: Path) -> str:
    """sha256 of the file's bytes (its identity in the manifest)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- manifest ---------------------------------------------------------------------------------

def read_manifest(lake_root: Path) -> list[dict]:
    """The manifest records (one per ingested file), oldest first."""
    path = lake_root / MANIFEST_NAME
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"manifest line is not JSON: {exc}", file=str(path),
                                row=number) from exc
    return records


def append_manifest(lake_root: Path, record: dict) -> None:
    """Add one record: the whole manifest is rewritten to a temp file, fsynced and renamed."""
    path = lake_root / MANIFEST_NAME
    existing = path.read_bytes() if path.exists() else b""
    line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
    _durable_write(path, lambda fh: fh.write(existing + line))


@contextmanager
def _ingest_lock(lake_root: Path) -> Iterator[None]:
    """One ingest at a time per lake (an advisory lock on ``lake/.ingest.lock``)."""
    lake_root.mkdir(parents=True, exist_ok=True)
    with open(lake_root / ".ingest.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ---- reading ---------------------------------------------------------------------------------

def _file_format(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return _SUFFIXES.get(suffixes[-1]) if suffixes else None


@dataclass
class _RawChunk:
    """Contract-named raw columns of consecutive rows, plus rows that could not be parsed."""

    frame: pd.DataFrame
    rows: np.ndarray  # source_row of each frame row (1-based data row / JSON line number)
    malformed: list[tuple[int, str]] = field(default_factory=list)
    replaced: bool = False  # some bytes were not UTF-8 and were replaced
    dropped: list[str] = field(default_factory=list)


def read_event_file(path: Path, column_mapping: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Read a whole landing file as contract-named columns (small files, tools and tests)."""
    frames = [chunk.frame for chunk in iter_raw_chunks(path, column_mapping or {})]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=list(REQUIRED_COLUMNS))


def iter_raw_chunks(path: Path, mapping: Mapping[str, str],
                    chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[_RawChunk]:
    """Stream a landing file in chunks; errors (unreadable, missing column) name the file."""
    fmt = _file_format(path)
    if fmt is None:
        raise DataError("unsupported file type", file=str(path))
    if path.stat().st_size == 0:
        raise DataError("file is empty (0 bytes): expected at least a header", file=str(path))
    try:
        if fmt == "parquet":
            yield from _parquet_chunks(path, mapping, chunk_rows)
        elif fmt == "jsonl":
            yield from _jsonl_chunks(path, mapping, min(chunk_rows, _JSON_CHUNK_ROWS))
        else:
            yield from _csv_chunks(path, "\t" if fmt == "tsv" else ",", mapping, chunk_rows)
    except DataError:
        raise
    except (ValueError, OSError, EOFError, zlib.error, pa.ArrowException) as exc:
        raise DataError(f"cannot be read as {fmt}: {exc}", file=str(path)) from exc


def _plan_columns(names: list[str], mapping: Mapping[str, str], path: Path
                  ) -> tuple[dict[str, str], list[str]]:
    """{source name: contract name} of the columns to keep, and the dropped (normalised) names."""
    keep: dict[str, str] = {}
    dropped: list[str] = []
    for raw in names:
        name = str(raw).strip().lstrip("\ufeff").strip().lower()
        target = mapping.get(name, name)
        if target in CONTRACT_INPUT_COLUMNS:
            if target in keep.values():
                raise DataError(f"two columns map to {target!r} (check the column mapping)",
                                file=str(path), column=str(raw))
            keep[str(raw)] = target
        else:
            dropped.append(name)
    missing = [c for c in REQUIRED_COLUMNS if c not in keep.values()]
    if missing:
        found = [str(n) for n in names]
        hint = _delimiter_hint(found)
        raise DataError(f"missing required column(s) {missing}; found {found}{hint}",
                        file=str(path), column=missing[0])
    return keep, dropped


def _delimiter_hint(found: list[str]) -> str:
    if len(found) == 1:
        for sep in (";", "|", "\t", ","):
            if sep in found[0]:
                return f" (the header looks {sep!r}-delimited; use .csv for ',' and .tsv for tab)"
    return ""


def _open_binary(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


def _csv_chunks(path: Path, sep: str, mapping: Mapping[str, str], chunk_rows: int
                ) -> Iterator[_RawChunk]:
    with _open_binary(path) as fh:
        header = fh.readline()
    text = header.decode("utf-8", errors="replace").rstrip("\r\n")
    if not text.strip():
        raise DataError("no header line", file=str(path), row=0)
    names = next(csv.reader([text], delimiter=sep))
    keep, dropped = _plan_columns(names, mapping, path)
    invalid: dict[int, str] = {}

    def on_invalid(row: Any) -> str:
        invalid[row.number - 1] = (f"malformed row: expected {row.expected_columns} fields, "
                                   f"got {row.actual_columns}")
        return "skip"

    reader = pa_csv.open_csv(
        str(path),
        read_options=pa_csv.ReadOptions(column_names=names, skip_rows=1, use_threads=False,
                                        block_size=8 << 20),
        parse_options=pa_csv.ParseOptions(delimiter=sep, invalid_row_handler=on_invalid),
        convert_options=pa_csv.ConvertOptions(include_columns=list(keep),
                                              column_types={n: pa.binary() for n in keep}))
    next_row, pending, pending_rows = 1, [], 0
    for batch in reader:
        pending.append(batch)
        pending_rows += batch.num_rows
        if pending_rows >= chunk_rows:
            chunk, next_row = _csv_chunk(pending, keep, dropped, invalid, next_row)
            yield chunk
            pending, pending_rows = [], 0
    chunk, next_row = _csv_chunk(pending, keep, dropped, invalid, next_row, last=True)
    if len(chunk.frame) or chunk.malformed:
        yield chunk


def _csv_chunk(batches: list[pa.RecordBatch], keep: dict[str, str], dropped: list[str],
               invalid: dict[int, str], next_row: int, last: bool = False
               ) -> tuple[_RawChunk, int]:
    rows_n = sum(b.num_rows for b in batches)
    skipped = np.array(sorted(r for r in invalid if r >= next_row), dtype=np.int64)
    candidates = np.arange(next_row, next_row + rows_n + skipped.size, dtype=np.int64)
    rows = candidates[~np.isin(candidates, skipped)][:rows_n]
    end = int(rows[-1]) + 1 if rows.size else next_row
    if last:
        end = max([end, *(r + 1 for r in invalid)])
    malformed = [(r, invalid.pop(r)) for r in sorted(invalid) if r < end]
    columns: dict[str, pd.Series] = {}
    replaced = False
    for source, target in keep.items():
        arrays = [b.column(b.schema.get_field_index(source)) for b in batches]
        values, bad = _decode_utf8(pa.chunked_array(arrays, type=pa.binary()))
        replaced |= bad
        columns[target] = values
    frame = pd.DataFrame(columns, index=pd.RangeIndex(rows_n)) if columns else pd.DataFrame()
    return _RawChunk(frame, rows, malformed, replaced, dropped), end


def _decode_utf8(values: pa.ChunkedArray) -> tuple[pd.Series, bool]:
    """Binary -> pandas string (Arrow-backed); invalid UTF-8 is replaced with U+FFFD."""
    try:
        text = values.cast(pa.string())
        replaced = False
    except pa.ArrowInvalid:
        text = pa.chunked_array([pa.array(
            [v.decode("utf-8", errors="replace") if v is not None else None
             for v in values.to_pylist()], type=pa.string())])
        replaced = True
    return pd.Series(pd.arrays.ArrowStringArray(text.combine_chunks())), replaced


def _jsonl_chunks(path: Path, mapping: Mapping[str, str], chunk_rows: int
                  ) -> Iterator[_RawChunk]:
    records: list[dict] = []
    rows: list[int] = []
    malformed: list[tuple[int, str]] = []
    replaced = yielded = False
    with _open_binary(path) as fh:
        for number, raw in enumerate(fh, 1):
            line = raw.decode("utf-8", errors="replace")
            if not line.strip():
                continue
            replaced |= _REPLACEMENT in line
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                malformed.append((number, f"malformed row: invalid JSON ({exc.msg})"))
                continue
            if not isinstance(record, dict):
                malformed.append((number, "malformed row: not a JSON object"))
                continue
            records.append(record)
            rows.append(number)
            if len(records) >= chunk_rows:
                yield _json_chunk(records, rows, malformed, replaced, mapping, path)
                records, rows, malformed, replaced, yielded = [], [], [], False, True
    if records or malformed or not yielded:
        yield _json_chunk(records, rows, malformed, replaced, mapping, path)


def _json_chunk(records: list[dict], rows: list[int], malformed: list[tuple[int, str]],
                replaced: bool, mapping: Mapping[str, str], path: Path) -> _RawChunk:
    names = list(dict.fromkeys(key for record in records for key in record))
    if not records and malformed:
        names = list(REQUIRED_COLUMNS)  # nothing parsed: let the malformed rows speak
    elif not records:
        raise DataError("no JSON records", file=str(path))
    keep, dropped = _plan_columns(names, mapping, path)
    frame = pd.DataFrame({target: pd.Series([_json_text(r.get(src)) for r in records],
                                            dtype="string")
                          for src, target in keep.items()}, index=pd.RangeIndex(len(records)))
    return _RawChunk(frame, np.asarray(rows, dtype=np.int64), malformed, replaced, dropped)


def _json_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _parquet_chunks(path: Path, mapping: Mapping[str, str], chunk_rows: int
                    ) -> Iterator[_RawChunk]:
    parquet = pq.ParquetFile(path)
    keep, dropped = _plan_columns(parquet.schema_arrow.names, mapping, path)
    next_row = 1
    for batch in parquet.iter_batches(batch_size=chunk_rows, columns=list(keep)):
        frame = batch.to_pandas().rename(columns=keep)
        rows = np.arange(next_row, next_row + len(frame), dtype=np.int64)
        next_row += len(frame)
        yield _RawChunk(frame.reset_index(drop=True), rows, dropped=dropped)


# ---- normalising -------------------------------------------------------------------------

def normalise_events(raw: pd.DataFrame, *, source: str, rows: np.ndarray | None = None,
                     check_replacement: bool = False, latest_valid: pd.Timestamp | None = None
                     ) -> tuple[pd.DataFrame, pd.DataFrame, int, list[str]]:
    """Contract-typed events, rejected rows (with ``reason``), no-consent count, dropped columns.

    ``rows`` are the source row numbers (default 1..n); ``check_replacement`` quarantines rows
    with U+FFFD (undecodable bytes) in a text column; ``latest_valid`` quarantines later events.
    """
    frame = raw.reset_index(drop=True)
    dropped = [c for c in frame.columns if c not in CONTRACT_INPUT_COLUMNS]
    consent = parse_bool(frame["consent"]) if "consent" in frame else None
    out = pd.DataFrame(index=frame.index)
    value_unreadable = pd.Series(False, index=frame.index)
    for column in EVENT_COLUMNS:
        if column == "timestamp":
            out[column] = parse_timestamps(frame[column])
        elif column == "value":
            if column in frame:
                out[column], value_unreadable = _parse_values(frame[column])
            else:
                out[column] = np.nan
        else:
            values = frame[column] if column in frame else pd.Series(pd.NA, index=frame.index)
            out[column] = _clean_text(values)
    out["event_type"] = out["event_type"].str.lower()
    out["source_file"] = pd.Series(source, index=frame.index, dtype="string")
    out["source_row"] = (np.asarray(rows, dtype=np.int64) if rows is not None
                         else np.arange(1, len(frame) + 1, dtype="int64"))

    no_consent = consent.eq(False).to_numpy() if consent is not None else np.zeros(len(out), bool)
    keep = ~no_consent
    out, value_unreadable = out[keep], value_unreadable[keep]
    reason = pd.Series("", index=out.index, dtype="string")
    if check_replacement:
        for column in ("event_id", "user_id", "item_id", "event_type", "device", "session_id"):
            bad = out[column].str.contains(_REPLACEMENT, regex=False).fillna(False)
            reason = reason.mask(bad & (reason == ""), f"invalid UTF-8 in {column}")
    reason = reason.mask(out["timestamp"].isna() & (reason == ""), "timestamp unreadable")
    for column in ("user_id", "item_id", "event_type"):
        reason = reason.mask(out[column].isna() & (reason == ""), f"{column} missing")
    reason = reason.mask(value_unreadable & (reason == ""), "value unreadable")
    if latest_valid is not None:
        future = (out["timestamp"] > latest_valid).fillna(False)
        reason = reason.mask(future & (reason == ""), "timestamp after ingestion time")
    bad = (reason != "").to_numpy()
    rejected = out[bad].assign(reason=reason[bad]).astype(EVENT_DTYPES)
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
    if pd.api.types.is_numeric_dtype(values):
        numeric, is_num = values.astype("float64"), values.notna()
    else:
        numeric, is_num = _parse_numbers(values.astype("string").str.strip(),
                                         r"^[-+]?\d+(\.\d*)?$")
    result = pd.Series(pd.NaT, index=values.index, dtype="datetime64[us, UTC]")
    if is_num.any():
        epoch = numeric[is_num].astype("float64")
        millis = epoch.abs() > 1e11  # epoch seconds reach 1e11 only in the year 5138
        seconds = epoch.where(~millis, epoch / 1000.0)
        result[is_num] = pd.to_datetime(seconds, unit="s", utc=True, errors="coerce")
    is_text = ~is_num & values.notna()
    if is_text.any():
        result[is_text] = pd.to_datetime(values[is_text].astype(str), utc=True,
                                         format="ISO8601", errors="coerce")
    return result


def _parse_values(values: pd.Series) -> tuple[pd.Series, pd.Series]:
    """``value`` as float64, and where a non-empty value was not a number."""
    if pd.api.types.is_numeric_dtype(values):
        return values.astype("float64"), pd.Series(False, index=values.index)
    text = _clean_text(values)
    numbers, is_number = _parse_numbers(text, _NUMBER.pattern)
    return numbers, (text.notna() & ~is_number).fillna(False).astype(bool)


def _parse_numbers(text: pd.Series, pattern: str) -> tuple[pd.Series, pd.Series]:
    """Vectorised (Arrow) float parsing of the strings matching ``pattern``; others -> NaN."""
    arrow = pa.array(text.array, type=pa.large_string())
    is_number = pc.fill_null(pc.match_substring_regex(arrow, pattern), False)
    numbers = pc.cast(pc.if_else(is_number, pc.utf8_trim_whitespace(arrow), None), pa.float64())
    return (pd.Series(numbers.to_numpy(zero_copy_only=False), index=text.index, dtype="float64"),
            pd.Series(is_number.to_numpy(zero_copy_only=False), index=text.index))


def derive_event_ids(events: pd.DataFrame) -> pd.Series:
    """Deterministic id from the other fields, for files that carry no ``event_id``."""
    parts = [events[c].astype("string").fillna("") for c in
             ("user_id", "item_id", "event_type", "value", "session_id")]
    parts.insert(3, events["timestamp"].astype("int64").astype("string"))
    key = parts[0].str.cat(parts[1:], sep="\x1f")
    return key.map(lambda k: "h" + hashlib.sha1(k.encode()).hexdigest()[:20]).astype("string")


def _clean_text(values: pd.Series) -> pd.Series:
    text = values.astype("string").str.strip()
    return text.mask(text.isin(_MISSING_TEXT))


# ---- staging ---------------------------------------------------------------------------------

@dataclass
class _Staged:
    """One landing file, normalised into staging chunk files, not yet in the lake."""

    folder: Path
    days: dict[str, list[tuple[Path, int, int]]] = field(default_factory=dict)  # day -> groups
    quarantine_chunks: list[Path] = field(default_factory=list)
    rows_read: int = 0
    no_consent: int = 0
    bad_rows: int = 0
    future: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    examples: list[tuple[int, str]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    pii: list[str] = field(default_factory=list)

    def check_bad_share(self, path: Path, max_share: float) -> None:
        """Fail the file when too many of its rows are quarantined (naming reasons and rows)."""
        considered = self.rows_read - self.no_consent
        share = self.bad_rows / considered if considered else 0.0
        if share > max_share:
            reasons = ", ".join(f"{reason}: {count}" for reason, count in
                                sorted(self.reasons.items(), key=lambda kv: -kv[1]))
            examples = "; ".join(f"row {row}: {reason}" for row, reason in self.examples)
            first_row = self.examples[0][0] if self.examples else None
            raise DataError(f"{self.bad_rows} of {considered} rows ({share:.2%}) cannot be "
                            f"ingested, more than max_bad_row_share {max_share:.2%} ({reasons}); "
                            f"e.g. {examples}", file=str(path), row=first_row)


def _staging_dir(lake_root: Path, digest: str) -> Path:
    return lake_root / "_staging" / digest[:16]


def _stage_file(path: Path, mapping: Mapping[str, str], policy: _Policy,
                folder: Path) -> _Staged:
    """Read, normalise and stage every chunk of ``path``."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    staged = _Staged(folder)
    started = time.perf_counter()
    for number, raw in enumerate(iter_raw_chunks(path, mapping, policy.chunk_rows)):
        staged.rows_read += len(raw.frame) + len(raw.malformed)
        events, rejected, no_consent, _ = normalise_events(
            raw.frame, source=path.name, rows=raw.rows, check_replacement=raw.replaced,
            latest_valid=policy.latest_valid)
        if raw.malformed:
            rejected = pd.concat([rejected, _malformed_rows(raw.malformed, path.name)],
                                 ignore_index=True)
        staged.no_consent += no_consent
        staged.dropped = sorted(set(staged.dropped) | set(raw.dropped))
        staged.pii = sorted(c for c in staged.dropped if is_pii_column(c))
        if len(events):
            _stage_by_day(_to_lake_table(events, policy.ingested_at),
                          folder / f"chunk-{number:05d}.parquet", staged.days)
        if len(rejected):
            staged.bad_rows += len(rejected)
            staged.future += int((rejected[REASON] == "timestamp after ingestion time").sum())
            for reason, count in rejected[REASON].value_counts().items():
                staged.reasons[str(reason)] = staged.reasons.get(str(reason), 0) + int(count)
            staged.examples.extend(list(zip(rejected["source_row"].astype(int).tolist()[:5],
                                            rejected[REASON].tolist()[:5])))
            staged.examples = sorted(staged.examples)[:5]
            q_path = folder / f"quarantine-{number:05d}.parquet"
            _write_table(_to_lake_table(rejected, policy.ingested_at, with_reason=True), q_path,
                         durable=False)
            staged.quarantine_chunks.append(q_path)
        logger.info("%s: %d rows read so far (%.1fs)", path.name, staged.rows_read,
                    time.perf_counter() - started)
    if staged.pii:
        logger.warning("%s: dropped columns that look like personal data: %s", path.name,
                       ", ".join(staged.pii))
    return staged


def _stage_by_day(table: pa.Table, path: Path, days: dict[str, list[tuple[Path, int, int]]]
                  ) -> None:
    """Write ``table`` with one row group per event date (rows keep file order within a day)."""
    dates = pc.cast(table.column("timestamp"), pa.date32()).to_numpy(zero_copy_only=False)
    order = np.argsort(dates, kind="stable")
    table, dates = table.take(pa.array(order)), dates[order]
    uniques, starts = np.unique(dates, return_index=True)
    ends = [*starts[1:], len(dates)]
    with pq.ParquetWriter(path, table.schema, compression="none") as writer:
        for group, (day, start, end) in enumerate(zip(uniques, starts, ends, strict=True)):
            writer.write_table(table.slice(int(start), int(end - start)),
                               row_group_size=int(end - start))
            days.setdefault(str(day), []).append((path, group, int(end - start)))


def _malformed_rows(malformed: list[tuple[int, str]], source: str) -> pd.DataFrame:
    """Quarantine rows for lines that could not be parsed: lineage and reason only."""
    frame = pd.DataFrame({c: pd.Series(index=range(len(malformed)), dtype=d)
                          for c, d in EVENT_DTYPES.items()})
    frame["source_file"] = pd.Series(source, index=frame.index, dtype="string")
    frame["source_row"] = np.array([row for row, _ in malformed], dtype=np.int64)
    frame[REASON] = pd.Series([reason for _, reason in malformed], dtype="string")
    return frame


# ---- committing ------------------------------------------------------------------------------

@dataclass
class _Committed:
    new: int = 0
    duplicate: int = 0
    late: int = 0
    partitions: set[str] = field(default_factory=set)
    late_tables: list[pa.Table] = field(default_factory=list)


def _commit_staged(staged: _Staged, lake_dir: Path, index: EventIdIndex, policy: _Policy
                   ) -> _Committed:
    """Merge the staged rows into the lake, one part file per date: dedupe by event_id across
    the whole lake, keep late events out."""
    committed = _Committed()
    for day, batch, groups in _day_batches(staged.days, policy.chunk_rows * 2):
        table = pa.concat_tables([pq.ParquetFile(path).read_row_group(group)
                                  for path, group, _ in groups])
        h1, h2 = hash_event_ids(table.column("event_id"))
        duplicate = index.contains(h1, h2) | _duplicated_pairs(h1, h2)
        committed.duplicate += int(duplicate.sum())
        keep = ~duplicate
        if policy.late_before is not None:
            ts = table.column("timestamp")
            late = pc.less(ts, pa.scalar(policy.late_before.to_pydatetime(), type=ts.type))
            late = late.to_numpy(zero_copy_only=False) & keep
            if late.any():
                committed.late += int(late.sum())
                reason = (f"late: before the lake watermark minus the allowed lateness "
                          f"({policy.late_before.isoformat()})")
                late_rows = table.filter(pa.array(late))
                committed.late_tables.append(late_rows.append_column(
                    REASON, pa.array([reason] * late_rows.num_rows, type=pa.large_string())))
                keep &= ~late
        new = table.filter(pa.array(keep))
        if new.num_rows:
            part = _part_path(lake_dir, day, staged.folder.name, batch)
            _write_table(new, part, durable=True)
            _cache_part_hashes(lake_dir, part, h1[keep], h2[keep])  # the next run reads these
            committed.partitions.add(day)
        committed.new += new.num_rows
        index.add(h1[keep], h2[keep])
    return committed


def _day_batches(days: dict[str, list[tuple[Path, int, int]]], max_rows: int
                 ) -> Iterator[tuple[str, int, list[tuple[Path, int, int]]]]:
    """Per date (in order), the staged row groups in batches of at most ~``max_rows`` rows."""
    for day in sorted(days):
        batch, rows, number = [], 0, 0
        for group in days[day]:
            if batch and rows + group[2] > max_rows:
                yield day, number, batch
                batch, rows, number = [], 0, number + 1
            batch.append(group)
            rows += group[2]
        yield day, number, batch


def _part_path(lake_dir: Path, day: str, tag: str, batch: int) -> Path:
    """``event_date=D/part-<sha16>[-<batch>].parquet``; never an existing file's name."""
    folder = lake_dir / f"event_date={day}"
    path = folder / (f"part-{tag}.parquet" if batch == 0 else f"part-{tag}-{batch}.parquet")
    retry = 0
    while path.exists():  # defensive: a part file is never overwritten
        retry += 1
        path = folder / f"part-{tag}-{batch}-r{retry}.parquet"
    return path


def _duplicated_pairs(h1: np.ndarray, h2: np.ndarray) -> np.ndarray:
    """Later copies of a (h1, h2) pair within one chunk."""
    return pd.DataFrame({"a": h1, "b": h2}).duplicated(keep="first").to_numpy()


def _write_quarantine(staged: _Staged, committed: _Committed, lake_root: Path, name: str,
                      digest: str) -> Path | None:
    """One quarantine Parquet per landing file (rows + ``reason``), or None when clean."""
    tables = [pq.read_table(p) for p in staged.quarantine_chunks]
    tables += [t.select(QUARANTINE_SCHEMA.names).cast(QUARANTINE_SCHEMA)
               for t in committed.late_tables]
    if not tables:
        return None
    path = lake_root / "quarantine" / f"{name}.{digest[:12]}.parquet"
    _write_table(pa.concat_tables([t.cast(QUARANTINE_SCHEMA) for t in tables]), path,
                 durable=True)
    logger.warning("%s: %d rows quarantined at ingest -> %s", name,
                   sum(t.num_rows for t in tables), path)
    return path


# ---- lake index --------------------------------------------------------------------------------

class EventIdIndex:
    """Exact set of event ids in the lake, as 2x64-bit hash pairs (16 bytes an id).

    Segments are sorted by the first hash; a lookup finds the run of equal first hashes and
    compares the second, so a false "already in the lake" needs a 128-bit collision.
    """

    def __init__(self) -> None:
        self._segments: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, h1: np.ndarray, h2: np.ndarray) -> None:
        if h1.size:
            order = np.argsort(h1, kind="stable")
            self._segments.append((h1[order], h2[order]))
        if len(self._segments) > 8:
            merged_1 = np.concatenate([s[0] for s in self._segments])
            merged_2 = np.concatenate([s[1] for s in self._segments])
            self._segments = []
            self.add(merged_1, merged_2)

    def contains(self, h1: np.ndarray, h2: np.ndarray) -> np.ndarray:
        order = np.argsort(h1)
        q1, q2 = h1[order], h2[order]
        found = np.zeros(h1.size, dtype=bool)
        for s1, s2 in self._segments:
            left = np.searchsorted(s1, q1, side="left")
            right = np.searchsorted(s1, q1, side="right")
            single = (right - left) == 1
            found[single] |= s2[left[single]] == q2[single]
            for i in np.flatnonzero((right - left) > 1):  # 64-bit collisions: practically never
                found[i] |= bool((s2[left[i]:right[i]] == q2[i]).any())
        out = np.empty_like(found)
        out[order] = found
        return out

    def __len__(self) -> int:
        return sum(s[0].size for s in self._segments)


def hash_event_ids(ids: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Two independent 64-bit SipHashes of each id (a false match needs both to collide)."""
    values = ids.to_numpy(zero_copy_only=False).astype(object, copy=False)
    return (pd.util.hash_array(values, hash_key="recs-event-id-01", categorize=False),
            pd.util.hash_array(values, hash_key="recs-event-id-02", categorize=False))


def lake_part_files(lake_dir: Path) -> list[Path]:
    """Every part file of the lake, by date then name (in-flight dotfiles excluded)."""
    return sorted(p for p in lake_dir.glob("event_date=*/*.parquet") if not p.name.startswith("."))


#: Per part file, its event ids' hash pairs (sorted by the first), so that each ingest reads
#: and hashes only the part files added since: ``<lake>/.event-id-hashes-v1/<date>/<part>.npz``
#: (outside the ``event_date=*/*.parquet`` files readers list), stamped with the part's size
#: and mtime; a missing, stale or unreadable cache is rebuilt from the part.
_HASH_CACHE = ".event-id-hashes-v1"


def _hash_cache_path(lake_dir: Path, part: Path) -> Path:
    return lake_dir / _HASH_CACHE / part.parent.name / f"{part.name}.npz"


def _part_stamp(part: Path) -> np.ndarray:
    stat = part.stat()
    return np.array([stat.st_size, stat.st_mtime_ns], np.int64)


def _part_hashes(lake_dir: Path, part: Path) -> tuple[np.ndarray, np.ndarray]:
    """(h1, h2) of ``part``'s event ids, sorted by h1: cached, or read, hashed and cached."""
    cache = _hash_cache_path(lake_dir, part)
    if cache.exists():  # (the ingest lock keeps other writers out meanwhile)
        try:
            with np.load(cache) as saved:
                if np.array_equal(saved["stamp"], _part_stamp(part)):
                    return saved["h1"], saved["h2"]
        except Exception as exc:  # a torn or foreign file: rebuild it
            logger.warning("event-id hash cache %s unreadable (%s): rebuilding it", cache, exc)
    h1, h2 = hash_event_ids(pq.read_table(part, columns=["event_id"]).column("event_id"))
    return _cache_part_hashes(lake_dir, part, h1, h2)


def _cache_part_hashes(lake_dir: Path, part: Path, h1: np.ndarray, h2: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Sort (h1, h2) by h1 and save them as ``part``'s cache (atomically; a lake we cannot
    write to only loses the speed-up). Returns the sorted pair."""
    order = np.argsort(h1, kind="stable")
    h1, h2 = h1[order], h2[order]
    cache = _hash_cache_path(lake_dir, part)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            np.savez(handle, h1=h1, h2=h2, stamp=_part_stamp(part))
        os.replace(tmp, cache)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        logger.warning("cannot cache the event-id hashes of %s: %s", part, exc)
    return h1, h2


def _prune_hash_cache(lake_dir: Path, parts: list[Path]) -> None:
    """Delete the caches (and leftover temporary files) of part files no longer in the lake."""
    root = lake_dir / _HASH_CACHE
    if not root.is_dir():
        return
    wanted = {_hash_cache_path(lake_dir, part) for part in parts}
    for path in root.glob("*/*"):
        if path not in wanted:
            path.unlink(missing_ok=True)


def _load_lake_index(lake_dir: Path) -> tuple[EventIdIndex, pd.Timestamp | None]:
    """The ids already in the lake (every date) and its watermark (newest event time)."""
    index = EventIdIndex()
    parts = lake_part_files(lake_dir)
    hashes = [_part_hashes(lake_dir, part) for part in parts]
    _prune_hash_cache(lake_dir, parts)
    if hashes:  # one sort of everything (sorted runs: the stable sort merges them)
        index.add(np.concatenate([h[0] for h in hashes]), np.concatenate([h[1] for h in hashes]))
    del hashes
    watermark = _newest_event(parts)
    logger.info("lake index: %d event ids in %d part files, watermark %s", len(index),
                len(parts), watermark)
    return index, watermark


def lake_watermark(lake_dir: Path) -> pd.Timestamp | None:
    """The newest event time in the lake (any date), or None when the lake is empty."""
    return _newest_event(lake_part_files(lake_dir))


def _newest_event(parts: list[Path]) -> pd.Timestamp | None:
    """Newest ``timestamp`` in the part files of the newest date partition (``parts`` sorted)."""
    if not parts:
        return None
    newest_day = parts[-1].parent.name
    return max(pd.Timestamp(pq.read_table(p, columns=["timestamp"]).column("timestamp")
                            .to_pandas().max()) for p in parts if p.parent.name == newest_day)


# ---- writing -----------------------------------------------------------------------------------

def _schema(with_reason: bool = False) -> pa.Schema:
    columns = {**EVENT_DTYPES, "source_file": "string", "source_row": "int64",
               INGESTED_AT: "datetime64[us, UTC]"}
    if with_reason:
        columns[REASON] = "string"
    empty = pd.DataFrame({c: pd.Series(dtype=d) for c, d in columns.items()})
    return pa.Schema.from_pandas(empty, preserve_index=False)


LAKE_SCHEMA = _schema()
QUARANTINE_SCHEMA = _schema(with_reason=True)


def _to_lake_table(frame: pd.DataFrame, ingested_at: pd.Timestamp, *, with_reason: bool = False
                   ) -> pa.Table:
    out = frame.assign(**{INGESTED_AT: pd.Series(ingested_at, index=frame.index).astype(
        "datetime64[us, UTC]")})
    schema = QUARANTINE_SCHEMA if with_reason else LAKE_SCHEMA
    return pa.Table.from_pandas(out[schema.names].reset_index(drop=True), schema=schema,
                                preserve_index=False)


def _write_table(table: pa.Table, path: Path, *, durable: bool) -> None:
    if durable:
        _durable_write(path, lambda fh: pq.write_table(table, fh))
    else:  # staging: read back once, soon deleted
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path, compression="none")


def _durable_write(path: Path, write: Any) -> None:
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


# ---- reading the lake back ---------------------------------------------------------------

SNAPSHOT_COLUMNS = list(EVENT_COLUMNS) + list(LINEAGE_COLUMNS)


def _snapshot_parts(lake_dir: Path, start: dt.datetime, cutoff: dt.datetime
                    ) -> dict[str, list[Path]]:
    days: dict[str, list[Path]] = {}
    for part in lake_part_files(lake_dir):
        day = dt.date.fromisoformat(part.parent.name.split("=", 1)[1])
        if start.date() <= day <= cutoff.date():
            days.setdefault(day.isoformat(), []).append(part)
    return days


def _snapshot_day(parts: list[Path], start: dt.datetime, cutoff: dt.datetime) -> pd.DataFrame:
    frame = pd.concat([pq.read_table(p, columns=SNAPSHOT_COLUMNS, schema=LAKE_SCHEMA)
                       .to_pandas() for p in parts], ignore_index=True)
    frame = frame[(frame["timestamp"] >= start) & (frame["timestamp"] < cutoff)]
    frame = frame.sort_values(["timestamp", "event_id"], kind="stable").reset_index(drop=True)
    return frame.astype({**EVENT_DTYPES, "source_file": "string", "source_row": "int64"})


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
                frame = _snapshot_day(parts, start, cutoff)
                writer.write_table(pa.Table.from_pandas(frame, schema=schema,
                                                        preserve_index=False))
                rows += len(frame)
                if len(frame):  # days ascend, rows sorted by time: the last row is the newest
                    newest = pd.Timestamp(frame["timestamp"].iloc[-1])
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.info("snapshot: %d events from %d days, window [%s, %s) -> %s", rows, len(days),
                start.isoformat(), cutoff.isoformat(), path)
    return Snapshot(path, start, cutoff, rows, newest)


def _empty_snapshot() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=EVENT_DTYPES.get(c, "string"))
                         for c in SNAPSHOT_COLUMNS}).astype({"source_row": "int64"})


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
