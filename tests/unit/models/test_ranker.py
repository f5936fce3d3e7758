"""Ranker: learns a planted rule under both objectives; AUC/PR-AUC; guards; features."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.features.tables import FeatureTables
from pipeline.models.ranker import Ranker, feature_names, held_out_scores, pair_features


def _planted(n_groups=60, per_group=20, seed=0):
    """Label = 1 exactly when feature 0 > 0.8; feature 1 is noise."""
    rng = np.random.default_rng(seed)
    x = rng.random((n_groups * per_group, 2)).astype(np.float32)
    y = (x[:, 0] > 0.8).astype(np.float32)
    groups = np.repeat(np.arange(n_groups), per_group)
    return x, y, groups


@pytest.mark.parametrize("objective", ["binary:logistic", "rank:ndcg"])
def test_learns_the_planted_rule(objective):
    x, y, groups = _planted()
    ranker = Ranker(objective=objective, n_estimators=50, max_depth=2, prior=None).fit(
        x, y, groups, ["signal", "noise"]
    )
    x_new, y_new, _ = _planted(seed=1)
    assert held_out_scores(y_new, ranker.predict(x_new))["auc"] > 0.95
    assert ranker.validation_["auc"] > 0.95
    assert ranker.importances().index[0] == "signal"


def test_prior_margin_alone_ranks_by_the_prior_feature():
    x, y, groups = _planted()
    ranker = Ranker(n_estimators=1, learning_rate=1e-6, prior="signal", max_depth=1).fit(
        x, y, groups, ["signal", "noise"]
    )
    scores = ranker.predict(x)
    order = np.argsort(x[:, 0])
    assert (np.diff(scores[order]) >= 0).all()


def test_same_data_same_model():
    x, y, groups = _planted()
    first = Ranker(n_estimators=20).fit(x, y, groups).predict(x)
    second = Ranker(n_estimators=20).fit(x, y, groups).predict(x)
    assert np.array_equal(first, second)


def test_bagged_scores_are_the_mean_of_the_single_seed_models(tmp_path):
    x, y, groups = _planted()
    x_new = _planted(seed=1)[0]
    bagged = Ranker(objective="rank:ndcg", n_estimators=20, n_bags=3, random_state=5).fit(
        x, y, groups, ["signal", "noise"]
    )
    singles = [
        Ranker(objective="rank:ndcg", n_estimators=20, random_state=seed)
        .fit(x, y, groups, ["signal", "noise"])
        .predict(x_new)
        for seed in (5, 6, 7)
    ]
    np.testing.assert_allclose(
        bagged.predict(x_new), np.mean(singles, axis=0), rtol=1e-5, atol=1e-6
    )
    assert len(bagged.n_trees_) == 3 and len(set(bagged.boosters_raw())) == 3
    files = bagged.save(tmp_path)
    assert files == ["ranker.ubj", "ranker_1.ubj", "ranker_2.ubj"]
    loaded = Ranker(objective="rank:ndcg", n_bags=3, random_state=5).load_model(
        tmp_path, bagged.n_trees_
    )
    loaded.feature_names_ = ["signal", "noise"]
    np.testing.assert_array_equal(loaded.predict(x_new), bagged.predict(x_new))


def test_bags_trained_in_parallel_equal_bags_trained_one_by_one():
    x, y, groups = _planted()
    one_by_one = Ranker(objective="rank:ndcg", n_estimators=20, n_bags=4, bag_workers=1).fit(
        x, y, groups
    )
    parallel = Ranker(objective="rank:ndcg", n_estimators=20, n_bags=4, bag_workers=4).fit(
        x, y, groups
    )
    assert one_by_one.boosters_raw() == parallel.boosters_raw()
    assert one_by_one.n_trees_ == parallel.n_trees_
    np.testing.assert_array_equal(one_by_one.predict(x), parallel.predict(x))


def test_bag_budget_trains_only_the_bags_that_fit():
    x, y, groups = _planted()
    pairs = len(y)
    assert Ranker(n_bags=4, bag_budget_pairs=None).bags_for(pairs) == 4
    assert Ranker(n_bags=4, bag_budget_pairs=2 * pairs + 1).bags_for(pairs) == 2
    assert Ranker(n_bags=4, bag_budget_pairs=pairs // 2).bags_for(pairs) == 1  # at least one
    budgeted = Ranker(
        objective="rank:ndcg", n_estimators=10, n_bags=4, bag_budget_pairs=2 * pairs
    ).fit(x, y, groups)
    two = Ranker(objective="rank:ndcg", n_estimators=10, n_bags=2).fit(x, y, groups)
    assert budgeted.boosters_raw() == two.boosters_raw()


def test_the_model_does_not_depend_on_the_thread_count():
    x, y, groups = _planted(n_groups=200)
    models = [
        Ranker(objective="rank:ndcg", n_estimators=20, n_jobs=threads).fit(x, y, groups)
        for threads in (1, 2, 3)
    ]
    assert models[0].boosters_raw() == models[1].boosters_raw() == models[2].boosters_raw()
    np.testing.assert_array_equal(models[0].predict(x), models[2].predict(x))


def test_held_out_users_are_a_seeded_share_of_the_sorted_distinct_keys():
    rng = np.random.default_rng(0)
    keys = rng.choice(np.array([f"user{k}" for k in range(50)], dtype=object), 400)
    codes = pd.factorize(keys, sort=True)[0]
    for seed in (1, 2, 3):
        held = Ranker(validation_share=0.2)._held_out(codes, seed)
        # the selection models were trained with: a permutation of the sorted distinct ids
        chosen = np.random.default_rng(seed).permutation(np.unique(keys))[:10]
        np.testing.assert_array_equal(held, np.isin(keys, chosen))


@pytest.mark.parametrize("objective", ["binary:logistic", "rank:ndcg"])
def test_unit_weights_change_nothing(objective):
    x, y, groups = _planted()
    plain = Ranker(objective=objective, n_estimators=20).fit(x, y, groups)
    ones = Ranker(objective=objective, n_estimators=20).fit(x, y, groups, weights=np.ones(len(y)))
    assert plain.boosters_raw() == ones.boosters_raw()


@pytest.mark.parametrize("objective", ["binary:logistic", "rank:ndcg"])
def test_query_weights_decide_which_of_two_conflicting_rules_is_learned(objective):
    """Half the queries follow feature 0, half feature 1: the heavily weighted half wins."""
    x, y, groups = _planted(n_groups=80)
    old = groups >= 40
    y = np.where(old, (x[:, 1] > 0.8), (x[:, 0] > 0.8)).astype(np.float32)
    weights = np.where(old, 0.01, 1.0)
    for w, winner in ((weights, "signal"), (1.01 - weights, "noise")):
        ranker = Ranker(objective=objective, n_estimators=30, max_depth=2, prior=None).fit(
            x, y, groups, ["signal", "noise"], weights=w
        )
        assert ranker.importances().index[0] == winner


def test_guards():
    x, y, groups = _planted()
    with pytest.raises(ValueError, match="objective"):
        Ranker(objective="reg:squarederror").fit(x, y, groups)
    with pytest.raises(ValueError, match="positive"):
        Ranker().fit(x, np.zeros_like(y), groups)
    with pytest.raises(ValueError, match="n_bags"):
        Ranker(n_bags=0).fit(x, y, groups)
    with pytest.raises(ValueError, match="positive, one per pair"):
        Ranker().fit(x, y, groups, weights=np.zeros(len(y)))
    with pytest.raises(ValueError, match="same within a query"):
        Ranker().fit(x, y, groups, weights=np.arange(1, len(y) + 1, dtype=float))


def test_held_out_scores_known_answer():
    got = held_out_scores(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    assert got["auc"] == pytest.approx(0.75)
    assert got["pr_auc"] == pytest.approx((1 + 2 / 3) / 2)
    assert np.isnan(held_out_scores(np.array([1, 1]), np.array([0.1, 0.2]))["auc"])


def test_pair_features_gather_the_right_rows_and_columns():
    tables = FeatureTables(
        user=np.array([[1.0], [2.0]], np.float32),
        user_names=("recency_days",),
        item=np.array([[10.0, 5.0], [20.0, 7.0], [30.0, 9.0]], np.float32),
        item_names=("users_total", "age_days"),
        affinity=np.array([[0.25, 0.75], [1.0, 0.0]], np.float32),
        item_category=np.array([0, 1, -1]),
        segment_popularity=np.array([[0.5, 0.1, 0.0], [0.2, 0.2, 0.2]], np.float32),
        user_segment=np.array([[0], [-1]]),
        segment_names=("age_band",),
        item_log_basis=np.array([10.0, 20.0, 30.0], np.float32),
        user_taste=np.array([[1.0, 3.0], [2.0, 4.0]], np.float32),
    )
    pairs = pd.DataFrame(
        {
            "row": [0, 1],
            "item": [1, 2],
            "from_als": 1.0,
            "from_knn": 0.0,
            "from_popular": 0.0,
            "als_rank": 1.0,
            "knn_rank": 101.0,
            "als_score": 0.5,
            "knn_recent": 0.0,
            "knn_all": 0.0,
        }
    )
    x = pd.DataFrame(pair_features(pairs, tables), columns=feature_names(tables))
    assert x["category_affinity"].tolist() == [0.75, 0.0]  # item 2 has no category
    assert x["segment_popularity_age_band"].tolist() == pytest.approx([0.1, 0.2])  # -1 global
    assert x["global_popularity"].tolist() == pytest.approx([0.2, 0.2])
    assert x["item_users_total"].tolist() == [20.0, 30.0]
    assert x["user_recency_days"].tolist() == [1.0, 2.0]
    assert x["age_gap"].tolist() == pytest.approx([7.0 - 3.0, 9.0 - 4.0])
    assert x["popularity_gap"].tolist() == pytest.approx([np.log1p(20) - 1, np.log1p(30) - 2])
