"""The empirical truth (a stand-in for data without a latent one, such as MovieLens-100k):
what it recovers of a synthetic world's tastes, its affinity, simulated days on MovieLens-shaped
data (no price, no device), days played against a served history, and the ``simulate-day``
command writing a landing file that parses back."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import DEFAULT_USER, Settings
from pipeline.core.schema import EVENT_COLUMNS
from pipeline.lake.demo import simulate as sim
from pipeline.lake.demo import synthetic as syn

UTC = dt.timezone.utc


@pytest.fixture(scope="module")
def world() -> syn.World:
    return syn.generate_world(n_users=3000, n_items=200, n_days=30, seed=5)


@pytest.fixture(scope="module")
def empirical(world: syn.World) -> syn.Truth:
    return sim.empirical_truth(world.data.events, world.data.items)


def _in_true_codes(world: syn.World, truth: syn.Truth) -> np.ndarray:
    """The empirical prefs of each empirical user as the world's category codes (-1 unused)."""
    codes = {name: k for k, name in enumerate(world.truth.category_names)}
    mapping = np.array([codes.get(name, -1) for name in truth.category_names] + [-1])
    return mapping[truth.prefs]


# ---- a synthetic world's tastes, recovered ---------------------------------------------------
def test_prefs_recover_most_users_true_top_category(world, empirical):
    true = world.truth.prefs[world.truth.user_index(empirical.user_ids)]
    found = _in_true_codes(world, empirical)
    # the empirical top category is one of the user's true preferred categories: ~96.6%
    top_is_true = (true == found[:, [0]]).any(axis=1)
    assert top_is_true.mean() >= 0.9
    # users with a single true preference: the top category is that one (~96%)
    single = (true >= 0).sum(axis=1) == 1
    assert single.sum() > 500
    assert (found[single, 0] == true[single, 0]).mean() >= 0.9
    # as sets: ~85% of the found categories are true ones and ~85% of the true ones are found
    hit = (found[:, :, None] == true[:, None, :]) & (found[:, :, None] >= 0)
    assert hit.any(axis=2).sum() / (found >= 0).sum() >= 0.75
    assert hit.any(axis=1).sum() / (true >= 0).sum() >= 0.75
    assert ((found >= 0).sum(axis=1) >= 1).all()  # everyone has a category here


def test_users_items_and_habits(world, empirical):
    truth = world.truth
    assert sorted(empirical.user_ids) == list(empirical.user_ids)
    assert set(empirical.user_ids) == set(world.data.events["user_id"])
    assert set(empirical.item_ids) == set(truth.item_ids)  # the items table's and the log's
    items = truth.item_index(empirical.item_ids)
    assert np.array_equal(empirical.price, truth.price[items])
    assert np.array_equal(empirical.available, truth.available[items])
    assert np.array_equal(empirical.published_at, truth.published_at[items])
    names = np.asarray(empirical.category_names, dtype=object)
    assert list(names[empirical.category]) == list(
        np.asarray(truth.category_names, dtype=object)[truth.category[items]]
    )
    assert empirical.category_names[-1] == sim.UNKNOWN_CATEGORY
    assert (empirical.style == 0).all()
    assert ((empirical.styles == 0) == (empirical.prefs >= 0)).all()
    assert empirical.popularity.max() == 1.0 and (empirical.popularity > 0).all()

    users = truth.user_index(empirical.user_ids)
    assert (empirical.primary_device == truth.primary_device[users]).mean() >= 0.9  # ~98%
    rates = pd.Series(empirical.sessions_per_day)
    assert rates.corr(pd.Series(truth.sessions_per_day[users]), method="spearman") >= 0.7
    assert rates.mean() == pytest.approx(truth.sessions_per_day[users].mean(), rel=0.1)
    assert empirical.activity.mean() == pytest.approx(1.0)
    assert empirical.window_start == truth.window_start
    assert empirical.window_end == truth.window_end
    assert ((empirical.strength > 0) & (empirical.strength <= 1)).all()


def test_same_arguments_same_truth(world, empirical):
    again = sim.empirical_truth(
        world.data.events.sample(frac=1.0, random_state=1), world.data.items
    )
    for name in (
        "user_ids",
        "prefs",
        "strength",
        "sessions_per_day",
        "primary_device",
        "item_ids",
        "category",
        "popularity",
        "published_at",
    ):
        assert np.array_equal(getattr(again, name), getattr(empirical, name)), name


