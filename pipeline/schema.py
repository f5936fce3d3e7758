"""The interaction-event contract (see README, "Event contract")."""

from __future__ import annotations

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

ITEM_COLUMNS: tuple[str, ...] = ("item_id", "title", "category", "published_at", "available", "price")
