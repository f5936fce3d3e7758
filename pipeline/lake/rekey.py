"""Key rotation, lake side: rewrite every stored user id of the lake from one key's pseudonym
to another's.

A new pseudonymisation key changes every stored id. :func:`rekey_lake` rewrites, under the
ingest lock, the ``user_id`` column of the lake parts (``events/event_date=*/``), the
quarantine and the served-list history, through ``translate`` (old stored ids -> new ones, None
where an id stays as it is); the caller (:func:`pipeline.serving.pseudonyms.rekey`) builds it
from the serving DB's mapping and records the new pairs before a file is rewritten. In the
lake parts, the ids ingest derived from an event's content (no ``event_id`` of the sender's)
are derived again from the new ids (:func:`~pipeline.lake.event_ids.content_keys`), as ingest
would derive them under the new key, so deduplication by content keeps working; the parts'
hash caches are stamped by size and mtime and rebuild themselves at the next ingest.

Each file is replaced atomically (temp file, fsync, rename); a file whose ids are all new
already is left alone, so a retry after a crash finishes the work. Run folders and MLflow
bundles are not rewritten (the next nightly builds new ones; see the README, "Rotating the
key"). Nothing here logs an id, only counts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.lake.event_ids import content_keys, own_ids
from pipeline.lake.ingest import ingest_lock
from pipeline.lake.keymark import write_mark
from pipeline.lake.served import served_dir
from pipeline.lake.storage import LAKE_SCHEMA, durable_write, lake_part_files

logger = logging.getLogger(__name__)

USER_COLUMN = "user_id"
#: Old stored ids (distinct) -> new stored ids (None: unchanged), same length.
Translate = Callable[[np.ndarray], np.ndarray]


@dataclass
class LakeRekey:
    """What a rekey rewrote (counts only), small for a report."""

    lake_parts: int = 0
    lake_rows: int = 0
    derived_event_ids: int = 0
    quarantine_files: int = 0
    quarantine_rows: int = 0
    served_files: int = 0
    served_rows: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def rekey_lake(
    lake_root: Path, translate: Translate, *, dry_run: bool = False, new_key: bytes | None = None
) -> LakeRekey:
    """Rewrite the stored user ids under ``lake_root`` through ``translate`` (see the module
    docstring); with ``dry_run``, count what would change and write nothing. The lake's id
    mark (:mod:`pipeline.lake.keymark`) then names ``new_key``."""
    result = LakeRekey()
    with ingest_lock(lake_root):
        for part in lake_part_files(lake_root / "events"):
            rows, derived = _rekey_file(part, translate, dry_run, rederive=True)
            if rows:
                result.lake_parts += 1
                result.lake_rows += rows
                result.derived_event_ids += derived
        for path in sorted((lake_root / "quarantine").glob("*.parquet")):
            rows, _ = _rekey_file(path, translate, dry_run)
            result.quarantine_files += bool(rows)
            result.quarantine_rows += rows
        for path in sorted(served_dir(lake_root).glob("cutoff_date=*/served-*.parquet")):
            rows, _ = _rekey_file(path, translate, dry_run, compression="zstd")
            result.served_files += bool(rows)
            result.served_rows += rows
        if not dry_run:
            write_mark(lake_root, new_key)
    logger.info("rekey%s: %s", " (dry run)" if dry_run else "", result.to_dict())
    return result


def _rekey_file(
    path: Path,
    translate: Translate,
    dry_run: bool,
    *,
    rederive: bool = False,
    compression: str = "snappy",
) -> tuple[int, int]:
    """Rows whose id changes in ``path`` (rewritten unless ``dry_run``), and derived event
    ids derived again."""
    if USER_COLUMN not in pq.read_schema(path).names:
        return 0, 0
    table = pq.read_table(path)
    field = table.schema.field(USER_COLUMN)
    old = np.asarray(table.column(USER_COLUMN).to_pylist(), dtype=object)
    codes, uniques = pd.factorize(old, use_na_sentinel=True)
    uniques = np.asarray(uniques, dtype=object)
    new = np.asarray(translate(uniques), dtype=object) if len(uniques) else uniques
    changes = np.array(
        [n is not None and n != o for o, n in zip(uniques, new, strict=True)], dtype=bool
    )
    changed_rows = (
        (codes >= 0) & changes[np.maximum(codes, 0)] if len(codes) else np.zeros(0, dtype=bool)
    )
    rows = int(changed_rows.sum())
    if not rows:
        return 0, 0
    values = old.copy()
    values[changed_rows] = new[codes[changed_rows]]
    target = field.type.value_type if pa.types.is_dictionary(field.type) else field.type
    column = pa.array(values.tolist(), type=target)
    if pa.types.is_dictionary(field.type):
        column = column.dictionary_encode().cast(field.type)
    table = table.set_column(table.schema.get_field_index(USER_COLUMN), field, column)
    derived = 0
    if rederive and "event_id" in table.schema.names:
        mask = ~own_ids(table.column("event_id")) & changed_rows
        derived = int(mask.sum())
        if derived:
            full = pa.table(
                {
                    name: (
                        table.column(name)
                        if name in table.schema.names
                        else pa.nulls(table.num_rows, LAKE_SCHEMA.field(name).type)
                    )
                    for name in LAKE_SCHEMA.names
                }
            )
            keys = content_keys(full)
            ids = pc.if_else(
                pa.array(mask), keys, table.column("event_id").combine_chunks().cast(pa.string())
            )
            position = table.schema.get_field_index("event_id")
            table = table.set_column(
                position,
                table.schema.field("event_id"),
                ids.cast(table.schema.field("event_id").type),
            )
    if not dry_run:
        durable_write(path, lambda fh: pq.write_table(table, fh, compression=compression))
    return rows, derived
