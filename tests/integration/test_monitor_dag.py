"""The monitor DAG via ``dag.test()`` against real Postgres and a real MLflow store.

The world's data is stationary until 2024-02-08, when every session moves to the TV app
(a planted device-mix drift). A nightly run for 2024-02-01 makes the champion; the monitor
then compares later windows with the champion's last week:

* for 2024-02-01 (the champion's own window) every PSI is 0 and nothing fires;
* for 2024-02-15 the device mix is at alert level: the monitoring table, MLflow and the PNG
  report have it, and the drift-alert Asset gets an event that asks for a retrain.
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
DRIFTED = dt.datetime(2024, 2, 15, tzinfo=UTC)
CONF = {"top_n": 5, "als_iterations": 3, "als_factors": 8, "holdout_days": 7, "ranker_bags": 1}


@pytest.fixture(scope="module")
def world(tmp_path_factory, pg_dsn_module, airflow_db):
    from airflow.dag_processing.dagbag import BundleDagBag

    from pipeline.lake.demo import write_landing
    from pipeline.lake.demo.drift import DriftPlan, plant_drift
    from pipeline.lake.demo.synthetic import generate_clickstream

    root = tmp_path_factory.mktemp("monitor")
    data = generate_clickstream(n_users=600, n_items=150, n_days=45, start="2024-01-01", seed=5)
    data = plant_drift(data, DriftPlan(start="2024-02-08", device_mix={"tv": 1.0}, seed=1))
    write_landing(data, root / "data" / "landing", name="clicks", fmt="csv", gzip=True)
    env = pytest.MonkeyPatch()
    env.setenv("RECS_DATA_DIR", str(root / "data"))
    env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    env.setenv("MLFLOW_ARTIFACT_ROOT", str(root / "mlartifacts"))
    env.setenv("AIRFLOW_CONN_RECS_SERVING", pg_dsn_module)
    env.delenv("RECS_PUSHGATEWAY_URL", raising=False)
    dags = BundleDagBag(
        dag_folder=str(Path(__file__).parents[2] / "dags"),
        bundle_path=Path(__file__).parents[2] / "dags",
    ).dags
    for dag in dags.values():
        for task in dag.tasks:
            task.retries = 0
    run = dags["recommendations_nightly"].test(logical_date=CUTOFF, run_conf=CONF)
    assert run.state == "success"
    yield {"root": root, "dags": dags, "dsn": pg_dsn_module}
    env.undo()


def _monitor(world, as_of: dt.datetime):
    dag = world["dags"]["recommendations_monitor"]
    run = dag.test(logical_date=as_of, run_conf={"as_of": as_of.isoformat()})
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    summary = json.loads(
        (world["root"] / "data" / "monitoring" / f"{as_of:%Y-%m-%d}" / "summary.json").read_text()
    )
    return run, states, summary


def test_the_champions_own_window_shows_no_drift(world):
    run, states, summary = _monitor(world, CUTOFF)
    assert run.state == "success"
    assert states == {"monitor": "success", "notify": "skipped", "trigger_retrain": "skipped"}
    assert summary["alerts"] == [] and summary["champion"] == "1"
    assert all(value == 0.0 for _, value in summary["top_psi"])


def test_a_planted_device_shift_alerts_everywhere_people_look(world):
    from pipeline.serving.store import read_monitoring

    run, states, summary = _monitor(world, DRIFTED)
    assert run.state == "success"
    assert states == {"monitor": "success", "notify": "success", "trigger_retrain": "success"}
    assert summary["retrain"] is True
    assert "event.device" in [name for name, _ in summary["top_psi"]]
    assert any(alert.startswith("psi.event.device = ") for alert in summary["alerts"])

    rows = read_monitoring(dsn=world["dsn"], sqlite_path=Path("/nonexistent"), source="monitor")
    device = rows[(rows.metric == "psi") & (rows.subject == "event.device")]
    assert device.set_index("run_date")["status"].to_dict() == {
        pd.Timestamp(CUTOFF): "ok",
        pd.Timestamp(DRIFTED): "alert",
    }
    assert (rows[rows.run_date == pd.Timestamp(DRIFTED)]["model_version"] == "1").all()
    # The champion's own scores of the users of each window are compared too.
    scores = rows[(rows.subject == "model.score")].set_index("run_date")
    assert scores.loc[pd.Timestamp(CUTOFF), "value"] == 0.0
    assert scores["value"].notna().all() and set(scores["status"]) <= {"ok", "warn", "alert"}

    report = Path(summary["report"])
    assert report.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    import mlflow

    runs = mlflow.search_runs(experiment_names=["monitoring"], output_format="list")
    by_day = {r.data.tags["as_of"]: r for r in runs}
    assert set(by_day) == {"2024-02-01", "2024-02-15"}
    assert by_day["2024-02-15"].data.metrics["psi.event.device"] > 0.25


def test_the_alert_updates_the_drift_asset_with_its_reason(world):
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        events = session.scalars(
            select(AssetEvent)
            .join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .where(AssetModel.uri == "recs://monitor/drift-alert")
        ).all()
        extras = [dict(event.extra) for event in events]
    assert extras, "no drift-alert Asset event"
    assert extras[-1]["as_of"].startswith("2024-02-15")
    assert "event.device" in extras[-1]["reason"]
