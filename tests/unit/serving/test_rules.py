"""Business rules at write time (pipeline.serving.rules): tiny inputs with known answers."""

from __future__ import annotations

import datetime as dt
import logging

import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import DEFAULT_USER
from pipeline.serving.rules import (
    GENERIC_REASON,
    apply_business_rules,
    build_consumed,
    recommend_with_rules,
)

CUTOFF = dt.datetime(2024, 5, 1, tzinfo=dt.timezone.utc)
NO_CONSUMED = pd.DataFrame({"user_id": pd.Series(dtype=str), "item_id": pd.Series(dtype=str)})


def _candidates(lists: dict[str, list[str]], source: str = "als") -> pd.DataFrame:
    rows = [
        {
            "user_id": user,
            "rank": rank,
            "item_id": item,
            "score": 1.0 / rank,
            "reason": f"because you liked {item}",
            "source": source,
        }
        for user, items in lists.items()
        for rank, item in enumerate(items, start=1)
    ]
    return pd.DataFrame(rows, columns=["user_id", "rank", "item_id", "score", "reason", "source"])


def _fallback(items: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "item_id": items,
            "score": np.linspace(1.0, 0.1, len(items)),
            "reason": [f"popular {item}" for item in items],
        }
    )


def _consumed(pairs: list[tuple[str, str]]) -> pd.DataFrame:
    return pd.DataFrame(pairs, columns=["user_id", "item_id"]) if pairs else NO_CONSUMED


def _apply(
    candidates: pd.DataFrame, *, n: int, fallback: list[str], consumed=(), items=None, **kwargs
) -> pd.DataFrame:
    return apply_business_rules(
        candidates,
        consumed=_consumed(list(consumed)),
        items=items,
        fallback=_fallback(fallback),
        n=n,
        cutoff=CUTOFF,
        **kwargs,
    )


def _items_of(lists: pd.DataFrame, user: str) -> list[str]:
    mine = lists[lists["user_id"] == user].sort_values("rank")
    assert list(mine["rank"]) == list(range(1, len(mine) + 1))
    return list(mine["item_id"])


def test_consumed_items_are_dropped_and_ranks_renumbered() -> None:
    candidates = _candidates({"u1": ["a", "b", "c", "d"], "u2": ["a", "b", "c", "d"]})

    out = _apply(candidates, n=3, fallback=["p"], consumed=[("u1", "b"), ("u2", "a"), ("u3", "c")])

    assert _items_of(out, "u1") == ["a", "c", "d"]
    assert _items_of(out, "u2") == ["b", "c", "d"]
    assert set(out.loc[out["user_id"] != DEFAULT_USER, "source"]) == {"als"}


def test_short_lists_are_filled_from_the_fallback_skipping_consumed_and_repeats() -> None:
    candidates = _candidates({"u1": ["a", "b"]})

    out = _apply(candidates, n=5, fallback=["b", "x", "y", "z", "w"], consumed=[("u1", "x")])

    assert _items_of(out, "u1") == ["a", "b", "y", "z", "w"]
    mine = out[out["user_id"] == "u1"].set_index("item_id")
    assert list(mine["source"]) == ["als", "als", "popular", "popular", "popular"]
    assert mine.loc["y", "reason"] == "popular y"


def test_duplicate_candidates_are_kept_once() -> None:
    candidates = _candidates({"u1": ["a", "a", "b", "a", "c"]})

    assert _items_of(_apply(candidates, n=3, fallback=["p"]), "u1") == ["a", "b", "c"]


def test_unavailable_items_are_never_recommended() -> None:
    items = pd.DataFrame(
        {
            "item_id": ["a", "b", "c", "p", "q", "r"],
            "available": ["false", "True", None, "0", "maybe", "yes"],
        }
    )
    candidates = _candidates({"u1": ["a", "b", "c", "d"]})

    out = _apply(candidates, n=5, fallback=["p", "q", "r", "s"], items=items)

    # a (false), p (0) and q (unreadable: fail safe) are out; c (unknown) and d (no metadata) stay
    assert _items_of(out, "u1") == ["b", "c", "d", "r", "s"]
    assert _items_of(out, DEFAULT_USER) == ["r", "s"]


def test_boolean_available_column() -> None:
    items = pd.DataFrame({"item_id": ["a", "b"], "available": [False, True]})

    out = _apply(_candidates({"u1": ["a", "b"]}), n=1, fallback=["a", "b"], items=items)

    assert _items_of(out, "u1") == ["b"] and _items_of(out, DEFAULT_USER) == ["b"]


