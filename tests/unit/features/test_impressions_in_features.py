"""Impressions (weight 0) never reach the feature tables: RFM frequency / recency /
monetary, sessions, device and day-part shares and item popularity are the same with and
without them, because the run's encoding leaves them out."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import DEFAULT_EVENT_WEIGHTS
from pipeline.core.ids import EncodedEvents
from pipeline.features.matrix import build_matrix
from pipeline.features.popularity import popular_items
from pipeline.features.tables import FeatureFrames, build_feature_tables
from pipeline.lake.demo.synthetic import generate_clickstream

CUTOFF = dt.datetime(2024, 1, 21, tzinfo=dt.timezone.utc)


def _with_impressions(events: pd.DataFrame, per_event: int = 4, seed: int = 1) -> pd.DataFrame:
    """Each event's user shown ``per_event`` random items (positions 1..) in the same second,
    plus a user and an item seen only in impressions; a snapshot's order."""
    rng = np.random.default_rng(seed)
    source = events.iloc[np.repeat(np.arange(len(events)), per_event)].reset_index(drop=True)
    shown = source.assign(
        event_id=[f"imp{k:07d}" for k in range(len(source))],
        event_type="impression",
        item_id=rng.choice(events["item_id"].unique(), len(source)),
        value=np.nan,
        position=np.tile(np.arange(1, per_event + 1), len(events)),
        placement="home_recs",
    )
    shown.loc[:9, "user_id"] = "seen-only-user"
    shown.loc[10:19, "item_id"] = "seen-only-item"
    out = pd.concat([events, shown], ignore_index=True).astype(
        {
            **{c: str(t) for c, t in events.dtypes.items()},
            "position": "Int64",
            "placement": "string",
        }
    )
    return out.sort_values(["timestamp", "event_id"], kind="stable").reset_index(drop=True)


@pytest.fixture(scope="module")
def encoded():
    data = generate_clickstream(n_users=80, n_items=50, n_days=20, start="2024-01-01", seed=11)
    without = data.events.sort_values(["timestamp", "event_id"], kind="stable")
    with_imp = _with_impressions(without)
    assert (with_imp["event_type"] == "impression").sum() == 4 * len(without)
    return (
        EncodedEvents.from_frame(without, DEFAULT_EVENT_WEIGHTS),
        EncodedEvents.from_frame(with_imp, DEFAULT_EVENT_WEIGHTS),
        data.items,
    )


def test_user_and_item_feature_tables_ignore_impressions(encoded):
    without, with_imp, items = encoded
    assert with_imp.left_out["impression"] > 0
    for as_of in (CUTOFF, CUTOFF - dt.timedelta(days=7)):
        plain = FeatureFrames.build(
            without.before(as_of).frame, as_of, without.items.rekey(items, "item_id")
        )
        shown = FeatureFrames.build(
            with_imp.before(as_of).frame, as_of, with_imp.items.rekey(items, "item_id")
        )
        pd.testing.assert_frame_equal(plain.user, shown.user)
        pd.testing.assert_frame_equal(plain.item, shown.item)
    columns = set(plain.user.columns)
    assert {
        "recency_days",
        "frequency_7d",
        "monetary",
        "sessions",
        "device_mobile_share",
    } <= columns


def test_popularity_and_matrix_aligned_features_ignore_impressions(encoded):
    without, with_imp, items = encoded
    for n in (5, 20):
        pd.testing.assert_frame_equal(
            popular_items(without.frame, CUTOFF, n), popular_items(with_imp.frame, CUTOFF, n)
        )
    tables = []
    for enc in (without, with_imp):
        space = (np.arange(len(enc.users)), np.arange(len(enc.items)))
        matrix = build_matrix(enc.frame, DEFAULT_EVENT_WEIGHTS, *space)
        tables.append(
            (
                matrix,
                build_feature_tables(
                    enc.frame,
                    CUTOFF,
                    *space,
                    matrix.confidence,
                    items=enc.items.rekey(items, "item_id"),
                ),
            )
        )
    (plain_matrix, plain), (shown_matrix, shown) = tables
    assert (plain_matrix.confidence != shown_matrix.confidence).nnz == 0
    assert (plain_matrix.strongest != shown_matrix.strongest).nnz == 0
    for name, array in plain.arrays().items():
        np.testing.assert_array_equal(array, shown.arrays()[name], err_msg=name)
    assert plain.user_names == shown.user_names and plain.item_names == shown.item_names
