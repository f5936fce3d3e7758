"""User ids as the CMS knows them, and as the pipeline stores them (keyed pseudonyms).

The CMS asks to forget a user by *its* id (the id it serves lists for). Inside the pipeline,
the lake, the quarantine, the run folders, the model bundles and the served-list history hold
the id *as stored*: with a key configured (``RECS_PSEUDONYM_KEY`` or
``RECS_PSEUDONYM_KEY_FILE``, :attr:`~pipeline.core.config.Settings.pseudonym_key`), a keyed
pseudonym given at ingest, ``ps_`` + the first :data:`PSEUDONYM_HEX_CHARS` hex digits of
HMAC-SHA256(key, canonical id); without one, the CMS id itself (logged once as a warning).
Every "CMS id -> stored id" conversion goes through :func:`stored_user_id` or
:class:`Pseudonymiser` (the same function, vectorised: each distinct id is hashed once).

The way back (pseudonym -> CMS id) is not computable: it lives only in the serving DB's
``user_pseudonyms`` table (:mod:`pipeline.serving.pseudonyms`), written at ingest and applied
at publish, so the view keeps the CMS's ids (its contract).

An id that already has a pseudonym's form (``ps_`` + 32 lowercase hex digits) is taken as
stored and never hashed twice: a quarantine file copied back into the landing folder (a
backfill), or a landing file written from the lake, keeps its ids. A CMS whose own ids have
that exact form must not turn pseudonymisation on (the README says so).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections.abc import Iterable

import numpy as np
import pandas as pd

from pipeline.core.config import (
    DEFAULT_USER,
    KEY_ENV,
    KEY_FILE_ENV,
    check_key,
)

logger = logging.getLogger(__name__)

#: Longest id the lake accepts (longer ones are quarantined at ingest, see the README).
MAX_USER_ID_LENGTH = 512

#: Every pseudonym starts with this, so that one is recognised (and never hashed again).
PSEUDONYM_PREFIX = "ps_"
#: Hex digits of the HMAC kept: 128 bits, so that two of a billion users collide with a
#: probability near 1e-21, in 35 characters per id.
PSEUDONYM_HEX_CHARS = 32
PSEUDONYM_LENGTH = len(PSEUDONYM_PREFIX) + PSEUDONYM_HEX_CHARS
_PSEUDONYM_RE = re.compile(rf"^{PSEUDONYM_PREFIX}[0-9a-f]{{{PSEUDONYM_HEX_CHARS}}}$")

_warned_no_key = False


def canonical_id(value: object) -> str:
    """The canonical text of an id, as ingest normalises it: integers and integral floats
    print as integers (``196``, ``196.0`` and ``"196"`` are one user), text as is."""
    if isinstance(value, bool):
        raise TypeError("a boolean is not a user id")
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if float(value).is_integer():
            return str(int(value))
        return repr(float(value))
    return str(value)


def is_pseudonym(value: object) -> bool:
    """True when ``value`` has a pseudonym's form (``ps_`` + 32 lowercase hex digits)."""
    return isinstance(value, str) and _PSEUDONYM_RE.match(value) is not None


def pseudonym_mask(values: pd.Series | np.ndarray | Iterable[object]) -> np.ndarray:
    """Per value, :func:`is_pseudonym`; each distinct value is tested once."""
    array = (
        values.to_numpy(dtype=object)
        if isinstance(values, pd.Series)
        else np.asarray(
            list(values) if not isinstance(values, np.ndarray) else values, dtype=object
        )
    )
    if not len(array):
        return np.zeros(0, dtype=bool)
    codes, uniques = pd.factorize(array, use_na_sentinel=True)
    hit = np.array([is_pseudonym(u) for u in uniques], dtype=bool)
    out = np.zeros(len(array), dtype=bool)
    known = codes >= 0
    out[known] = hit[codes[known]]
    return out


def pseudonym(user_id: object, key: bytes) -> str:
    """The keyed pseudonym of ``user_id`` (its canonical text): ``ps_`` + the first
    :data:`PSEUDONYM_HEX_CHARS` hex digits of HMAC-SHA256(key, UTF-8 text). An id that is
    already a pseudonym is returned as is."""
    text = canonical_id(user_id)
    if is_pseudonym(text):
        return text
    digest = hmac.new(key, text.encode("utf-8"), hashlib.sha256).hexdigest()
    return PSEUDONYM_PREFIX + digest[:PSEUDONYM_HEX_CHARS]


