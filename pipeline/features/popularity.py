"""Recent popularity: the fallback list, the cold-start list and the baseline to beat."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd

#: (days, phrase) windows tried in order until the list is full; ``None`` means all time.
WINDOWS: tuple[tuple[int | None, str], ...] = (
    (7, "this week"),
    (30, "this month"),
    (None, "overall"),
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
        counts = (
            window.groupby("item_id", observed=True)["user_id"]
            .nunique()
            .rename("users")
            .reset_index()
        )
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
