"""Wiring shared by the recommendations DAGs: the Assets that chain them, the serving
connection, who triggered a run and why, the failure notifier and per-task timeouts. No DAG
here and no heavy imports.

**Assets.** ``recommendations_nightly``'s ``ingest`` updates :data:`LAKE_EVENTS` (extra:
the run's ``cutoff``); ``recommendations_monitor`` is scheduled on it. When the monitor finds
drift or broken input at ``alert`` level for a date at least as new as the champion's, it
updates :data:`DRIFT_ALERT` (extra: ``as_of``, ``reason``), and the nightly, scheduled on its
cron OR that Asset, retrains at once for ``as_of`` (after a cool-down). A loader outside
Airflow that writes to the lake can post a :data:`LAKE_EVENTS` event through the REST API
(``POST /api/v2/assets/events``, extra ``{"cutoff": "<ISO time>"}``) to run the monitor.

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
from airflow.sdk import Asset

#: Updated by every successful ``ingest`` (extra ``cutoff``: the run's point in time).
LAKE_EVENTS = Asset(name="recs_lake_events", uri="recs://lake/events")
#: Updated by ``recommendations_monitor`` when a metric is at alert level (extra ``as_of``,
#: ``reason``); ``recommendations_nightly`` retrains on it.
DRIFT_ALERT = Asset(name="recs_drift_alert", uri="recs://monitor/drift-alert")

# MLflow gives its loggers their own stderr handler unless told not to; in a task, Airflow logs
# raw stderr at error level. Without it, MLflow's records reach Airflow's task log at their
# own level (INFO stays INFO). Set before any task imports mlflow (this module is imported by
# the DAG files, which every task process parses first).
os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")

ALERT_EMAIL_ENV = "RECS_ALERT_EMAIL"
ALERT_CONN_ENV = "RECS_ALERT_SMTP_CONN_ID"
ALERT_FROM_ENV = "RECS_ALERT_FROM"

#: Jinja templates rendered by the notifier with the failed task's context.
ALERT_SUBJECT = (
    "[recs] {{ dag.dag_id }} failed: task {{ ti.task_id }}, try {{ ti.try_number }}"
    ", run {{ run_id }}"
)
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
    "label_windows": pendulum.duration(hours=4),
    "train": pendulum.duration(hours=4),
    "evaluate": pendulum.duration(hours=4),
    "register": pendulum.duration(hours=4),  # may refit the champion's recipe
    "publish": pendulum.duration(hours=1),
    "move_champion": pendulum.duration(minutes=10),
    "republish": pendulum.duration(hours=1),
    "forget": pendulum.duration(hours=2),  # rewrites every lake part and run file of the users
}


def notify_failure(context) -> None:
    """``on_failure_callback``: mail the failure through the SMTP provider's notifier when
    ``RECS_ALERT_EMAIL`` is set, and push its time to the Pushgateway when
    ``RECS_PUSHGATEWAY_URL`` is (``recs_last_failure_timestamp_seconds``); otherwise nothing."""
    dag = context.get("dag")
    if os.environ.get("RECS_PUSHGATEWAY_URL") and dag is not None:
        import time

        from pipeline.monitoring.prometheus import push_failure

        push_failure(dag.dag_id, time.time())
    recipients = [a.strip() for a in os.environ.get(ALERT_EMAIL_ENV, "").split(",") if a.strip()]
    if not recipients:
        return
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier

    notifier = SmtpNotifier(
        to=recipients,
        from_email=os.environ.get(ALERT_FROM_ENV) or "recs-pipeline@localhost",
        subject=ALERT_SUBJECT,
        html_content=ALERT_BODY,
        smtp_conn_id=os.environ.get(ALERT_CONN_ENV) or "smtp_default",
    )
    context["error_line"] = first_error_line(context.get("exception"))
    notifier(context)


def send_alert(context, *, subject: str, lines: list[str]) -> bool:
    """Mail an alert that is not a task failure (the monitor's) through the same notifier and
    settings as :func:`notify_failure`; False (and nothing sent) without ``RECS_ALERT_EMAIL``."""
    import html
    import logging

    recipients = [a.strip() for a in os.environ.get(ALERT_EMAIL_ENV, "").split(",") if a.strip()]
    logging.getLogger("recs_support").warning("%s\n%s", subject, "\n".join(lines))
    if not recipients:
        return False
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier

    body = "".join(f"<p>{html.escape(line)}</p>" for line in lines)
    # Rendered as Jinja templates by the notifier: keep the text literal.
    notifier = SmtpNotifier(
        to=recipients,
        from_email=os.environ.get(ALERT_FROM_ENV) or "recs-pipeline@localhost",
        subject="{% raw %}" + subject + "{% endraw %}",
        html_content="{% raw %}" + body + "{% endraw %}",
        smtp_conn_id=os.environ.get(ALERT_CONN_ENV) or "smtp_default",
    )
    notifier(context)
    return True


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


#: Where the DAGs look for the user-id pseudonymisation key, before the environment.
PSEUDONYM_VARIABLE = "recs_pseudonym_key"
PSEUDONYM_CONN_ID = "recs_pseudonym"


def pseudonym_key() -> bytes | None:
    """The key of the user-id pseudonyms (README, "Pseudonymised ids"): the Airflow Variable
    ``recs_pseudonym_key``, else the password of the connection ``recs_pseudonym``, else the
    environment (``RECS_PSEUDONYM_KEY`` or the file ``RECS_PSEUDONYM_KEY_FILE``), else None.
    A key found in Airflow is registered with the log masker, so that it never shows in a
    task log. Called inside tasks only (a Variable read at parse time would hit the
    metadata DB on every parse)."""
    from airflow.sdk import Connection, Variable
    from airflow.sdk.exceptions import AirflowNotFoundException
    from airflow.sdk.log import mask_secret

    from pipeline.core.config import check_key, load_pseudonym_key

    text = str(Variable.get(PSEUDONYM_VARIABLE, default=None) or "").strip()
    source = f"the Airflow Variable {PSEUDONYM_VARIABLE}"
    if not text:
        try:
            text = str(Connection.get(PSEUDONYM_CONN_ID).password or "").strip()
            source = f"the password of the Airflow connection {PSEUDONYM_CONN_ID}"
        except AirflowNotFoundException:
            text = ""
    if text:
        mask_secret(text)
        return check_key(text.encode("utf-8"), source)
    return load_pseudonym_key()


def triggered_by(context, prefix: str | None = None) -> str:
    """Who or what started the run: "scheduled", "manual by <user>" from the UI/API, or
    "asset_triggered: <reason>" for a run an Asset event started (the events' ``reason``)."""
    run = context["dag_run"]
    user = getattr(run, "triggering_user_name", None)
    kind = prefix or str(getattr(run.run_type, "value", run.run_type))
    text = f"{kind} by {user}" if user else kind
    reasons = [
        str(event.extra["reason"])
        for event in _asset_events(context)
        if (event.extra or {}).get("reason")
    ]
    return f"{text}: {'; '.join(dict.fromkeys(reasons))}" if reasons else text


def asset_moment(context, key: str) -> pendulum.DateTime | None:
    """The newest ``extra[key]`` (an ISO time) among the Asset events that triggered the run,
    or None (a scheduled or manual run, or events without it)."""
    moments = [
        pendulum.parse(str(event.extra[key]))
        for event in _asset_events(context)
        if (event.extra or {}).get(key)
    ]
    return max(moments) if moments else None


def as_of_date(context) -> pendulum.DateTime:
    """The moment a monitoring-style run looks back from: the ``as_of`` Param, else the
    triggering ingest's ``cutoff``, else midnight UTC of the logical date (or trigger time)."""
    params, run = context["params"], context["dag_run"]
    if params.get("as_of"):
        return pendulum.parse(params["as_of"])
    moment = asset_moment(context, "cutoff")
    if moment is not None:
        return moment
    moment = run.logical_date or run.run_after
    return pendulum.datetime(moment.year, moment.month, moment.day, tz="UTC")


def _asset_events(context) -> list:
    events = context.get("triggering_asset_events") or {}
    return [event for asset in events for event in events[asset]]
