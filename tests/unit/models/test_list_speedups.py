"""The faster list path gives what the code it replaced gave, bit for bit: ``ranked_within``'s
packed-key sort against ``np.lexsort``, ``lookup`` against ``gather``, ``row_dots`` in blocks
against one ``einsum``, the kNN features of ``generate`` against a binary search of sorted
products, and the reasons against the pandas merge and sort they were made with before."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pipeline.lake.demo.synthetic import generate_clickstream
from pipeline.models import base, candidates
from pipeline.models.base import HISTORY_FOR_REASONS, VERBS, ranked_within, row_dots
from pipeline.models.candidates import gather, lookup
from pipeline.models.twostage import TwoStageRecommender, _strongest_history

CUTOFF = dt.datetime(2024, 2, 1, tzinfo=dt.timezone.utc)


def _lexsorted(groups, scores, ties):
    order = np.lexsort((ties, -np.asarray(scores), groups))
    grouped = np.asarray(groups)[order]
    positions = np.arange(len(order))
    first = np.r_[True, grouped[1:] != grouped[:-1]] if len(order) else np.zeros(0, bool)
    return order, positions - np.maximum.accumulate(np.where(first, positions, 0)) + 1


@pytest.mark.parametrize("seed", range(6))
def test_the_packed_key_sort_orders_like_lexsort(seed):
    """Groups in runs (in any order of their values), tied and signed scores, -0.0 and 0.0."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 40, 50)
    groups = np.repeat(rng.permutation(1_000)[:50], sizes)
    ties = np.concatenate([rng.permutation(5_000)[:size] for size in sizes])
    scores = rng.choice(np.array([-1.5, -0.0, 0.0, 0.25, 0.5, 3.0], np.float32), len(groups))
    free = rng.random(len(groups)) < 0.5
    scores[free] = rng.standard_normal(int(free.sum())).astype(np.float32)
    assert base._order_by_key(groups, scores, ties) is not None  # the fast path ran
    for got, expected in zip(
        ranked_within(groups, scores, ties), _lexsorted(groups, scores, ties), strict=True
    ):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    "case",
    ["nan", "split group", "repeated tie", "float64", "negative tie"],
)
def test_the_packed_key_sort_steps_aside_where_it_does_not_apply(case):
    groups = np.array([1, 1, 1, 2, 2, 3])
    scores = np.array([0.5, 0.5, 0.1, 0.2, 0.9, 0.3], np.float32)
    ties = np.array([3, 1, 2, 0, 4, 5])
    if case == "nan":
        scores[2] = np.nan
    elif case == "split group":
        groups = np.array([1, 1, 2, 2, 1, 3])
    elif case == "repeated tie":
        ties[1] = 3
    elif case == "float64":
        scores = scores.astype(np.float64)
    else:
        ties[0] = -1
    assert base._order_by_key(groups, scores, ties) is None
    for got, expected in zip(
        ranked_within(groups, scores, ties), _lexsorted(groups, scores, ties), strict=True
    ):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("cells", [1 << 22, 450, 200])
def test_lookup_reads_a_product_like_gather(monkeypatch, cells):
    """Unsorted product rows, empty rows, one or many buffer blocks."""
    monkeypatch.setattr(candidates, "LOOKUP_CELLS", cells)
    rng = np.random.default_rng(cells)
    history = sp.random(60, 90, density=0.05, random_state=1, format="csr", dtype=np.float32)
    keep = np.ones(60, np.float32)
    keep[rng.integers(0, 60, 8)] = 0.0  # some users without history
    history = sp.csr_matrix(sp.diags(keep) @ history)
    history.eliminate_zeros()
    similarity = sp.random(90, 90, density=0.1, random_state=2, format="csr", dtype=np.float32)
    product = history @ similarity
    rows = np.sort(rng.integers(0, 60, 3_000))
    cols = rng.integers(0, 90, 3_000)
    expected = gather(product, rows, cols)
    assert (expected > 0).any()
    np.testing.assert_array_equal(lookup(product, rows, cols), expected)
    shuffled = rng.permutation(len(rows))  # unsorted rows: by gather
    np.testing.assert_array_equal(
        lookup(product, rows[shuffled], cols[shuffled]), expected[shuffled]
    )
    empty = sp.csr_matrix((60, 90), dtype=np.float32)
    assert lookup(empty, rows, cols).sum() == 0 and lookup(product, rows[:0], cols[:0]).size == 0


def test_row_dots_in_blocks_equal_one_einsum(monkeypatch):
    monkeypatch.setattr(base, "PAIRS_PER_BLOCK", 7)
    rng = np.random.default_rng(0)
    left = rng.standard_normal((30, 16)).astype(np.float32)
    right = rng.standard_normal((50, 16)).astype(np.float32)
    a, b = rng.integers(0, 30, 200), rng.integers(0, 50, 200)
    expected = np.einsum("pf,pf->p", left[a], right[b]).astype(np.float32)
    np.testing.assert_array_equal(row_dots(left, a, right, b), expected)
    assert row_dots(left, a[:0], right, b[:0]).shape == (0,)


