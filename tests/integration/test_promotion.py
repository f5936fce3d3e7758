"""Champion/challenger gate, force_promote, rollback and a broken champion, whole DAGs.

Runs in order on one world: a good first model becomes champion; a deliberately worse model
(forced to a poor setting through Params) stays challenger and the first model's lists stay
published; force_promote overrides the gate; the rollback DAG restores the first model's lists
exactly; a champion whose artifact is gone fails publish loudly and changes nothing.
"""

from __future__ import annotations

import datetime as dt
import shutil

import pandas as pd
import psycopg2
import pytest

pytestmark = pytest.mark.integration

UTC = dt.timezone.utc
DAY1 = dt.datetime(2024, 2, 1, tzinfo=UTC)
GOOD = {"top_n": 5, "als_factors": 16, "als_iterations": 8, "holdout_days": 7, "ranker_bags": 2}
BAD = {**GOOD, "als_factors": 2, "als_iterations": 1, "als_regularization": 10.0}


def _promotions(dsn: str) -> pd.DataFrame:
    with psycopg2.connect(dsn) as conn:
        return pd.read_sql(
            "SELECT model_version, decision, reason, triggered_by "
            "FROM recs.model_promotions ORDER BY id",
            conn,
        )


def _champion() -> str:
    from pipeline.registry.versions import champion_version, configure_mlflow

    configure_mlflow()
    return champion_version()


@pytest.fixture(scope="module")
def first_lists(world, published):
    run = world["dags"]["recommendations_nightly"].test(logical_date=DAY1, run_conf=GOOD)
    assert run.state == "success"
    return published()


def test_first_model_becomes_champion(world, first_lists):
    assert _champion() == "1"
    assert set(first_lists["model_version"]) == {"1"}
    audit = _promotions(world["dsn"])
    assert list(audit["decision"]) == ["first"]


def test_the_run_records_the_numeric_kernels_it_trained_with(world, first_lists):
    import json

    from mlflow import MlflowClient

    from pipeline.core.runtime import check_numerics

    client = MlflowClient()
    tag = client.get_run(client.get_model_version("recommender", "1").run_id).data.tags.get(
        "numerics"
    )
    assert tag == check_numerics() and tag.startswith("openblas ")
    meta = json.loads(
        (world["root"] / "data" / "runs" / "2024-02-01T000000" / "model" / "meta.json").read_text()
    )
    assert meta["training"]["numerics"] == tag


def test_registered_bundle_round_trips_to_the_same_predictions(world, first_lists):
    from pipeline.registry.versions import load_bundle, load_version

    model, version = load_version("1")
    users = pd.DataFrame({"user_id": sorted(set(first_lists["user_id"]))[:20] + ["nobody"]})
    served = model.predict(users, params={"n": 7})
    bundle = world["root"] / "data" / "runs" / "2024-02-01T000000" / "model"
    local = load_bundle(bundle).recommend(users["user_id"], 7)
    pd.testing.assert_frame_equal(served.reset_index(drop=True), local.reset_index(drop=True))
    assert (served.groupby("user_id").size() == 7).all()


def test_worse_challenger_does_not_take_over(world, first_lists, published):
    """A challenger the gate rejects stays challenger. On 300 synthetic users a crippled
    ALS alone is not reliably worse (the ranker also reads kNN and popularity candidates;
    the holdout's noise is about +-0.02 nDCG), so the run also asks for a 50% gain."""
    day2 = DAY1 + dt.timedelta(days=1)
    run = world["dags"]["recommendations_nightly"].test(
        logical_date=day2, run_conf={**BAD, "gate_min_relative_gain": 0.5}
    )
    assert run.state == "success"
    assert _champion() == "1"
    lists = published()
    assert set(lists["model_version"]) == {"1"}  # publish kept serving the champion
    last = _promotions(world["dsn"]).iloc[-1]
    assert (last["model_version"], last["decision"]) == ("2", "rejected")
    assert "champion" in last["reason"] or "baseline" in last["reason"]
    assert last["triggered_by"]


def test_force_promote_overrides_the_gate(world, first_lists, published):
    day3 = DAY1 + dt.timedelta(days=2)
    run = world["dags"]["recommendations_nightly"].test(
        logical_date=day3, run_conf={**BAD, "als_factors": 3, "force_promote": True}
    )
    assert run.state == "success"
    assert _champion() == "3"
    assert set(published()["model_version"]) == {"3"}
    last = _promotions(world["dsn"]).iloc[-1]
    assert (last["model_version"], last["decision"]) == ("3", "forced")


def test_rollback_restores_the_previous_lists_exactly(world, first_lists, published):
    run = world["dags"]["recommendations_rollback"].test(run_conf={"version": None})
    assert run.state == "success"
    assert _champion() == "1"
    pd.testing.assert_frame_equal(first_lists, published())
    last = _promotions(world["dsn"]).iloc[-1]
    assert (last["model_version"], last["decision"]) == ("1", "rollback")


