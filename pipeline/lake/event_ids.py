"""The lake's event index: every event id already stored, and the content of every event that
came with an id of its own, as 128-bit hash pairs.

**Identity.** Two rows are the same event when their event ids are equal, or when one of them
came without an ``event_id`` and their contents are equal. The *content key* of a row is the
id :func:`~pipeline.lake.normalise.derive_event_ids` gives its fields (``user_id``,
``item_id``, ``event_type``, ``timestamp``, ``value``, ``session_id``, and ``position`` /
``placement`` where present), so a row sent without an id is stored under its content key,
and the same event sent once with the CMS's ``event_id`` and once without is found either
way round. Two rows that both carry ids of their own are never merged by content, however
alike: the sender told them apart (two purchases of one item in the same second), and the
sender's id is the better witness. Rows without ids could never be told apart (equal fields
give equal derived ids), as before. Of a row and its later copy, the first is kept.

Event ids and content keys are deduplicated against the whole lake (every date), so a
replayed event -- even with another timestamp, when it carries its id -- is never stored
twice. Both are hashed with two independent 64-bit SipHashes (:func:`hash_event_ids`) and kept
in an :class:`EventIdIndex` (ids) with its ``contents`` (the content keys of rows that came
with an id of their own; a row without one is already in the ids under its content key). The
per-part hash caches (see ``_HASH_CACHE`` and ``_CONTENT_CACHE``) let each ingest read and
hash only the part files added since the last one, so the cost of an ingest follows its new
data; a lake written before the content caches existed gets them on its next ingest (each
part read once). :func:`load_lake_index` builds the index (and the watermark) before an
ingest.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.lake.storage import LAKE_SCHEMA, lake_part_files, newest_event

logger = logging.getLogger(__name__)


class HashPairSet:
    """Exact set of strings as 2x64-bit hash pairs (16 bytes a member).

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
                found[i] |= bool((s2[left[i] : right[i]] == q2[i]).any())
        out = np.empty_like(found)
        out[order] = found
        return out

    def __len__(self) -> int:
        return sum(s[0].size for s in self._segments)


class EventIdIndex(HashPairSet):
    """The event ids in the lake (this set) and, in ``contents``, the content keys of the
    events that came with an id of their own (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.contents = HashPairSet()

    def add_keys(self, keys: EventKeys) -> None:
        """Record rows as stored: their ids, and the content keys of those with own ids."""
        self.add(keys.h1, keys.h2)
        self.contents.add(keys.k1[keys.explicit], keys.k2[keys.explicit])

    def duplicates(self, keys: EventKeys) -> np.ndarray:
        """Which rows of one batch (in file order) are events already in the lake or in an
        earlier row of the batch: the same event id, or the same content where one of the
        two rows came without an id. Rows that both carry ids of their own are never merged
        by content (module docstring)."""
        duplicate = self.contains(keys.h1, keys.h2) | _duplicated_pairs(keys.h1, keys.h2)
        own, derived = keys.explicit, ~keys.explicit
        if own.any():  # the lake holds it without an id: under its content key, as its id
            duplicate[own] |= self.contains(keys.k1[own], keys.k2[own])
        if derived.any() and len(self.contents):  # the lake holds it with an id of its own
            duplicate[derived] |= self.contents.contains(keys.k1[derived], keys.k2[derived])
        # within the batch, among the rows still standing: per content key, when its first
        # row came without an id, every later row is that event; when it came with one, only
        # the later rows without ids are (rows with ids of their own stay apart)
        standing = np.flatnonzero(~duplicate)
        if standing.size > 1 and own[standing].any():
            frame = pd.DataFrame(
                {"a": keys.k1[standing], "b": keys.k2[standing], "own": own[standing]}
            )
            later = frame.duplicated(["a", "b"], keep="first").to_numpy()
            if later.any():
                first_own = (
                    frame.groupby(["a", "b"], sort=False)["own"].transform("first").to_numpy(bool)
                )
                duplicate[standing[later & ~(first_own & frame["own"].to_numpy())]] = True
        return duplicate


def _duplicated_pairs(h1: np.ndarray, h2: np.ndarray) -> np.ndarray:
    """Later copies of a (h1, h2) pair within one batch."""
    return pd.DataFrame({"a": h1, "b": h2}).duplicated(keep="first").to_numpy()


def hash_event_ids(ids: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Two independent 64-bit SipHashes of each id (a false match needs both to collide)."""
    values = ids.to_numpy(zero_copy_only=False).astype(object, copy=False)
    return (
        pd.util.hash_array(values, hash_key="recs-event-id-01", categorize=False),
        pd.util.hash_array(values, hash_key="recs-event-id-02", categorize=False),
    )


