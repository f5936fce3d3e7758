"""Repair: take back everything one landing file brought into the lake, so it can be re-sent.

Validation at the door keeps rows that break the suite out of the lake, but a file can still
be wrong in ways no suite sees (a wrong timestamp column that parses, the wrong column
mapping). Once its rows are in, a corrected re-send is deduplicated away (same event ids, same
content). ``python -m pipeline.cli repair <file name or sha256>`` removes, by the file's
manifest entry (:func:`repair_landing_file`):

- its **lake rows**: every row of a part file named after the file's content
  (``part-<sha16>*``, wherever it is: also parts a crashed commit left behind), and in the
  other part files of the dates its entry lists, the rows whose lineage is the file
  (``source_file`` and ``ingested_at`` of the entry) -- rows of other files stay. A part left
  empty is deleted, one with other rows is rewritten without them (temp file, fsync, rename);
- their **hash caches** (event ids and content keys; rewritten for a rewritten part), so the
  lake index forgets the events and their re-send is new;
- its **quarantine file** ``lake/quarantine/<file>.<sha12>.parquet``;
- its **manifest entry**: the manifest lists what is in the lake; the entry, what was removed
  and when go to the repair log ``lake/_repairs.jsonl`` (:mod:`.repair_log`).

It holds the ingest lock (no ingest runs meanwhile), is idempotent (a second run finds the
file repaired and changes nothing; a crash half-way is finished by the next run) and refuses,
naming the file, what the manifest does not know, a name that matches several entries, and a
name repaired before and ingested again since (name the new entry by its sha256). The file's
exact bytes are then withheld from ingest unless ``allow_resend``, so a copy left in the
landing folder cannot bring the rows back. Runs already made keep their own copies
(``runs/<cutoff>/``); the next run, or a re-run of a date, reads the repaired lake.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.errors import DataError
from pipeline.lake.event_ids import cache_part_keys, event_keys, part_cache_paths
from pipeline.lake.ingest import MANIFEST_NAME, ingest_lock, read_manifest
from pipeline.lake.repair_log import REPAIRS_NAME, append_repair_log, read_repair_log
from pipeline.lake.storage import durable_write

logger = logging.getLogger(__name__)

#: A sha256 given on the command line: the full 64 hex digits or a prefix of at least 12 (the
#: quarantine files' names carry 12).
_DIGEST = re.compile(r"^[0-9a-f]{12,64}$")


@dataclass
class RepairResult:
    """What a repair removed (or, in a dry run, would remove); counts only, no ids."""

    file: str
    sha256: str
    ingested_at: str | None
    dry_run: bool = False
    already_repaired_at: str | None = None  # an earlier repair took it back: nothing to do
    rows_by_date: dict[str, int] = field(default_factory=dict)
    parts_deleted: list[str] = field(default_factory=list)
    parts_rewritten: list[str] = field(default_factory=list)
    quarantine_file: str | None = None
    quarantine_rows: int = 0
    withheld: bool = True

    @property
    def lake_rows(self) -> int:
        return sum(self.rows_by_date.values())

    def to_dict(self) -> dict:
        return {**asdict(self), "lake_rows": self.lake_rows}

    def describe(self) -> str:
        """The operator's summary (what the CLI prints)."""
        head = f"{self.file} (sha256 {self.sha256}, ingested {self.ingested_at})"
        resend = "these exact bytes are " + (
            "skipped by ingest" if self.withheld else "ingested again (--allow-resend)"
        )
        if self.already_repaired_at is not None:
            return (
                f"{head} was already repaired at {self.already_repaired_at}: nothing of it "
                f"is in the lake, nothing to do; {resend}"
            )
        verb = "would remove" if self.dry_run else "removed"
        dates = ", ".join(f"{day} ({rows:,})" for day, rows in sorted(self.rows_by_date.items()))
        lines = [
            f"repair {head}{' -- dry run, nothing changed' if self.dry_run else ''}:",
            f"  lake        {verb} {self.lake_rows:,} rows: "
            f"{len(self.parts_deleted)} part file(s) deleted, "
            f"{len(self.parts_rewritten)} rewritten without them"
            + (f"; dates {dates}" if dates else ""),
            f"  quarantine  {verb} {self.quarantine_rows:,} rows"
            + (f" ({self.quarantine_file})" if self.quarantine_file else " (none)"),
            f"  manifest    {'would move' if self.dry_run else 'moved'} the entry to "
            f"{REPAIRS_NAME}",
            f"  re-send     a corrected file (other bytes) is ingested normally; {resend}",
        ]
        return "\n".join(lines)


@dataclass
class _PartAction:
    part: Path
    remove: np.ndarray | None  # rows to remove; None: the whole part

    @property
    def whole(self) -> bool:
        return self.remove is None


