"""The synthetic world's ground truth and the simulated CMS: generate_clickstream unchanged,
affinity, simulate_day's events, position bias, and an A/B the truth can referee."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import DEFAULT_USER
from pipeline.core.schema import EVENT_DTYPES
from pipeline.lake.demo import DemoData
from pipeline.lake.demo import simulate as sim
from pipeline.lake.demo import synthetic as syn

DAY = "2024-02-20"
DAY_START = pd.Timestamp(DAY, tz="UTC")


def _digest(data: DemoData) -> str:
    """Version-independent fingerprint of the three frames' contents."""
    h = hashlib.sha256()
    for frame in (data.events, data.items, data.users):
        for name in frame.columns:
            col = frame[name]
            if str(col.dtype).startswith("datetime64"):
                raw = col.dt.tz_convert(None).to_numpy().astype("datetime64[us]")
                h.update(raw.view(np.int64).tobytes())
            elif col.dtype.kind in "fiub":
                h.update(np.ascontiguousarray(col.to_numpy()).tobytes())
            else:
                h.update("\x1f".join(col.astype(str)).encode())
    return h.hexdigest()[:16]


@pytest.fixture(scope="module")
def world() -> syn.World:
    return syn.generate_world(n_users=3000, n_items=200, n_days=30, seed=5)


@pytest.fixture(scope="module")
def truth(world: syn.World) -> syn.Truth:
    return world.truth


def _random_lists(truth: syn.Truth, k: int, seed: int) -> pd.DataFrame:
    """Each user gets ``k`` distinct random items in random order."""
    rng = np.random.default_rng(seed)
    items = np.argsort(rng.random((truth.n_users, truth.n_items)), axis=1)[:, :k]
    return pd.DataFrame(
        {
            "user_id": np.repeat(truth.user_ids, k),
            "rank": np.tile(np.arange(1, k + 1), truth.n_users),
            "item_id": truth.item_ids[items.ravel()],
        }
    )


# ---- generate_clickstream is unchanged -----------------------------------------------------
# Digests of generate_clickstream's frames taken before the ground truth was exposed.
@pytest.mark.parametrize(
    ("kwargs", "digest", "n_events"),
    [
        (dict(n_users=300, n_items=120, n_days=20, seed=4), "5495851a8454925e", 18224),
        (
            dict(n_users=250, n_items=80, n_days=14, seed=9, n_categories=6),
            "a3519c741b511e9b",
            13913,
        ),
    ],
)
def test_generate_clickstream_unchanged(kwargs, digest, n_events) -> None:
    data = syn.generate_clickstream(**kwargs)
    world = syn.generate_world(**kwargs)
    for name in ("events", "items", "users"):
        pd.testing.assert_frame_equal(
            getattr(data, name), getattr(world.data, name), check_exact=True
        )
    assert len(data.events) == n_events
    assert _digest(data) == digest == _digest(world.data)


def test_truth_matches_the_frames(world: syn.World, truth: syn.Truth) -> None:
    items, users = world.data.items, world.data.users
    assert list(truth.user_ids) == list(users["user_id"])
    assert list(truth.item_ids) == list(items["item_id"])
    names = np.asarray(truth.category_names, dtype=object)
    assert list(names[truth.category]) == list(items["category"])
    assert np.array_equal(truth.price, items["price"].to_numpy())
    assert np.array_equal(truth.available, items["available"].to_numpy())
    assert (truth.items_frame()["published_at"] == items["published_at"]).all()
    assert truth.popularity.max() == 1.0 and (truth.popularity > 0).all()
    # every used preference slot has a style of that category; unused slots are -1 in both
    used = truth.prefs >= 0
    assert used[:, 0].all() and np.array_equal(used, truth.styles >= 0)
    assert (truth.styles[used] < 4).all()
    assert ((truth.strength > 0) & (truth.strength < 1)).all()
    assert set(truth.primary_device) <= {"desktop", "mobile", "tablet", "tv", "other"}
    assert ((truth.visit_probability > 0) & (truth.visit_probability < 1)).all()
    # users mostly use their primary device
    primary = dict(zip(truth.user_ids, truth.primary_device))
    events = world.data.events
    assert (
        events["device"].to_numpy(object) == events["user_id"].map(primary).to_numpy(object)
    ).mean() > 0.75


