"""The interaction-event contract (see README, "Event contract")."""

from __future__ import annotations

import re

REQUIRED_COLUMNS: tuple[str, ...] = ("user_id", "item_id", "event_type", "timestamp")
OPTIONAL_COLUMNS: tuple[str, ...] = ("event_id", "value", "device", "session_id", "consent")
EVENT_COLUMNS: tuple[str, ...] = (
    "event_id", "user_id", "item_id", "event_type", "timestamp", "value", "device", "session_id",
)
DEVICES: tuple[str, ...] = ("desktop", "mobile", "tablet", "tv", "other")

#: pandas dtypes of a normalised event frame (what the lake stores).
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

ITEM_COLUMNS: tuple[str, ...] = ("item_id", "title", "category", "published_at", "available",
                                  "price")

#: What a landing file may contribute: the event columns plus ``consent`` (never stored).
CONTRACT_INPUT_COLUMNS: tuple[str, ...] = (*EVENT_COLUMNS, "consent")

#: Column names that look like personal data; such columns are dropped at ingest (as is every
#: column outside the contract) and logged as PII. Matched against the lower-cased name.
PII_NAME_PATTERN = re.compile(
    r"(^|[_\W])(e?_?mail|email_address|ip|ip_?addr(ess)?|ipv[46]|(first|last|full|user|sur|"
    r"given|family)_?name|phone|mobile_?(number|phone)|tel(ephone)?|msisdn|address|street|"
    r"zip(_?code)?|post(al)?_?code|ssn|passport|iban|credit_?card|card_?number|dob|"
    r"birth_?(date|day)|date_?of_?birth|lat(itude)?|lon(gitude)?|geo(location)?|user_?agent|"
    r"cookie|device_?fingerprint)($|[_\W])|^(name|fullname|firstname|lastname|surname|username)$")

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
    return pd.Series(np.where(text.isin(FALSE_WORDS), False,
                              np.where(text.isin(TRUE_WORDS), True, None)),
                     index=values.index, dtype="boolean")