#: The form of an id :func:`~pipeline.lake.normalise.derive_event_ids` derives: ``h`` and 20
#: hex digits of the SHA-1 of the event's fields. A row whose id has this form is taken as one
#: that came without an id (its id is its content key): ids a sender makes up do not look like
#: this, and a quarantine file or lake export sent back carries exactly such derived ids.
DERIVED_ID_PATTERN = r"^h[0-9a-f]{20}$"
#: The columns a content key is made of (the fields of a derived id).
CONTENT_COLUMNS = (
    "event_id",
    "user_id",
    "item_id",
    "event_type",
    "timestamp",
    "value",
    "session_id",
    "position",
    "placement",
)


@dataclass(frozen=True)
class EventKeys:
    """One batch of rows' identities: the id hashes (``h1``, ``h2``), which rows came with an
    id of their own (``explicit``), and the content-key hashes (``k1``, ``k2``; for a row
    without an own id, its id's hashes)."""

    h1: np.ndarray
    h2: np.ndarray
    explicit: np.ndarray
    k1: np.ndarray
    k2: np.ndarray

    def where(self, mask: np.ndarray) -> EventKeys:
        return EventKeys(
            self.h1[mask], self.h2[mask], self.explicit[mask], self.k1[mask], self.k2[mask]
        )