def test_broken_champion_artifact_fails_loudly_and_keeps_the_lists(world, first_lists, published):
    from mlflow import MlflowClient

    before = published()
    source = MlflowClient().get_model_version("recommender", "1").source  # models:/m-<id>
    bundle = world["root"] / "mlartifacts" / "models" / source.split("/")[-1] / "artifacts"
    hidden = bundle.with_name("artifacts.hidden")
    shutil.move(bundle, hidden)  # the champion's whole artifact folder disappears
    try:
        run = world["dags"]["recommendations_rollback"].test(run_conf={"version": "1"})
        states = {ti.task_id: ti.state for ti in run.get_task_instances()}
        assert run.state == "failed" and states["republish"] == "failed"
    finally:
        shutil.move(hidden, bundle)
    pd.testing.assert_frame_equal(before, published())


def test_the_same_recipe_on_newer_data_is_a_retrain_not_a_win(world, first_lists, published):
    """After the rollback, v1 (the GOOD recipe) is champion: GOOD again on newer data ties it
    by construction, which the audit row says, with the gate's settings and interval."""
    import json

    day4 = DAY1 + dt.timedelta(days=3)
    # dag.test() keeps earlier runs' conf in the DAG's params (one DAG object, one process):
    # name every value the earlier runs changed.
    conf = {
        **GOOD,
        "als_regularization": 0.05,
        "force_promote": False,
        "gate_min_relative_gain": 0.0,
    }
    run = world["dags"]["recommendations_nightly"].test(logical_date=day4, run_conf=conf)
    assert run.state == "success"
    with psycopg2.connect(world["dsn"]) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT model_version, decision, reason, metrics FROM recs.model_promotions "
            "ORDER BY id DESC LIMIT 1"
        )
        version, decision, reason, metrics = cur.fetchone()
    assert decision == "retrained", _promotions(world["dsn"]).to_string()
    assert "same recipe" in reason and "tie, not a win" in reason
    assert metrics["same_recipe"] is True and metrics["interval"] == [0.0, 0.0]
    assert metrics["tolerance"] == 0.001 and metrics["min_relative_gain"] == 0.0
    assert _champion() == version
    assert set(published()["model_version"]) == {version}
    register = json.loads(
        (world["root"] / "data" / "runs" / "2024-02-04T000000" / "register.json").read_text()
    )
    assert register["serve_version"] == version
    from mlflow import MlflowClient

    client = MlflowClient()
    logged = client.get_run(client.get_model_version("recommender", version).run_id).data
    assert logged.metrics["gate_diff_low"] == 0.0 and logged.metrics["gate_diff_high"] == 0.0


def test_publish_serves_the_version_its_gate_decided_on_not_the_alias(world, published):
    """Another run may move ``champion`` between this run's register and publish."""
    from pipeline import nightly
    from pipeline.core.config import Settings
    from pipeline.registry.versions import set_champion

    day4 = DAY1 + dt.timedelta(days=3)
    decided = _champion()
    set_champion("2", decision="test", reason="another run moved the alias meanwhile")
    try:
        result = nightly.publish(
            Settings(top_n=5),
            day4,
            dsn=world["dsn"],
            decision={"serve_version": decided, "reason": "decided"},
        )
    finally:
        set_champion(decided, decision="test", reason="restore")
    assert result["published"] and result["model_version"] == decided
    assert set(published()["model_version"]) == {decided}


def test_a_champion_whose_decision_was_never_recorded_is_healed_by_the_retry(world):
    """Before decisions were recorded ahead of the alias move, PostgreSQL failing inside
    ``register`` left the champion moved and ``model_promotions`` without its row, and the
    retry said "unchanged". The retry now records the decision, marked as recorded late."""
    from pipeline import nightly
    from pipeline.core.config import Settings

    day4 = DAY1 + dt.timedelta(days=3)
    champion = _champion()
    with psycopg2.connect(world["dsn"]) as conn, conn.cursor() as cur:
        cur.execute("DELETE FROM recs.model_promotions WHERE model_version = %s", (champion,))
    conf = {**GOOD, "als_regularization": 0.05}
    result = nightly.register(Settings(**conf), day4, dsn=world["dsn"], triggered_by="retry")
    assert result["decision"] == "unchanged" and result["serve_version"] == champion
    healed = _promotions(world["dsn"]).iloc[-1]
    assert healed["model_version"] == champion and healed["triggered_by"] == "retry"
    assert healed["reason"].startswith("recorded late")
    again = nightly.register(Settings(**conf), day4, dsn=world["dsn"], triggered_by="retry")
    assert again["decision"] == "unchanged"
    assert len(_promotions(world["dsn"]).query("model_version == @champion")) == 1  # once
