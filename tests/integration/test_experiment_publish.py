"""An A/B experiment through the whole nightly DAG (``dag.test()``, real Postgres and MLflow
store): a first run publishes without one; an experiment {control: popularity 30%, model:
champion 30%, holdout: 10%} is started with the command line; the next day's run publishes
each user's list from the variant ``Experiment.assign`` puts them in, under the same business
rules, with a fallback per recommending variant, the holdout users' assignments and no rows
for them; the CMS query is unchanged and the served-list history carries the variants."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pandas as pd
import psycopg2
import pytest

from pipeline.core.config import DEFAULT_USER, Settings

pytestmark = pytest.mark.integration

UTC = dt.timezone.utc
DAY1 = dt.datetime(2024, 2, 1, tzinfo=UTC)
DAY2 = DAY1 + dt.timedelta(days=1)
CONF = {"top_n": 5, "als_iterations": 5, "als_factors": 16, "holdout_days": 7, "ranker_bags": 2}
CONFIG = {
    "name": "ranker-vs-popular",
    "salt": "2024-02-ranker",
    "planned_days": 14,
    "variants": [
        {"name": "control", "kind": "popularity", "share": 0.3},
        {"name": "model", "kind": "model", "model": "champion", "share": 0.3},
        {"name": "holdout", "kind": "holdout", "share": 0.1},
    ],
}
NOWHERE = Path("/nonexistent")


@pytest.fixture(scope="module")
def runs(world, published):
    """Day 1 without an experiment, the experiment started, day 2 with it."""
    from pipeline.cli import main
    from pipeline.serving.experiments import Experiment
    from pipeline.serving.store import active_experiment

    nightly = world["dags"]["recommendations_nightly"]
    assert nightly.test(logical_date=DAY1, run_conf=CONF).state == "success"
    before = published()
    config = world["root"] / "ranker-vs-popular.json"
    config.write_text(json.dumps(CONFIG))
    assert (
        main(
            [
                "experiment",
                "start",
                "--config",
                str(config),
                "--by",
                "integration test",
                "--reason",
                "does personalisation beat popularity?",
            ]
        )
        == 0
    )
    record = active_experiment(world["dsn"], NOWHERE)
    experiment = Experiment.from_dict(record["config"])
    assert nightly.test(logical_date=DAY2, run_conf=CONF).state == "success"
    return {"before": before, "after": published(), "experiment": experiment, "record": record}


def _cms(dsn: str, user_id: str) -> list[tuple]:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SET search_path = recs")
        cur.execute(
            "SELECT item_id, reason FROM recommendations WHERE user_id = %s ORDER BY rank",
            (user_id,),
        )
        return cur.fetchall()


def _rules_lists(recommender, users, *, personal: bool) -> pd.DataFrame:
    """The lists publish's business rules give ``users`` from ``recommender`` (its own
    candidates, or none: its fallback list only), from the day-2 run's events."""
    from pipeline.core.ids import EncodedEvents
    from pipeline.lake.readers import read_side_file
    from pipeline.serving.rules import CANDIDATE_COLUMNS, build_consumed, recommend_with_rules

    settings = Settings(**CONF)
    events = EncodedEvents.read(settings.run_dir(DAY2), ("user_id", "item_id", "event_type"))

    def nothing(chunk, k):
        return pd.DataFrame({column: pd.Series(dtype=object) for column in CANDIDATE_COLUMNS})

    lists, _ = recommend_with_rules(
        recommender.recommend if personal else nothing,
        np.asarray(users, dtype=object),
        candidate_multiplier=settings.candidate_multiplier,
        consumed=build_consumed(events, settings.consumed_event_types),
        items=read_side_file(settings.landing_dir / "items.csv"),
        fallback=recommender.popular_,
        n=settings.top_n,
        max_per_category=settings.max_per_category,
        item_ttl_days=settings.item_ttl_days,
        cutoff=DAY2,
    )
    return lists


def _items(frame: pd.DataFrame) -> dict[str, list[str]]:
    ordered = frame.sort_values(["user_id", "rank"])
    return {user: list(rows["item_id"]) for user, rows in ordered.groupby("user_id")}


def test_the_cli_recorded_the_start_and_saved_the_config(world, runs):
    record = runs["record"]
    assert (record["name"], record["version"], record["action"]) == (
        "ranker-vs-popular",
        1,
        "start",
    )
    assert record["changed_by"] == "integration test"
    saved = world["root"] / "data" / "experiments" / "ranker-vs-popular.json"
    assert json.loads(saved.read_text()) == record["config"]


def test_without_an_experiment_every_row_has_a_null_variant(runs):
    before = runs["before"]
    assert before["variant"].isna().all() and before["experiment"].isna().all()
    assert set(before["user_id"]).isdisjoint({"__default__:control", "__default__:model"})