def own_ids(ids: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Which ids are the sender's own, not derived from content (:data:`DERIVED_ID_PATTERN`)."""
    derived = pc.fill_null(pc.match_substring_regex(ids, DERIVED_ID_PATTERN), False)
    return ~np.asarray(derived.to_numpy(zero_copy_only=False), dtype=bool)


def content_keys(table: pa.Table) -> pa.Array:
    """The content key of each row of ``table`` (lake columns; see the module docstring):
    the id :func:`~pipeline.lake.normalise.derive_event_ids` gives its fields, so a row's
    content key equals the id it would have got without an ``event_id``.

    The same text as ``derive_event_ids`` builds (a test holds them equal), assembled in
    Arrow rather than pandas: a lake with own ids pays this for every event once, and the
    per-row Python work is left to the SHA-1 alone. ``value`` is formatted by pandas, as
    there, but once per distinct value (bit for bit)."""

    def text(column: str) -> pa.ChunkedArray:
        return pc.fill_null(pc.cast(table.column(column), pa.string()), "")

    values = np.asarray(table.column("value").to_numpy(zero_copy_only=False), np.float64)
    distinct, inverse = np.unique(values.view(np.uint64), return_inverse=True)
    formatted = (
        pd.Series(distinct.view(np.float64)).astype("string").fillna("").to_numpy(dtype=object)
    )
    micros = pc.cast(pc.cast(table.column("timestamp"), pa.int64()), pa.string())
    key = pc.binary_join_element_wise(
        text("user_id"),
        text("item_id"),
        text("event_type"),
        micros,
        pa.array(formatted[inverse.reshape(-1)], pa.string()),
        text("session_id"),
        "\x1f",
    )
    position, placement = table.column("position"), table.column("placement")
    shown = pc.or_(pc.is_valid(position), pc.is_valid(placement))
    if pc.any(shown).as_py():  # (impressions: rows with neither keep their old key)
        key = pc.if_else(
            shown,
            pc.binary_join_element_wise(key, text("position"), text("placement"), "\x1f"),
            key,
        )
    return pa.array(
        [
            None if k is None else "h" + hashlib.sha1(k.encode()).hexdigest()[:20]
            for k in key.to_pylist()
        ],
        type=pa.string(),
    )


def event_keys(table: pa.Table) -> EventKeys:
    """The identities of ``table``'s rows (lake columns): content keys are computed only for
    rows with ids of their own (about the cost of deriving ids for a file without them)."""
    h1, h2 = hash_event_ids(table.column("event_id"))
    explicit = own_ids(table.column("event_id"))
    k1, k2 = h1.copy(), h2.copy()
    if explicit.any():
        k1[explicit], k2[explicit] = hash_event_ids(content_keys(table.filter(pa.array(explicit))))
    return EventKeys(h1, h2, explicit, k1, k2)


#: Per part file, its event ids' hash pairs (sorted by the first), so that each ingest reads
#: and hashes only the part files added since: ``<lake>/.event-id-hashes-v1/<date>/<part>.npz``
#: (outside the ``event_date=*/*.parquet`` files readers list), stamped with the part's size
#: and mtime; a missing, stale or unreadable cache is rebuilt from the part.
_HASH_CACHE = ".event-id-hashes-v1"
#: The same per part file for the content keys of its rows that came with ids of their own
#: (empty for a part whose rows came without ids): ``<lake>/.event-content-hashes-v1/...``.
_CONTENT_CACHE = ".event-content-hashes-v1"
CACHE_FOLDERS = (_HASH_CACHE, _CONTENT_CACHE)


def _hash_cache_path(lake_dir: Path, part: Path, root: str = _HASH_CACHE) -> Path:
    return lake_dir / root / part.parent.name / f"{part.name}.npz"


def part_cache_paths(lake_dir: Path, part: Path) -> list[Path]:
    """Every hash cache of ``part`` (to delete with the part)."""
    return [_hash_cache_path(lake_dir, part, root) for root in CACHE_FOLDERS]


def _part_stamp(part: Path) -> np.ndarray:
    stat = part.stat()
    return np.array([stat.st_size, stat.st_mtime_ns], np.int64)


def _cached(lake_dir: Path, part: Path, root: str) -> tuple[np.ndarray, np.ndarray] | None:
    cache = _hash_cache_path(lake_dir, part, root)
    if cache.exists():  # (the ingest lock keeps other writers out meanwhile)
        try:
            with np.load(cache) as saved:
                if np.array_equal(saved["stamp"], _part_stamp(part)):
                    return saved["h1"], saved["h2"]
        except Exception as exc:  # a torn or foreign file: rebuild it
            logger.warning("event hash cache %s unreadable (%s): rebuilding it", cache, exc)
    return None


def _part_hashes(lake_dir: Path, part: Path) -> tuple[np.ndarray, np.ndarray]:
    """(h1, h2) of ``part``'s event ids, sorted by h1: cached, or read, hashed and cached."""
    cached = _cached(lake_dir, part, _HASH_CACHE)
    if cached is not None:
        return cached
    h1, h2 = hash_event_ids(pq.read_table(part, columns=["event_id"]).column("event_id"))
    return cache_part_hashes(lake_dir, part, h1, h2)


def _part_contents(lake_dir: Path, part: Path) -> tuple[np.ndarray, np.ndarray]:
    """(k1, k2) of the content keys of ``part``'s rows with ids of their own: cached, or
    computed and cached (only the ``event_id`` column is read when no row has an own id)."""
    cached = _cached(lake_dir, part, _CONTENT_CACHE)
    if cached is not None:
        return cached
    explicit = own_ids(pq.read_table(part, columns=["event_id"]).column("event_id"))
    if explicit.any():
        table = pq.read_table(
            part, columns=list(CONTENT_COLUMNS), schema=LAKE_SCHEMA
        )  # a column an old part lacks reads as nulls
        k1, k2 = hash_event_ids(content_keys(table.filter(pa.array(explicit))))
    else:
        k1 = k2 = np.zeros(0, np.uint64)
    return cache_part_hashes(lake_dir, part, k1, k2, root=_CONTENT_CACHE)


def cache_part_keys(lake_dir: Path, part: Path, keys: EventKeys) -> None:
    """Save both caches of a part just written with the rows of ``keys``."""
    cache_part_hashes(lake_dir, part, keys.h1, keys.h2)
    cache_part_hashes(
        lake_dir, part, keys.k1[keys.explicit], keys.k2[keys.explicit], root=_CONTENT_CACHE
    )


def cache_part_hashes(
    lake_dir: Path, part: Path, h1: np.ndarray, h2: np.ndarray, *, root: str = _HASH_CACHE
) -> tuple[np.ndarray, np.ndarray]:
    """Sort (h1, h2) by h1 and save them as ``part``'s cache (atomically; a lake we cannot
    write to only loses the speed-up). Returns the sorted pair."""
    order = np.argsort(h1, kind="stable")
    h1, h2 = h1[order], h2[order]
    cache = _hash_cache_path(lake_dir, part, root)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            np.savez(handle, h1=h1, h2=h2, stamp=_part_stamp(part))
        os.replace(tmp, cache)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        logger.warning("cannot cache the event hashes of %s: %s", part, exc)
    return h1, h2


def _prune_hash_cache(lake_dir: Path, parts: list[Path]) -> None:
    """Delete the caches (and leftover temporary files) of part files no longer in the lake."""
    for name in CACHE_FOLDERS:
        root = lake_dir / name
        if not root.is_dir():
            continue
        wanted = {_hash_cache_path(lake_dir, part, name) for part in parts}
        for path in root.glob("*/*"):
            if path not in wanted:
                path.unlink(missing_ok=True)


def load_lake_index(lake_dir: Path) -> tuple[EventIdIndex, pd.Timestamp | None]:
    """The ids (and own-id content keys) already in the lake (every date) and its watermark
    (newest event time)."""
    index = EventIdIndex()
    parts = lake_part_files(lake_dir)
    for target, load in ((index, _part_hashes), (index.contents, _part_contents)):
        hashes = [load(lake_dir, part) for part in parts]
        if hashes:  # one sort of everything (sorted runs: the stable sort merges them)
            target.add(
                np.concatenate([h[0] for h in hashes]), np.concatenate([h[1] for h in hashes])
            )
        del hashes
    _prune_hash_cache(lake_dir, parts)
    watermark = newest_event(parts)
    logger.info(
        "lake index: %d event ids and %d content keys of events with their own ids "
        "in %d part files, watermark %s",
        len(index),
        len(index.contents),
        len(parts),
        watermark,
    )
    return index, watermark
