"""Two-stage recommender on a small seeded clickstream: contract, cold start, determinism,
point in time, persistence."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.lake.demo.synthetic import generate_clickstream
from pipeline.models.twostage import TwoStageRecommender, _query_ids

CUTOFF = dt.datetime(2024, 2, 1, tzinfo=dt.timezone.utc)
PARAMS = dict(
    factors=8,
    iterations=3,
    label_days=7,
    label_windows=2,
    n_estimators=30,
    n_als=20,
    n_knn=20,
    n_popular=10,
    cold_segment="age_band",
    random_state=3,
)


@pytest.fixture(scope="module")
def data():
    return generate_clickstream(n_users=120, n_items=60, n_days=40, start="2024-01-01", seed=3)


@pytest.fixture(scope="module")
def model(data):
    return TwoStageRecommender(**PARAMS).fit(
        data.events, CUTOFF, items=data.items, users=data.users
    )


def _before(data):
    return data.events[data.events["timestamp"] < CUTOFF]


def test_lists_follow_the_serving_contract(data, model):
    users = sorted(_before(data)["user_id"].unique())[:30]
    lists = model.recommend(users, 5)
    assert list(lists.columns) == ["user_id", "rank", "item_id", "score", "reason", "source"]
    sizes = lists.groupby("user_id")["rank"].agg(["count", "min", "max"])
    assert len(sizes) == 30 and (sizes["count"] == 5).all() and (sizes["max"] == 5).all()
    assert set(lists["source"]) <= {"ranker", "popular"} and (lists["source"] == "ranker").any()
    seen = set(zip(_before(data)["user_id"], _before(data)["item_id"], strict=True))
    assert not any(pair in seen for pair in zip(lists["user_id"], lists["item_id"], strict=True))
    ranked = lists[lists["source"] == "ranker"]
    assert ranked["reason"].str.match(r"^(because you \w+ .+|popular .+)$").all()
    assert (ranked.groupby("user_id")["score"].diff().dropna() <= 0).all()


def test_cold_users_get_their_segment_list(data, model):
    lists = model.recommend(["u5", "nobody"], 5)  # u5 has a users.csv row but we pretend cold
    stranger = lists[lists["user_id"] == "nobody"]
    assert (stranger["source"] == "popular").all()
    assert stranger["item_id"].tolist() == model.default_list(5)["item_id"].tolist()
    assert model.default_list(5)["reason"].str.startswith("popular").all()
    assert list(model.popular_.columns) == ["item_id", "score", "reason"]


def test_min_history_sends_light_users_to_the_cold_list(data):
    light = TwoStageRecommender(**{**PARAMS, "min_history": 10_000}).fit(
        data.events, CUTOFF, items=data.items, users=data.users
    )
    lists = light.recommend(sorted(_before(data)["user_id"].unique())[:5], 5)
    assert (lists["source"] == "popular").all()


def test_same_data_and_seed_same_lists_and_fingerprint(data, model):
    users = sorted(_before(data)["user_id"].unique())[:40]
    again = TwoStageRecommender(**PARAMS).fit(
        data.events, CUTOFF, items=data.items, users=data.users
    )
    pd.testing.assert_frame_equal(model.recommend(users, 5), again.recommend(users, 5))
    assert model.fingerprint() == again.fingerprint()


_FIT_IN_A_FRESH_PROCESS = """
import datetime as dt, sys
from pipeline.lake.demo.synthetic import generate_clickstream
from pipeline.models.twostage import TwoStageRecommender
data = generate_clickstream(n_users=120, n_items=60, n_days=40, start="2024-01-01", seed=3)
model = TwoStageRecommender(**{params}).fit(
    data.events, dt.datetime(2024, 2, 1, tzinfo=dt.timezone.utc), items=data.items,
    users=data.users)
