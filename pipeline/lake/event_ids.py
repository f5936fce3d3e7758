"""The lake's event-id index: every event id already stored, as 128-bit hash pairs.

Event ids are deduplicated against the whole lake (every date), so a replayed event -- even
with another timestamp -- is never stored twice. Ids are hashed with two independent 64-bit
SipHashes (:func:`hash_event_ids`) and kept in an :class:`EventIdIndex`. The per-part hash
caches (see ``_HASH_CACHE``) let each ingest read and hash only the part files added since the
last one; :func:`load_lake_index` builds the index (and the watermark) before an ingest.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.lake.storage import lake_part_files, newest_event

logger = logging.getLogger(__name__)


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
    return cache_part_hashes(lake_dir, part, h1, h2)


def cache_part_hashes(lake_dir: Path, part: Path, h1: np.ndarray, h2: np.ndarray
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


def load_lake_index(lake_dir: Path) -> tuple[EventIdIndex, pd.Timestamp | None]:
    """The ids already in the lake (every date) and its watermark (newest event time)."""
    index = EventIdIndex()
    parts = lake_part_files(lake_dir)
    hashes = [_part_hashes(lake_dir, part) for part in parts]
    _prune_hash_cache(lake_dir, parts)
    if hashes:  # one sort of everything (sorted runs: the stable sort merges them)
        index.add(np.concatenate([h[0] for h in hashes]), np.concatenate([h[1] for h in hashes]))
    del hashes
    watermark = newest_event(parts)
    logger.info("lake index: %d event ids in %d part files, watermark %s", len(index),
                len(parts), watermark)
    return index, watermark
