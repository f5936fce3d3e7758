"""The popularity fallback: windows, fill order, reasons."""

from __future__ import annotations

import datetime as dt

import pandas as pd

from pipeline.features.popularity import popular_items

UTC = dt.timezone.utc


def test_recent_window_first_then_filled_from_longer_windows_with_reasons():
    events = pd.DataFrame(
        {
            "user_id": ["u1", "u2", "u1", "u3", "u4", "u5"],
            "item_id": ["new", "new", "old", "old", "old", "older"],
            "timestamp": pd.to_datetime(
                [
                    "2024-03-29",
                    "2024-03-30",
                    "2024-03-10",
                    "2024-03-11",
                    "2024-03-12",
                    "2023-01-01",
                ],
                utc=True,
            ),
        }
    )
    items = pd.DataFrame({"item_id": ["new", "old"], "category": ["Sports", "News"]})
    top = popular_items(events, dt.datetime(2024, 4, 1, tzinfo=UTC), 3, items)
    assert list(top["item_id"]) == ["new", "old", "older"]
    assert list(top["reason"]) == [
        "popular in Sports this week",
        "popular in News this month",
        "popular overall",
    ]
    assert top["score"].is_monotonic_decreasing and top["score"].iloc[0] == 1.0


def test_count_distinct_is_pandas_nunique_on_codes_and_strings():
    import numpy as np

    from pipeline.features.popularity import count_distinct

    rng = np.random.default_rng(5)
    codes = pd.DataFrame(
        {
            "user_id": rng.integers(0, 50, 2_000).astype(np.int32),
            "item_id": rng.integers(0, 80, 2_000).astype(np.int32),
        }
    )
    for events in (codes, codes.astype(str), codes.head(0)):
        expected = events.groupby("item_id", observed=True)["user_id"].nunique()
        pd.testing.assert_series_equal(count_distinct(events), expected)
        expected = events.groupby("user_id", observed=True)["item_id"].nunique()
        pd.testing.assert_series_equal(count_distinct(events, "user_id", "item_id"), expected)
