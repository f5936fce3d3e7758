"""Right to erasure, lake side: forget users in the lake, the quarantine, the served-list
history and the run folders, and add them to the tombstone that keeps them out at ingest.

Everything here works on ids *as stored* (the caller converts the CMS's ids with
:func:`pipeline.core.privacy.stored_user_id`) and runs under the ingest lock
(:func:`pipeline.lake.ingest.ingest_lock`), so an ingest never sees half an erasure. Every file
that holds one of the users is rewritten without them through
:func:`~pipeline.lake.storage.durable_write` (temp file, fsync, rename): a crash leaves each
file either old or new, and a retry finds what is left, so :func:`erase_users` is idempotent.
Nothing here logs an id, only counts.

What is rewritten:

* **lake parts** ``events/event_date=*/part-*.parquet``: their rows dropped (a part left empty
  is deleted); the lake index is then reloaded (:func:`~pipeline.lake.event_ids.
  load_lake_index`), which rebuilds the hash caches of the rewritten parts (stale by their
  stamp) and prunes those of deleted parts. This is the one exception to "a part file is
  never overwritten";
* **quarantine** ``quarantine/*.parquet`` (rows kept with a reason at ingest);
* **leftovers of a crashed ingest** ``_staging/`` (deleted, as every ingest does first);
* **served-list history** ``served/cutoff_date=*/served-*.parquet`` (sorted by user, so the
  rewrite is a filter on one column);
* **run folders** ``runs/<cutoff>/``, every Parquet file with a ``user_id`` column, found by
  looking, not by a list of names, so that new stage outputs are covered:

  - a file whose only column is a text ``user_id`` is an id map (row ``c`` is code ``c``:
    ``user_ids.parquet``, the bundle's ``model/users.parquet``): the users' entries are
    *blanked* to ``__erased__:<code>``, so every code of the run keeps its meaning;
  - other files with a text ``user_id`` (``events_raw``, ``events``, ``quarantine``,
    ``assignments``, ``holdout_user_ndcg``, the bundle's ``side_users``...): rows dropped;
  - files with an integer ``user_id`` (codes: ``events_encoded``, the feature tables): the
    rows of the users' codes in the nearest id map (the file's folder or above) dropped;
  - the run's Great Expectations Data Docs (``data_docs/``, which may quote failing rows) are
    deleted when the run held one of the users.

  A run whose id map held one of the users is reported with the model version its
  ``register.json`` names: that model was trained on their data.

Not rewritten: the model bundles' numeric arrays (ALS factors, recent items per user code):
with the id map blanked, those rows belong to no id any more; the registered copy in MLflow
keeps its own id map until the version is deleted (see the README, "Privacy").
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.lake.event_ids import load_lake_index
from pipeline.lake.ingest import ingest_lock
from pipeline.lake.served import served_dir
from pipeline.lake.storage import durable_write, lake_part_files
from pipeline.lake.tombstone import ERASED_PREFIX, add_to_tombstone

logger = logging.getLogger(__name__)

USER_COLUMN = "user_id"
__all__ = ["ERASED_PREFIX", "LakeErasure", "erase_users"]


@dataclass
class LakeErasure:
    """What one erasure removed from the lake side (counts only: no id), small for XCom."""

    tombstone_added: int = 0
    lake_events: int = 0
    lake_parts_rewritten: int = 0
    lake_parts_removed: int = 0
    quarantine_rows: int = 0
    staging_removed: int = 0
    served_history_rows: int = 0
    run_folders: int = 0  # run folders that held one of the users
    run_rows: int = 0  # rows dropped from run-folder tables
    run_ids_blanked: int = 0  # id-map entries blanked
    run_files_rewritten: int = 0
    run_reports_removed: int = 0  # Data Docs folders deleted
    model_versions: list[str] = field(default_factory=list)  # trained on their data

    def to_dict(self) -> dict:
        return asdict(self)


def erase_users(
    lake_root: Path,
    runs_root: Path,
    stored_ids: Iterable[str],
    *,
    dry_run: bool = False,
    tombstone_ids: Iterable[str] | None = None,
) -> LakeErasure:
    """Forget ``stored_ids`` (ids as stored) everywhere under ``lake_root`` and ``runs_root``,
    under the ingest lock: first the tombstone (from then on, ingest drops their rows), then
    the lake parts, quarantine, staging leftovers, served-list history and run folders (see
    the module docstring). With ``dry_run``, count what would be removed and change nothing.
    Idempotent: a retry removes what an interrupted erasure left.

    The tombstone gets ``tombstone_ids``, the ids as the CMS sends them (default:
    ``stored_ids``, the same without a pseudonym key): ingest tests them before it
    pseudonymises, so the tombstone does not depend on the key and survives a rotation."""
    ids = sorted(set(stored_ids))
    erased = sorted(set(tombstone_ids)) if tombstone_ids is not None else ids
    result = LakeErasure()
    if not ids:
        return result
    lake_dir = lake_root / "events"
    with ingest_lock(lake_root):
        if not dry_run:
            _, result.tombstone_added = add_to_tombstone(lake_root, erased)
        _erase_lake_parts(lake_dir, ids, result, dry_run)
        for path in sorted((lake_root / "quarantine").glob("*.parquet")):
            result.quarantine_rows += _drop_rows(path, ids, dry_run)
        staging = lake_root / "_staging"
        if staging.is_dir():
            result.staging_removed = sum(1 for p in staging.rglob("*") if p.is_file())
            if not dry_run:
                shutil.rmtree(staging, ignore_errors=True)
        for path in sorted(served_dir(lake_root).glob("cutoff_date=*/served-*.parquet")):
            result.served_history_rows += _drop_rows(path, ids, dry_run)
        for run in (
            sorted(p for p in runs_root.glob("*") if p.is_dir()) if runs_root.is_dir() else []
        ):
            _erase_run(run, ids, result, dry_run)
        if not dry_run and (result.lake_parts_rewritten or result.lake_parts_removed):
            # the caches of rewritten parts no longer match their stamp (size, mtime): this
            # rebuilds them from the new files and prunes those of deleted parts, so the
            # next ingest's index is exact
            load_lake_index(lake_dir)
    result.model_versions = sorted(set(result.model_versions), key=_version_key)
    logger.info(
        "erasure%s (lake side, %d user id(s)): %s",
        " (dry run)" if dry_run else "",
        len(ids),
        json.dumps(result.to_dict(), sort_keys=True),
    )
    return result


# ---- the lake ----------------------------------------------------------------------------------


def _erase_lake_parts(lake_dir: Path, ids: list[str], result: LakeErasure, dry_run: bool) -> None:
    for part in lake_part_files(lake_dir):
        users = pq.read_table(part, columns=[USER_COLUMN]).column(USER_COLUMN)
        hit = _is_in(users, ids)
        removed = int(np.count_nonzero(hit))
        if not removed:
            continue
        result.lake_events += removed
        if dry_run:
            continue
        if removed == len(hit):
            part.unlink()
            result.lake_parts_removed += 1
            continue
        _rewrite(part, pq.read_table(part).filter(pa.array(~hit)))
        result.lake_parts_rewritten += 1


# ---- run folders --------------------------------------------------------------------------------


def _erase_run(run: Path, ids: list[str], result: LakeErasure, dry_run: bool) -> None:
    """One run folder: files with a user column, id maps last (their codes are read first)."""
    files = sorted(p for p in run.rglob("*.parquet") if not p.name.startswith("."))
    maps: dict[Path, np.ndarray] = {}  # id-map file -> codes of the users in it
    others: list[tuple[Path, pa.DataType]] = []
    for path in files:
        schema = pq.read_schema(path)
        if USER_COLUMN not in schema.names:
            continue
        kind = schema.field(USER_COLUMN).type
        if len(schema.names) == 1 and _is_text(kind):
            hit = _is_in(pq.read_table(path).column(USER_COLUMN), ids)
            maps[path] = np.flatnonzero(hit)
        else:
            others.append((path, kind))
    touched = any(len(codes) for codes in maps.values())
    for path, kind in others:
        if _is_text(kind):
            removed = _drop_rows(path, ids, dry_run)
        elif pa.types.is_integer(kind):
            codes = _nearest_codes(path, run, maps)
            removed = _drop_codes(path, codes, dry_run) if codes is not None else 0
        else:
            logger.warning("%s: user column of type %s left as it is", path, kind)
            continue
        if removed:
            touched = True
            result.run_rows += removed
            result.run_files_rewritten += 1
    for path, codes in maps.items():
        if len(codes):
            result.run_ids_blanked += len(codes)
            result.run_files_rewritten += 1
            if not dry_run:
                _blank_ids(path, codes)
    if not touched:
        return
    result.run_folders += 1
    docs = run / "data_docs"
    if docs.is_dir():
        result.run_reports_removed += 1
        if not dry_run:
            shutil.rmtree(docs, ignore_errors=True)
    version = _registered_version(run)
    if version is not None:
        result.model_versions.append(version)


def _nearest_codes(path: Path, run: Path, maps: dict[Path, np.ndarray]) -> np.ndarray | None:
    """The users' codes in the id map of ``path``'s folder or the nearest one above it."""
    folder = path.parent
    while True:
        found = [codes for map_path, codes in maps.items() if map_path.parent == folder]
        if found:
            return np.unique(np.concatenate(found))
        if folder == run or run not in folder.parents:
            logger.warning("%s: integer user codes without an id map; left as it is", path)
            return None
        folder = folder.parent


def _registered_version(run: Path) -> str | None:
    path = run / "register.json"
    try:
        version = json.loads(path.read_text()).get("version")
    except (OSError, ValueError, AttributeError):
        return None
    return None if version is None else str(version)


# ---- file rewrites ------------------------------------------------------------------------------


def _drop_rows(path: Path, ids: list[str], dry_run: bool) -> int:
    """Rewrite ``path`` without the rows whose text ``user_id`` is in ``ids``; rows removed."""
    if USER_COLUMN not in pq.read_schema(path).names:
        return 0
    hit = _is_in(pq.read_table(path, columns=[USER_COLUMN]).column(USER_COLUMN), ids)
    removed = int(np.count_nonzero(hit))
    if removed and not dry_run:  # only then the whole file
        _rewrite(path, pq.read_table(path).filter(pa.array(~hit)))
    return removed


def _drop_codes(path: Path, codes: np.ndarray, dry_run: bool) -> int:
    if not len(codes):
        return 0
    values = pq.read_table(path, columns=[USER_COLUMN]).column(USER_COLUMN)
    hit = np.isin(values.to_numpy(zero_copy_only=False), codes)
    removed = int(np.count_nonzero(hit))
    if removed and not dry_run:
        _rewrite(path, pq.read_table(path).filter(pa.array(~hit)))
    return removed


def _blank_ids(path: Path, codes: np.ndarray) -> None:
    table = pq.read_table(path)
    values = table.column(USER_COLUMN).to_pylist()
    for code in codes:
        values[int(code)] = f"{ERASED_PREFIX}{int(code)}"
    column = pa.array(values, type=table.schema.field(USER_COLUMN).type)
    _rewrite(path, table.set_column(0, table.schema.field(USER_COLUMN), column))


def _rewrite(path: Path, table: pa.Table) -> None:
    """Atomically replace ``path`` with ``table``, in the file's compression."""
    compression = _compression(path)
    durable_write(path, lambda fh: pq.write_table(table, fh, compression=compression))


def _compression(path: Path) -> str:
    metadata = pq.ParquetFile(path).metadata
    if metadata.num_row_groups and metadata.num_columns:
        codec = str(metadata.row_group(0).column(0).compression).lower()
        return "none" if codec == "uncompressed" else codec
    return "snappy"


def _is_in(column: pa.ChunkedArray | pa.Array, ids: list[str]) -> np.ndarray:
    """True where a text (or dictionary-encoded text) value is one of ``ids``; nulls: False."""
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    if not _is_text(column.type):
        return np.zeros(len(column), dtype=bool)
    hit = pc.is_in(column, value_set=pa.array(ids, type=column.type))
    return hit.fill_null(False).to_numpy(zero_copy_only=False).astype(bool, copy=False)


def _is_text(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (1 << 62, version)
