"""
### Roll back the recommendations model

Moves the MLflow alias `champion` of model `recommender` back to an earlier version (by default
the previous champion) and republishes the lists that version served, exactly as they were:
same model, same run data (its logical date), same list length.

Trigger it by hand from the UI ("Trigger DAG", optionally with a `version`). The decision is
recorded in the serving DB's `model_promotions` table and as MLflow tags.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, get_current_context, task


def _who() -> str:
    run = get_current_context()["dag_run"]
    user = getattr(run, "triggering_user_name", None)
    return f"rollback by {user}" if user else "rollback"


def _serving_dsn() -> str | None:
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return Connection.get("recs_serving").get_uri()
    except AirflowNotFoundException:
        return None


@dag(
    dag_id="recommendations_rollback",
    schedule=None,
    start_date=pendulum.datetime(1990, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": pendulum.duration(seconds=30)},
    params={"version": Param(None, type=["null", "string"], pattern=r"^[0-9]+$",
                             title="Model version",
                             description="Registered version of `recommender` to serve again; "
                                         "empty = the previous champion.")},
    tags=["recommendations", "ml", "operations"],
    doc_md=__doc__,
)
def recommendations_rollback():
    @task
    def move_champion() -> dict:
        from pipeline import nightly
        from pipeline.config import Settings

        version = get_current_context()["params"]["version"]
        return nightly.rollback(Settings(), version, dsn=_serving_dsn(), triggered_by=_who())

    @task
    def republish(target: dict) -> dict:
        from pipeline import nightly
        from pipeline.config import Settings, as_utc

        settings = Settings(top_n=target["top_n"])
        return nightly.publish(settings, as_utc(target["cutoff"]), dsn=_serving_dsn())

    republish(move_champion())


recommendations_rollback()