@pytest.fixture(scope="module")
def model():
    data = generate_clickstream(n_users=150, n_items=80, n_days=40, start="2024-01-01", seed=5)
    return TwoStageRecommender(
        factors=8,
        iterations=3,
        label_days=7,
        label_windows=2,
        n_estimators=20,
        n_als=20,
        n_knn=20,
        n_popular=10,
        random_state=5,
    ).fit(data.events, CUTOFF, items=data.items, users=data.users)


def test_generate_reads_the_knn_features_of_the_sorted_products(model):
    generator = model.generator_
    rows = np.arange(model.matrix_.shape[0])
    pairs = generator.generate(rows)
    u, item = pairs["u"].to_numpy(), pairs["item"].to_numpy()
    seen = generator.matrix_.confidence[rows]
    recent = generator.knn_.score(generator.recent_[rows])
    every = generator.knn_.score((seen > 0).astype(np.float32))
    recent.sort_indices()
    every.sort_indices()
    np.testing.assert_array_equal(pairs["knn_recent"].to_numpy(), gather(recent, u, item))
    np.testing.assert_array_equal(pairs["knn_all"].to_numpy(), gather(every, u, item))
    assert (pairs["knn_all"] > 0).any()
    factors = np.einsum(
        "pf,pf->p",
        np.asarray(generator.als_.user_factors)[pairs["row"].to_numpy()],
        np.asarray(generator.als_.item_factors)[item],
    )
    np.testing.assert_array_equal(pairs["als_score"].to_numpy(), factors.astype(np.float32))


def _explained_before(model, picks: pd.DataFrame) -> np.ndarray:
    """The reasons as the merge-and-sort implementation gave them."""
    matrix = model.snapshot_.matrix
    conf = matrix.confidence[np.unique(picks["row"].to_numpy())].tocoo()
    rows = np.unique(picks["row"].to_numpy())
    code = matrix.strongest[rows].tocoo()
    frame = pd.DataFrame(
        {"row": rows[conf.row], "hist": conf.col, "c": conf.data, "code": code.data}
    ).astype({"code": np.int64})
    order, rank = _lexsorted(frame["row"].to_numpy(), frame["c"].to_numpy(), frame["hist"])
    hist = frame.iloc[order[rank <= HISTORY_FOR_REASONS]][["row", "hist", "code"]]
    pairs = picks[["row", "item", "knn_all", "from_als"]].reset_index().merge(hist, on="row")
    hist_col, item_col = pairs["hist"].to_numpy(), pairs["item"].to_numpy()
    use_knn = pairs["knn_all"].to_numpy() > 0
    sim = np.empty(len(pairs), np.float32)
    sim[use_knn] = gather(model.generator_.knn_.similarity_, hist_col[use_knn], item_col[use_knn])
    factors = model._unit_item_factors()
    sim[~use_knn] = np.einsum("pf,pf->p", factors[hist_col[~use_knn]], factors[item_col[~use_knn]])
    order, rank = _lexsorted(pairs["index"].to_numpy(), sim, hist_col)
    pairs = pairs.iloc[order[rank == 1]]
    titles = model.items_["title"].astype(object).to_numpy()
    verbs = np.array([VERBS.get(t, "engaged with") for t in matrix.event_types], dtype=object)
    text = "because you " + verbs[pairs["code"].to_numpy()] + " " + titles[pairs["hist"]]
    linked = (pairs["knn_all"].to_numpy() > 0) | (pairs["from_als"].to_numpy() > 0)
    out = pd.Series(model._popular_reason(picks["item"].to_numpy()), index=picks.index)
    out.loc[pairs["index"].to_numpy()[linked]] = text[linked]
    return out.to_numpy(dtype=object)


def test_reasons_are_those_of_the_merge_and_sort(model):
    rows = np.arange(model.matrix_.shape[0])
    pairs = model.rank_candidates(rows)
    order, rank = ranked_within(
        pairs["row"].to_numpy(), pairs["score"].to_numpy(), pairs["item"].to_numpy()
    )
    picks = pairs.iloc[order].reset_index(drop=True)
    picks.loc[::7, ["knn_all", "from_als"]] = 0.0  # some picks without a link: popular
    got = model._explain(picks)
    assert got.tolist() == _explained_before(model, picks).tolist()
    assert any(reason.startswith("because you") for reason in got)
    assert any(reason.startswith("popular") for reason in got)
    history = _strongest_history(model.matrix_, rows)
    assert history.groupby("row").size().max() <= HISTORY_FOR_REASONS