# ---- affinity --------------------------------------------------------------------------------
def test_affinity_is_higher_for_a_users_top_category_items(empirical):
    aff = empirical.affinity_matrix(np.arange(empirical.n_users), np.arange(empirical.n_items))
    top = empirical.prefs[:, 0]
    in_top = empirical.category[None, :] == top[:, None]
    in_any = (empirical.category[None, :, None] == empirical.prefs[:, None, :]).any(axis=2)
    assert in_top.any(axis=1).all()
    lowest_in_top = np.where(in_top, aff, np.inf).min(axis=1)
    highest_outside = np.where(in_any, -np.inf, aff).max(axis=1)
    assert (lowest_in_top > highest_outside).all()
    # a preferred category is the whole match (one style): base + (1 - base) * strength
    base = syn.AFFINITY_BASE * (
        1
        - syn.AFFINITY_POPULARITY_SHARE
        + syn.AFFINITY_POPULARITY_SHARE * np.sqrt(empirical.popularity)
    )
    users, items = np.nonzero(in_any)
    assert np.allclose(
        aff[users, items], base[items] + (1 - base[items]) * empirical.strength[users]
    )
    users, items = np.nonzero(~in_any)
    assert np.allclose(aff[users, items], base[items])


def test_lists_the_stand_in_prefers_are_truly_better(world, empirical):
    """The stand-in's best lists beat global popularity under the world's own truth."""
    truth = world.truth
    mine = sim.oracle_lists(empirical, 10, available_only=False)
    popular = sim.popularity_list(truth, 10)
    assert sim.expected_ctr(truth, mine) > 1.5 * sim.expected_ctr(truth, popular)
    users = truth.user_index(empirical.user_ids)
    rng = np.random.default_rng(0)
    u, i = rng.integers(0, empirical.n_users, 20_000), rng.integers(0, empirical.n_items, 20_000)
    items = truth.item_index(empirical.item_ids)
    assert (
        np.corrcoef(empirical.affinity_by_index(u, i), truth.affinity_by_index(users[u], items[i]))[
            0, 1
        ]
        >= 0.5
    )  # ~0.71


