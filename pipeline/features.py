"""Point-in-time features: RFM and context per user, popularity and age per item.

Every function takes the run's ``cutoff`` and uses only events strictly before it, so a
feature row never sees the future even when the frame passed in holds later events.
"""

from __future__ import annotations

import datetime as dt
import logging

import numpy as np
import pandas as pd

from pipeline.schema import DEVICES

logger = logging.getLogger(__name__)

FREQUENCY_WINDOWS = (7, 30, 90)
POPULARITY_WINDOWS = (1, 7, 30)
DAYPARTS = {"night": (0, 6), "morning": (6, 12), "afternoon": (12, 18), "evening": (18, 24)}


def before(events: pd.DataFrame, cutoff: dt.datetime) -> pd.DataFrame:
    """The events strictly before ``cutoff``."""
    return events[events["timestamp"] < cutoff]


def build_user_features(events: pd.DataFrame, cutoff: dt.datetime) -> pd.DataFrame:
    """One row per user: recency, frequency per window, monetary, device and time profile."""
    events = before(events, cutoff)
    by_user = events.groupby("user_id", observed=True)
    age_days = (cutoff - events["timestamp"]).dt.total_seconds() / 86400.0
    frame = pd.DataFrame({
        "recency_days": (cutoff - by_user["timestamp"].max()).dt.total_seconds() / 86400.0,
        "tenure_days": (cutoff - by_user["timestamp"].min()).dt.total_seconds() / 86400.0,
        "events_total": by_user.size(),
        "items_distinct": by_user["item_id"].nunique(),
        "monetary": by_user["value"].sum(min_count=0).fillna(0.0),
    })
    for days in FREQUENCY_WINDOWS:
        recent = events[age_days <= days].groupby("user_id", observed=True).size()
        frame[f"frequency_{days}d"] = recent.reindex(frame.index, fill_value=0)
    frame = frame.join(_shares(events, events["device"].fillna("other"), "device", DEVICES))
    hours = events["timestamp"].dt.hour
    daypart = pd.Series(pd.NA, index=events.index, dtype="string")
    for name, (lo, hi) in DAYPARTS.items():
        daypart = daypart.mask((hours >= lo) & (hours < hi), name)
    frame = frame.join(_shares(events, daypart, "daypart", tuple(DAYPARTS)))
    weekend = (events["timestamp"].dt.day_of_week >= 5).astype("float64")
    frame["weekend_share"] = weekend.groupby(events["user_id"]).mean()
    frame = frame.join(_session_stats(events))
    frame.index.name = "user_id"
    return frame.reset_index().sort_values("user_id", kind="stable").reset_index(drop=True)


def build_item_features(events: pd.DataFrame, cutoff: dt.datetime,
                        items: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per item: distinct users per window, trend, age since first seen, category."""
    events = before(events, cutoff)
    by_item = events.groupby("item_id", observed=True)
    frame = pd.DataFrame({"users_total": by_item["user_id"].nunique(),
                          "first_seen_days": (cutoff - by_item["timestamp"].min())
                          .dt.total_seconds() / 86400.0})
    for days in POPULARITY_WINDOWS:
        recent = events[events["timestamp"] >= cutoff - dt.timedelta(days=days)]
        counts = recent.groupby("item_id", observed=True)["user_id"].nunique()
        frame[f"popularity_{days}d"] = counts.reindex(frame.index, fill_value=0)
    # Trend: last week's daily rate against the 30-day daily rate (1.0 = steady).
    frame["trend"] = ((frame["popularity_7d"] / 7.0 + 1e-3)
                      / (frame["popularity_30d"] / 30.0 + 1e-3)).astype("float64")
    frame.index.name = "item_id"
    frame = frame.reset_index()
    if items is not None and len(items):
        side = items.drop_duplicates("item_id").set_index("item_id")
        if "category" in side:
            frame["category"] = frame["item_id"].map(side["category"]).astype("string")
        if "published_at" in side:
            published = pd.to_datetime(frame["item_id"].map(side["published_at"]), utc=True,
                                       errors="coerce")
            frame["age_days"] = (cutoff - published).dt.total_seconds() / 86400.0
    if "age_days" not in frame:
        frame["age_days"] = frame["first_seen_days"]
    frame["age_days"] = frame["age_days"].fillna(frame["first_seen_days"])
    return frame.sort_values("item_id", kind="stable").reset_index(drop=True)


def _shares(events: pd.DataFrame, labels: pd.Series, prefix: str, levels: tuple[str, ...]
            ) -> pd.DataFrame:
    counts = pd.crosstab(events["user_id"], labels.astype("string").fillna("other"))
    counts = counts.reindex(columns=list(levels), fill_value=0)
    shares = counts.div(counts.sum(axis=1).replace(0, np.nan), axis=0).fillna(0.0)
    shares.columns = [f"{prefix}_{c}_share" for c in shares.columns]
    return shares


def _session_stats(events: pd.DataFrame) -> pd.DataFrame:
    """Sessions per user and mean events / duration per session (sessions = session_id)."""
    with_session = events[events["session_id"].notna()]
    if with_session.empty:
        return pd.DataFrame(columns=["sessions", "events_per_session", "session_minutes"],
                            dtype="float64")
    per = with_session.groupby(["user_id", "session_id"], observed=True)["timestamp"].agg(
        ["size", "min", "max"])
    per["minutes"] = (per["max"] - per["min"]).dt.total_seconds() / 60.0
    by_user = per.groupby(level="user_id")
    return pd.DataFrame({"sessions": by_user.size(),
                         "events_per_session": by_user["size"].mean(),
                         "session_minutes": by_user["minutes"].mean()})
