"""
### Nightly recommendations

Turns the interaction logs in `$RECS_DATA_DIR/landing/events/` into fresh per-user
recommendations in the serving DB's `recommendations` view:

`ingest` → `validate` → `build_features` → `tune` → `label_windows` → (`train` ∥ `evaluate`)
→ `register` → `publish`; `label_windows` fits the model's label windows (stage one and the
ranker's training pairs) once for both; `train` (the model to serve) and `evaluate` (the same
recipe refitted before the holdout, and the baselines) are independent and run side by side.

* **Point in time:** a run for logical date *D* uses only events before *D* 00:00 UTC.
  Re-running a date overwrites its run folder and republishes identical rows.
* **Data** passes between tasks as Parquet under `$RECS_DATA_DIR/runs/<cutoff>/`; XCom
  carries only paths and small metrics.
* **Serving DB:** the Airflow connection `recs_serving` (Postgres); without it, the embedded
  SQLite file `$RECS_DATA_DIR/serving.sqlite`.
* **Pseudonymised ids:** with a key (the Variable `recs_pseudonym_key`, the connection
  `recs_pseudonym`'s password, or `RECS_PSEUDONYM_KEY[_FILE]`), `ingest` stores keyed
  pseudonyms instead of user ids and records the mapping in the serving DB's
  `user_pseudonyms`; `publish` serves the CMS's ids (README, "Pseudonymised ids").
* **Model:** MLflow registered model `recommender`; `publish` serves the version this run's
  promotion gate decided on (the new `champion`, or the one it kept).
* **A/B experiments:** while one runs (started, changed and stopped with
  `python -m pipeline.cli experiment start|change|stop`, recorded in the serving DB),
  `publish` serves each user from their variant (`variant` and `experiment` columns of the
  view, `recommendation_assignments` for the CMS; holdout users get no rows). No Param: the
  experiment lives in the serving DB.
* **Forward only:** a run for a date older than production's (a backfill) records its results
  (run folder, metrics, MLflow run and model version) but promotes and publishes nothing,
  unless `serve_backfill` or `force_promote` is set.
* **Retrain on drift:** besides its cron, the DAG runs when `recommendations_monitor` raises
  a drift or data alert (the `recs://monitor/drift-alert` Asset), for the monitor's as-of
  date, unless a run for that date already reached the gate, or a model was registered less
  than `retrain_cooldown_hours` before (then the run is skipped, and says so). Why it ran
  is recorded in MLflow and `model_promotions`.
* **No data, no run:** a window with fewer than `min_window_events` events, or whose newest
  event is older than `max_staleness_days`, fails `ingest` at once (no retries) and names a
  logical date that would work.

The logic lives in the `pipeline` package; this file only wires it.
"""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import (
    AssetOrTimeSchedule,
    CronTriggerTimetable,
    Param,
    dag,
    get_current_context,
    task,
)
from recs_support import (
    DRIFT_ALERT,
    LAKE_EVENTS,
    TIMEOUTS,
    asset_moment,
    notify_failure,
    pseudonym_key,
    serving_dsn,
    triggered_by,
)

