"""Wiring shared by the recommendations DAGs: the serving connection, who triggered a run,
the failure notifier and per-task timeouts. No DAG here and no heavy imports.

**Failure notifier.** Set ``RECS_ALERT_EMAIL`` (comma-separated addresses) and an SMTP
connection (``smtp_default``, e.g. ``AIRFLOW_CONN_SMTP_DEFAULT='smtp://mail.example.com:587'``;
another id with ``RECS_ALERT_SMTP_CONN_ID``) and every task that fails for good (after its
retries) sends one mail through the SMTP provider's ``SmtpNotifier``: DAG, run, task, try and
the first line of the error. Without ``RECS_ALERT_EMAIL`` nothing is sent and nothing is logged
as an error.
"""

from __future__ import annotations

import os

import pendulum

# MLflow gives its loggers their own stderr handler unless told not to; in a task, Airflow logs
# raw stderr at error level. Without it, MLflow's records reach Airflow's task log at their
# own level (INFO stays INFO). Set before any task imports mlflow (this module is imported by
# the DAG files, which every task process parses first).
os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")

ALERT_EMAIL_ENV = "RECS_ALERT_EMAIL"
ALERT_CONN_ENV = "RECS_ALERT_SMTP_CONN_ID"
ALERT_FROM_ENV = "RECS_ALERT_FROM"

#: Jinja templates rendered by the notifier with the failed task's context.
ALERT_SUBJECT = ("[recs] {{ dag.dag_id }} failed: task {{ ti.task_id }}, try {{ ti.try_number }}"
                 ", run {{ run_id }}")
ALERT_BODY = """<p>DAG <b>{{ dag.dag_id }}</b>, run <b>{{ run_id }}</b>
(logical date {{ dag_run.logical_date or 'none' }}): task <b>{{ ti.task_id }}</b> failed on
try {{ ti.try_number }} and will not be retried.</p>
<p>Error: <code>{{ error_line | e }}</code></p>
<p>Log: <a href="{{ ti.log_url }}">{{ ti.log_url }}</a></p>"""

#: Wall-clock limit of each task (``execution_timeout``): generous for the scale the
#: benchmarks measured (50k users: train ~3 min, evaluate ~4 min), tight enough that a hung
#: task fails the night instead of blocking the next one.
TIMEOUTS = {
    "ingest": pendulum.duration(hours=1),
    "validate": pendulum.duration(hours=1),
    "build_features": pendulum.duration(hours=1),
    "tune": pendulum.duration(hours=5),  # tune_budget_minutes is at most 4 hours
    "train": pendulum.duration(hours=4),
    "evaluate": pendulum.duration(hours=4),
    "register": pendulum.duration(hours=4),  # may refit the champion's recipe
    "publish": pendulum.duration(hours=1),
    "move_champion": pendulum.duration(minutes=10),
    "republish": pendulum.duration(hours=1),
}


def notify_failure(context) -> None:
    """``on_failure_callback``: mail the failure through the SMTP provider's notifier when
    ``RECS_ALERT_EMAIL`` is set; otherwise do nothing."""
    recipients = [a.strip() for a in os.environ.get(ALERT_EMAIL_ENV, "").split(",") if a.strip()]
    if not recipients:
        return
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier

    notifier = SmtpNotifier(
        to=recipients, from_email=os.environ.get(ALERT_FROM_ENV) or "recs-pipeline@localhost",
        subject=ALERT_SUBJECT, html_content=ALERT_BODY,
        smtp_conn_id=os.environ.get(ALERT_CONN_ENV) or "smtp_default")
    context["error_line"] = first_error_line(context.get("exception"))
    notifier(context)


def first_error_line(error: BaseException | str | None) -> str:
    """``Type: first line of the message`` (the type is left out when the message starts
    with it, as the DAGs' AirflowFailException messages do)."""
    if error is None:
        return "unknown error (see the task log)"
    lines = str(error).strip().splitlines()
    first = lines[0] if lines else ""
    kind = type(error).__name__ if isinstance(error, BaseException) else ""
    return first if not kind or first.startswith(kind) else f"{kind}: {first}"


def serving_dsn() -> str | None:
    """The ``recs_serving`` connection as a URI, or None (the embedded SQLite file)."""
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return Connection.get("recs_serving").get_uri()
    except AirflowNotFoundException:
        return None


def triggered_by(context, prefix: str | None = None) -> str:
    """Who or what started the run: "scheduled", or "manual by <user>" from the UI/API."""
    run = context["dag_run"]
    user = getattr(run, "triggering_user_name", None)
    kind = prefix or str(getattr(run.run_type, "value", run.run_type))
    return f"{kind} by {user}" if user else kind