def test_events_follow_the_preferences(world: syn.World, truth: syn.Truth) -> None:
    """The truth is the one the events were drawn from: most views are in a preferred
    category, and users with more activity have more sessions."""
    events = world.data.events
    users = truth.user_index(events["user_id"])
    items = truth.item_index(events["item_id"])
    in_pref = (truth.prefs[users] == truth.category[items][:, None]).any(axis=1)
    assert in_pref.mean() > 0.6
    sessions = events.groupby("user_id")["session_id"].nunique()
    activity = pd.Series(truth.activity, index=truth.user_ids).loc[sessions.index]
    assert np.corrcoef(activity, sessions)[0, 1] > 0.5


# ---- affinity ------------------------------------------------------------------------------
def test_affinity_prefers_preferred_categories_and_styles(truth: syn.Truth) -> None:
    users, items = np.arange(truth.n_users), np.arange(truth.n_items)
    aff = truth.affinity_matrix(users, items)
    assert aff.shape == (truth.n_users, truth.n_items)
    assert ((aff >= 0) & (aff <= 1)).all()
    in_cat = truth.prefs[:, None, :] == truth.category[None, :, None]
    same_style = (in_cat & (truth.styles[:, None, :] == truth.style[None, :, None])).any(-1)
    in_cat = in_cat.any(-1)
    assert aff[in_cat].mean() > aff[~in_cat].mean() + 0.25
    assert aff[same_style].mean() > aff[in_cat & ~same_style].mean() + 0.2
    assert aff[~in_cat].max() <= syn.AFFINITY_BASE
    # per user, with a margin, not just on average over everybody
    mine, other = np.where(in_cat, aff, np.nan), np.where(~in_cat, aff, np.nan)
    has_both = in_cat.any(axis=1) & (~in_cat).any(axis=1)
    gap = np.nanmean(mine[has_both], axis=1) - np.nanmean(other[has_both], axis=1)
    assert (gap > 0.1).all()
    # mildly increasing with popularity outside the user's taste
    most, least = np.argmax(truth.popularity), np.argmin(truth.popularity)
    assert np.nanmean(other[:, most]) > np.nanmean(other[:, least])


def test_affinity_apis_agree(truth: syn.Truth) -> None:
    rng = np.random.default_rng(0)
    u, i = rng.integers(0, truth.n_users, 500), rng.integers(0, truth.n_items, 500)
    pairwise = truth.affinity(truth.user_ids[u], truth.item_ids[i])
    assert np.array_equal(pairwise, truth.affinity_by_index(u, i))
    matrix = truth.affinity(truth.user_ids[:50, None], truth.item_ids[None, :])
    assert np.allclose(matrix, truth.affinity_matrix(np.arange(50), np.arange(truth.n_items)))
    # the documented formula, for one user and item
    uu, ii = int(u[0]), int(i[0])
    base = 0.1 * (0.5 + 0.5 * np.sqrt(truth.popularity[ii]))
    slot = np.flatnonzero(truth.prefs[uu] == truth.category[ii])
    match = (
        0.0
        if slot.size == 0
        else truth.strength[uu] * (0.4 + 0.6 * (truth.styles[uu, slot[0]] == truth.style[ii]))
    )
    assert truth.affinity_by_index(uu, ii) == pytest.approx(base + (1 - base) * match)
    with pytest.raises(KeyError, match="unknown user"):
        truth.affinity(["nobody"], ["i0"])


# ---- click model ---------------------------------------------------------------------------
def test_click_model_defaults_and_validation(truth: syn.Truth) -> None:
    model = sim.ClickModel()
    assert (model.position_decay, model.base_ctr_scale) == (1.0, 0.2)
    oracle = sim.oracle_lists(truth, 10)
    popular = sim.popularity_list(truth, 10)
    oracle_aff = truth.affinity(oracle["user_id"], oracle["item_id"]).reshape(-1, 10)
    popular_aff = truth.affinity(
        np.repeat(truth.user_ids, 10), np.tile(popular["item_id"], truth.n_users)
    ).reshape(-1, 10)
    first = model.p_click(oracle_aff[:, 0], 1).mean()
    assert 0.10 <= first <= 0.20
    assert model.p_click(popular_aff[:, 0], 1).mean() < 0.5 * first
    assert model.p_examine(np.array([1, 2, 10])) == pytest.approx([1.0, 0.5, 0.1])
    assert model.p_cart(1.0) > model.p_cart(0.1) and model.p_purchase(1.0) <= 1
    for bad in (
        dict(position_decay=-1),
        dict(base_ctr_scale=1.5),
        dict(cart_base=0.9, cart_slope=0.2),
        dict(purchase_base=-0.1),
    ):
        with pytest.raises(ValueError):
            sim.ClickModel(**bad)


