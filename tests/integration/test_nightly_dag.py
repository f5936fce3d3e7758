"""The whole nightly DAG via ``dag.test()``: synthetic data, real Postgres, real MLflow store.

One module-scoped world (landing data, MLflow store, throwaway Postgres database) and runs
in order: a first run publishes, a re-run of the same date republishes identical rows, and a
run with a broken landing file fails without touching what is published.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pandas as pd
import pytest

from pipeline.config import DEFAULT_USER

pytestmark = pytest.mark.integration

UTC = dt.timezone.utc
CUTOFF = dt.datetime(2024, 2, 1, tzinfo=UTC)
CONF = {"top_n": 5, "als_iterations": 5, "als_factors": 16, "holdout_days": 7}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world(tmp_path_factory, pg_dsn_module, airflow_db):
    """Landing data (with events after the cutoff), env for the stores, and the DAG."""
    from pipeline.data import write_landing
    from pipeline.data.synthetic import generate_clickstream

    root = tmp_path_factory.mktemp("nightly")
    data = generate_clickstream(n_users=300, n_items=150, n_days=40, start="2024-01-01",
                                seed=7)
    write_landing(data, root / "data" / "landing", name="clicks", fmt="csv", gzip=True)
    env = pytest.MonkeyPatch()
    env.setenv("RECS_DATA_DIR", str(root / "data"))
    env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    env.setenv("MLFLOW_ARTIFACT_ROOT", str(root / "mlartifacts"))
    env.setenv("AIRFLOW_CONN_RECS_SERVING", pg_dsn_module)
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(REPO / "dags")).dags["recommendations_nightly"]
    for task in dag.tasks:
        task.retries = 0  # a failure should fail the test run now, not after retry delays
    yield {"root": root, "events": data.events, "dag": dag, "dsn": pg_dsn_module}
    env.undo()


def _published(dsn: str) -> pd.DataFrame:
    from pipeline.serving import read_all

    return read_all(dsn=dsn, sqlite_path=Path("/nonexistent"))


def test_first_run_publishes_a_list_for_every_user_seen_before_the_cutoff(world):
    run = world["dag"].test(logical_date=CUTOFF, run_conf=CONF)
    assert run.state == "success"

    events = world["events"]
    before = events[pd.to_datetime(events["timestamp"], utc=True) < CUTOFF]
    published = _published(world["dsn"])
    users = set(published["user_id"])
    assert users == set(before["user_id"]) | {DEFAULT_USER}
    sizes = published.groupby("user_id")["rank"].agg(["count", "min", "max"])
    assert (sizes["count"] == 5).all() and (sizes["min"] == 1).all() and (sizes["max"] == 5).all()
    # Point in time: items first seen after the cutoff are never recommended.
    only_later = set(events["item_id"]) - set(before["item_id"])
    assert set(published["item_id"]).isdisjoint(only_later)
    assert (published["generated_at"] == pd.Timestamp(CUTOFF)).all()
    assert published["reason"].str.len().gt(0).all()
    assert set(published["source"]) <= {"als", "popular"}
    assert published["model_version"].nunique() == 1


def test_rerun_of_the_same_date_publishes_identical_rows(world):
    first = _published(world["dsn"])
    run = world["dag"].test(logical_date=CUTOFF, run_conf=CONF)
    assert run.state == "success"
    pd.testing.assert_frame_equal(first, _published(world["dsn"]))


def test_a_malformed_landing_file_fails_the_run_and_keeps_what_is_published(world):
    before = _published(world["dsn"])
    landing = world["root"] / "data" / "landing" / "events"
    good = next(landing.glob("*.gz")).read_bytes()
    (landing / "broken.csv.gz").write_bytes(good[: len(good) // 2])  # truncated gzip
    try:
        run = world["dag"].test(logical_date=CUTOFF + dt.timedelta(days=1), run_conf=CONF)
        assert run.state == "failed"
        states = {ti.task_id: ti.state for ti in run.get_task_instances()}
        assert states["ingest"] == "failed" and states["publish"] != "success"
    finally:
        (landing / "broken.csv.gz").unlink()
    pd.testing.assert_frame_equal(before, _published(world["dsn"]))