print(model.fingerprint())
"""


@pytest.mark.parametrize("hash_seed", ["0", "12345"])
def test_same_fingerprint_in_a_fresh_process_with_another_hash_seed(model, hash_seed):
    """Nothing depends on Python's per-process string hashing, thread timing or state left
    from earlier fits: a new interpreter (the next nightly run) fits the same model."""
    code = _FIT_IN_A_FRESH_PROCESS.format(params=repr(PARAMS))
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[3],
        env={**os.environ, "PYTHONHASHSEED": hash_seed},
    )
    assert out.stdout.strip().splitlines()[-1] == model.fingerprint()


def test_events_after_the_cutoff_change_nothing(data, model):
    before = _before(data)
    alone = TwoStageRecommender(**PARAMS).fit(before, CUTOFF, items=data.items, users=data.users)
    assert alone.fingerprint() == model.fingerprint()
    assert data.events["timestamp"].max() > CUTOFF  # the fixture does hold later events


def test_save_load_round_trip(tmp_path, data, model):
    users = sorted(_before(data)["user_id"].unique())[:20] + ["nobody"]
    loaded = TwoStageRecommender.load(model.save(tmp_path / "bundle"))
    pd.testing.assert_frame_equal(model.recommend(users, 5), loaded.recommend(users, 5))
    assert loaded.fingerprint() == model.fingerprint()
    assert loaded.get_params() == model.get_params()
    from pipeline.models.bundle import load_recommender

    assert isinstance(load_recommender(tmp_path / "bundle"), TwoStageRecommender)


def test_a_bundle_saved_before_bagging_loads_as_one_ranker(tmp_path, data):
    import json

    single = TwoStageRecommender(
        **{**PARAMS, "n_bags": 1, "bag_budget_pairs": None, "label_halflife_days": None}
    ).fit(_before(data), CUTOFF, items=data.items, users=data.users)
    folder = single.save(tmp_path / "old")
    meta = json.loads((folder / "meta.json").read_text())
    for name in ("n_bags", "bag_budget_pairs", "label_halflife_days"):
        del meta["params"][name]  # written before these parameters existed
    meta["ranker"]["n_trees"] = meta["ranker"]["n_trees"][0]  # a plain count then
    (folder / "meta.json").write_text(json.dumps(meta))
    loaded = TwoStageRecommender.load(folder)
    assert loaded.get_params()["n_bags"] == 1
    assert loaded.get_params()["bag_budget_pairs"] is None
    assert loaded.get_params()["label_halflife_days"] is None
    assert loaded.fingerprint() == single.fingerprint()
    users = sorted(_before(data)["user_id"].unique())[:10]
    pd.testing.assert_frame_equal(loaded.recommend(users, 5), single.recommend(users, 5))


def test_label_windows_weigh_less_the_earlier_they_end():
    model = TwoStageRecommender(label_stride_days=7, label_halflife_days=14)
    # window 1 ends at the cutoff, window w 7 (w - 1) days before
    groups = np.concatenate([_query_ids(w, [row]) for w, row in ((1, 5), (2, 7), (3, 1), (5, 2))])
    np.testing.assert_allclose(model._window_weights(groups), [1.0, 2**-0.5, 0.5, 0.25], rtol=1e-6)
    assert TwoStageRecommender(label_halflife_days=None)._window_weights(groups) is None


def test_a_half_life_changes_the_ranker_not_the_training_pairs(data, model):
    assert model.recipe.label_halflife_days is None  # the default: all windows alike
    weighted = TwoStageRecommender(**{**PARAMS, "label_halflife_days": 7}).fit(
        _before(data), CUTOFF, items=data.items, users=data.users
    )
    assert weighted.ranker_.boosters_raw() != model.ranker_.boosters_raw()
    assert weighted.training_["pairs"] == model.training_["pairs"]


def test_label_users_per_window_are_capped_by_a_seeded_sample(data, model):
    assert model.training_["users"] > 2 * PARAMS["label_windows"]  # the cap matters below
    capped = TwoStageRecommender(**{**PARAMS, "max_label_users": 2}).fit(
        _before(data), CUTOFF, items=data.items, users=data.users
    )
    assert capped.training_["users"] <= 2 * PARAMS["label_windows"]
    assert capped.get_params()["max_label_users"] == 2  # logged, fingerprinted, re-fitted
    # recall and candidate counts are over the sampled users, not every user of the window
    assert capped.training_["candidate_recall"]["candidates"] == pytest.approx(
        capped.training_["pairs"] / capped.training_["users"]
    )
    again = TwoStageRecommender(**{**PARAMS, "max_label_users": 2}).fit(
        _before(data), CUTOFF, items=data.items, users=data.users
    )
    assert again.fingerprint() == capped.fingerprint()


def test_training_reports_recall_and_validation(model):
    assert model.training_["positives"] > 0
    assert 0 < model.training_["candidate_recall"]["all"] <= 1
    assert np.isfinite(model.ranker_.validation_["auc"])
    assert not model.feature_importance().empty
    assert list(model.timings_) == ["encode", "training pairs", "ranker", "stage one", "cold start"]
    assert all(seconds >= 0 for seconds in model.timings_.values())


def test_the_bag_budget_caps_the_bags_of_a_large_training_set(data, model):
    pairs = model.training_["pairs"]
    assert len(model.ranker_.models_) == model.recipe.n_bags  # the default budget is far away
    budgeted = TwoStageRecommender(**{**PARAMS, "bag_budget_pairs": 2 * pairs}).fit(
        _before(data), CUTOFF, items=data.items, users=data.users
    )
    assert len(budgeted.ranker_.models_) == 2


def test_empty_history_is_rejected(data):
    with pytest.raises(ValueError, match="empty"):
        TwoStageRecommender(**PARAMS).fit(
            data.events, dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
        )


def test_encoded_events_and_prebuilt_features_give_the_same_model(data, model):
    """What the nightly does (events encoded once, feature tables built by build_features)
    fits exactly the model a frame of string ids gives."""
    from pipeline.core.config import DEFAULT_EVENT_WEIGHTS
    from pipeline.core.ids import EncodedEvents
    from pipeline.features.tables import FeatureFrames

    encoded = EncodedEvents.from_frame(data.events, DEFAULT_EVENT_WEIGHTS)  # later events too
    frames = FeatureFrames.build(
        encoded.before(CUTOFF).frame, CUTOFF, encoded.items.rekey(data.items, "item_id")
    )
    fitted = TwoStageRecommender(**PARAMS).fit(
        encoded, CUTOFF, items=data.items, users=data.users, features=frames
    )
    users = sorted(_before(data)["user_id"].unique())[:40] + ["nobody"]
    pd.testing.assert_frame_equal(fitted.recommend(users, 5), model.recommend(users, 5))
    assert fitted.matrix_.shape == encoded.shape  # the run's one id space
    late = FeatureFrames(CUTOFF - dt.timedelta(days=1), frames.user, frames.item)
    with pytest.raises(ValueError, match="features as of"):
        TwoStageRecommender(**PARAMS).fit(encoded, CUTOFF, features=late)


def test_serving_als_starts_from_the_newest_label_window_unless_warm_iterations_is_0(data, model):
    """Label windows are fitted oldest first, each ALS starting from the previous one's
    factors, and the serving fit from the newest window's (``warm_iterations`` sweeps); with
    0 every fit is a cold one, the same as fitting stage one alone on the serving matrix."""
    cold = TwoStageRecommender(**{**PARAMS, "warm_iterations": 0}).fit(
        _before(data), CUTOFF, items=data.items, users=data.users
    )

    def alone(fitted):
        snap = fitted.snapshot_
        return fitted._generator().fit(snap.matrix, snap.recent, snap.popular_cols).als_

    for fitted, same in ((cold, True), (model, False)):
        np.testing.assert_array_equal(
            fitted.snapshot_.matrix.confidence.toarray(),
            model.snapshot_.matrix.confidence.toarray(),
        )
        equal = np.array_equal(fitted.generator_.als_.item_factors, alone(fitted).item_factors)
        assert equal is same
    assert model.recipe.warm_iterations == 5 and cold.training_["pairs"] > 0


def _encoded(data):
    from pipeline.core.config import DEFAULT_EVENT_WEIGHTS
    from pipeline.core.ids import EncodedEvents

    return EncodedEvents.from_frame(data.events, DEFAULT_EVENT_WEIGHTS)


def test_a_saved_label_chain_gives_the_fit_at_its_cutoff_the_same_model(tmp_path, data):
    """What the nightly's label_windows task hands train: the same model as fitting alone."""
    from pipeline.models.twostage import LabelChain

    encoded, side = _encoded(data), {"items": data.items, "users": data.users}
    alone = TwoStageRecommender(**PARAMS).fit(encoded, CUTOFF, **side)
    chain = TwoStageRecommender(**PARAMS).label_chain(encoded, CUTOFF, **side)
    assert [start for _, start in alone.label_starts(CUTOFF)] == chain.starts
    loaded = LabelChain.load(chain.save(tmp_path / "chain"))
    assert sorted(loaded.windows) == sorted(chain.windows) == chain.starts
    shared = TwoStageRecommender(**PARAMS).fit(encoded, CUTOFF, chain=loaded, **side)
    assert shared.fingerprint() == alone.fingerprint()
    assert shared.training_ == alone.training_
    with pytest.raises(ValueError, match="another recipe"):
        TwoStageRecommender(**{**PARAMS, "factors": 4}).fit(encoded, CUTOFF, chain=loaded, **side)


