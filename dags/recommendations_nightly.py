"""
### Nightly recommendations

Turns the interaction logs in `$RECS_DATA_DIR/landing/events/` into fresh per-user
recommendations in the serving DB's `recommendations` view:

`ingest` → `validate` → `build_features` → `train` → `evaluate` → `register` → `publish`

* **Point in time:** a run for logical date *D* uses only events before *D* 00:00 UTC.
  Re-running a date overwrites its run folder and republishes identical rows.
* **Data** passes between tasks as Parquet under `$RECS_DATA_DIR/runs/<cutoff>/`; XCom
  carries only paths and small metrics.
* **Serving DB:** the Airflow connection `recs_serving` (Postgres); without it, the embedded
  SQLite file `$RECS_DATA_DIR/serving.sqlite`.
* **Model:** MLflow registered model `recommender`; `publish` serves the `champion` alias.

The logic lives in the `pipeline` package; this file only wires it.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, get_current_context, task

PARAMS = {
    "top_n": Param(10, type="integer", minimum=1, maximum=100,
                   title="List length", description="Items published per user (N)."),
    "lookback_days": Param(365, type="integer", minimum=1, maximum=3650,
                           title="Lookback days",
                           description="Train on events from this many days before the cutoff."),
    "holdout_days": Param(14, type="integer", minimum=1, maximum=90, title="Holdout days",
                          description="The last days before the cutoff held out to evaluate "
                                      "the model against the popularity baselines."),
    "als_factors": Param(64, type="integer", minimum=2, maximum=512, title="ALS factors",
                         description="Latent factors of the ALS model."),
    "als_iterations": Param(15, type="integer", minimum=1, maximum=100,
                            title="ALS iterations", description="ALS training sweeps."),
    "als_regularization": Param(0.05, type="number", minimum=0, maximum=10,
                                title="ALS regularization", description="L2 penalty."),
    "als_alpha": Param(2.0, type="number", exclusiveMinimum=0, maximum=1000, title="ALS alpha",
                       description="Confidence scaling of the event weights."),
    "ranker_bags": Param(5, type="integer", minimum=1, maximum=20, title="Ranker bags",
                         description="XGBoost rankers trained with different seeds and "
                                     "averaged; more bags give steadier lists and cost "
                                     "proportionally more ranker training time. Large "
                                     "logs get fewer: bags x training pairs stays within "
                                     "2M (at least one bag)."),
    "force_promote": Param(False, type="boolean", title="Force promote",
                           description="Make this run's model the champion even if it loses "
                                       "to the champion at the promotion gate (recorded in "
                                       "model_promotions with who triggered the run)."),
    "tune": Param(False, type="boolean", title="Tune hyperparameters",
                  description="Before training, search ALS and ranker hyperparameters by "
                              "expanding-window time-series CV (3 folds of holdout_days "
                              "before the cutoff); the chosen params are logged."),
    "tune_budget_minutes": Param(10.0, type="number", minimum=0.5, maximum=240,
                                 title="Tuning budget (minutes)",
                                 description="Wall-clock budget of the search when tune is on."),
    "max_bad_row_share": Param(0.05, type="number", minimum=0, maximum=1,
                               title="Max bad-row share",
                               description="Quarantine up to this share of rows; above it, "
                                           "the run fails before training."),
}


def _run_args() -> tuple:
    """(Settings, cutoff) for the running task: cutoff = midnight UTC of the logical date."""
    from pipeline.config import Settings, as_utc

    context = get_current_context()
    run = context["dag_run"]
    moment = run.logical_date or run.run_after  # manual runs may have no logical date
    params = context["params"]
    settings = Settings(top_n=params["top_n"], lookback_days=params["lookback_days"],
                        holdout_days=params["holdout_days"], als_factors=params["als_factors"],
                        als_iterations=params["als_iterations"],
                        als_regularization=params["als_regularization"],
                        als_alpha=params["als_alpha"], ranker_bags=params["ranker_bags"],
                        max_bad_row_share=params["max_bad_row_share"],
                        force_promote=params["force_promote"], tune=params["tune"],
                        tune_budget_minutes=params["tune_budget_minutes"])
    return settings, as_utc(moment.date())


def _run_stage(name: str, **kwargs) -> dict:
    """Call ``pipeline.nightly.<name>`` for this run. Bad input (a file that cannot be read,
    validation beyond the quarantine threshold) fails the task at once: no retry can fix it,
    while other errors (a database briefly down) keep the task's retries."""
    from airflow.sdk.exceptions import AirflowFailException

    from pipeline import nightly
    from pipeline.errors import DataError, ValidationFailed

    try:
        return getattr(nightly, name)(*_run_args(), **kwargs)
    except (DataError, ValidationFailed) as exc:
        raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc


def _serving_dsn() -> str | None:
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return Connection.get("recs_serving").get_uri()
    except AirflowNotFoundException:
        return None


def _triggered_by() -> str:
    """Who or what started the run: "scheduled", or "manual by <user>" from the UI/API."""
    run = get_current_context()["dag_run"]
    user = getattr(run, "triggering_user_name", None)
    kind = str(getattr(run.run_type, "value", run.run_type))
    return f"{kind} by {user}" if user else kind


@dag(
    dag_id="recommendations_nightly",
    schedule="0 2 * * *",
    # Static and early: catchup is off, so it schedules nothing by itself, but tasks only run
    # for logical dates on or after it, and backfills or `dags test` may go far back
    # (the MovieLens demo runs for 1998-04-23).
    start_date=pendulum.datetime(1990, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": pendulum.duration(minutes=2),
                  "retry_exponential_backoff": True},
    params=PARAMS,
    tags=["recommendations", "ml"],
    doc_md=__doc__,
)
def recommendations_nightly():
    @task
    def ingest() -> dict:
        return _run_stage("ingest")

    @task
    def validate(_: dict) -> dict:
        return _run_stage("validate")

    @task
    def build_features(_: dict) -> dict:
        return _run_stage("build_features")

    @task
    def train(_: dict) -> dict:
        return _run_stage("train")

    @task
    def evaluate(_: dict) -> dict:
        return _run_stage("evaluate")

    @task
    def register(_: dict) -> dict:
        return _run_stage("register", dsn=_serving_dsn(), triggered_by=_triggered_by())

    @task
    def publish(_: dict) -> dict:
        return _run_stage("publish", dsn=_serving_dsn())

    publish(register(evaluate(train(build_features(validate(ingest()))))))


recommendations_nightly()