PARAMS = {
    "top_n": Param(
        10,
        type="integer",
        minimum=1,
        maximum=100,
        title="List length",
        description="Items published per user (N).",
    ),
    "lookback_days": Param(
        365,
        type="integer",
        minimum=1,
        maximum=3650,
        title="Lookback days",
        description="Train on events from this many days before the cutoff.",
    ),
    "holdout_days": Param(
        14,
        type="integer",
        minimum=1,
        maximum=90,
        title="Holdout days",
        description="The last days before the cutoff held out to evaluate "
        "the model against the popularity baselines.",
    ),
    "eval_max_users": Param(
        50_000,
        type=["integer", "null"],
        minimum=100,
        title="Holdout users scored",
        description="The holdout metrics use a seeded sample of at most "
        "this many returning users (empty: all of them).",
    ),
    "als_factors": Param(
        64,
        type="integer",
        minimum=2,
        maximum=512,
        title="ALS factors",
        description="Latent factors of the ALS model.",
    ),
    "als_iterations": Param(
        15,
        type="integer",
        minimum=1,
        maximum=100,
        title="ALS iterations",
        description="ALS training sweeps.",
    ),
    "als_regularization": Param(
        0.05,
        type="number",
        minimum=0,
        maximum=10,
        title="ALS regularization",
        description="L2 penalty.",
    ),
    "als_alpha": Param(
        2.0,
        type="number",
        exclusiveMinimum=0,
        maximum=1000,
        title="ALS alpha",
        description="Confidence scaling of the event weights.",
    ),
    "ranker_bags": Param(
        5,
        type="integer",
        minimum=1,
        maximum=20,
        title="Ranker bags",
        description="XGBoost rankers trained with different seeds and "
        "averaged; more bags give steadier lists and cost "
        "proportionally more ranker training time. Large "
        "logs get fewer: bags x training pairs stays within "
        "2M (at least one bag).",
    ),
    "force_promote": Param(
        False,
        type="boolean",
        title="Force promote",
        description="Make this run's model the champion even if it loses "
        "to the champion at the promotion gate (recorded in "
        "model_promotions with who triggered the run).",
    ),
    "tune": Param(
        False,
        type="boolean",
        title="Tune hyperparameters",
        description="Before training, search ALS and ranker hyperparameters by "
        "expanding-window time-series CV (3 folds of holdout_days "
        "before the cutoff); the chosen params are logged.",
    ),
    "tune_budget_minutes": Param(
        10.0,
        type="number",
        minimum=0.5,
        maximum=240,
        title="Tuning budget (minutes)",
        description="Wall-clock budget of the search when tune is on.",
    ),
    "publish_workers": Param(
        None,
        type=["null", "integer"],
        minimum=1,
        maximum=64,
        title="Publish worker processes",
        description="Processes that make the lists in publish, each loading the model "
        "once; empty = the CPUs the task may use, at most 2. The lists are the same "
        "for any number.",
    ),
    "max_bad_row_share": Param(
        0.05,
        type="number",
        minimum=0,
        maximum=1,
        title="Max bad-row share",
        description="Quarantine up to this share of rows; above it, the run fails before training.",
    ),
    "min_window_events": Param(
        100,
        type="integer",
        minimum=1,
        title="Min events in window",
        description="Fail at ingest, without retries, when the run's "
        "window (lookback days before the cutoff) holds "
        "fewer events; the error names a date that works.",
    ),
    "max_staleness_days": Param(
        3.0,
        type=["null", "number"],
        minimum=0,
        title="Max staleness (days)",
        description="Fail at ingest, without retries, when the newest "
        "event before the cutoff is older than this (a "
        "stopped export); empty = no limit.",
    ),
    "serve_backfill": Param(
        False,
        type="boolean",
        title="Serve a backfill",
        description="A run for a date older than the live lists or the "
        "champion records its results but serves nothing; "
        "set this to let it through the gate and publish.",
    ),
    "gate_min_relative_gain": Param(
        0.0,
        type="number",
        minimum=0,
        maximum=1,
        title="Gate: min relative gain",
        description="The challenger needs nDCG@10 >= champion x "
        "(1 + this) - tolerance to become champion.",
    ),
    "gate_tolerance": Param(
        0.001,
        type="number",
        minimum=0,
        maximum=1,
        title="Gate: tolerance",
        description="Absolute nDCG@10 slack of the promotion gate.",
    ),
    "gate_require_significance": Param(
        False,
        type="boolean",
        title="Gate: require a significant gain",
        description="Promote a different recipe only when the "
        "95% paired bootstrap interval of "
        "challenger minus champion (over holdout "
        "users) lies above zero.",
    ),
    "gate_online": Param(
        False,
        type="boolean",
        title="Gate: decide online",
        description="A different recipe that passes the offline gate waits "
        "as online-test; it becomes champion only when an "
        "experiment serving it beside the champion shows it "
        "significantly better (decided by the impact DAG at the "
        "experiment's planned horizon).",
    ),
}

#: Params of the DAG's wiring, not of the pipeline.
DAG_PARAMS = {
    "retrain_cooldown_hours": Param(
        float(os.environ.get("RECS_RETRAIN_COOLDOWN_HOURS", "12")),
        type="number",
        minimum=0,
        title="Retrain cool-down (hours)",
        description="A run started by a drift alert is skipped when the newest model version "
        "was registered less than this many hours before it, so that a lasting "
        "shift does not retrain every hour (default: RECS_RETRAIN_COOLDOWN_HOURS "
        "or 12).",
    ),
}

#: Params that map one to one onto ``pipeline.core.config.Settings`` fields.
SETTINGS_PARAMS = tuple(PARAMS)


def _run_args() -> tuple:
    """(Settings, cutoff) for the running task: cutoff = midnight UTC of the logical date."""
    from pipeline.core.config import Settings, as_utc

    context = get_current_context()
    run = context["dag_run"]
    # A drift-triggered run retrains for the monitor's as-of date; manual runs may have no
    # logical date.
    moment = asset_moment(context, "as_of") or run.logical_date or run.run_after
    params = context["params"]
    settings = Settings(
        **{name: params[name] for name in SETTINGS_PARAMS}, pseudonym_key=pseudonym_key()
    )
    return settings, as_utc(moment.date())