def test_item_ttl_drops_old_items_only_when_set() -> None:
    items = pd.DataFrame(
        {
            "item_id": ["old", "edge", "new", "undated"],
            "published_at": [
                "2024-03-01T00:00:00Z",
                "2024-04-01T00:00:00+00:00",
                "2024-04-20T12:00:00Z",
                None,
            ],
        }
    )
    candidates = _candidates({"u1": ["old", "edge", "new", "undated"]})

    with_ttl = _apply(candidates, n=4, fallback=["old", "f"], items=items, item_ttl_days=30)
    without = _apply(candidates, n=4, fallback=["old", "f"], items=items)

    # cutoff 2024-05-01 - 30 days = 2024-04-01: "edge" is exactly at the limit and stays
    assert _items_of(with_ttl, "u1") == ["edge", "new", "undated", "f"]
    assert _items_of(with_ttl, DEFAULT_USER) == ["f"]
    assert _items_of(without, "u1") == ["old", "edge", "new", "undated"]


def test_category_cap_with_uncategorised_items_exempt() -> None:
    items = pd.DataFrame(
        {
            "item_id": ["d1", "d2", "d3", "c1", "n1", "n2", "n3"],
            "category": ["Drama", "Drama", "Drama", "Comedy", "", None, None],
        }
    )
    candidates = _candidates({"u1": ["d1", "d2", "d3", "n1", "n2", "n3", "x", "c1"]})

    out = _apply(candidates, n=6, fallback=["p"], items=items, max_per_category=2)

    # d3 is the third Drama; blank/None categories and unknown items (x) are exempt
    assert _items_of(out, "u1") == ["d1", "d2", "n1", "n2", "n3", "x"]


def test_fallback_respects_the_cap_then_relaxes_it_to_fill() -> None:
    items = pd.DataFrame(
        {"item_id": ["d1", "d2", "p1", "p2", "p3", "c1"], "category": ["Drama"] * 5 + ["Comedy"]}
    )
    candidates = _candidates({"u1": ["d1", "d2"]})

    out = _apply(
        candidates, n=5, fallback=["p1", "c1", "p2", "p3"], items=items, max_per_category=2
    )

    # capped: d1, d2, c1; then the best remaining fallback items regardless of category
    assert _items_of(out, "u1") == ["d1", "d2", "c1", "p1", "p2"]
    # the default list gets the cap too: p1, p2 (Drama x2), c1, then relaxed p3
    assert _items_of(out, DEFAULT_USER) == ["p1", "c1", "p2", "p3"]


def test_lists_that_cannot_be_filled_stay_short_and_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    candidates = _candidates({"u1": ["a", "b"], "u2": ["a"], "u3": ["a", "b", "c"]})
    consumed = [("u1", "p"), ("u1", "q"), ("u2", "a"), ("u2", "p")]

    with caplog.at_level(logging.WARNING, logger="pipeline.serving.rules"):
        out = _apply(candidates, n=3, fallback=["p", "q"], consumed=consumed)

    assert _items_of(out, "u1") == ["a", "b"]
    assert _items_of(out, "u2") == ["q"]
    assert _items_of(out, "u3") == ["a", "b", "c"]
    assert "3 list(s) have fewer than 3 items" in caplog.text  # u1, u2, __default__


def test_default_list_is_built_from_the_fallback_without_consumption() -> None:
    candidates = _candidates({"u1": ["a"]})

    out = _apply(candidates, n=2, fallback=["a", "b", "c"], consumed=[("u1", "a")])

    assert _items_of(out, "u1") == ["b", "c"]
    assert _items_of(out, DEFAULT_USER) == ["a", "b"]
    assert set(out.loc[out["user_id"] == DEFAULT_USER, "source"]) == {"popular"}
    no_default = _apply(candidates, n=2, fallback=["a", "b", "c"], include_default=False)
    assert DEFAULT_USER not in set(no_default["user_id"])


def test_default_candidates_come_before_the_fallback() -> None:
    candidates = _candidates({DEFAULT_USER: ["z"], "u1": ["a"]}, source="popular")

    out = _apply(candidates, n=2, fallback=["a", "b"])

    assert _items_of(out, DEFAULT_USER) == ["z", "a"]


def test_missing_reasons_become_generic_and_output_columns() -> None:
    candidates = _candidates({"u1": ["a", "b"]})
    candidates.loc[0, "reason"] = None
    candidates.loc[1, "reason"] = "  "

    out = _apply(candidates, n=2, fallback=["p"])

    assert list(out.columns) == ["user_id", "rank", "item_id", "score", "reason", "source"]
    assert list(out.loc[out["user_id"] == "u1", "reason"]) == [GENERIC_REASON, GENERIC_REASON]


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="n must be"):
        _apply(_candidates({"u1": ["a"]}), n=0, fallback=["p"])
    with pytest.raises(ValueError, match="max_per_category"):
        _apply(_candidates({"u1": ["a"]}), n=1, fallback=["p"], max_per_category=0)
    with pytest.raises(ValueError, match="candidates lack"):
        _apply(pd.DataFrame({"user_id": ["u1"]}), n=1, fallback=["p"])


