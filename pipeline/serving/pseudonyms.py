"""The pseudonym mapping in the serving DB: the only way back from a stored id to the CMS's.

With a key (:mod:`pipeline.core.privacy`), the lake, run folders, model bundles and served-list
history hold keyed pseudonyms; the view keeps the CMS's ids (its contract). The pairs
``pseudonym -> user_id`` live in the table ``user_pseudonyms`` (``sql/*/007_pseudonyms.sql``),
which ``cms_reader`` cannot read:

* ingest records each landing file's pairs (:func:`pseudonym_recorder`) before its rows are
  committed, so every pseudonym in the lake has its row;
* publish serves lists computed for pseudonyms under the CMS's ids (:func:`to_cms_ids`);
  experiment assignment hashes the CMS id (a CMS can compute its users' variants itself);
* the demo's simulated CMS writes the CMS's ids to its landing file;
* an erasure deletes a user's row with their lists (the table has a ``user_id`` column);
* a key rotation (:func:`rekey`) maps every stored id through it to the new key's pseudonym.

An id without a pseudonym's form (a lake written before a key was set) is its own CMS id. A
pseudonym without a row (it should not happen: a row is written before its events) is
reported as None; the caller decides (publish skips and counts, see the README).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.config import DEFAULT_USER, Settings, check_key
from pipeline.core.privacy import pseudonym, pseudonym_mask
from pipeline.lake.rekey import rekey_lake
from pipeline.lake.tombstone import ERASED_PREFIX
from pipeline.serving.store import backend_for

logger = logging.getLogger(__name__)

TABLE = "user_pseudonyms"


def record_pseudonyms(
    pairs: pd.DataFrame, *, dsn: str | None, sqlite_path: Path, schema: str | None = None
) -> int:
    """Record ``pseudonym, user_id`` pairs (kept when already there); how many were new."""
    if not len(pairs):
        return 0
    added = backend_for(dsn, sqlite_path, schema).write_pseudonyms(
        pairs[["pseudonym", "user_id"]].drop_duplicates("pseudonym")
    )
    logger.info("pseudonym mapping: %d pair(s) recorded, %d new", len(pairs), added)
    return added


def pseudonym_recorder(
    dsn: str | None, sqlite_path: Path, schema: str | None = None
) -> Callable[[pd.DataFrame], None]:
    """The ``record_pseudonyms`` callback of :func:`pipeline.lake.ingest.ingest_lake`."""

    def record(pairs: pd.DataFrame) -> None:
        record_pseudonyms(pairs, dsn=dsn, sqlite_path=sqlite_path, schema=schema)

    return record


def read_pseudonyms(*, dsn: str | None, sqlite_path: Path, schema: str | None = None) -> pd.Series:
    """Every pair, as a Series ``user_id`` indexed by ``pseudonym``."""
    frame = backend_for(dsn, sqlite_path, schema).read_pseudonyms()
    return pd.Series(
        frame["user_id"].to_numpy(object),
        index=pd.Index(frame["pseudonym"].to_numpy(object), name="pseudonym"),
        name="user_id",
        dtype=object,
    )


def to_cms_ids(
    stored_ids: Iterable[object], *, dsn: str | None, sqlite_path: Path, schema: str | None = None
) -> np.ndarray:
    """The CMS id of each stored id (an object array, same order): a pseudonym through the
    mapping (None when it has no row), any other id as is. The mapping is read only when
    some id is a pseudonym."""
    ids = np.asarray(
        list(stored_ids) if not isinstance(stored_ids, (np.ndarray, pd.Series)) else stored_ids,
        dtype=object,
    )
    out = ids.copy()
    pseudo = pseudonym_mask(ids)
    if pseudo.any():
        mapping = read_pseudonyms(dsn=dsn, sqlite_path=sqlite_path, schema=schema)
        mapped = pd.Series(ids[pseudo]).map(mapping)
        out[pseudo] = mapped.astype(object).where(mapped.notna(), None).to_numpy(object)
    return out


def rekey(
    settings: Settings,
    new_key: bytes,
    *,
    dsn: str | None = None,
    schema: str | None = None,
    dry_run: bool = False,
) -> dict:
    """Rotate the pseudonymisation key: every stored user id of the lake parts, quarantine and
    served-list history becomes the new key's pseudonym of the same CMS id, found through
    ``user_pseudonyms`` (ids in clear, of a lake written before any key, are CMS ids
    themselves; ``__default__...`` and ``__erased__:...`` stay). The new pairs are recorded
    before each file is rewritten; the old pairs are kept (old run folders and model bundles
    still hold old pseudonyms, so a rollback to them still publishes), an erasure deletes
    both. A pseudonym without a row stays as it is and is counted (``unmapped_ids``).

    Idempotent (a retry after a crash finishes the work). The caller then configures
    ``new_key`` everywhere before the next ingest, and runs the nightly (README, "Rotating
    the key"). Returns counts only."""
    new_key = check_key(new_key, "the new key")
    if settings.pseudonym_key is not None and new_key == settings.pseudonym_key:
        raise ValueError("the new key is the key configured now: nothing to rotate")
    store = {"dsn": dsn, "sqlite_path": settings.serving_sqlite_path, "schema": schema}
    mapping = read_pseudonyms(**store)
    unmapped: set[str] = set()
    recorded = 0

    def translate(old: np.ndarray) -> np.ndarray:
        nonlocal recorded
        cms = np.full(len(old), None, dtype=object)
        pseudo = pseudonym_mask(old)
        if pseudo.any():
            found = pd.Series(old[pseudo]).map(mapping)
            cms[pseudo] = found.astype(object).where(found.notna(), None).to_numpy(object)
            unmapped.update(o for o, c in zip(old[pseudo], cms[pseudo], strict=True) if c is None)
        clear = ~pseudo & np.array(
            [
                isinstance(o, str)
                and o != DEFAULT_USER
                and not o.startswith((f"{DEFAULT_USER}:", ERASED_PREFIX))
                for o in old
            ],
            dtype=bool,
        )
        cms[clear] = old[clear]
        new = np.array([None if c is None else pseudonym(c, new_key) for c in cms], dtype=object)
        pairs = pd.DataFrame(
            {
                "pseudonym": [n for n in new if n is not None],
                "user_id": [c for c in cms if c is not None],
            }
        )
        if len(pairs) and not dry_run:  # recorded before the file is rewritten
            recorded += record_pseudonyms(pairs, **store)
        return new

    lake = rekey_lake(settings.lake_events_dir.parent, translate, dry_run=dry_run, new_key=new_key)
    if not dry_run:  # users known to the mapping but absent from the lake now keep theirs
        recorded += record_pseudonyms(
            pd.DataFrame(
                {
                    "pseudonym": [pseudonym(c, new_key) for c in mapping.to_numpy(object)],
                    "user_id": mapping.to_numpy(object),
                }
            ),
            **store,
        )
    if unmapped:
        logger.warning(
            "rekey: %d stored pseudonym(s) have no row in user_pseudonyms and "
            "were left as they are",
            len(unmapped),
        )
    return {
        **lake.to_dict(),
        "pairs_recorded": recorded,
        "unmapped_ids": len(unmapped),
        "dry_run": dry_run,
    }
