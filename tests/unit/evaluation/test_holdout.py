"""Ranking metrics on hand-computed cases, holdout split, popularity baseline."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pipeline.core.metrics import ranking_metrics
from pipeline.evaluation import holdout
from pipeline.evaluation.holdout import (
    popularity_top,
    split_holdout,
    top_by_scores,
    top_unseen,
)

UTC = dt.timezone.utc


def test_ranking_metrics_known_answer():
    # user 0: relevant {1, 3}; list [1, 2, 3] -> hits at ranks 1 and 3
    # user 1: relevant {0};    list [2, 1, -1] -> no hit
    truth = sp.csr_matrix(np.array([[0, 1, 0, 1], [1, 0, 0, 0]], dtype=np.float32))
    top = np.array([[1, 2, 3], [2, 1, -1]])
    got = ranking_metrics(top, truth, k=3)
    dcg0 = 1 + 1 / np.log2(4)
    idcg0 = 1 + 1 / np.log2(3)
    assert got["precision"] == pytest.approx((2 / 3 + 0) / 2)
    assert got["recall"] == pytest.approx((1.0 + 0) / 2)
    assert got["ndcg"] == pytest.approx((dcg0 / idcg0 + 0) / 2)
    assert got["map"] == pytest.approx(((1 + 2 / 3) / 2 + 0) / 2)
    assert got["hit_rate"] == pytest.approx(0.5)


def test_users_without_truth_are_skipped():
    truth = sp.csr_matrix(np.array([[1, 0], [0, 0]], dtype=np.float32))
    got = ranking_metrics(np.array([[0, 1], [0, 1]]), truth, k=2)
    assert got["hit_rate"] == 1.0


def test_top_by_scores_excludes_seen_and_pads():
    scores = np.array([[0.9, 0.5, 0.1]])
    seen = sp.csr_matrix(np.array([[1, 0, 0]]))
    assert top_by_scores(scores, seen, 3).tolist() == [[1, 2, -1]]


def test_top_by_scores_in_row_blocks_equals_all_rows_at_once():
    rng = np.random.default_rng(0)
    scores = rng.random((11, 7)).round(1)  # ties
    seen = sp.random(11, 7, density=0.3, random_state=1, format="csr")
    whole = top_by_scores(scores, seen, 4, chunk_rows=100)
    np.testing.assert_array_equal(top_by_scores(scores, seen, 4, chunk_rows=3), whole)


@pytest.mark.parametrize("head_extra", [0, 3, 256])
@pytest.mark.parametrize("k", [1, 5, 40])
def test_top_unseen_equals_top_by_scores_of_the_shared_vector(monkeypatch, head_extra, k):
    """One ranking for every row (popularity): the same top-k as the dense path, for light
    rows, rows that saw most of the head (the dense fallback), rows that saw everything
    (padded with -1) and k beyond the catalog."""
    monkeypatch.setattr(holdout, "HEAD_EXTRA", head_extra)
    rng = np.random.default_rng(k + head_extra)
    n_rows, n_items = 60, 30
    scores = rng.permutation(n_items).astype(np.float64) - np.arange(n_items) * 1e-9
    seen = sp.random(n_rows, n_items, density=0.2, random_state=2, format="lil")
    seen[0, :] = 1.0  # saw everything
    seen[1, np.argsort(-scores)[:20]] = 1.0  # saw the whole head
    seen[2, :] = 0.0  # saw nothing
    seen = seen.tocsr()
    dense = top_by_scores(np.broadcast_to(scores, (n_rows, n_items)), seen, k)
    np.testing.assert_array_equal(top_unseen(scores, seen, k, chunk_rows=7), dense)
    assert (top_unseen(scores, seen, k)[0] == -1).all()


def _events(rows):
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "event_type", "timestamp"])
    frame["timestamp"] = pd.to_datetime(frame["timestamp"], utc=True)
    frame["value"] = np.nan
    return frame


def test_split_holdout_truth_is_new_items_of_warm_users_only():
    events = _events(
        [
            ("u1", "a", "view", "2024-01-01"),
            ("u1", "b", "view", "2024-01-09"),
            ("u1", "a", "view", "2024-01-09"),  # seen before: not truth
            ("u2", "a", "view", "2024-01-02"),
            ("cold", "b", "view", "2024-01-09"),  # no history: not scored
            ("u2", "b", "view", "2024-01-11"),  # at/after cutoff: ignored
        ]
    )
    cutoff = dt.datetime(2024, 1, 10, tzinfo=UTC)
    split = split_holdout(events, cutoff, holdout_days=3, weights={"view": 1.0})
    assert list(split.train.user_ids) == ["u1", "u2"]
    assert list(split.train.item_ids) == ["a"]  # b first appears in the holdout
    assert split.truth.nnz == 0  # ... so it cannot be truth either
    assert len(split.eval_rows) == 0


def test_popularity_baseline_ranks_by_distinct_users():
    events = _events(
        [
            ("u1", "a", "view", "2024-01-01"),
            ("u2", "a", "view", "2024-01-01"),
            ("u2", "b", "view", "2024-01-01"),
            ("u3", "c", "view", "2024-01-01"),
            ("u3", "a", "view", "2024-01-09"),
        ]
    )
    cutoff = dt.datetime(2024, 1, 10, tzinfo=UTC)
    split = split_holdout(events, cutoff, holdout_days=3, weights={"view": 1.0})
    top = popularity_top(split, np.arange(3), 3, days=None)
    # a (2 users) > b (1) = c (1, tie broken by item order); seen items excluded per user
    assert top.tolist() == [[1, 2, -1], [2, -1, -1], [0, 1, -1]]


# ---- id-level metrics, diversity, bias audit -------------------------------------------------
def test_user_metrics_match_the_matrix_version():
    from pipeline.core.metrics import user_metrics

    truth_m = sp.csr_matrix(np.array([[0, 1, 0, 1], [1, 0, 0, 0]], dtype=np.float32))
    expected = ranking_metrics(np.array([[1, 2, 3], [2, 1, -1]]), truth_m, k=3)
    lists = pd.DataFrame(
        {
            "user_id": ["x", "x", "x", "y", "y"],
            "rank": [1, 2, 3, 1, 2],
            "item_id": ["i1", "i2", "i3", "i2", "i1"],
        }
    )
    truth = pd.DataFrame({"user_id": ["x", "x", "y", "z"], "item_id": ["i1", "i3", "i0", "i9"]})
    got = user_metrics(lists, truth, k=3)
    assert list(got.index) == ["x", "y", "z"]  # z has truth but no list: zeros
    assert got.loc["z"].sum() == 0
    for metric, value in expected.items():
        assert got.loc[["x", "y"], metric].mean() == pytest.approx(value)


def test_top_diversity_and_lists_to_top():
    from pipeline.core.metrics import top_diversity
    from pipeline.evaluation.holdout import lists_to_top

    got = top_diversity(np.array([[0, 1], [0, -1]]), np.array([9.0, 0.0, 0.0]), k=2)
    log_pop = np.log1p([9.0, 0.0, 0.0])
    assert got["coverage"] == pytest.approx(2 / 3)
    assert got["popularity_bias"] == pytest.approx((2 * log_pop[0] + 0) / 3 - log_pop.mean())
    events = _events([("u1", "a", "view", "2024-01-01"), ("u2", "b", "view", "2024-01-01")])
    split = split_holdout(events, dt.datetime(2024, 1, 10, tzinfo=UTC), 3, {"view": 1.0})
    lists = pd.DataFrame(
        {"user_id": ["u2", "u2", "ghost"], "rank": [1, 2, 1], "item_id": ["b", "new", "a"]}
    )
    top = lists_to_top(lists, np.array(["u1", "u2"], dtype=object), split.train, 2)
    assert top.tolist() == [[-1, -1], [1, -1]]


def test_popularity_lists_cover_cold_users_and_skip_seen_items():
    from pipeline.evaluation.holdout import popularity_lists

    events = _events(
        [
            ("u1", "a", "view", "2024-01-01"),
            ("u2", "a", "view", "2024-01-01"),
            ("u2", "b", "view", "2024-01-02"),
            ("u3", "c", "view", "2024-01-20"),
        ]
    )
    lists = popularity_lists(
        events, dt.datetime(2024, 1, 10, tzinfo=UTC), np.array(["u2", "new"], dtype=object), k=2
    )
    assert lists[lists["user_id"] == "new"]["item_id"].tolist() == ["a", "b"]
    assert lists[lists["user_id"] == "u2"]["item_id"].tolist() == []  # saw both; c is later
    users = np.array(["u2", "new", "u1", "other"], dtype=object)
    one_go = popularity_lists(events, dt.datetime(2024, 1, 10, tzinfo=UTC), users, k=2)
    chunked = popularity_lists(
        events, dt.datetime(2024, 1, 10, tzinfo=UTC), users, k=2, chunk_users=1
    )
    pd.testing.assert_frame_equal(chunked, one_go)


def test_segment_audit_groups_per_model_and_segment():
    from pipeline.evaluation.holdout import segment_audit

    per_user = pd.DataFrame({"ndcg": [1.0, 0.0, 0.5]}, index=pd.Index(["a", "b", "c"]))
    segments = pd.DataFrame(
        {"user_type": ["new", "returning", "returning"], "gender": ["F", None, "M"]},
        index=["a", "b", "c"],
    )
    audit = segment_audit({"m": per_user}, segments).set_index(["segment", "value"])
    assert audit.loc[("user_type", "returning"), "ndcg"] == pytest.approx(0.25)
    assert audit.loc[("user_type", "returning"), "users"] == 2
    assert audit.loc[("gender", "unknown"), "ndcg"] == 0.0


def test_paired_bootstrap_interval_brackets_the_mean_difference():
    from pipeline.core.metrics import paired_bootstrap

    rng = np.random.default_rng(1)
    a = rng.random(400)
    low, high = paired_bootstrap(a + 0.1, a)  # the same users, 0.1 better each
    assert low == pytest.approx(0.1) and high == pytest.approx(0.1)
    noisy_low, noisy_high = paired_bootstrap(a, rng.random(400))
    assert noisy_low < 0 < noisy_high
    assert paired_bootstrap(a, a) == (0.0, 0.0)  # the same model: nothing to tell apart
    b = rng.random(400)
    assert paired_bootstrap(a, b, block=7) == pytest.approx(paired_bootstrap(a, b))  # seeded


def test_per_user_metrics_are_what_the_means_average():
    from pipeline.core.metrics import ranking_metrics, ranking_metrics_per_user

    truth = sp.csr_matrix(np.array([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]], np.float32))
    top = np.array([[0, 1], [2, 3], [3, 1]])
    per_user = ranking_metrics_per_user(top, truth, k=2)
    assert per_user["hit_rate"].tolist() == [1.0, 1.0]  # the empty row is skipped
    assert per_user["ndcg"][0] == pytest.approx(1 / (1 + 1 / np.log2(3)))
    assert per_user["ndcg"][1] == pytest.approx((1 / np.log2(3)) / 1.0)
    means = ranking_metrics(top, truth, k=2)
    assert means == {m: pytest.approx(v.mean()) for m, v in per_user.items()}


def test_encoded_split_has_the_run_shape_and_the_same_truth():
    from pipeline.core.ids import EncodedEvents

    events = _events(
        [
            ("u1", "a", "view", "2024-01-01"),
            ("u1", "b", "view", "2024-01-02"),
            ("u1", "c", "view", "2024-01-09"),  # c first appears in the holdout
            ("u2", "a", "view", "2024-01-02"),
            ("u2", "b", "view", "2024-01-08"),  # new to u2, known item: truth
            ("cold", "b", "view", "2024-01-09"),  # no history: not scored
            ("u1", "d", "view", "2024-01-09"),  # d first appears in the holdout
        ]
    )
    cutoff = dt.datetime(2024, 1, 10, tzinfo=UTC)
    by_string = split_holdout(events, cutoff, holdout_days=3, weights={"view": 1.0})
    encoded = EncodedEvents.from_frame(events, {"view": 1.0})
    by_code = split_holdout(encoded, cutoff, holdout_days=3, weights={"view": 1.0})
    assert by_code.train.shape == encoded.shape == (3, 4)  # one shape for the run
    assert list(by_code.train.user_ids) == ["cold", "u1", "u2"]  # named by the id maps
    truth = {
        (by_code.train.user_ids[r], by_code.train.item_ids[c])
        for r, c in zip(*by_code.truth.nonzero(), strict=True)
    }
    old = {
        (by_string.train.user_ids[r], by_string.train.item_ids[c])
        for r, c in zip(*by_string.truth.nonzero(), strict=True)
    }
    assert truth == old == {("u2", "b")}
    assert len(by_code.encoded) == len(by_code.train_events) == 3


def test_max_users_scores_a_seeded_sample_of_the_returning_users():
    rows = []
    for n in range(40):  # every user has history, and a new item in the holdout
        rows += [
            (f"u{n:02d}", "a", "view", "2024-01-01"),
            (f"u{n:02d}", "b", "view", "2024-01-02"),
            (f"u{n:02d}", "c" if n % 2 else "b2", "view", "2024-01-09"),
        ]
    events = _events(rows + [("x", "c", "view", "2024-01-01"), ("x", "b2", "view", "2024-01-01")])
    cutoff = dt.datetime(2024, 1, 10, tzinfo=UTC)
    full = split_holdout(events, cutoff, holdout_days=3, weights={"view": 1.0})
    sampled = split_holdout(events, cutoff, 3, {"view": 1.0}, max_users=10, seed=4)
    again = split_holdout(events, cutoff, 3, {"view": 1.0}, max_users=10, seed=4)
    other = split_holdout(events, cutoff, 3, {"view": 1.0}, max_users=10, seed=5)
    assert len(full.eval_rows) == 40 and len(sampled.eval_rows) == 10
    assert set(sampled.eval_rows) <= set(full.eval_rows)
    assert sampled.eval_rows.tolist() == again.eval_rows.tolist() != other.eval_rows.tolist()
    # the sampled users keep their whole truth; the train matrix is untouched
    assert (sampled.truth[sampled.eval_rows] != full.truth[sampled.eval_rows]).nnz == 0
    assert (sampled.train.confidence != full.train.confidence).nnz == 0
    unlimited = split_holdout(events, cutoff, 3, {"view": 1.0}, max_users=40)
    assert (unlimited.truth != full.truth).nnz == 0


def test_window_truth_frame_keeps_codes_integer_and_other_ids_objects():
    import datetime as dt

    import numpy as np
    import pandas as pd

    from pipeline.core.metrics import window_truth_frame

    t0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    events = pd.DataFrame(
        {
            "user_id": np.array([1, 1, 2, 2], np.int32),
            "item_id": np.array([5, 6, 5, 7], np.int32),
            "timestamp": [t0, t0 + dt.timedelta(days=2), t0 + dt.timedelta(days=2), t0],
        }
    )
    start, end = t0 + dt.timedelta(days=1), t0 + dt.timedelta(days=3)
    coded = window_truth_frame(events, start, end)
    assert coded.values.tolist() == [[1, 6], [2, 5]]
    assert coded["user_id"].dtype.kind == "i" and coded["item_id"].dtype.kind == "i"
    named = window_truth_frame(events.astype({"user_id": str, "item_id": str}), start, end)
    assert named.values.tolist() == [["1", "6"], ["2", "5"]]
    assert named["user_id"].dtype == object and named["item_id"].dtype == object