def stored_user_id(cms_user_id: object, key: bytes | None = None) -> str:
    """The id under which the pipeline stores the CMS's ``cms_user_id``: its pseudonym with a
    ``key`` (:attr:`~pipeline.core.config.Settings.pseudonym_key`), else the id itself.

    This is the ONE place that maps a CMS id to the id in the lake, quarantine, run folders
    and served-list history (ingest through :class:`Pseudonymiser`, erasure and the ingest
    tombstone through this function)."""
    return pseudonym(cms_user_id, key) if key else canonical_id(cms_user_id)


def warn_no_key() -> None:
    """Say once per process that user ids are stored as the CMS sends them."""
    global _warned_no_key
    if not _warned_no_key:
        _warned_no_key = True
        logger.warning(
            "no pseudonymisation key (%s / %s): user ids are stored as the CMS "
            "sends them (see the README, 'Pseudonymised ids')",
            KEY_ENV,
            KEY_FILE_ENV,
        )


class Pseudonymiser:
    """:func:`pseudonym` over a column: each distinct id is hashed once (factorised first),
    so ingest pays one HMAC per user per chunk, not per event."""

    def __init__(self, key: bytes) -> None:
        self._key = check_key(key)

    def __repr__(self) -> str:  # never the key
        return "Pseudonymiser(<key>)"

    def __call__(self, values: pd.Series) -> tuple[pd.Series, pd.DataFrame]:
        """``values`` with every non-null id replaced by its pseudonym (same index and
        dtype), and the pairs ``pseudonym, user_id`` (one per distinct id newly hashed; ids
        already in a pseudonym's form give none)."""
        codes, uniques = pd.factorize(values, use_na_sentinel=True)
        originals = [canonical_id(u) for u in np.asarray(uniques, dtype=object)]
        hashed = np.array([pseudonym(u, self._key) for u in originals], dtype=object)
        out = np.full(len(values), None, dtype=object)
        known = codes >= 0
        out[known] = hashed[codes[known]]
        result = pd.Series(
            out,
            index=values.index,
            dtype=values.dtype if isinstance(values.dtype, pd.StringDtype) else object,
        )
        fresh = hashed != np.array(originals, dtype=object)
        pairs = pd.DataFrame(
            {
                "pseudonym": hashed[fresh].astype(object),
                "user_id": np.array(originals, dtype=object)[fresh],
            }
        )
        return result, pairs

    def frame(
        self, frame: pd.DataFrame, column: str = "user_id"
    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        """``frame`` with ``column`` pseudonymised, and the pairs (see ``__call__``)."""
        if column not in frame or not len(frame):
            return frame, pd.DataFrame(
                {"pseudonym": pd.Series(dtype=object), "user_id": pd.Series(dtype=object)}
            )
        values, pairs = self(frame[column])
        out = frame.copy()
        out[column] = values
        return out, pairs


def pseudonymiser_for(key: bytes | None) -> Pseudonymiser | None:
    """A :class:`Pseudonymiser` for ``key``, or None (and the one-time warning) without."""
    if not key:
        warn_no_key()
        return None
    return Pseudonymiser(key)


def check_user_ids(user_ids: Iterable[object]) -> list[str]:
    """The ids to forget, validated: text, not blank, no control character, at most
    :data:`MAX_USER_ID_LENGTH` characters, not a fallback list (``__default__...``);
    duplicates removed, order kept. Raises ValueError (naming the position, never echoing a
    whole list of ids) when one is unusable or the list is empty."""
    checked: dict[str, None] = {}
    for number, value in enumerate(user_ids, 1):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"user id #{number} is not a non-empty string")
        if value != value.strip():
            raise ValueError(
                f"user id #{number} has surrounding spaces (ids are matched "
                "exactly: pass the id as the CMS stores it)"
            )
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
            raise ValueError(f"user id #{number} holds a control character")
        if len(value) > MAX_USER_ID_LENGTH:
            raise ValueError(f"user id #{number} is longer than {MAX_USER_ID_LENGTH} characters")
        if value == DEFAULT_USER or value.startswith(f"{DEFAULT_USER}:"):
            raise ValueError(
                f"user id #{number} is a fallback list ({DEFAULT_USER}...), not a user"
            )
        checked[value] = None
    if not checked:
        raise ValueError("no user id to forget")
    return list(checked)


def key_fingerprint(key: bytes) -> str:
    """A short public name for a key (an HMAC of a fixed text under it): tells two keys apart
    without revealing either."""
    return hmac.new(key, b"recs:pseudonym-key-fingerprint", hashlib.sha256).hexdigest()[:16]
