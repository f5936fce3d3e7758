"""A throwaway world for whole-DAG runs: landing data, MLflow store, serving DB, the DAGs."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]
UTC = dt.timezone.utc


@pytest.fixture(scope="module")
def world(tmp_path_factory, pg_dsn_module, airflow_db):
    """Synthetic landing data (40 days from 2024-01-01), env pointing every store at a temp
    folder or a throwaway Postgres database, and the DAGs with retries off."""
    from airflow.dag_processing.dagbag import BundleDagBag

    from pipeline.lake.demo import write_landing
    from pipeline.lake.demo.synthetic import generate_clickstream

    root = tmp_path_factory.mktemp("world")
    data = generate_clickstream(n_users=300, n_items=150, n_days=40, start="2024-01-01", seed=7)
    write_landing(data, root / "data" / "landing", name="clicks", fmt="csv", gzip=True)
    env = pytest.MonkeyPatch()
    env.setenv("RECS_DATA_DIR", str(root / "data"))
    env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    env.setenv("MLFLOW_ARTIFACT_ROOT", str(root / "mlartifacts"))
    env.setenv("AIRFLOW_CONN_RECS_SERVING", pg_dsn_module)
    env.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # short stages get samples
    dags = BundleDagBag(dag_folder=str(REPO / "dags"), bundle_path=REPO / "dags").dags
    for dag in dags.values():
        for task in dag.tasks:
            task.retries = 0  # a failure should fail the run now, not after retry delays
    yield {"root": root, "events": data.events, "dags": dags, "dsn": pg_dsn_module}
    env.undo()


@pytest.fixture(scope="module")
def published(world):
    """Reads the whole ``recommendations`` view of the world, ordered by user and rank."""
    from pipeline.serving.store import read_all

    def read() -> pd.DataFrame:
        return read_all(dsn=world["dsn"], sqlite_path=Path("/nonexistent"))

    return read