# ---- simulate_day --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def random_lists(truth: syn.Truth) -> pd.DataFrame:
    return _random_lists(truth, 10, seed=1)


@pytest.fixture(scope="module")
def day_events(truth: syn.Truth, random_lists: pd.DataFrame) -> pd.DataFrame:
    return sim.simulate_day(truth, random_lists, DAY, seed=7)


def test_simulate_day_contract(day_events: pd.DataFrame, truth: syn.Truth) -> None:
    events = day_events
    assert list(events.columns) == list(sim.SIM_COLUMNS)
    assert {k: str(v) for k, v in events.dtypes.items() if k in EVENT_DTYPES} == EVENT_DTYPES
    assert set(events["event_type"]) == set(sim.SIM_EVENT_TYPES)
    assert (events["placement"] == "home_recs").all()
    assert events["event_id"].is_unique
    assert events["event_id"].str.startswith(f"sim-{DAY}-").all()
    assert events["timestamp"].is_monotonic_increasing
    assert events["timestamp"].min() >= DAY_START
    assert events["timestamp"].max() < DAY_START + pd.Timedelta(days=1)
    priced = events["event_type"].isin(["add_to_cart", "purchase"])
    price = pd.Series(truth.price, index=truth.item_ids)
    assert np.allclose(events.loc[priced, "value"], price.loc[events.loc[priced, "item_id"]])
    assert events.loc[~priced, "value"].isna().all()
    device = pd.Series(truth.primary_device, index=truth.user_ids)
    assert (
        events["device"].to_numpy(object) == device.loc[events["user_id"]].to_numpy(object)
    ).all()
    # one session per visiting user
    assert (events.groupby("user_id")["session_id"].nunique() == 1).all()
    assert events["session_id"].nunique() == events["user_id"].nunique()


def test_impressions_are_visitors_times_list_length(
    day_events: pd.DataFrame, random_lists: pd.DataFrame, truth: syn.Truth
) -> None:
    imp = day_events[day_events["event_type"] == "impression"]
    visitors = imp["user_id"].nunique()
    assert len(imp) == visitors * 10
    assert (
        imp.groupby("user_id")["position"].apply(sorted).apply(lambda p: p == list(range(1, 11)))
    ).all()
    # the visit rate follows the users' activity
    expected = truth.visit_probability.sum()
    assert abs(visitors - expected) < 4 * np.sqrt(expected)
    # the position is the served rank of that item for that user
    shown = imp.merge(random_lists, on=["user_id", "item_id"], validate="one_to_one")
    assert (shown["position"] == shown["rank"]).all()
    # every user visits at visit_rate=1, none at 0
    everyone = sim.simulate_day(truth, random_lists, DAY, visit_rate=1.0, seed=7)
    assert (everyone["event_type"] == "impression").sum() == truth.n_users * 10
    assert sim.simulate_day(truth, random_lists, DAY, visit_rate=0.0, seed=7).empty


def test_funnel_only_on_impressed_items_in_order(day_events: pd.DataFrame) -> None:
    key = ["user_id", "position", "item_id"]
    by_type = {t: day_events[day_events["event_type"] == t] for t in sim.SIM_EVENT_TYPES}
    assert len(by_type["click"]) > 0 and len(by_type["purchase"]) > 0
    for earlier, later in zip(sim.SIM_EVENT_TYPES, sim.SIM_EVENT_TYPES[1:]):
        pair = by_type[later].merge(
            by_type[earlier], on=key, how="left", suffixes=("", "_before"), validate="one_to_one"
        )
        assert pair["timestamp_before"].notna().all(), f"{later} without {earlier}"
        assert (pair["timestamp"] > pair["timestamp_before"]).all()
        assert (pair["session_id"] == pair["session_id_before"]).all()
    counts = [len(by_type[t]) for t in sim.SIM_EVENT_TYPES]
    assert counts == sorted(counts, reverse=True)