def _run_stage(name: str, **kwargs) -> dict:
    """Call ``pipeline.nightly.<name>`` for this run. Bad input (a file that cannot be read,
    validation beyond the quarantine threshold, an empty or stale window) or configuration
    (the serving schema or connection) fails the task at once: no retry can fix it, while
    other errors (a database briefly down) keep the task's retries."""
    from airflow.sdk.exceptions import AirflowFailException

    from pipeline import nightly
    from pipeline.core.errors import ConfigError, DataError, ValidationFailed, WindowError

    try:
        return getattr(nightly, name)(*_run_args(), **kwargs)
    except (ConfigError, DataError, ValidationFailed, WindowError) as exc:
        raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc


@dag(
    dag_id="recommendations_nightly",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("0 2 * * *", timezone="UTC"), assets=DRIFT_ALERT
    ),
    # Static and early: catchup is off, so it schedules nothing by itself, but tasks only run
    # for logical dates on or after it, and backfills or `dags test` may go far back
    # (the MovieLens demo runs for 1998-04-23).
    start_date=pendulum.datetime(1990, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={
        "retries": 2,
        "retry_delay": pendulum.duration(minutes=2),
        "retry_exponential_backoff": True,
        "on_failure_callback": notify_failure,
    },
    params={**PARAMS, **DAG_PARAMS},
    tags=["recommendations", "ml"],
    doc_md=__doc__,
)
def recommendations_nightly():
    @task.short_circuit(execution_timeout=pendulum.duration(minutes=5))
    def check_trigger() -> bool:
        """Every run goes on, except a drift-triggered one that would change nothing: a run
        for its cutoff already reached the promotion gate (the same data trains the same
        model), or a model was registered within the cool-down."""
        import logging

        log = logging.getLogger("recommendations_nightly")
        context = get_current_context()
        run = context["dag_run"]
        why = triggered_by(context)
        if str(getattr(run.run_type, "value", run.run_type)) != "asset_triggered":
            log.info("run: %s", why)
            return True
        settings, cutoff = _run_args()
        if (settings.run_dir(cutoff) / "register.json").exists():
            log.warning(
                "skipping the retrain (%s): a run for %s already trained on this data",
                why,
                f"{cutoff:%Y-%m-%d}",
            )
            return False
        from pipeline.registry.versions import last_registered_at

        previous = last_registered_at()
        hours = float(context["params"]["retrain_cooldown_hours"])
        if previous is not None and run.run_after - previous < pendulum.duration(hours=hours):
            log.warning(
                "skipping the retrain (%s): the last model was registered at %s, "
                "within the %.1f h cool-down",
                why,
                previous,
                hours,
            )
            return False
        log.info("retraining for %s: %s", f"{cutoff:%Y-%m-%d}", why)
        return True

    @task(execution_timeout=TIMEOUTS["ingest"], outlets=[LAKE_EVENTS])
    def ingest() -> dict:
        result = _run_stage("ingest", dsn=serving_dsn())
        # The monitor runs on this Asset, for this run's point in time.
        _, cutoff = _run_args()
        get_current_context()["outlet_events"][LAKE_EVENTS].extra = {
            "cutoff": cutoff.isoformat(),
            "rows_snapshot": result.get("snapshot_rows"),
        }
        return result

    @task(execution_timeout=TIMEOUTS["validate"])
    def validate(_: dict) -> dict:
        return _run_stage("validate")

    @task(execution_timeout=TIMEOUTS["build_features"])
    def build_features(_: dict) -> dict:
        return _run_stage("build_features")

    @task(execution_timeout=TIMEOUTS["tune"])
    def tune(_: dict) -> dict:
        return _run_stage("tune")

    @task(execution_timeout=TIMEOUTS["label_windows"])
    def label_windows(_: dict) -> dict:
        return _run_stage("label_windows")

    @task(execution_timeout=TIMEOUTS["train"])
    def train(_: dict) -> dict:
        return _run_stage("train")

    @task(execution_timeout=TIMEOUTS["evaluate"])
    def evaluate(_: dict) -> dict:
        return _run_stage("evaluate")

    @task(execution_timeout=TIMEOUTS["register"])
    def register(_trained: dict, _evaluated: dict) -> dict:
        return _run_stage(
            "register", dsn=serving_dsn(), triggered_by=triggered_by(get_current_context())
        )

    @task(execution_timeout=TIMEOUTS["publish"])
    def publish(decision: dict) -> dict:
        return _run_stage("publish", dsn=serving_dsn(), decision=decision)

    ingested = ingest()
    check_trigger() >> ingested
    windows = label_windows(tune(build_features(validate(ingested))))
    publish(register(train(windows), evaluate(windows)))


recommendations_nightly()
