"""The impact DAG via ``dag.test()`` on a simulated CMS: real Postgres, real MLflow store.

A synthetic world with known tastes; the nightly publishes lists for 2024-02-01; a simulated
CMS shows them for a week (impressions with positions, clicks, carts, purchases), the
feedback lands as a JSON-lines file and goes through the ordinary ingest; the impact DAG then
attributes it to the served lists.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.integration

UTC = dt.timezone.utc
CUTOFF = dt.datetime(2024, 2, 1, tzinfo=UTC)
AS_OF = CUTOFF + dt.timedelta(days=7)
CONF = {"top_n": 5, "als_iterations": 3, "als_factors": 8, "holdout_days": 7, "ranker_bags": 1}


@pytest.fixture(scope="module")
def world(tmp_path_factory, pg_dsn_module, airflow_db):
    from airflow.dag_processing.dagbag import BundleDagBag

    from pipeline.lake.demo import write_landing
    from pipeline.lake.demo.synthetic import generate_world

    root = tmp_path_factory.mktemp("impact")
    generated = generate_world(n_users=400, n_items=120, n_days=31, start="2024-01-01", seed=4)
    write_landing(generated.data, root / "data" / "landing", name="clicks", fmt="csv", gzip=True)
    env = pytest.MonkeyPatch()
    env.setenv("RECS_DATA_DIR", str(root / "data"))
    env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    env.setenv("MLFLOW_ARTIFACT_ROOT", str(root / "mlartifacts"))
    env.setenv("AIRFLOW_CONN_RECS_SERVING", pg_dsn_module)
    env.setenv("RECS_LANDING_SETTLE_SECONDS", "0")
    repo = Path(__file__).parents[2]
    dags = BundleDagBag(dag_folder=str(repo / "dags"), bundle_path=repo / "dags").dags
    for dag in dags.values():
        for task in dag.tasks:
            task.retries = 0
    run = dags["recommendations_nightly"].test(logical_date=CUTOFF, run_conf=CONF)
    assert run.state == "success"
    yield {"root": root, "dags": dags, "truth": generated.truth, "dsn": pg_dsn_module}
    env.undo()


def test_simulated_feedback_is_ingested_and_attributed(world):
    from pipeline.core.config import Settings
    from pipeline.lake.demo.simulate import simulate_day
    from pipeline.lake.ingest import ingest_lake
    from pipeline.lake.served import read_served

    data = world["root"] / "data"
    served = read_served(data / "lake", CUTOFF, AS_OF)
    lists = served[["user_id", "rank", "item_id"]]
    feedback = pd.concat(
        [
            simulate_day(world["truth"], lists, CUTOFF + dt.timedelta(days=d), seed=d)
            for d in range(7)
        ],
        ignore_index=True,
    )
    feedback["timestamp"] = pd.to_datetime(feedback["timestamp"], utc=True).dt.strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    path = data / "landing" / "events" / "feedback.jsonl"
    path.write_text(feedback.to_json(orient="records", lines=True))
    report = ingest_lake(Settings())
    assert report.rows_new == len(feedback) and report.rows_rejected == 0

    run = world["dags"]["recommendations_impact"].test(
        logical_date=AS_OF, run_conf={"as_of": AS_OF.isoformat(), "days": 7}
    )
    assert run.state == "success"
    summary = json.loads((data / "impact" / "2024-02-08" / "summary.json").read_text())
    (variant,) = summary["variants"]
    clicks = int((feedback["event_type"] == "click").sum())
    impressions = int((feedback["event_type"] == "impression").sum())
    # Every simulated impression and click is on a served item of a served user.
    assert variant["impressions"] == impressions and variant["clicks"] == clicks
    assert variant["ctr"] == pytest.approx(clicks / impressions)
    assert variant["users_active"] == feedback["user_id"].nunique()
    daily = pd.read_csv(data / "impact" / "2024-02-08" / "daily.csv")
    assert len(daily) == 7 and daily["impressions"].sum() == impressions
    assert (daily["ctr_top3"] >= daily["ctr"]).mean() > 0.5  # position bias shows
    assert Path(summary["report"]).read_bytes()[:4] == b"\x89PNG"
    # The same daily rows are in the serving DB's impact table.
    from pipeline.serving.store import read_impact

    table = read_impact(dsn=world["dsn"], sqlite_path=Path("/nonexistent"))
    assert len(table) == 7 and int(table["impressions"].sum()) == impressions
    assert int(table["clicks"].sum()) == clicks

    import mlflow

    (impact_run,) = mlflow.search_runs(experiment_names=["impact"], output_format="list")
    assert impact_run.data.tags["as_of"] == "2024-02-08"


def test_an_experiment_is_served_simulated_and_compared_with_its_control(world):
    """The experiment's week: the nightly serves control (popularity) and model (champion)
    by the assignment, the simulated CMS clicks by the world's true tastes, and the impact
    run compares the variants on users, checks the split and reads the fixed horizon."""
    from pipeline.cli import main
    from pipeline.core.config import Settings
    from pipeline.lake.demo.simulate import OrganicModel, simulate_day
    from pipeline.lake.ingest import ingest_lake
    from pipeline.lake.served import read_served

    data = world["root"] / "data"
    config = world["root"] / "experiment.json"
    config.write_text(
        json.dumps(
            {
                "name": "model-vs-popular",
                "salt": "impact-test",
                "planned_users_per_variant": 100,
                "variants": [
                    {"name": "control", "kind": "popularity", "share": 0.4},
                    {"name": "model", "kind": "model", "model": "champion", "share": 0.4},
                    {"name": "holdout", "kind": "holdout", "share": 0.2},
                ],
            }
        )
    )
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
    week = AS_OF + dt.timedelta(days=7)
    run = world["dags"]["recommendations_nightly"].test(logical_date=AS_OF, run_conf=CONF)
    assert run.state == "success"
    served = read_served(data / "lake", AS_OF, week)
    assert set(served.loc[~served["user_id"].str.startswith("__default__"), "variant"]) == {
        "control",
        "model",
    }
    personal = ~served["user_id"].str.startswith("__default__:")  # every user has a list
    lists = served.loc[personal, ["user_id", "rank", "item_id", "variant"]].fillna(
        {"variant": "(none)"}
    )
    assert not served["variant"].eq("holdout").any()  # the holdout gets no lists
    # everyone browses too (organic views, carts, purchases): the holdout's baseline
    feedback = pd.concat(
        [
            simulate_day(
                world["truth"],
                lists,
                AS_OF + dt.timedelta(days=d),
                seed=100 + d,
                organic=OrganicModel(1.0),
            )
            for d in range(7)
        ],
        ignore_index=True,
    )
    feedback["timestamp"] = pd.to_datetime(feedback["timestamp"], utc=True).dt.strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    (data / "landing" / "events" / "feedback-2.jsonl").write_text(
        feedback.drop(columns="variant").to_json(orient="records", lines=True)
    )
    assert ingest_lake(Settings()).rows_new == len(feedback)

    run = world["dags"]["recommendations_impact"].test(
        logical_date=week, run_conf={"as_of": week.isoformat(), "days": 7}
    )
    assert run.state == "success"
    summary = json.loads((data / "impact" / f"{week:%Y-%m-%d}" / "summary.json").read_text())
    by_variant = {row["variant"]: row for row in summary["variants"]}
    assert set(by_variant) == {"control", "model"}
    assert summary["srm"] is not None and summary["srm"]["expected_shares"] == {
        "control": 0.4,
        "model": 0.4,
    }
    comparison = {row["metric"]: row for row in summary["comparison"]}
    assert set(comparison) == {"engaged", "converted"}
    engaged = comparison["engaged"]
    assert (engaged["variant"], engaged["control"]) == ("model", "control")
    assert engaged["n_variant"] == by_variant["model"]["users_active"]
    assert engaged["decision"] in ("significant", "no significant difference")  # horizon met
    # the holdout: site-wide conversion per assigned user (users active before the week)
    sitewide = {row["variant"]: row for row in summary["sitewide"]}
    assert {"control", "model", "holdout"} <= set(sitewide)
    assert sitewide["holdout"]["users"] > 0 and sitewide["holdout"]["active_any"] > 0
    versus = {row["variant"]: row for row in summary["holdout_comparison"]}
    assert set(versus) == {"control", "model"}
    assert all(
        row["control"] == "holdout"
        and row["metric"] == "converted_any"
        and row["n_control"] == sitewide["holdout"]["users"]
        for row in versus.values()
    )
    assert (data / "impact" / f"{week:%Y-%m-%d}" / "holdout_comparison.csv").exists()


def test_the_online_gate_promotes_a_version_only_on_its_online_result(world):
    """``gate_online``: a new recipe that passes the offline gate waits as ``online-test``;
    an experiment serves it beside the champion; at the planned horizon the impact run
    records ``promoted-online`` in ``model_promotions`` and moves ``champion`` to it.

    The week's lists are written to the served history by the test, not by ``publish``
    (whose per-variant serving the previous test covers): the challenger's users get the
    world's best lists and the champion's users its popularity list, so the truth says which
    variant is better and the gate must see it."""
    from mlflow import MlflowClient

    from pipeline.cli import main
    from pipeline.core.config import Settings
    from pipeline.evaluation.gate import ONLINE_TEST, PROMOTED_ONLINE
    from pipeline.lake.demo.simulate import oracle_lists, popularity_list, simulate_day
    from pipeline.lake.ingest import ingest_lake
    from pipeline.lake.served import write_served
    from pipeline.registry.versions import MODEL_NAME, champion_version, configure_mlflow
    from pipeline.serving.experiments import Experiment
    from pipeline.serving.store import recorded_decision

    data, truth = world["root"] / "data", world["truth"]
    store = {"dsn": world["dsn"], "sqlite_path": Settings().serving_sqlite_path}
    week = AS_OF + dt.timedelta(days=7)
    previous = world["root"] / "experiment.json"
    if previous.exists():  # the previous test's experiment: one runs at a time
        assert main(["experiment", "stop", "--config", str(previous), "--by", "test"]) == 0
    configure_mlflow()
    champion = champion_version()
    # a different recipe; the tolerance lets it pass the offline gate on this small holdout
    run = world["dags"]["recommendations_nightly"].test(
        logical_date=week,
        run_conf={**CONF, "als_factors": 12, "gate_online": True, "gate_tolerance": 1.0},
    )
    assert run.state == "success"
    challenger = MlflowClient().get_model_version_by_alias(MODEL_NAME, "challenger").version
    assert challenger != champion
    assert (
        recorded_decision(**store, model_name="recommender", model_version=challenger)
        == ONLINE_TEST
    )
    assert champion_version() == champion  # waits for the online result

    config = world["root"] / "online-gate.json"
    config.write_text(
        json.dumps(
            {
                "name": "online-gate",
                "salt": "online-gate-test",
                "planned_users_per_variant": 100,
                "variants": [
                    {"name": "champion", "kind": "model", "model": "champion", "share": 0.5},
                    {"name": "challenger", "kind": "model", "model": str(challenger), "share": 0.5},
                ],
            }
        )
    )
    assert main(["experiment", "start", "--config", str(config), "--by", "test"]) == 0
    experiment = Experiment.load(data / "experiments" / "online-gate.json")
    users = pd.Series(truth.user_ids, dtype=object)
    variant = pd.Series(experiment.assign(users), index=users)
    best = oracle_lists(truth, 5, users=users[variant.to_numpy() == "challenger"].to_numpy())
    popular = popularity_list(truth, 5)
    control_users = users[variant.to_numpy() == "champion"].to_numpy()
    plain = pd.DataFrame(
        {
            "user_id": control_users.repeat(len(popular)),
            "rank": list(popular["rank"]) * len(control_users),
            "item_id": list(popular["item_id"]) * len(control_users),
        }
    )
    lists = pd.concat(
        [
            best.assign(variant="challenger", model_version=str(challenger)),
            plain.assign(variant="champion", model_version=str(champion)),
        ],
        ignore_index=True,
    ).astype({"user_id": str, "item_id": str})
    write_served(
        data / "lake", lists.assign(experiment="online-gate"), cutoff=week, published_at=week
    )
    feedback = pd.concat(
        [
            simulate_day(
                truth,
                lists[["user_id", "rank", "item_id", "variant"]],
                week + dt.timedelta(days=d),
                seed=200 + d,
            )
            for d in range(7)
        ],
        ignore_index=True,
    )
    feedback["timestamp"] = pd.to_datetime(feedback["timestamp"], utc=True).dt.strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    (data / "landing" / "events" / "feedback-3.jsonl").write_text(
        feedback.drop(columns="variant").to_json(orient="records", lines=True)
    )
    assert ingest_lake(Settings()).rows_new == len(feedback)

    end = week + dt.timedelta(days=7)
    run = world["dags"]["recommendations_impact"].test(
        logical_date=end, run_conf={"as_of": end.isoformat(), "days": 7}
    )
    assert run.state == "success"
    summary = json.loads((data / "impact" / f"{end:%Y-%m-%d}" / "summary.json").read_text())
    (verdict,) = summary["online_gate"]
    assert (verdict["version"], verdict["variant"]) == (str(challenger), "challenger")
    assert min(verdict["n_challenger"], verdict["n_champion"]) >= 100
    assert verdict["decision"] == PROMOTED_ONLINE and verdict["diff_ci"][0] > 0, verdict
    assert champion_version() == str(challenger)
    assert (
        recorded_decision(**store, model_name="recommender", model_version=challenger)
        == PROMOTED_ONLINE
    )

    # decided once: the next day's run leaves the decision and the champion alone
    again = dt.datetime(end.year, end.month, end.day, 12, tzinfo=UTC)
    run = world["dags"]["recommendations_impact"].test(
        logical_date=again, run_conf={"as_of": again.isoformat(), "days": 7}
    )
    assert run.state == "success"
    assert champion_version() == str(challenger)