def test_simulate_day_is_deterministic(
    truth: syn.Truth, random_lists: pd.DataFrame, day_events: pd.DataFrame
) -> None:
    again = sim.simulate_day(truth, random_lists, pd.Timestamp(DAY).to_pydatetime(), seed=7)
    pd.testing.assert_frame_equal(day_events, again)
    other_seed = sim.simulate_day(truth, random_lists, DAY, seed=8)
    other_day = sim.simulate_day(truth, random_lists, "2024-02-21", seed=7)
    assert set(other_seed["user_id"]) != set(day_events["user_id"])
    assert set(other_day["user_id"]) != set(day_events["user_id"])
    assert other_day["event_id"].str.startswith("sim-2024-02-21-").all()
    # ids embed the day, so several days concatenate with unique ids
    both = pd.concat([day_events, other_day])
    assert both["event_id"].is_unique


def test_default_list_and_missing_users(truth: syn.Truth) -> None:
    own = pd.DataFrame({"user_id": ["u0", "u0"], "rank": [1, 2], "item_id": ["i1", "i2"]})
    default = sim.popularity_list(truth, 3)
    assert (default["user_id"] == DEFAULT_USER).all()
    events = sim.simulate_day(truth, pd.concat([own, default]), DAY, visit_rate=1.0, seed=0)
    imp = events[events["event_type"] == "impression"]
    assert list(imp.loc[imp["user_id"] == "u0", "item_id"]) == ["i1", "i2"]
    others = imp[imp["user_id"] != "u0"]
    assert others["user_id"].nunique() == truth.n_users - 1
    assert set(others["item_id"]) == set(default["item_id"])
    # without a default list only the listed user is shown anything
    alone = sim.simulate_day(truth, own, DAY, visit_rate=1.0, seed=0)
    assert set(alone["user_id"]) == {"u0"}


def test_bad_lists_are_rejected(truth: syn.Truth) -> None:
    good = pd.DataFrame({"user_id": ["u0", "u0"], "rank": [1, 2], "item_id": ["i1", "i2"]})
    with pytest.raises(KeyError, match="unknown user"):
        sim.simulate_day(truth, good.assign(user_id="ghost"), DAY)
    with pytest.raises(KeyError, match="unknown item"):
        sim.simulate_day(truth, good.assign(item_id=["i1", "nope"]), DAY)
    with pytest.raises(ValueError, match="duplicated"):
        sim.simulate_day(truth, good.assign(rank=1), DAY)
    with pytest.raises(ValueError, match="rank"):
        sim.simulate_day(truth, good.assign(rank=[0, 1]), DAY)
    with pytest.raises(ValueError, match="several variants"):
        sim.simulate_day(truth, good.assign(variant=["a", "b"]), DAY)
    with pytest.raises(ValueError, match="columns"):
        sim.simulate_day(truth, good.drop(columns="rank"), DAY)


# ---- position bias and the A/B the truth referees ------------------------------------------
def test_position_bias(truth: syn.Truth, random_lists: pd.DataFrame) -> None:
    """Random items in random order have the same affinity at every rank on average; the
    click rate still falls with the rank, as the examination probability does."""
    events = pd.concat(
        [sim.simulate_day(truth, random_lists, DAY, visit_rate=1.0, seed=s) for s in range(3)]
    )
    imp = events[events["event_type"] == "impression"].groupby("position").size()
    clicks = events[events["event_type"] == "click"].groupby("position").size()
    ctr = (clicks / imp).reindex(range(1, 11), fill_value=0.0)
    assert ctr[1] > 3 * ctr[10]
    assert ctr[1] > ctr[2] > ctr[5]
    aff = truth.affinity(random_lists["user_id"], random_lists["item_id"])
    by_rank = pd.Series(aff).groupby(random_lists["rank"].to_numpy()).mean()
    assert by_rank.max() - by_rank.min() < 0.02