def test_users_get_the_lists_of_their_variant(world, runs):
    from pipeline.registry.versions import load_version
    from pipeline.serving.store import live_version

    after, experiment = runs["after"], runs["experiment"]
    served = live_version(dsn=world["dsn"], sqlite_path=NOWHERE)["model_version"]
    events = world["events"]
    users = sorted(
        set(events.loc[pd.to_datetime(events["timestamp"], utc=True) < DAY2, "user_id"].astype(str))
    )
    variant = dict(zip(users, experiment.assign(users), strict=True))
    groups = {
        name: [u for u, v in variant.items() if v == name]
        for name in ("control", "model", "holdout", None)
    }
    assert all(len(members) >= 10 for members in groups.values()), {
        k: len(v) for k, v in groups.items()
    }

    personal = after[~after["user_id"].str.startswith(DEFAULT_USER)]
    assert set(personal["user_id"]) == set(users) - set(groups["holdout"])
    per_user = personal.drop_duplicates("user_id").set_index("user_id")
    for name in ("control", "model"):
        assert set(per_user.loc[groups[name], "variant"]) == {name}
        assert set(per_user.loc[groups[name], "experiment"]) == {"ranker-vs-popular"}
    assert per_user.loc[groups[None], "variant"].isna().all()
    assert per_user.loc[groups[None], "experiment"].isna().all()
    assert set(after["model_version"]) == {served}  # "champion" is the version this run serves

    recommender = load_version(served)[0].unwrap_python_model().recommender
    lists = _items(personal)
    model_users = groups["model"] + groups[None]
    expected_model = _items(_rules_lists(recommender, model_users, personal=True))
    expected_control = _items(_rules_lists(recommender, groups["control"], personal=False))
    assert {u: lists[u] for u in model_users} == {u: expected_model[u] for u in model_users}
    assert {u: lists[u] for u in groups["control"]} == {
        u: expected_control[u] for u in groups["control"]
    }
    control = personal[personal["variant"] == "control"]
    assert set(control["source"]) == {"popular"}  # no personalisation, the same rules
    model = personal[personal["variant"] == "model"]
    assert set(model["source"]) - {"popular"}  # the model's own picks
    differs = sum(lists[u] != expected_control.get(u) for u in groups["model"])
    assert differs > len(groups["model"]) // 2  # personalised, unlike the control


def test_fallbacks_per_variant_and_none_for_the_holdout(world, runs):
    from pipeline.serving.store import read_assignments, read_user_list

    after, experiment = runs["after"], runs["experiment"]
    defaults = _items(after[after["user_id"].str.startswith(DEFAULT_USER)])
    assert set(defaults) == {DEFAULT_USER, "__default__:control", "__default__:model"}
    assert defaults["__default__:control"] == defaults[DEFAULT_USER]  # the same fallback list
    assert defaults["__default__:model"] == defaults[DEFAULT_USER]  # champion = served model
    default_rows = after[after["user_id"] == DEFAULT_USER]
    assert default_rows["variant"].isna().all()
    assert set(after.loc[after["user_id"] == "__default__:model", "variant"]) == {"model"}

    assignments = read_assignments(dsn=world["dsn"], sqlite_path=NOWHERE)
    assert set(assignments["experiment"]) == {"ranker-vs-popular"}
    assert list(experiment.assign(assignments["user_id"])) == list(assignments["variant"])
    holdout = assignments.loc[assignments["variant"] == "holdout", "user_id"]
    assert len(holdout) >= 10
    for user in holdout.head(5):
        assert _cms(world["dsn"], user) == []  # no rows: the CMS must not fall back
        assert read_user_list(user, dsn=world["dsn"], sqlite_path=NOWHERE).empty
    newcomer = next(
        f"new-user-{i}" for i in range(1000) if experiment.assign([f"new-user-{i}"])[0] == "control"
    )
    fallback = read_user_list(newcomer, dsn=world["dsn"], sqlite_path=NOWHERE)
    assert set(fallback["user_id"]) == {DEFAULT_USER}  # unknown: not assigned by the DB


def test_the_cms_query_is_unchanged(world, runs):
    after = runs["after"]
    user = after.loc[after["variant"] == "model", "user_id"].iloc[0]
    rows = after[after["user_id"] == user].sort_values("rank")
    assert _cms(world["dsn"], user) == list(zip(rows["item_id"], rows["reason"], strict=True))
    assert list(after.columns[:8]) == [
        "user_id",
        "rank",
        "item_id",
        "score",
        "reason",
        "source",
        "model_version",
        "generated_at",
    ]
    assert list(after.columns[8:]) == ["variant", "experiment"]


def test_the_served_history_carries_the_variants(world, runs):
    from pipeline.lake.served import read_served

    served = read_served(world["root"] / "data" / "lake", DAY2, DAY2 + dt.timedelta(days=1))
    served = served[served["cutoff"] == pd.Timestamp(DAY2)]
    after = runs["after"]
    assert len(served) == len(after)
    merged = after.merge(served, on=["user_id", "rank"], suffixes=("", "_served"))
    assert len(merged) == len(after)
    for column in ("item_id", "variant", "experiment", "model_version"):
        assert (
            merged[column].fillna("-").tolist() == merged[f"{column}_served"].fillna("-").tolist()
        ), column
    assert set(served["variant"].dropna()) == {"control", "model"}

    publish = json.loads((Settings(**CONF).run_dir(DAY2) / "publish.json").read_text())
    assert publish["experiment"]["name"] == "ranker-vs-popular"
    assert publish["experiment"]["variants"]["holdout"]["users"] >= 10
