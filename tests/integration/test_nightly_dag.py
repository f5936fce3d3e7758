"""The whole nightly DAG via ``dag.test()``: synthetic data, real Postgres, real MLflow store.

One module-scoped world (landing data, MLflow store, throwaway Postgres database) and runs
in order: a first run publishes, a re-run of the same date republishes identical rows, and a
run with a broken landing file fails without touching what is published.
"""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pytest

from pipeline.core.config import DEFAULT_USER

pytestmark = pytest.mark.integration

UTC = dt.timezone.utc
CUTOFF = dt.datetime(2024, 2, 1, tzinfo=UTC)
CONF = {"top_n": 5, "als_iterations": 5, "als_factors": 16, "holdout_days": 7, "ranker_bags": 2}


def test_first_run_publishes_a_list_for_every_user_seen_before_the_cutoff(world, published):
    run = world["dags"]["recommendations_nightly"].test(logical_date=CUTOFF, run_conf=CONF)
    assert run.state == "success"

    events = world["events"]
    before = events[pd.to_datetime(events["timestamp"], utc=True) < CUTOFF]
    rows = published()
    users = set(rows["user_id"])
    assert users == set(before["user_id"]) | {DEFAULT_USER}
    sizes = rows.groupby("user_id")["rank"].agg(["count", "min", "max"])
    assert (sizes["count"] == 5).all() and (sizes["min"] == 1).all() and (sizes["max"] == 5).all()
    # Point in time: items first seen after the cutoff are never recommended.
    only_later = set(events["item_id"]) - set(before["item_id"])
    assert set(rows["item_id"]).isdisjoint(only_later)
    assert (rows["generated_at"] == pd.Timestamp(CUTOFF)).all()
    assert rows["reason"].str.len().gt(0).all()
    assert set(rows["source"]) <= {"als", "ranker", "popular"}
    assert rows["model_version"].nunique() == 1
    # What was served is kept in the lake for attribution, keyed by user.
    from pipeline.lake.served import read_served

    served = read_served(world["root"] / "data" / "lake")
    assert len(served) == len(rows) and set(served["cutoff"]) == {pd.Timestamp(CUTOFF)}
    assert set(served["model_version"]) == set(rows["model_version"])


def test_rerun_of_the_same_date_publishes_identical_rows(world, published):
    first = published()
    run = world["dags"]["recommendations_nightly"].test(logical_date=CUTOFF, run_conf=CONF)
    assert run.state == "success"
    pd.testing.assert_frame_equal(first, published())


def test_one_mlflow_run_per_night_holds_datasets_stages_and_trend(world, published):
    """The champion's run is the night's run: input datasets with digests, a nested run per
    model stage with system metrics, the registered model and the trend plot."""
    import json

    from mlflow import MlflowClient

    from pipeline.core.config import Settings
    from pipeline.registry.tracking import RUN_FILE, file_digest

    client = MlflowClient()
    version = client.get_model_version_by_alias("recommender", "champion")
    night = client.get_run(version.run_id)
    assert night.info.run_name == "nightly-2024-02-01" and night.info.status == "FINISHED"
    run_dir = Settings().run_dir(CUTOFF)
    # the re-run of the date (previous test) was a night of its own, which found its model
    # already registered
    rerun = client.get_run(json.loads((run_dir / RUN_FILE).read_text())["run_id"])
    assert rerun.info.run_id != night.info.run_id
    assert rerun.data.tags["reused_version"] == str(version.version)
    assert rerun.info.status == "FINISHED"
    inputs = {
        next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset
        for i in night.inputs.dataset_inputs
    }
    assert set(inputs) == {"training", "evaluation"}
    digest = file_digest(run_dir / "events_encoded.parquet")
    assert inputs["training"].name == "events-2024-02-01"
    assert inputs["evaluation"].name == "holdout-2024-02-01"
    assert all(d.digest == digest for d in inputs.values())
    children = client.search_runs(
        [night.info.experiment_id], f"tags.mlflow.parentRunId = '{night.info.run_id}'"
    )
    assert {c.data.tags["stage"] for c in children} == {"tune", "train", "evaluate", "register"}
    assert all(c.info.status == "FINISHED" for c in children)
    sampled = [c for c in children if any(k.startswith("system/") for k in c.data.metrics)]
    assert sampled, "no stage logged system metrics"
    assert "model_ndcg_at_10" in night.data.metrics and night.data.params
    artifacts = {a.path for a in client.list_artifacts(night.info.run_id, "report")}
    assert "report/trend.png" in artifacts


def test_a_malformed_landing_file_fails_the_run_and_keeps_what_is_published(world, published):
    before = published()
    landing = world["root"] / "data" / "landing" / "events"
    good = next(landing.glob("*.gz")).read_bytes()
    (landing / "broken.csv.gz").write_bytes(good[: len(good) // 2])  # truncated gzip
    dag = world["dags"]["recommendations_nightly"]
    dag.get_task("ingest").retries = 2  # bad input must fail at once, not after retry delays
    try:
        run = dag.test(logical_date=CUTOFF + dt.timedelta(days=1), run_conf=CONF)
        assert run.state == "failed"
        tis = {ti.task_id: ti for ti in run.get_task_instances()}
        assert tis["ingest"].state == "failed" and tis["publish"].state != "success"
        assert tis["ingest"].try_number == 1  # failed for good on the first try: no retry
    finally:
        dag.get_task("ingest").retries = 0
        (landing / "broken.csv.gz").unlink()
    pd.testing.assert_frame_equal(before, published())
