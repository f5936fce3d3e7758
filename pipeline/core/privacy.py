"""User ids as the CMS knows them, and as the pipeline stores them.

The CMS asks to forget a user by *its* id (the id it serves lists for). Inside the pipeline,
the lake, the quarantine, the run folders and the served-list history hold the id *as
stored*, which today is the CMS id itself, and tomorrow a keyed pseudonym (issue 15, item 4:
a keyed HMAC applied at ingest). Every "CMS id -> stored id" conversion goes through
:func:`stored_user_id`, so that change is a one-line swap there; the serving DB keeps the CMS
ids (the view's contract), so it is asked with the ids as given.
"""

from __future__ import annotations

from collections.abc import Iterable

from pipeline.core.config import DEFAULT_USER

#: Longest id the lake accepts (longer ones are quarantined at ingest, see the README).
MAX_USER_ID_LENGTH = 512


def stored_user_id(cms_user_id: str) -> str:
    """The id under which the pipeline stores the CMS's ``cms_user_id``: the identity for now.

    This is the ONE place that maps a CMS id to the id in the lake, quarantine, run folders
    and served-list history (erasure and the ingest tombstone use it). When user ids are
    pseudonymised at ingest with a keyed HMAC, return that HMAC here, and nothing else
    changes."""
    return cms_user_id


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
            raise ValueError(f"user id #{number} has surrounding spaces (ids are matched "
                             "exactly: pass the id as the CMS stores it)")
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
            raise ValueError(f"user id #{number} holds a control character")
        if len(value) > MAX_USER_ID_LENGTH:
            raise ValueError(f"user id #{number} is longer than {MAX_USER_ID_LENGTH} characters")
        if value == DEFAULT_USER or value.startswith(f"{DEFAULT_USER}:"):
            raise ValueError(f"user id #{number} is a fallback list ({DEFAULT_USER}...), "
                             "not a user")
        checked[value] = None
    if not checked:
        raise ValueError("no user id to forget")
    return list(checked)
