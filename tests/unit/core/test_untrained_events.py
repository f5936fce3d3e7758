"""Impressions never train: events of a type weighted 0 are left out when a run's events are
encoded (both encoders), before the id maps; a configured positive weight encodes them."""

from __future__ import annotations

import datetime as dt
import logging

import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import DEFAULT_EVENT_WEIGHTS, Settings, untrained_event_types
from pipeline.core.ids import EncodedEvents, encode_events_file
from pipeline.lake.demo.synthetic import generate_clickstream

CUTOFF = dt.datetime(2024, 1, 21, tzinfo=dt.timezone.utc)


def with_impressions(events: pd.DataFrame, per_event: int = 3, seed: int = 0) -> pd.DataFrame:
    """``events`` plus ``per_event`` impressions per event (the user shown other items at
    positions 1.., in the same second), plus users and items known only from impressions;
    sorted by time then event id (a snapshot's order)."""
    rng = np.random.default_rng(seed)
    items = events["item_id"].unique()
    n = len(events) * per_event
    source = events.iloc[np.repeat(np.arange(len(events)), per_event)]
    shown = pd.DataFrame(
        {
            "event_id": [f"imp{k:07d}" for k in range(n)],
            "user_id": source["user_id"].to_numpy(),
            "item_id": rng.choice(items, n),
            "event_type": "impression",
            "timestamp": source["timestamp"].to_numpy(),
            "value": np.nan,
            "device": source["device"].to_numpy(),
            "session_id": source["session_id"].to_numpy(),
            "position": np.tile(np.arange(1, per_event + 1), len(events)),
            "placement": "home_recs",
        }
    )
    strangers = pd.DataFrame(
        {
            "event_id": [f"imp-only{k}" for k in range(20)],
            "user_id": [f"seen-only-u{k % 5}" for k in range(10)]
            + list(rng.choice(events["user_id"].unique(), 10)),
            "item_id": list(rng.choice(items, 10)) + [f"seen-only-i{k % 3}" for k in range(10)],
            "event_type": "impression",
            "timestamp": events["timestamp"].iloc[rng.integers(0, len(events), 20)].to_numpy(),
            "value": np.nan,
            "device": "mobile",
            "session_id": None,
            "position": np.arange(1, 21),
            "placement": "article_end",
        }
    )
    out = pd.concat(
        [events.assign(position=pd.NA, placement=pd.NA), shown, strangers], ignore_index=True
    )
    out = out.astype(
        {
            **{c: str(t) for c, t in events.dtypes.items()},
            "position": "Int64",
            "placement": "string",
        }
    )
    return out.sort_values(["timestamp", "event_id"], kind="stable").reset_index(drop=True)


@pytest.fixture(scope="module")
def worlds() -> tuple[pd.DataFrame, pd.DataFrame]:
    data = generate_clickstream(n_users=60, n_items=40, n_days=20, start="2024-01-01", seed=5)
    without = data.events.sort_values(["timestamp", "event_id"], kind="stable")
    return without.reset_index(drop=True), with_impressions(data.events)


def _same(a: EncodedEvents, b: EncodedEvents) -> None:
    pd.testing.assert_frame_equal(a.frame.reset_index(drop=True), b.frame.reset_index(drop=True))
    assert a.users == b.users and a.items == b.items


def test_untrained_types_are_those_weighted_zero():
    assert Settings().event_weights["impression"] == 0.0
    assert untrained_event_types(DEFAULT_EVENT_WEIGHTS) == {"impression"}
    assert untrained_event_types({"view": 1.0, "impression": 0.5}) == set()
    assert untrained_event_types({"view": 0, "skip": -1.0, "click": 2}) == {"view", "skip"}


def test_encoding_leaves_impressions_out_before_the_id_maps(worlds, caplog):
    without, with_imp = worlds
    n_imp = int((with_imp["event_type"] == "impression").sum())
    with caplog.at_level(logging.INFO, logger="pipeline.core.ids"):
        encoded = EncodedEvents.from_frame(with_imp, DEFAULT_EVENT_WEIGHTS)
    assert encoded.left_out == {"impression": n_imp}
    assert f"{n_imp} events of types weighted 0 left out" in caplog.text
    _same(encoded, EncodedEvents.from_frame(without, DEFAULT_EVENT_WEIGHTS))
    assert not any(str(u).startswith("seen-only") for u in encoded.users.ids)
    assert not any(str(i).startswith("seen-only") for i in encoded.items.ids)
    assert "impression" not in set(encoded.frame["event_type"].astype(str))
    assert len(encoded) == len(without)


def test_the_file_encoder_leaves_them_out_too_and_matches_the_frame_encoder(
    worlds, tmp_path, caplog
):
    without, with_imp = worlds
    with_imp.to_parquet(tmp_path / "with.parquet", row_group_size=500)  # several row groups
    without.to_parquet(tmp_path / "without.parquet")
    with caplog.at_level(logging.INFO, logger="pipeline.core.ids"):
        written = encode_events_file(
            tmp_path / "with.parquet", tmp_path / "a", DEFAULT_EVENT_WEIGHTS
        )
    n_imp = int((with_imp["event_type"] == "impression").sum())
    assert written.left_out == {"impression": n_imp} and "left out" in caplog.text
    plain = encode_events_file(tmp_path / "without.parquet", tmp_path / "b", DEFAULT_EVENT_WEIGHTS)
    assert plain.left_out == {}
    _same(written, plain)
    _same(written, EncodedEvents.from_frame(without, DEFAULT_EVENT_WEIGHTS))
    _same(EncodedEvents.read(tmp_path / "a"), EncodedEvents.read(tmp_path / "b"))


def test_a_configured_positive_weight_encodes_impressions(worlds, tmp_path):
    _, with_imp = worlds
    settings = Settings(
        data_dir=tmp_path, event_weights={**DEFAULT_EVENT_WEIGHTS, "impression": 0.5}
    )
    assert untrained_event_types(settings.event_weights) == set()
    encoded = EncodedEvents.from_frame(with_imp, settings.event_weights)
    assert encoded.left_out == {} and len(encoded) == len(with_imp)
    impressions = encoded.frame["event_type"] == "impression"
    assert int(impressions.sum()) == int((with_imp["event_type"] == "impression").sum())
    assert (encoded.frame.loc[impressions, "weight"] == 0.5).all()
    assert {"seen-only-u0", "seen-only-i0"} <= set(encoded.users.ids) | set(encoded.items.ids)
    with_imp.to_parquet(tmp_path / "with.parquet")
    _same(
        encode_events_file(tmp_path / "with.parquet", tmp_path / "enc", settings.event_weights),
        encoded,
    )


def test_views_weighted_zero_are_left_out_like_impressions(worlds):
    without, _ = worlds
    weights = {**DEFAULT_EVENT_WEIGHTS, "view": 0.0}
    encoded = EncodedEvents.from_frame(without, weights)
    assert encoded.left_out == {"view": int((without["event_type"] == "view").sum())}
    assert "view" not in set(encoded.frame["event_type"].astype(str))