# ---- MovieLens-shaped data -------------------------------------------------------------------
def _movielens_like() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Ratings without device or session, genres as category, no price; one item without a
    genre, one missing from the items table, one without a release date; impressions that
    are no taste."""
    rows = []
    t0 = pd.Timestamp("1998-01-05T10:00:00Z")
    tastes = {
        "1": ["10", "11", "12", "13", "20"],  # Drama x4, Comedy
        "2": ["20", "21", "22", "10", "30"],  # Comedy x3, Drama, Action
        "3": ["30", "31", "40", "41", "99"],
    }  # Action x2, unknown x2, not listed
    for u, (user, watched) in enumerate(tastes.items()):
        for k, item in enumerate(watched):
            rows.append(
                (
                    f"ml-{user}-{item}",
                    user,
                    item,
                    "rating",
                    t0 + pd.Timedelta(days=3 * k + u),
                    float(1 + (k % 5)),
                )
            )
    rows += [
        (f"imp-1-{k}", "1", "30", "impression", t0 + pd.Timedelta(days=20, minutes=k), None)
        for k in range(20)
    ]  # shown Action twenty times: not a taste
    rows.append(("imp-9", "9", "10", "impression", t0, None))  # only impressions: no tastes
    events = pd.DataFrame(
        rows, columns=["event_id", "user_id", "item_id", "event_type", "timestamp", "value"]
    )
    items = pd.DataFrame(
        {  # as read_side_file gives it: all text, blanks missing
            "item_id": ["10", "11", "12", "13", "20", "21", "22", "30", "31", "40", "41"],
            "title": [f"Film {k}" for k in range(11)],
            "category": ["Drama"] * 4 + ["Comedy"] * 3 + ["Action"] * 2 + ["unknown", pd.NA],
            "published_at": ["1995-01-01T00:00:00Z"] * 10 + [pd.NA],
            "available": ["True"] * 11,
        }
    ).astype("string")
    return events, items


def test_a_movielens_shaped_truth():
    events, items = _movielens_like()
    truth = sim.empirical_truth(events, items)
    assert list(truth.user_ids) == ["1", "2", "3"]  # user 9 only had impressions
    assert truth.category_names == ("Action", "Comedy", "Drama", sim.UNKNOWN_CATEGORY)
    names = np.asarray(truth.category_names + ("",), dtype=object)
    assert [list(names[p][p >= 0]) for p in truth.prefs] == [
        ["Drama", "Comedy"],
        ["Comedy", "Drama", "Action"],
        ["Action"],
    ]
    assert truth.strength == pytest.approx([1.0, 1.0, 0.4])
    assert list(truth.primary_device) == ["desktop"] * 3
    assert (truth.price == 0).all()
    item = dict(zip(truth.item_ids, range(truth.n_items), strict=True))
    assert truth.category_names[truth.category[item["99"]]] == sim.UNKNOWN_CATEGORY
    assert truth.category_names[truth.category[item["41"]]] == sim.UNKNOWN_CATEGORY
    first_41 = events.loc[events["item_id"] == "41", "timestamp"].min()
    assert truth.published_at[item["41"]] == np.datetime64(first_41.tz_convert(None), "s")
    assert truth.popularity[item["10"]] == truth.popularity[item["20"]] == 1.0  # 2 users each
    assert truth.popularity[item["11"]] < 1.0
    # a 40-day log of 15 rating events: sessions (no session ids) are events
    span = (truth.window_end - truth.window_start) / pd.Timedelta(days=1)
    assert truth.sessions_per_day == pytest.approx(np.array([5, 5, 5]) / span)
    assert truth.affinity(["1"], ["10"])[0] > truth.affinity(["1"], ["30"])[0]


def test_simulate_day_on_movielens_shaped_data():
    events, items = _movielens_like()
    truth = sim.empirical_truth(events, items)
    lists = pd.DataFrame(
        {
            "user_id": ["1", "1", "2", DEFAULT_USER, DEFAULT_USER],
            "rank": [1, 2, 1, 1, 2],
            "item_id": ["10", "30", "20", "12", "22"],
        }
    )
    # everyone visits, every examined item is clicked as often as its affinity, then bought
    eager = sim.ClickModel(
        position_decay=0.0,
        base_ctr_scale=1.0,
        cart_base=1.0,
        cart_slope=0.0,
        purchase_base=1.0,
        purchase_slope=0.0,
    )
    frames = [
        sim.simulate_day(truth, lists, "1998-03-01", click_model=eager, visit_rate=1.0, seed=seed)
        for seed in range(20)
    ]
    day = pd.concat(frames, ignore_index=True)
    assert list(day.columns) == list(sim.SIM_COLUMNS)
    assert (day["event_type"] == "impression").sum() == 20 * 5  # 2 + 1 + 2 (user 3: default)
    bought = day[day["event_type"] == "purchase"]
    assert len(bought) > 0
    assert (bought["value"] == 0).all()  # the truth's price of an unpriced film
    assert set(day["device"]) == {"desktop"}
    assert day["timestamp"].dt.date.astype(str).eq("1998-03-01").all()

    served = sim.simulate_served(truth, lists, "1998-03-01", 2, click_model=eager, visit_rate=1.0)
    sales = served.events["event_type"].isin(["add_to_cart", "purchase"])
    assert sales.any() and served.events.loc[sales, "value"].isna().all()  # no price, no value
    assert served.users == 3 and served.skipped_users == 0 and served.cutoffs == (None, None)


# ---- a served history ------------------------------------------------------------------------
def test_simulate_served_plays_the_live_set_and_skips_unknown_users(world, empirical):
    day1, day2 = dt.datetime(2024, 1, 31, tzinfo=UTC), dt.datetime(2024, 2, 1, tzinfo=UTC)
    users = empirical.user_ids[:400]
    own = sim.oracle_lists(empirical, 5, users=users).assign(
        variant=lambda f: np.where(f["user_id"].str[1:].astype(int) % 2, "a", "b")
    )
    default = sim.popularity_list(empirical, 5)
    ghost = default.assign(user_id="ghost", variant="a")
    odd_item = own.head(1).assign(user_id="u1", item_id="no-such-item", rank=99, variant="a")
    first = pd.concat([own, default, ghost, odd_item], ignore_index=True).assign(cutoff=day1)
    second = pd.concat([own.drop(columns="variant"), default], ignore_index=True).assign(
        cutoff=day2, variant=None
    )
    served = pd.concat([first, second], ignore_index=True)

    result = sim.simulate_served(empirical, served, day1, 2, seed=4)
    assert result.cutoffs == (pd.Timestamp(day1), pd.Timestamp(day2))
    assert result.users == empirical.n_users  # the default list reaches everyone
    assert result.skipped_users == 1 and result.skipped_rows == 5 + 1
    events = result.events
    assert events["timestamp"].is_monotonic_increasing
    days = events["timestamp"].dt.strftime("%Y-%m-%d")
    assert set(days) == {"2024-01-31", "2024-02-01"}
    assert set(events.loc[days == "2024-01-31", "variant"]) == {"a", "b", sim.NO_VARIANT}
    assert set(events.loc[days == "2024-02-01", "variant"]) == {sim.NO_VARIANT}
    # day one is that day simulated alone with the live set's usable rows
    alone = sim.simulate_day(
        empirical, pd.concat([own, default.assign(variant=sim.NO_VARIANT)]), day1, seed=4
    )
    pd.testing.assert_frame_equal(
        events[days == "2024-01-31"].reset_index(drop=True), alone, check_dtype=False
    )


# ---- the command -----------------------------------------------------------------------------
def test_simulate_day_command_writes_a_landing_file_that_parses_back(tmp_path, monkeypatch, capsys):
    from pipeline.cli import main
    from pipeline.lake.demo import write_landing
    from pipeline.lake.ingest import ingest_lake
    from pipeline.lake.normalise import normalise_events
    from pipeline.lake.readers import read_event_file, read_side_file
    from pipeline.lake.served import read_served, write_served
    from pipeline.lake.snapshot import load_snapshot

    monkeypatch.setenv("RECS_DATA_DIR", str(tmp_path))
    settings = Settings()
    assert settings.data_dir == tmp_path.resolve()
    data = syn.generate_clickstream(n_users=300, n_items=80, n_days=20, seed=3)
    write_landing(data, settings.landing_dir, name="synthetic", gzip=True)
    report = ingest_lake(settings)
    assert report.files_failed == 0
    day = dt.datetime(2024, 1, 21, tzinfo=UTC)  # the day after the log
    assert main(["simulate-day", "2024-01-21"]) == 1  # nothing served yet
    assert "no served lists" in capsys.readouterr().err

    lake_root = settings.lake_events_dir.parent
    truth = sim.empirical_truth(data.events, data.items)
    lists = pd.concat(
        [
            sim.oracle_lists(truth, 10, users=truth.user_ids[:150]),
            sim.popularity_list(truth, 10),
            sim.popularity_list(truth, 10, user_id="newcomer"),
        ],
        ignore_index=True,
    )
    write_served(
        lake_root, lists, cutoff=day - dt.timedelta(days=1), published_at=day, model_version="1"
    )
    assert main(["simulate-day", "2024-01-21", "--days", "2", "--seed", "9"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("simulated 2 day(s) from 2024-01-21 (seed 9): 300 users, ")
    for word in (
        "visits",
        "impressions",
        "clicks",
        "carts",
        "purchases",
        "skipped 1 listed user(s) without events",
    ):
        assert word in line

    path = settings.landing_events_dir / "simulated-2024-01-21.csv.gz"
    assert line.endswith(str(path)) and path.exists()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp left
    raw = read_event_file(path)
    assert list(raw.columns) == [*EVENT_COLUMNS, "position", "placement"]
    parsed, rejected, _, dropped = normalise_events(raw, source=path.name)
    assert rejected.empty and not dropped and len(parsed) > 0

    # exactly what the library plays for the same inputs
    expected = sim.simulate_served(
        sim.empirical_truth(
            load_snapshot(settings.lake_events_dir, day, 365),
            read_side_file(settings.landing_dir / "items.csv"),
        ),
        read_served(lake_root, day, day + dt.timedelta(days=2)),
        day,
        2,
        seed=9,
    ).events
    assert len(parsed) == len(expected)
    for column in (
        "event_id",
        "user_id",
        "item_id",
        "event_type",
        "device",
        "session_id",
        "placement",
    ):
        assert list(parsed[column]) == list(expected[column]), column
    assert list(parsed["position"]) == list(expected["position"])
    assert (parsed["timestamp"].to_numpy() == expected["timestamp"].to_numpy()).all()
    np.testing.assert_allclose(parsed["value"].to_numpy(float), expected["value"].to_numpy(float))
    counts = parsed["event_type"].value_counts()
    assert f"{counts['impression']:,} impressions" in line
    assert f"{parsed['session_id'].nunique():,} visits" in line
    assert set(parsed["timestamp"].dt.strftime("%Y-%m-%d")) == {"2024-01-21", "2024-01-22"}


def test_simulate_day_command_rejects_bad_arguments(capsys):
    from pipeline.cli import main

    for argv in (["simulate-day", "2024-13-01"], ["simulate-day", "2024-01-01", "--days", "0"]):
        with pytest.raises(SystemExit):
            main(argv)
    assert "YYYY-MM-DD" in capsys.readouterr().err
