"""The erasure tombstone: keyed hashes of the users forgotten on request, consulted at ingest.

Forgetting a user (:mod:`pipeline.lake.erasure`) removes their rows from the lake, but the
landing files are the CMS's export and stay where they are, and an export may be sent again:
without a record, the next ingest would bring the user back (their event ids are no longer in
the lake's index). The tombstone is that record, without keeping the ids themselves:

    lake/_erased/salt            32 random bytes (hex), made once per lake, mode 0600
    lake/_erased/tombstone.txt   one HMAC-SHA256(salt, user id as the CMS sends it) per line

so the file says nothing about who was forgotten to someone without the salt (and even with
it, an id must be guessed to be tested). Ingest drops a row whose ``user_id`` matches, before
pseudonymisation, validation and quarantine (the id is never written anywhere), and counts it
(``rows_erased``). The tombstone holds the CMS's ids (not the pseudonyms the lake stores), so
it does not depend on the pseudonymisation key and survives a key rotation; a publish finds
no pseudonym mapping for an erased user (their row is deleted) and serves them nothing.
Losing the salt makes the tombstone useless: back up ``_erased/`` with the
lake. Files are written with :func:`~pipeline.lake.storage.durable_write` under the ingest lock.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.files import write_once
from pipeline.lake.storage import durable_write

logger = logging.getLogger(__name__)

ERASED_DIR = "_erased"
#: What an erased user's entry in a run's id map becomes: ``__erased__:<code>`` (unique, so
#: the map stays valid and every other code keeps its meaning).
ERASED_PREFIX = "__erased__:"
SALT_FILE = "salt"
TOMBSTONE_FILE = "tombstone.txt"


def erased_dir(lake_root: Path) -> Path:
    return lake_root / ERASED_DIR


class Tombstone:
    """The keyed hashes of the erased users of one lake (empty when none was erased)."""

    def __init__(self, salt: bytes | None = None, digests: Iterable[str] = ()) -> None:
        self._salt = salt
        self._digests = frozenset(digests)

    def __len__(self) -> int:
        return len(self._digests)

    def __bool__(self) -> bool:
        return bool(self._digests)

    @classmethod
    def load(cls, lake_root: Path) -> Tombstone:
        """The lake's tombstone; empty (and nothing created) when no user was erased."""
        folder = erased_dir(lake_root)
        path = folder / TOMBSTONE_FILE
        if not path.exists():
            return cls()
        salt = _read_salt(folder)
        if salt is None:
            raise RuntimeError(
                f"{path} exists but its salt {folder / SALT_FILE} is missing: "
                "restore it from the lake's backup (without it, erased users "
                "cannot be recognised at ingest)"
            )
        digests = [line.strip() for line in path.read_text(encoding="ascii").splitlines()]
        return cls(salt, (d for d in digests if d))

    def digest(self, stored_id: str) -> str:
        if self._salt is None:
            raise RuntimeError("a tombstone without a salt has no digests")
        return hmac.new(self._salt, stored_id.encode("utf-8"), hashlib.sha256).hexdigest()

    def matches(self, values: pd.Series | np.ndarray) -> np.ndarray:
        """True where a value (a stored user id) is in the tombstone; nulls never match.
        Each distinct value is hashed once."""
        array = np.asarray(values, dtype=object)
        out = np.zeros(len(array), dtype=bool)
        if not self._digests or not len(array):
            return out
        codes, uniques = pd.factorize(pd.Series(array, dtype=object), use_na_sentinel=True)
        hit = np.array(
            [isinstance(u, str) and self.digest(u) in self._digests for u in uniques], dtype=bool
        )
        known = codes >= 0
        out[known] = hit[codes[known]]
        return out

    def drop_rows(self, *frames: pd.DataFrame) -> tuple[list[pd.DataFrame], int]:
        """``frames`` without the rows of erased users (by ``user_id``), and how many rows
        were dropped in all."""
        out, dropped = [], 0
        for frame in frames:
            if not self._digests or not len(frame) or "user_id" not in frame:
                out.append(frame)
                continue
            hit = self.matches(frame["user_id"].to_numpy(dtype=object, na_value=None))
            dropped += int(hit.sum())
            out.append(frame[~hit] if hit.any() else frame)
        return out, dropped


def add_to_tombstone(lake_root: Path, stored_ids: Iterable[str]) -> tuple[Tombstone, int]:
    """Add ``stored_ids`` to the lake's tombstone (creating the salt on first use); returns
    the new tombstone and how many ids were not in it yet. The caller holds the ingest lock."""
    folder = erased_dir(lake_root)
    salt = _read_salt(folder) or _create_salt(folder)
    current = Tombstone.load(lake_root) if (folder / TOMBSTONE_FILE).exists() else Tombstone(salt)
    digests = set(current._digests)
    before = len(digests)
    digests.update(current.digest(i) for i in stored_ids)
    added = len(digests) - before
    if added:
        text = "".join(f"{d}\n" for d in sorted(digests)).encode("ascii")
        durable_write(folder / TOMBSTONE_FILE, lambda fh: fh.write(text))
        logger.info("tombstone: %d user(s) added, %d in all", added, len(digests))
    return Tombstone(salt, digests), added


def request_key(lake_root: Path, stored_ids: Iterable[str]) -> str:
    """A keyed hash of a set of ids (creating the lake's salt on first use): names an
    erasure's journal, so that a retry with the same ids finds it, without writing the ids."""
    folder = erased_dir(lake_root)
    salt = _read_salt(folder) or _create_salt(folder)
    text = "\n".join(sorted(set(stored_ids))).encode("utf-8")
    return hmac.new(salt, b"request\n" + text, hashlib.sha256).hexdigest()


def _read_salt(folder: Path) -> bytes | None:
    path = folder / SALT_FILE
    if not path.exists():
        return None
    return bytes.fromhex(path.read_text(encoding="ascii").strip())


def _create_salt(folder: Path) -> bytes:
    """32 random bytes, written once (0600); a concurrent creator's salt wins."""
    write_once(folder / SALT_FILE, secrets.token_hex(32) + "\n")
    salt = _read_salt(folder)
    assert salt is not None
    return salt


def without_erased_users(users: pd.DataFrame | None, lake_root: Path) -> pd.DataFrame | None:
    """``users`` (the side file ``landing/users.csv``, the CMS's export, which stays as it
    is) without the rows of users forgotten on request, so that their attributes never reach
    a model, a bundle or a report again."""
    if users is None:
        return None
    tombstone = Tombstone.load(lake_root)
    (kept,), dropped = tombstone.drop_rows(users)
    if dropped:
        logger.info("users.csv: %d row(s) of users erased on request left out", dropped)
    return kept.reset_index(drop=True) if dropped else kept


def served_user_ids(user_ids: np.ndarray, lake_root: Path) -> np.ndarray:
    """The ids a publish may serve, of a run's user id map: without the entries an erasure
    blanked (:data:`ERASED_PREFIX`: a rollback republishing an old run) and without users in
    the tombstone (a run that read its snapshot before an erasure and publishes after it)."""
    ids = np.asarray(user_ids, dtype=object)
    keep = np.array(
        [not (isinstance(u, str) and u.startswith(ERASED_PREFIX)) for u in ids], dtype=bool
    )
    tombstone = Tombstone.load(lake_root)
    if tombstone:
        keep &= ~tombstone.matches(ids)
    if not keep.all():
        logger.info("publish: %d erased user(s) of the run left out", int((~keep).sum()))
        return ids[keep]
    return ids
