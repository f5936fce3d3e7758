"""Recent popularity: the fallback list, the cold-start list and the baseline to beat."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd

from pipeline.core.arrays import run_starts

#: (days, phrase) windows tried in order until the list is full; ``None`` means all time.
WINDOWS: tuple[tuple[int | None, str], ...] = (
    (7, "this week"),
    (30, "this month"),
    (None, "overall"),
)


def count_distinct(events: pd.DataFrame, by: str = "item_id", of: str = "user_id") -> pd.Series:
    """Distinct ``of`` per ``by`` value of ``events``, by ``by`` value: what
    ``events.groupby(by)[of].nunique()`` returns (by default, distinct users per item). On
    integer codes, one sort of packed (by, of) keys: ~3x faster than pandas on 11M events."""
    keys, values = events[by].to_numpy(), events[of].to_numpy()
    codes = keys.dtype.kind in "iu" and values.dtype.kind in "iu" and len(keys) > 0
    if not codes or keys.min() < 0 or values.min() < 0:
        return events.groupby(by, observed=True)[of].nunique()
    width = np.int64(values.max()) + 1
    pairs = keys.astype(np.int64) * width + values
    pairs.sort()
    pairs = pairs[np.r_[True, pairs[1:] != pairs[:-1]]]
    key_of = pairs // width
    starts = run_starts(key_of)
    return pd.Series(
        np.diff(np.r_[starts, len(key_of)]),
        index=pd.Index(key_of[starts].astype(keys.dtype), name=by),
        name=of,
    )


def popular_items(
    events: pd.DataFrame, cutoff: dt.datetime, n: int, items: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Top ``n`` items by distinct users, most recent window first, filled from longer ones.

    Returns columns item_id, score (rank-based, from 1.0 down, so it never increases down
    the list even across windows), window, reason ("popular in Drama this week").
    """
    chosen: list[pd.DataFrame] = []
    taken: set[str] = set()
    for days, phrase in WINDOWS:
        if sum(len(c) for c in chosen) >= n:
            break
        window = (
            events
            if days is None
            else events[events["timestamp"] >= cutoff - dt.timedelta(days=days)]
        )
        counts = count_distinct(window).rename("users").reset_index()
        counts = counts[~counts["item_id"].isin(taken)]
        counts = counts.sort_values(["users", "item_id"], ascending=[False, True], kind="stable")
        top = counts.head(n - sum(len(c) for c in chosen)).assign(window=phrase)
        taken.update(top["item_id"])
        chosen.append(top)
    ranked = (
        pd.concat(chosen, ignore_index=True)
        if chosen
        else pd.DataFrame(columns=["item_id", "users", "window"])
    )
    ranked["score"] = (1.0 - np.arange(len(ranked)) / max(len(ranked), 1)).astype("float32")
    ranked["reason"] = _reasons(ranked, items)
    return ranked[["item_id", "score", "window", "reason"]].reset_index(drop=True)


def _reasons(ranked: pd.DataFrame, items: pd.DataFrame | None) -> pd.Series:
    category = pd.Series(pd.NA, index=ranked.index, dtype="string")
    if items is not None and "category" in items:
        lookup = items.drop_duplicates("item_id").set_index("item_id")["category"]
        category = ranked["item_id"].map(lookup).astype("string")
    general = "popular " + ranked["window"]
    specific = "popular in " + category.fillna("") + " " + ranked["window"]
    return specific.where(category.notna() & (category != ""), general).astype("string")
