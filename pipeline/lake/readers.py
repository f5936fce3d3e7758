"""Reading landing files: discovery, format detection, chunked event readers and side files.

**Formats.** CSV/TSV, JSON lines and Parquet, optionally gzipped (``.csv.gz``, ``.jsonl.gz``).
Files are streamed in chunks (``chunk_rows``; CSV via ``pyarrow.csv.open_csv``, Parquet by row
batches, JSON lines line by line), so memory is bounded by a chunk, not by a file. Each chunk
carries the contract-named columns (after the column mapping), the source row numbers, the
lines that could not be parsed and the dropped column names; columns outside the contract are
never even decoded for CSV. A file that cannot be read at all (0 bytes, truncated gzip,
corrupt Parquet, missing required column, unknown delimiter) raises DataError naming it.

**Non-UTF-8.** Bytes that are not UTF-8 are decoded with replacement (U+FFFD) and the chunk
says so (the normaliser then quarantines the rows whose contract columns were hit).

**Files still being written.** Producers should write to a dotfile and rename: dotfiles are
not listed.

**Side files.** ``items.csv`` / ``users.csv`` are read whole, with string ids.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import stat
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from pipeline.core.errors import DataError
from pipeline.core.schema import CONTRACT_INPUT_COLUMNS, REQUIRED_COLUMNS

DEFAULT_CHUNK_ROWS = 250_000
_JSON_CHUNK_ROWS = 100_000  # a JSON record costs ~1 kB of Python objects while parsed
_SUFFIXES = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
REPLACEMENT_CHAR = "\ufffd"


def list_landing_files(landing_events_dir: Path) -> list[Path]:
    """Landing entries named like files we read, in a stable order (dotfiles are in-flight
    writes). Entries that are not regular files (directories, FIFOs, dangling links) are
    listed too, so that :func:`check_landing_file` reports them instead of skipping them."""
    if not landing_events_dir.exists():
        return []
    return sorted(
        p
        for p in landing_events_dir.iterdir()
        if not p.name.startswith(".") and file_format(p) is not None
    )


def landing_files(landing_events_dir: Path) -> list[Path]:
    """The landing files that :func:`check_landing_file` accepts (the others are skipped
    here; ``ingest`` reports them)."""
    usable = []
    for path in list_landing_files(landing_events_dir):
        try:
            check_landing_file(path)
        except DataError:
            continue
        usable.append(path)
    return usable


def check_landing_file(path: Path) -> None:
    """DataError unless ``path`` is a regular file, or a symbolic link to one inside its own
    folder (a link elsewhere is never followed: nothing outside the landing folder is read)."""
    if path.is_symlink():
        target = path.resolve()
        if not target.exists():
            raise DataError("a dangling symbolic link", file=str(path))
        if not target.is_relative_to(path.parent.resolve()):
            raise DataError(
                "a symbolic link to a file outside the landing folder (not followed)",
                file=str(path),
            )
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):
        kind = (
            "a directory"
            if stat.S_ISDIR(mode)
            else "a FIFO"
            if stat.S_ISFIFO(mode)
            else "not a regular file"
        )
        raise DataError(f"{kind}, named like a landing file", file=str(path))


def file_format(path: Path) -> str | None:
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
    return (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(columns=list(REQUIRED_COLUMNS))
    )


def iter_raw_chunks(
    path: Path, mapping: Mapping[str, str], chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> Iterator[_RawChunk]:
    """Stream a landing file in chunks; errors (unreadable, missing column) name the file."""
    fmt = file_format(path)
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


def _plan_columns(
    names: list[str], mapping: Mapping[str, str], path: Path
) -> tuple[dict[str, str], list[str]]:
    """{source name: contract name} of the columns to keep, and the dropped (normalised) names."""
    keep: dict[str, str] = {}
    dropped: list[str] = []
    for raw in names:
        name = str(raw).strip().lstrip("\ufeff").strip().lower()
        target = mapping.get(name, name)
        if target in CONTRACT_INPUT_COLUMNS:
            if target in keep.values():
                raise DataError(
                    f"two columns map to {target!r} (check the column mapping)",
                    file=str(path),
                    column=str(raw),
                )
            keep[str(raw)] = target
        else:
            dropped.append(name)
    missing = [c for c in REQUIRED_COLUMNS if c not in keep.values()]
    if missing:
        found = [str(n) for n in names]
        hint = _delimiter_hint(found)
        raise DataError(
            f"missing required column(s) {missing}; found {found}{hint}",
            file=str(path),
            column=missing[0],
        )
    return keep, dropped


def _delimiter_hint(found: list[str]) -> str:
    if len(found) == 1:
        for sep in (";", "|", "\t", ","):
            if sep in found[0]:
                return f" (the header looks {sep!r}-delimited; use .csv for ',' and .tsv for tab)"
    return ""


def _open_binary(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


#: A CSV header must end within this many bytes.
HEADER_BYTES = 1 << 20


def _csv_chunks(
    path: Path, sep: str, mapping: Mapping[str, str], chunk_rows: int
) -> Iterator[_RawChunk]:
    with _open_binary(path) as fh:
        head = fh.read(HEADER_BYTES)
    # the header ends at the first line break of any style (CR-only files are CSV too)
    text = re.split(r"\r\n|\r|\n", head.decode("utf-8", errors="replace"), maxsplit=1)[0]
    text = text.removeprefix("\ufeff")  # a byte-order mark, also before a quoted name
    if len(text) >= HEADER_BYTES:
        raise DataError(
            f"no line break in the first {HEADER_BYTES} bytes: not a CSV header",
            file=str(path),
            row=0,
        )
    if not text.strip():
        raise DataError("no header line", file=str(path), row=0)
    names = next(csv.reader([text], delimiter=sep))
    keep, dropped = _plan_columns(names, mapping, path)
    invalid: dict[int, str] = {}

    def on_invalid(row: Any) -> str:
        invalid[row.number - 1] = (
            f"malformed row: expected {row.expected_columns} fields, got {row.actual_columns}"
        )
        return "skip"

    reader = pa_csv.open_csv(
        str(path),
        read_options=pa_csv.ReadOptions(
            column_names=names, skip_rows=1, use_threads=False, block_size=8 << 20
        ),
        parse_options=pa_csv.ParseOptions(delimiter=sep, invalid_row_handler=on_invalid),
        convert_options=pa_csv.ConvertOptions(
            include_columns=list(keep), column_types={n: pa.binary() for n in keep}
        ),
    )
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


def _csv_chunk(
    batches: list[pa.RecordBatch],
    keep: dict[str, str],
    dropped: list[str],
    invalid: dict[int, str],
    next_row: int,
    last: bool = False,
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
        text = pa.chunked_array(
            [
                pa.array(
                    [
                        v.decode("utf-8", errors="replace") if v is not None else None
                        for v in values.to_pylist()
                    ],
                    type=pa.string(),
                )
            ]
        )
        replaced = True
    return pd.Series(pd.arrays.ArrowStringArray(text.combine_chunks())), replaced


def _jsonl_chunks(path: Path, mapping: Mapping[str, str], chunk_rows: int) -> Iterator[_RawChunk]:
    records: list[dict] = []
    rows: list[int] = []
    malformed: list[tuple[int, str]] = []
    replaced = yielded = False
    with _open_binary(path) as fh:
        for number, raw in enumerate(fh, 1):
            line = raw.decode("utf-8", errors="replace")
            if number == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark opens the file
            if not line.strip():
                continue
            replaced |= REPLACEMENT_CHAR in line
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


def _json_chunk(
    records: list[dict],
    rows: list[int],
    malformed: list[tuple[int, str]],
    replaced: bool,
    mapping: Mapping[str, str],
    path: Path,
) -> _RawChunk:
    names = list(dict.fromkeys(key for record in records for key in record))
    if not records and malformed:
        names = list(REQUIRED_COLUMNS)  # nothing parsed: let the malformed rows speak
    elif not records:
        raise DataError("no JSON records", file=str(path))
    keep, dropped = _plan_columns(names, mapping, path)
    frame = pd.DataFrame(
        {
            target: pd.Series([_json_text(r.get(src)) for r in records], dtype="string")
            for src, target in keep.items()
        },
        index=pd.RangeIndex(len(records)),
    )
    return _RawChunk(frame, np.asarray(rows, dtype=np.int64), malformed, replaced, dropped)


def _json_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # 196.0 is the number 196: one text form (ids, epochs)
    return str(value)


def _parquet_chunks(path: Path, mapping: Mapping[str, str], chunk_rows: int) -> Iterator[_RawChunk]:
    parquet = pq.ParquetFile(path)
    keep, dropped = _plan_columns(parquet.schema_arrow.names, mapping, path)
    next_row = 1
    for batch in parquet.iter_batches(batch_size=chunk_rows, columns=list(keep)):
        frame = batch.to_pandas().rename(columns=keep)
        rows = np.arange(next_row, next_row + len(frame), dtype=np.int64)
        next_row += len(frame)
        yield _RawChunk(frame.reset_index(drop=True), rows, dropped=dropped)


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
