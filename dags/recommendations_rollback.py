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
from recs_support import TIMEOUTS, notify_failure, serving_dsn, triggered_by


@dag(
    dag_id="recommendations_rollback",
    schedule=None,
    start_date=pendulum.datetime(1990, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={
        "retries": 2,
        "retry_delay": pendulum.duration(seconds=30),
        "on_failure_callback": notify_failure,
    },
    params={
        "version": Param(
            None,
            type=["null", "string"],
            pattern=r"^[0-9]+$",
            title="Model version",
            description="Registered version of `recommender` to serve again; "
            "empty = the previous champion.",
        )
    },
    tags=["recommendations", "ml", "operations"],
    doc_md=__doc__,
)
def recommendations_rollback():
    @task(execution_timeout=TIMEOUTS["move_champion"])
    def move_champion() -> dict:
        from pipeline import nightly
        from pipeline.core.config import Settings

        context = get_current_context()
        return nightly.rollback(
            Settings(),
            context["params"]["version"],
            dsn=serving_dsn(),
            triggered_by=triggered_by(context, prefix="rollback"),
        )

    @task(execution_timeout=TIMEOUTS["republish"])
    def republish(target: dict) -> dict:
        from pipeline import nightly
        from pipeline.core.config import Settings, as_utc

        settings = Settings(top_n=target["top_n"])
        return nightly.publish(
            settings, as_utc(target["cutoff"]), dsn=serving_dsn(), version=target["version"]
        )

    republish(move_champion())


recommendations_rollback()
