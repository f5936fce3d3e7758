"""
### Recommendations monitor

Watches the input and the model's world after every ingest: runs on the
`recs://lake/events` Asset, which `recommendations_nightly`'s `ingest` updates (or a loader
outside Airflow, through `POST /api/v2/assets/events`).

`monitor` compares the `window_days` days before the as-of date with the same days before the
serving champion's training cutoff: PSI of every user, item and event-mix feature, input
volume against its trailing median, the newest event's age, quarantine and late shares, and
the live lists' coverage. It writes the serving DB's `monitoring` table, an MLflow run in the
`monitoring` experiment, a PNG report under `$RECS_DATA_DIR/monitoring/<date>/`, and pushes to
the Pushgateway at `RECS_PUSHGATEWAY_URL` when set.

* `notify` mails the alerts (same settings as the failure notifier: `RECS_ALERT_EMAIL` and
  the SMTP connection) and is skipped when there are none.
* `trigger_retrain` updates the `recs://monitor/drift-alert` Asset when an alert concerns data
  at least as new as the champion's; `recommendations_nightly` then retrains (after its
  cool-down). Skipped otherwise, so no Asset event.

**As-of date:** the triggering ingest's `cutoff`; for a manual run, the `as_of` Param, else
the logical date, else midnight of the trigger time.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, get_current_context, task
from recs_support import (
    DRIFT_ALERT,
    LAKE_EVENTS,
    as_of_date,
    notify_failure,
    send_alert,
    serving_dsn,
)

PARAMS = {
    "as_of": Param(
        None,
        type=["null", "string"],
        format="date-time",
        title="As of (manual runs)",
        description="Monitor the window that ends here (empty: the triggering "
        "ingest's cutoff, else the logical date).",
    ),
    "window_days": Param(
        7,
        type="integer",
        minimum=1,
        maximum=90,
        title="Window (days)",
        description="Days compared: the current window before the as-of "
        "date against the same days before the champion's "
        "training cutoff.",
    ),
    "psi_warn": Param(
        0.1,
        type="number",
        minimum=0,
        title="PSI warn",
        description="PSI at or above this is a warning.",
    ),
    "psi_alert": Param(
        0.25,
        type="number",
        minimum=0,
        title="PSI alert",
        description="PSI at or above this is an alert (mail, and a retrain "
        "through the drift-alert Asset).",
    ),
    "min_sample": Param(
        200,
        type="integer",
        minimum=1,
        title="Min sample",
        description="A feature with fewer values than this in either window "
        "gets status unknown: PSI of a few users is noise.",
    ),
}


@dag(
    dag_id="recommendations_monitor",
    schedule=LAKE_EVENTS,
    start_date=pendulum.datetime(1990, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={
        "retries": 2,
        "retry_delay": pendulum.duration(minutes=1),
        "on_failure_callback": notify_failure,
    },
    params=PARAMS,
    tags=["recommendations", "monitoring"],
    doc_md=__doc__,
)
def recommendations_monitor():
    @task(execution_timeout=pendulum.duration(hours=1))
    def monitor() -> dict:
        from pipeline.core.config import Settings, as_utc
        from pipeline.monitor import MonitorOptions, run_monitor
        from pipeline.monitoring.report import format_summary

        context = get_current_context()
        params = context["params"]
        options = MonitorOptions(
            window_days=params["window_days"],
            psi_warn=params["psi_warn"],
            psi_alert=params["psi_alert"],
            min_sample=params["min_sample"],
        )
        summary = run_monitor(
            Settings(), as_utc(as_of_date(context).isoformat()), serving_dsn(), options
        )
        for line in format_summary(summary).splitlines():
            print(line)
        return {
            key: summary[key]
            for key in ("as_of", "alerts", "warnings", "retrain", "reference", "report", "champion")
        }

    @task(execution_timeout=pendulum.duration(minutes=10))
    def notify(summary: dict) -> None:
        from airflow.sdk.exceptions import AirflowSkipException

        if not summary["alerts"]:
            raise AirflowSkipException("no alert")
        send_alert(
            get_current_context(),
            subject=f"[recs] monitor {summary['as_of'][:10]}: {len(summary['alerts'])} alert(s)",
            lines=[
                f"Reference: {summary['reference']}",
                *summary["alerts"],
                f"Report: {summary['report']}",
                "A retrain was requested."
                if summary["retrain"]
                else "No retrain: the data is older than the champion's.",
            ],
        )

    @task(execution_timeout=pendulum.duration(minutes=10), outlets=[DRIFT_ALERT])
    def trigger_retrain(summary: dict) -> None:
        from airflow.sdk.exceptions import AirflowSkipException

        if not summary["retrain"]:
            raise AirflowSkipException("nothing to retrain for")
        reason = (
            f"monitor {summary['as_of'][:10]}: "
            + "; ".join(summary["alerts"][:3])
            + (f" (+{len(summary['alerts']) - 3} more)" if len(summary["alerts"]) > 3 else "")
        )
        get_current_context()["outlet_events"][DRIFT_ALERT].extra = {
            "as_of": summary["as_of"],
            "reason": reason,
        }

    summary = monitor()
    notify(summary)
    trigger_retrain(summary)


recommendations_monitor()
