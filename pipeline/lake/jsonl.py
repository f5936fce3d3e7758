"""Append-only JSON-lines logs of the lake (the manifest, the repair log): read them with the
line that breaks named, append one record durably."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.core.errors import DataError
from pipeline.lake.storage import durable_write


def read_records(path: Path, what: str) -> list[dict]:
    """The records of the log at ``path``, oldest first (empty when it does not exist); a line
    that is not JSON raises a DataError naming ``what``, the file and the line."""
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{what} line is not JSON: {exc}", file=str(path), row=number
                ) from exc
    return records


def append_record(path: Path, record: dict) -> None:
    """Add one record: the whole log is rewritten to a temp file, fsynced and renamed, so a
    crash leaves the old log or the new one, never half a line."""
    existing = path.read_bytes() if path.exists() else b""
    line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
    durable_write(path, lambda fh: fh.write(existing + line))
