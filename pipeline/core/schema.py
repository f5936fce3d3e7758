"""The interaction-event contract (see README, "Event contract")."""

from __future__ import annotations

import re

REQUIRED_COLUMNS: tuple[str, ...] = ("user_id", "item_id", "event_type", "timestamp")
OPTIONAL_COLUMNS: tuple[str, ...] = (
    "event_id",
    "value",
    "device",
    "session_id",
    "consent",
    "position",
    "placement",
)
#: The interaction columns of every event (what models, features and the demos build on).
EVENT_COLUMNS: tuple[str, ...] = (
    "event_id",
    "user_id",
    "item_id",
    "event_type",
    "timestamp",
    "value",
    "device",
    "session_id",
)
#: The CMS feedback columns (README, "Event contract"): where an item was shown. Optional in
#: every file; stored in the lake beside :data:`EVENT_COLUMNS` (null when a file lacks them,
#: and in lake part files written before they existed). ``position``: the 1-based rank the
#: item was shown at; ``placement``: the slot's name (``home_recs``).
FEEDBACK_COLUMNS: tuple[str, ...] = ("position", "placement")
DEVICES: tuple[str, ...] = ("desktop", "mobile", "tablet", "tv", "other")

#: pandas dtypes of the event columns of a normalised event frame (the lake stores these plus
#: :data:`FEEDBACK_DTYPES`: see :data:`LAKE_EVENT_DTYPES`).
EVENT_DTYPES: dict[str, str] = {
    "event_id": "string",
    "user_id": "string",
    "item_id": "string",
    "event_type": "string",
    "timestamp": "datetime64[us, UTC]",
    "value": "float64",
    "device": "string",
    "session_id": "string",
}
#: ``position`` is a nullable integer (>= 1), ``placement`` text; both null when absent.
FEEDBACK_DTYPES: dict[str, str] = {
    "position": "Int64",
    "placement": "string",
}
#: What the lake stores per event (snapshots and quarantine files too): the event columns
#: plus the feedback columns.
LAKE_EVENT_COLUMNS: tuple[str, ...] = (*EVENT_COLUMNS, *FEEDBACK_COLUMNS)
LAKE_EVENT_DTYPES: dict[str, str] = {**EVENT_DTYPES, **FEEDBACK_DTYPES}

ITEM_COLUMNS: tuple[str, ...] = (
    "item_id",
    "title",
    "category",
    "published_at",
    "available",
    "price",
)

#: What a landing file may contribute: the lake's columns plus ``consent`` (never stored).
CONTRACT_INPUT_COLUMNS: tuple[str, ...] = (*LAKE_EVENT_COLUMNS, "consent")

#: Column names that look like personal data; such columns are dropped at ingest (as is every
#: column outside the contract) and logged as PII. Matched against the lower-cased name.
PII_NAME_PATTERN = re.compile(
    r"(^|[_\W])(e?_?mail|email_address|ip|ip_?addr(ess)?|ipv[46]|(first|last|full|user|sur|"
    r"given|family)_?name|phone|mobile_?(number|phone)|tel(ephone)?|msisdn|address|street|"
    r"zip(_?code)?|post(al)?_?code|ssn|passport|iban|credit_?card|card_?number|dob|"
    r"birth_?(date|day)|date_?of_?birth|lat(itude)?|lon(gitude)?|geo(location)?|user_?agent|"
    r"cookie|device_?fingerprint)($|[_\W])|^(name|fullname|firstname|lastname|surname|username)$"
)

TRUE_WORDS = frozenset({"true", "t", "1", "yes", "y"})
FALSE_WORDS = frozenset({"false", "f", "0", "no", "n"})


def parse_bool(values):
    """Contract booleans (``consent``, ``available``) from bool, number or text columns.

    Returns a pandas ``boolean`` Series: True/False where the value reads as one (case and
    spaces ignored), NA where it is missing or unreadable; callers decide what NA means.
    """
    import numpy as np
    import pandas as pd

    text = values.astype("string").str.strip().str.lower()
    return pd.Series(
        np.where(text.isin(FALSE_WORDS), False, np.where(text.isin(TRUE_WORDS), True, None)),
        index=values.index,
        dtype="boolean",
    )