def test_oracle_beats_popularity_and_expected_ctr_agrees(truth: syn.Truth) -> None:
    oracle = sim.oracle_lists(truth, 10)
    assert oracle.groupby("user_id").size().eq(10).all()
    assert truth.available[truth.item_index(oracle["item_id"])].all()
    half = set(truth.user_ids[::2])
    lists = pd.concat(
        [
            oracle[oracle["user_id"].isin(half)].assign(variant="oracle"),
            sim.popularity_list(truth, 10).assign(variant="popular"),
        ],
        ignore_index=True,
    )
    events = pd.concat(
        [
            sim.simulate_day(truth, lists, day, visit_rate=1.0, seed=3)
            for day in ("2024-02-20", "2024-02-21")
        ]
    )
    assert set(events.loc[events["user_id"].isin(half), "variant"]) == {"oracle"}
    assert set(events.loc[~events["user_id"].isin(half), "variant"]) == {"popular"}
    observed = sim.observed_ctr(events)
    expected = sim.expected_ctr(truth, lists, visit_rate=1.0)
    assert list(expected.index) == list(observed.index) == ["oracle", "popular"]
    assert observed["oracle"] > 2 * observed["popular"]
    assert expected["oracle"] > 2 * expected["popular"]
    assert np.allclose(observed, expected, rtol=0.2)
    lift_obs = observed["oracle"] - observed["popular"]
    lift_exp = expected["oracle"] - expected["popular"]
    assert lift_obs == pytest.approx(lift_exp, rel=0.15)
    # with the users' own visit rates the expectation weighs users by visit probability
    natural = sim.expected_ctr(truth, lists)
    assert natural["oracle"] > 2 * natural["popular"]


def test_expected_ctr_by_hand(truth: syn.Truth) -> None:
    lists = pd.DataFrame(
        {"user_id": ["u0", "u0", "u1"], "rank": [1, 2, 1], "item_id": ["i0", "i1", "i2"]}
    )
    model = sim.ClickModel(position_decay=1.0, base_ctr_scale=0.5)
    aff = truth.affinity(lists["user_id"], lists["item_id"])
    p = model.p_click(aff, lists["rank"].to_numpy())
    w = truth.visit_probability[[0, 0, 1]]
    assert sim.expected_ctr(truth, lists, model) == pytest.approx((w * p).sum() / w.sum())
    assert sim.expected_ctr(truth, lists, model, visit_rate=0.5) == pytest.approx(p.mean())
    assert isinstance(sim.observed_ctr(sim.simulate_day(truth, lists, DAY, visit_rate=1.0)), float)


def test_organic_browsing_adds_to_the_list_events_without_changing_them(
    truth: syn.Truth, random_lists: pd.DataFrame, day_events: pd.DataFrame
) -> None:
    listed = random_lists[random_lists["user_id"].isin(truth.user_ids[: truth.n_users // 2])]
    plain = sim.simulate_day(truth, listed, DAY, seed=7)
    both = sim.simulate_day(truth, listed, DAY, seed=7, organic=sim.OrganicModel(2.0))
    recs = both[both["placement"] == "home_recs"].reset_index(drop=True)
    pd.testing.assert_frame_equal(recs.astype({"position": "int64"}), plain)
    browse = both[both["placement"] == "browse"]
    assert set(browse["event_type"]) == {"view", "add_to_cart", "purchase"}
    assert browse["position"].isna().all() and both["event_id"].is_unique
    assert both["timestamp"].is_monotonic_increasing
    # users without a list browse too (a holdout has a baseline), and only browse
    unlisted = ~both["user_id"].isin(listed["user_id"])
    assert unlisted.any() and (both.loc[unlisted, "placement"] == "browse").all()
    # a cart or purchase follows its view (same id stem: user and view number) of the item
    stem = browse["event_id"].str.rsplit("-", n=1).str[0]
    views = browse[browse["event_type"] == "view"].assign(stem=stem)
    later = (
        browse[browse["event_type"] != "view"]
        .assign(stem=stem)
        .merge(
            views, on=["stem", "user_id", "item_id"], suffixes=("", "_view"), validate="many_to_one"
        )
    )
    assert len(later) == (browse["event_type"] != "view").sum()
    assert (later["timestamp"] > later["timestamp_view"]).all()
    # browsing follows taste and popularity: views per item correlate with popularity
    per_item = views["item_id"].value_counts().reindex(truth.item_ids, fill_value=0)
    assert np.corrcoef(per_item.to_numpy(), truth.popularity)[0, 1] > 0.5
    # visitors are the same people with or without browsing
    assert set(plain["user_id"]) <= set(both["user_id"])
    with pytest.raises(ValueError):
        sim.OrganicModel(-1.0)