def test_a_fit_at_an_earlier_cutoff_reads_the_windows_it_shares_with_the_chain(tmp_path, data):
    """evaluate's fit at the holdout start: windows it shares with train's chain are read,
    the older ones fitted, and the chain's generator at its cutoff is its serving stage one."""
    from pipeline.models.twostage import LabelChain

    encoded, side = _encoded(data), {"items": data.items, "users": data.users}
    holdout = CUTOFF - dt.timedelta(days=PARAMS["label_days"])
    chain = TwoStageRecommender(**PARAMS).label_chain(encoded, CUTOFF, keep=(holdout,), **side)
    assert holdout in chain.generators  # here also the newest window's start
    loaded = LabelChain.load(chain.save(tmp_path / "chain"))
    model = TwoStageRecommender(**PARAMS)
    own = [start for _, start in model.label_starts(holdout)]
    assert own[-1] in chain.starts and own[0] not in chain.starts
    shared = model.fit(encoded, holdout, chain=loaded, **side)
    np.testing.assert_array_equal(
        shared.generator_.als_.item_factors, chain.generators[holdout].als_.item_factors
    )
    np.testing.assert_array_equal(
        shared.generator_.knn_.similarity_.toarray(),
        chain.generators[holdout].knn_.similarity_.toarray(),
    )
    users = sorted(_before(data)["user_id"].unique())[:20]
    lists = shared.recommend(users, 5)
    assert len(lists) == 5 * len(users) and lists["item_id"].notna().all()
    alone = TwoStageRecommender(**PARAMS).fit(encoded, holdout, **side)
    # the same windows and users; the candidates of the shared window differ a little: it
    # was the first of train's chain (a cold ALS), here it follows one more window
    assert shared.training_["users"] == alone.training_["users"]


def test_a_label_windows_sample_depends_on_its_start_not_on_the_fit(data):
    encoded, side = _encoded(data), {"items": data.items, "users": data.users}
    capped = {**PARAMS, "max_label_users": 3}
    late = TwoStageRecommender(**capped).label_chain(encoded, CUTOFF, **side)
    early_cutoff = CUTOFF - dt.timedelta(days=PARAMS["label_days"])
    early = TwoStageRecommender(**capped).label_chain(encoded, early_cutoff, **side)
    (common,) = set(late.windows) & set(early.windows)
    np.testing.assert_array_equal(
        np.unique(late.windows[common].rows), np.unique(early.windows[common].rows)
    )
    assert len(np.unique(late.windows[common].rows)) == 3
