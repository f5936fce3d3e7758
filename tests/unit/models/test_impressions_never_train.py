"""Impressions (weight 0) are never a positive training signal: ALS and the two-stage model
fitted on a log plus many impressions recommend exactly what they recommend without them, the
holdout truth and the consumed filter are unchanged; configured with a positive weight, they
do train."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import DEFAULT_EVENT_WEIGHTS
from pipeline.core.ids import EncodedEvents
from pipeline.features.matrix import build_matrix
from pipeline.features.popularity import popular_items
from pipeline.lake.demo.synthetic import generate_clickstream
from pipeline.models.als import AlsRecommender
from pipeline.models.twostage import TwoStageRecommender, window_truth

CUTOFF = dt.datetime(2024, 1, 25, tzinfo=dt.timezone.utc)
PARAMS = dict(
    factors=8,
    iterations=3,
    label_days=5,
    label_windows=2,
    n_estimators=20,
    n_als=20,
    n_knn=20,
    n_popular=10,
    random_state=3,
)


def _with_impressions(events: pd.DataFrame, per_event: int = 5, seed: int = 2) -> pd.DataFrame:
    """Each event's user shown ``per_event`` random items (positions 1..) in the same second,
    plus users and items seen only in impressions; a snapshot's order."""
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
def world():
    data = generate_clickstream(n_users=100, n_items=50, n_days=30, start="2024-01-01", seed=4)
    without = data.events.sort_values(["timestamp", "event_id"], kind="stable")
    return data, without.reset_index(drop=True), _with_impressions(without)


def _als_lists(events: pd.DataFrame, weights, users) -> pd.DataFrame:
    encoded = EncodedEvents.from_frame(events, weights).before(CUTOFF)
    matrix = build_matrix(
        encoded.frame, weights, np.arange(len(encoded.users)), np.arange(len(encoded.items))
    )
    matrix = matrix.relabel(encoded.users.ids, encoded.items.ids)
    popular = popular_items(encoded.decoded(), CUTOFF, 10)
    model = AlsRecommender(factors=8, iterations=5, random_state=1).fit(matrix, popular)
    return model.recommend(users, 5)


def test_als_recommends_the_same_with_and_without_impressions(world):
    _, without, with_imp = world
    users = sorted(without.loc[without["timestamp"] < CUTOFF, "user_id"].unique())
    plain = _als_lists(without, DEFAULT_EVENT_WEIGHTS, users)
    shown = _als_lists(with_imp, DEFAULT_EVENT_WEIGHTS, users)
    pd.testing.assert_frame_equal(plain, shown)
    assert not shown["item_id"].eq("seen-only-item").any()
    # configured to count, the impressions do train (and change the lists)
    counted = _als_lists(with_imp, {**DEFAULT_EVENT_WEIGHTS, "impression": 1.0}, users)
    assert not counted[["item_id", "score"]].equals(plain[["item_id", "score"]])


def test_two_stage_model_holdout_truth_and_consumed_pairs_ignore_impressions(world):
    from pipeline.serving.rules import build_consumed

    data, without, with_imp = world
    fitted = []
    for events in (without, with_imp):
        encoded = EncodedEvents.from_frame(events, DEFAULT_EVENT_WEIGHTS)
        model = TwoStageRecommender(**PARAMS).fit(
            encoded, CUTOFF, DEFAULT_EVENT_WEIGHTS, data.items, data.users
        )
        fitted.append((encoded, model))
    (plain_events, plain), (shown_events, shown) = fitted
    users = list(plain.matrix_.user_ids) + ["seen-only-user", "nobody"]
    pd.testing.assert_frame_equal(plain.recommend(users, 5), shown.recommend(users, 5))
    assert plain.training_["pairs"] == shown.training_["pairs"]
    assert plain.training_["positives"] == shown.training_["positives"]
    end = CUTOFF + dt.timedelta(days=5)
    truth = [
        window_truth(enc.frame, CUTOFF, end, model.matrix_, model.weights_) for enc, model in fitted
    ]
    assert (truth[0] != truth[1]).nnz == 0 and truth[0].nnz > 0
    pd.testing.assert_frame_equal(build_consumed(plain_events), build_consumed(shown_events))