def repair_landing_file(
    lake_dir: Path,
    target: str,
    *,
    dry_run: bool = False,
    allow_resend: bool = False,
    repaired_at: dt.datetime | None = None,
) -> RepairResult:
    """Remove everything the landing file ``target`` (its name, or its sha256 or a prefix of
    at least 12 hex digits) brought into the lake ``lake_dir`` (``lake/events``); see the
    module docstring. ``dry_run``: only say what would be removed. Raises DataError naming
    the file when the manifest has no such entry, or the name is ambiguous."""
    lake_root = lake_dir.parent
    when = pd.Timestamp(repaired_at or dt.datetime.now(dt.timezone.utc)).tz_convert("UTC")
    if not lake_root.is_dir():  # refused without creating a lake (the lock file would)
        _find_entry([], [], target, lake_root)
    with ingest_lock(lake_root):
        manifest = read_manifest(lake_root)
        log = read_repair_log(lake_root)
        record = _find_entry(manifest, log, target, lake_root)
        if "repaired_at" in record:  # an earlier repair's log record: nothing left to do
            result = RepairResult(
                record["file"],
                record["sha256"],
                record.get("ingested_at"),
                dry_run=dry_run,
                already_repaired_at=record["repaired_at"],
                withheld=bool(record.get("withheld", True)),
            )
            if allow_resend and result.withheld and not dry_run:
                append_repair_log(
                    lake_root,
                    {
                        "status": "released",
                        "sha256": result.sha256,
                        "file": result.file,
                        "withheld": False,
                        "repaired_at": when.isoformat(),
                    },
                )
                result.withheld = False
                logger.info(
                    "repair: %s (sha256 %s) may be ingested again", result.file, result.sha256[:12]
                )
            return result
        actions = _plan(lake_dir, record)
        result = _result(lake_dir, record, actions, dry_run, withheld=not allow_resend)
        if dry_run:
            return result
        entry = {
            "sha256": record["sha256"],
            "file": record["file"],
            "repaired_at": when.isoformat(),
            "withheld": result.withheld,
            "lake_rows": result.lake_rows,
            "rows_by_date": result.rows_by_date,
            "parts_deleted": len(result.parts_deleted),
            "parts_rewritten": len(result.parts_rewritten),
            "quarantine_rows": result.quarantine_rows,
            "manifest_record": record,
        }
        append_repair_log(lake_root, {**entry, "status": "started"})
        for action in actions:
            _apply(lake_dir, action)
        if result.quarantine_file is not None:
            (lake_root / "quarantine" / result.quarantine_file).unlink(missing_ok=True)
        _remove_manifest_entry(lake_root, record["sha256"])
        append_repair_log(lake_root, {**entry, "status": "done"})
    logger.info(
        "repair: %s (sha256 %s) taken back: %d lake rows (%d part files deleted, %d "
        "rewritten), %d quarantine rows, manifest entry moved to %s",
        result.file,
        result.sha256[:12],
        result.lake_rows,
        len(result.parts_deleted),
        len(result.parts_rewritten),
        result.quarantine_rows,
        REPAIRS_NAME,
    )
    return result


def _find_entry(manifest: list[dict], log: list[dict], target: str, lake_root: Path) -> dict:
    """The manifest entry ``target`` names, or the log record of its earlier repair."""
    name = Path(target).name  # a path to the landing file names it too
    digest = target.strip().lower()
    by_digest = bool(_DIGEST.match(digest))

    def named(record: dict) -> bool:
        return record.get("file") == name or (
            by_digest and str(record.get("sha256", "")).startswith(digest)
        )

    matches = [r for r in manifest if named(r)]
    done = [r for r in log if r.get("status") == "done" and named(r)]
    shas = sorted({r["sha256"] for r in matches})
    if len(shas) > 1:
        listed = "; ".join(f"sha256 {r['sha256']} ingested {r.get('ingested_at')}" for r in matches)
        raise DataError(
            f"{len(shas)} manifest entries match {target!r} ({listed}): repair "
            "one at a time, naming it by its sha256",
            file=target,
        )
    if matches:
        record = matches[0]
        # by name, after a repair of that name: the entry is the re-send, never taken back
        # by running the same command twice
        again = [
            r
            for r in done
            if r.get("file") == record["file"]
            and record.get("ingested_at")
            and pd.Timestamp(r["repaired_at"]) <= pd.Timestamp(record["ingested_at"])
        ]
        if again and not (by_digest and record["sha256"].startswith(digest)):
            raise DataError(
                f"{record['file']} was repaired at {again[-1]['repaired_at']} (sha256 "
                f"{again[-1]['sha256']}) and ingested again since (sha256 {record['sha256']}, "
                f"at {record.get('ingested_at')}): to take back the re-sent file too, name it "
                f"by its sha256: python -m pipeline.cli repair {record['sha256']}",
                file=target,
            )
        return record
    if done:
        last = done[-1]
        return {
            **last["manifest_record"],
            "repaired_at": last["repaired_at"],
            "withheld": _still_withheld(log, last["sha256"]),
        }
    raise DataError(
        f"no entry for {target!r} in the lake's manifest {lake_root / MANIFEST_NAME}"
        f" (it holds {len(manifest)} file(s)): nothing of it is in the lake, "
        "nothing to repair; give the landing file's name or its sha256 as the "
        "manifest records them",
        file=target,
    )


