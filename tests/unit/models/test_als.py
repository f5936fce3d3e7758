"""ALS recommender: learns a known block structure, excludes seen items, explains, round-trips."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.features.matrix import build_matrix
from pipeline.models.als import AlsRecommender

WEIGHTS = {"view": 1.0, "purchase": 10.0}


def _two_communities(n_users=40, n_items=20, seed=0):
    """Users 0..19 consume items 0..9, users 20..39 items 10..19; each misses a few."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        block = range(0, n_items // 2) if u < n_users // 2 else range(n_items // 2, n_items)
        for i in block:
            if rng.random() < 0.7:
                rows.append(
                    (f"u{u:02d}", f"i{i:02d}", "view" if rng.random() < 0.8 else "purchase", np.nan)
                )
    return pd.DataFrame(rows, columns=["user_id", "item_id", "event_type", "value"])


def _fit(events, **params):
    popular = pd.DataFrame(
        {
            "item_id": ["i00", "i10", "i01"],
            "score": [1.0, 0.9, 0.8],
            "reason": ["popular this week"] * 3,
        }
    )
    items = pd.DataFrame(
        {"item_id": [f"i{i:02d}" for i in range(20)], "title": [f"Title {i}" for i in range(20)]}
    )
    matrix = build_matrix(events, WEIGHTS)
    defaults = {"factors": 8, "iterations": 10, "regularization": 0.01, "random_state": 1}
    return AlsRecommender(**{**defaults, **params}).fit(matrix, popular, items)


def test_recommends_unseen_items_from_the_users_own_community():
    events = _two_communities()
    model = _fit(events)
    lists = model.recommend(["u00", "u25"], n=3)
    seen = set(zip(events["user_id"], events["item_id"]))
    assert len(lists) == 6 and list(lists["rank"]) == [1, 2, 3, 1, 2, 3]
    assert not any((u, i) in seen for u, i in zip(lists["user_id"], lists["item_id"]))
    top = lists[lists["rank"] == 1].set_index("user_id")["item_id"]
    assert int(top["u00"][1:]) < 10 and int(top["u25"][1:]) >= 10
    assert lists["reason"].str.match(r"because you (viewed|bought) Title \d+").all()
    assert (lists["source"] == "als").all()


def test_unknown_users_and_short_lists_fill_from_popular():
    model = _fit(_two_communities())
    lists = model.recommend(["stranger"], n=2)
    assert list(lists["item_id"]) == ["i00", "i10"]
    assert (lists["source"] == "popular").all()
    assert list(lists["reason"]) == ["popular this week"] * 2
    default = model.default_list(3)
    assert list(default["item_id"]) == ["i00", "i10", "i01"] and list(default["rank"]) == [1, 2, 3]


def test_long_list_runs_log_progress_and_chunks_change_nothing(caplog):
    model = _fit(_two_communities())
    users = [f"u{u:02d}" for u in range(40)]
    whole = model.recommend(users, n=3)
    model.chunk_users, model.progress_seconds = 15, 0.0  # 3 chunks, a line after each
    with caplog.at_level("INFO", logger="pipeline.models.base"):
        chunked = model.recommend(users, n=3)
    pd.testing.assert_frame_equal(chunked, whole)
    progress = [r.getMessage() for r in caplog.records if "lists for" in r.getMessage()]
    assert [m.split(" (")[0] for m in progress] == [
        f"AlsRecommender: lists for {done} of 40 users" for done in (15, 30, 40)
    ]


def test_same_seed_same_lists_and_save_load_round_trip(tmp_path):
    events = _two_communities()
    first = _fit(events).recommend(["u00", "u30"], n=5)
    second_model = _fit(events)
    pd.testing.assert_frame_equal(first, second_model.recommend(["u00", "u30"], n=5))
    loaded = AlsRecommender.load(second_model.save(tmp_path / "bundle"))
    pd.testing.assert_frame_equal(first, loaded.recommend(["u00", "u30"], n=5))
    assert loaded.get_params() == second_model.get_params()


def test_empty_matrix_is_rejected():
    empty = pd.DataFrame(columns=["user_id", "item_id", "event_type", "value"])
    with pytest.raises(ValueError, match="empty"):
        _fit(empty)


def test_an_already_fitted_als_gives_the_same_lists_without_fitting_again():
    events = _two_communities()
    fitted = _fit(events, factors=4, iterations=5)
    wrapped = AlsRecommender.from_fitted(
        fitted.model_, fitted.matrix_, fitted.popular_, fitted.items_
    )
    assert wrapped.get_params() == fitted.get_params()
    users = [f"u{u:02d}" for u in range(40)] + ["nobody"]
    pd.testing.assert_frame_equal(wrapped.recommend(users, 5), fitted.recommend(users, 5))
    rows = np.arange(40)
    np.testing.assert_array_equal(wrapped.score_top(rows, 5)[0], fitted.score_top(rows, 5)[0])