def test_build_consumed_counts_only_the_chosen_event_types() -> None:
    events = pd.DataFrame(
        {
            "user_id": ["u1", "u1", "u1", "u2"],
            "item_id": ["a", "a", "b", "c"],
            "event_type": ["view", "purchase", "view", "click"],
        }
    )

    everything = build_consumed(events)
    purchases = build_consumed(events, ["purchase"])

    assert sorted(map(tuple, everything.to_numpy())) == [("u1", "a"), ("u1", "b"), ("u2", "c")]
    assert list(map(tuple, purchases.to_numpy())) == [("u1", "a")]


def _random_world(seed: int, n_users: int = 300, n_items: int = 60):
    rng = np.random.default_rng(seed)
    item_ids = np.array([f"i{k:03d}" for k in range(n_items)], dtype=object)
    items = pd.DataFrame(
        {
            "item_id": item_ids,
            "category": rng.choice(np.array(["A", "B", "C", None], dtype=object), n_items),
            "available": rng.random(n_items) > 0.1,
            "published_at": pd.Timestamp(CUTOFF)
            - pd.to_timedelta(rng.integers(0, 90, n_items), unit="D"),
        }
    )
    rows = []
    for user in range(n_users):
        for rank, item in enumerate(rng.choice(item_ids, 12, replace=True), start=1):
            rows.append((f"u{user}", rank, item, 1.0 / rank, f"r {item}", "als"))
    candidates = pd.DataFrame(
        rows, columns=["user_id", "rank", "item_id", "score", "reason", "source"]
    )
    consumed = pd.DataFrame(
        {
            "user_id": [f"u{k}" for k in rng.integers(0, n_users, 3000)],
            "item_id": rng.choice(item_ids, 3000),
        }
    )
    fallback = _fallback(list(rng.permutation(item_ids)[:25]))
    return candidates, consumed, items, fallback


@pytest.mark.parametrize("seed", [1, 2])
def test_invariants_on_random_data_and_chunking_does_not_matter(seed: int) -> None:
    candidates, consumed, items, fallback = _random_world(seed)
    kwargs = dict(
        consumed=consumed,
        items=items,
        fallback=fallback,
        n=8,
        max_per_category=3,
        item_ttl_days=60,
        cutoff=CUTOFF,
    )

    out = apply_business_rules(candidates, **kwargs)
    chunked = apply_business_rules(
        candidates.sample(frac=1.0, random_state=seed), chunk_users=7, **kwargs
    )

    key = ["user_id", "rank"]
    pd.testing.assert_frame_equal(
        out.sort_values(key).reset_index(drop=True), chunked.sort_values(key).reset_index(drop=True)
    )
    assert set(out["user_id"]) == set(candidates["user_id"]) | {DEFAULT_USER}
    sizes = out.groupby("user_id")["rank"].agg(["count", "min", "max"])
    assert (sizes["min"] == 1).all() and (sizes["max"] == sizes["count"]).all()
    assert (sizes["count"] <= 8).all()
    assert not out.duplicated(["user_id", "item_id"]).any()
    pairs = set(map(tuple, consumed.to_numpy()))
    assert not any((u, i) in pairs for u, i in out[["user_id", "item_id"]].to_numpy())
    meta = items.set_index("item_id")
    oldest = pd.Timestamp(CUTOFF) - pd.Timedelta(days=60)
    assert meta.loc[out["item_id"], "available"].all()
    assert (meta.loc[out["item_id"], "published_at"] >= oldest).all()
    # The cap only breaks where a list was relaxed: its over-cap items are fallback fills.
    categorised = out.assign(category=meta.loc[out["item_id"], "category"].to_numpy())
    categorised = categorised[categorised["category"].notna()]
    per_category = categorised.groupby(["user_id", "category"]).size()
    for user, category in per_category[per_category > 3].index:
        over = categorised[(categorised["user_id"] == user) & (categorised["category"] == category)]
        assert (over.sort_values("rank")["source"].iloc[3:] == "popular").all()


def test_recommend_with_rules_asks_for_more_candidates_chunk_by_chunk() -> None:
    calls: list[tuple[list[str], int]] = []

    def recommend(users: np.ndarray, k: int) -> pd.DataFrame:
        calls.append((list(users), k))
        return _candidates({user: [f"{user}-{r}" for r in range(k)] for user in users})

    out, stats = recommend_with_rules(
        recommend,
        np.array(["u1", "u2", "u1", "u3", DEFAULT_USER], dtype=object),
        candidate_multiplier=3,
        consumed=_consumed([("u2", "u2-0")]),
        items=None,
        fallback=_fallback(["p", "q"]),
        n=2,
        cutoff=CUTOFF,
        chunk_users=2,
    )

    assert calls == [(["u1", "u2"], 6), (["u3"], 6)]
    assert _items_of(out, "u2") == ["u2-1", "u2-2"]
    assert _items_of(out, DEFAULT_USER) == ["p", "q"]
    assert (stats.users, stats.rows, stats.dropped_consumed, stats.short_lists) == (4, 8, 1, 0)