def _still_withheld(log: list[dict], digest: str) -> bool:
    states = [
        bool(r.get("withheld", False))
        for r in log
        if r.get("sha256") == digest and r.get("status") in ("done", "released")
    ]
    return states[-1] if states else False


def _plan(lake_dir: Path, record: dict) -> list[_PartAction]:
    """The part files holding the file's rows, and which of their rows are its."""
    tag = record["sha256"][:16]
    own = {
        p
        for p in lake_dir.glob(f"event_date=*/part-{tag}*.parquet")
        if not p.name.startswith(".")
        and (p.name == f"part-{tag}.parquet" or p.name.startswith(f"part-{tag}-"))
    }
    actions = [_PartAction(p, None) for p in sorted(own)]
    ingested = record.get("ingested_at")
    if ingested is None:  # (every manifest entry records it; without it only own parts)
        return actions
    stamp = pd.Timestamp(ingested).tz_convert("UTC").floor("us").to_pydatetime()
    for day in sorted(set(record.get("partitions") or [])):
        for part in sorted((lake_dir / f"event_date={day}").glob("*.parquet")):
            if part in own or part.name.startswith("."):
                continue
            lineage = pq.read_table(part, columns=["source_file", "ingested_at"])
            at = lineage.column("ingested_at")
            mine = pc.and_(
                pc.equal(lineage.column("source_file"), record["file"]),
                pc.equal(at, pa.scalar(stamp, type=at.type)),
            )
            mine = np.asarray(pc.fill_null(mine, False).to_numpy(zero_copy_only=False), bool)
            if mine.all():
                actions.append(_PartAction(part, None))
            elif mine.any():
                actions.append(_PartAction(part, mine))
    return actions


def _result(
    lake_dir: Path, record: dict, actions: list[_PartAction], dry_run: bool, *, withheld: bool
) -> RepairResult:
    lake_root = lake_dir.parent
    result = RepairResult(
        record["file"],
        record["sha256"],
        record.get("ingested_at"),
        dry_run=dry_run,
        withheld=withheld,
    )
    for action in actions:
        day = action.part.parent.name.split("=", 1)[1]
        rows = (
            pq.ParquetFile(action.part).metadata.num_rows
            if action.whole
            else int(action.remove.sum())
        )
        result.rows_by_date[day] = result.rows_by_date.get(day, 0) + rows
        relative = str(action.part.relative_to(lake_root))
        (result.parts_deleted if action.whole else result.parts_rewritten).append(relative)
    quarantine = (
        record.get("quarantine_file") or f"{record['file']}.{record['sha256'][:12]}.parquet"
    )
    path = lake_root / "quarantine" / quarantine
    if path.exists():
        result.quarantine_file = quarantine
        result.quarantine_rows = pq.ParquetFile(path).metadata.num_rows
    return result


def _apply(lake_dir: Path, action: _PartAction) -> None:
    """Delete a part (and its caches), or rewrite it without the file's rows (and re-cache)."""
    part = action.part
    if action.whole:
        for cache in part_cache_paths(lake_dir, part):
            cache.unlink(missing_ok=True)
        part.unlink(missing_ok=True)
        _fsync_folder(part.parent)
        with contextlib.suppress(OSError):  # still holds other parts: keep it
            part.parent.rmdir()  # a date left without parts
        return
    table = pq.read_table(part)
    kept = table.filter(pa.array(~action.remove))
    durable_write(part, lambda fh: pq.write_table(kept, fh))
    cache_part_keys(lake_dir, part, event_keys(kept))  # stamped with the new file


def _remove_manifest_entry(lake_root: Path, digest: str) -> None:
    """Rewrite the manifest without the entry of ``digest`` (temp file, fsync, rename)."""
    path = lake_root / MANIFEST_NAME
    kept = [r for r in read_manifest(lake_root) if r.get("sha256") != digest]
    data = "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in kept).encode()
    durable_write(path, lambda fh: fh.write(data))


def _fsync_folder(folder: Path) -> None:
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
