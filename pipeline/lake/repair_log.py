"""The repair log ``lake/_repairs.jsonl``: every ``repair`` of a landing file, for the audit.

One JSON object per line, appended (the file rewritten to a temp file, fsynced and renamed,
like the manifest): ``status`` ``started`` (what is about to be removed) then ``done`` (what
was removed), each with the file's manifest entry as it was, counts only (no ids); a crash in
between leaves a ``started`` line, and the next ``repair`` of the file finishes the job.
``released`` lets the same bytes in again. The manifest lists what is in the lake; this log
keeps what was taken back, so the manifest entry of a repaired file is removed, not marked.

A repaired file's exact bytes are *withheld* (:func:`withheld_digests`): ingest skips them,
so a copy left in the landing folder cannot bring the wrong rows back; a corrected file (other
bytes) is ingested normally. ``repair --allow-resend`` does not withhold them (the same bytes
ingested again, say after fixing the column mapping).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.lake.jsonl import append_record, read_records

REPAIRS_NAME = "_repairs.jsonl"


def read_repair_log(lake_root: Path) -> list[dict]:
    """The repair log's records, oldest first (empty when nothing was ever repaired)."""
    return read_records(lake_root / REPAIRS_NAME, "repair log")


def append_repair_log(lake_root: Path, record: dict) -> None:
    """Add one record durably (the whole log rewritten to a temp file, fsynced, renamed)."""
    append_record(lake_root / REPAIRS_NAME, record)


def withheld_digests(lake_root: Path) -> set[str]:
    """sha256 of the landing files taken back by ``repair`` whose bytes ingest must skip:
    per file content, its latest ``done`` or ``released`` record decides."""
    latest: dict[str, bool] = {}
    for record in read_repair_log(lake_root):
        if record.get("status") in ("done", "released"):
            latest[record["sha256"]] = bool(record.get("withheld", False))
    return {digest for digest, withheld in latest.items() if withheld}
