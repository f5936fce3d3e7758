"""Push the pipeline's monitoring metrics to a Prometheus Pushgateway.

Batch jobs live too briefly to be scraped, so they push: when ``RECS_PUSHGATEWAY_URL`` is set
(e.g. ``http://127.0.0.1:9091``) the functions below send their gauges there, under the job
``recs_pipeline`` (``RECS_PUSHGATEWAY_JOB`` overrides it); when it is unset they only log at
debug level and return False. Prometheus scrapes the Pushgateway (with ``honor_labels: true``)
and ``alerts.rules.yml``, next to this module, alerts on what it finds.

A push never fails the pipeline: an unreachable or refusing gateway is logged as a warning
(URL and error) and the function returns False; it returns True when the gateway took the
metrics. Requests time out after :data:`TIMEOUT_S` seconds. Timestamps are passed in (unix
seconds; ``as_of`` may be a datetime); nothing here reads the clock.

Grouping: one Pushgateway group per writer, the label ``pipeline`` in the grouping key, so no
writer replaces another's metrics.

* ``{pipeline="<dag_id>"}`` (``recommendations_nightly`` by default) holds a DAG's outcome:
  :func:`push_publish` and :func:`push_failure` both write there with POST (``pushadd``), which
  replaces only the metric names of that push, so a failure keeps the last success and a
  success keeps the last failure, which ``RecsNightlyFailed`` compares.
* ``{pipeline="monitor"}`` holds the monitor's snapshot: :func:`push_monitor` writes it with PUT
  (``push``), which replaces the whole group, so a feature or metric no longer measured does
  not linger with a stale value.

The Pushgateway adds the grouping labels (``job``, ``pipeline``, and ``instance=""``) to every
series, plus its own ``push_time_seconds`` per group.

Metrics (all gauges):

===========================================  ==============  =======================================
metric                                       labels          meaning
===========================================  ==============  =======================================
``recs_feature_psi``                         feature, group  PSI of a feature within a group (all
                                                             when ungrouped) against the champion's
                                                             training window
``recs_drift_status``                        feature         worst status over the feature's groups:
                                                             -1 unknown (sample too small, NaN),
                                                             0 ok, 1 warn, 2 alert
``recs_monitor_alerts``                                      features whose drift status is 2
``recs_monitor_last_run_timestamp_seconds``                  the ``as_of`` of the last monitor run
``recs_input_volume_ratio``                                  events of the last full day over the
                                                             trailing daily median (1 = usual)
``recs_input_late_ratio``                                    share of the rows the newest ingest
                                                             read rejected as too late
``recs_input_quarantine_ratio``                              share of the rows the newest ingest
                                                             read kept out of the lake
``recs_input_newest_event_age_seconds``                      age of the newest input event when the
                                                             monitor measured
``recs_coldstart_user_ratio``                                share of served users whose list
                                                             starts with a fallback (cold start)
``recs_catalogue_coverage_ratio``                            share of the catalogue recommended
``recs_new_item_ratio``                                      share of the current window's events
                                                             on items the reference window lacks
``recs_health_metric``                       metric          any other data-health value
``recs_last_success_timestamp_seconds``      dag             when the last successful run published
                                                             (unix seconds)
``recs_published_rows``                                      rows of the last publish
``recs_published_users``                                     users of the last publish
``recs_model_version``                                       the serving champion's version as a
                                                             number
``recs_last_failure_timestamp_seconds``      dag             when a run last failed for good (unix
                                                             seconds)
===========================================  ==============  =======================================

Data health gets one gauge per metric rather than one labelled gauge: each alert rule then
names its metric and unit directly (``recs_input_quarantine_ratio > 0.05``), and a value that
is no ratio (an age in seconds) cannot be compared against a ratio threshold by mistake. The
``health`` keys of :func:`push_monitor` are the monitoring table's metric names
(:data:`HEALTH_GAUGES`): ``volume_ratio``, ``late_share``, ``quarantine_share``,
``newest_event_age`` (or ``newest_event_age_seconds``), ``cold_start_share``,
``catalogue_coverage``, ``new_item_share``, in the table's order; any other key is exported as
``recs_health_metric{metric="<key>"}``. :func:`push_monitor` also takes the monitor's rows as
they go to the monitoring table (metric, subject, value, status): ``psi`` rows become PSI by
feature, the others health values.

The drift rules fire on ``recs_feature_psi`` itself (>= 0.25, >= 0.1), except for features whose
``recs_drift_status`` is -1: the monitor judged their sample too small for the PSI to mean much.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import re
from collections.abc import Mapping

import pandas as pd
from prometheus_client import CollectorRegistry, Gauge, push_to_gateway, pushadd_to_gateway

logger = logging.getLogger(__name__)

URL_ENV = "RECS_PUSHGATEWAY_URL"
JOB_ENV = "RECS_PUSHGATEWAY_JOB"
DEFAULT_JOB = "recs_pipeline"
NIGHTLY_DAG = "recommendations_nightly"
MONITOR_GROUP = "monitor"
GROUP_LABEL = "pipeline"
TIMEOUT_S = 5.0

#: PSI thresholds (as in alerts.rules.yml and pipeline.monitoring.drift): >= WARN_PSI is a
#: warning, >= ALERT_PSI an alert.
WARN_PSI, ALERT_PSI = 0.1, 0.25
#: ``recs_drift_status`` values; "unknown" (NaN PSI, or too small a sample to judge) is -1.
STATUS_CODES = {"unknown": -1, "ok": 0, "warn": 1, "alert": 2}
UNGROUPED = "all"
#: The ``metric`` of PSI rows in the monitoring table's shape (their ``subject`` is the feature).
PSI_METRIC = "psi"

#: ``health`` key of :func:`push_monitor` (the monitoring table's ``metric``) -> (gauge, help).
HEALTH_GAUGES: dict[str, tuple[str, str]] = {
    "volume_ratio": (
        "recs_input_volume_ratio",
        "Input events of the last full day over the trailing daily median (1 = usual).",
    ),
    "late_share": (
        "recs_input_late_ratio",
        "Share of the rows read by the newest ingest rejected as too late.",
    ),
    "quarantine_share": (
        "recs_input_quarantine_ratio",
        "Share of the rows read by the newest ingest kept out of the lake.",
    ),
    "newest_event_age": (
        "recs_input_newest_event_age_seconds",
        "Age of the newest input event when the monitor measured (seconds).",
    ),
    "cold_start_share": (
        "recs_coldstart_user_ratio",
        "Share of served users whose list starts with a fallback item.",
    ),
    "catalogue_coverage": (
        "recs_catalogue_coverage_ratio",
        "Share of the catalogue that appears in the published lists.",
    ),
    "new_item_share": (
        "recs_new_item_ratio",
        "Share of the current window's events on items the reference window never saw.",
    ),
}
#: Other spellings accepted for a ``health`` key.
HEALTH_ALIASES = {"newest_event_age_seconds": "newest_event_age"}
OTHER_HEALTH_GAUGE = "recs_health_metric"


def pushgateway_url() -> str | None:
    """The Pushgateway from ``RECS_PUSHGATEWAY_URL``; None when unset or blank."""
    return (os.environ.get(URL_ENV) or "").strip() or None


def pushgateway_job() -> str:
    """The job name: ``RECS_PUSHGATEWAY_JOB`` or ``recs_pipeline``."""
    return (os.environ.get(JOB_ENV) or "").strip() or DEFAULT_JOB


def version_number(model_version: str | int | float | None) -> float:
    """A model version as a number: ``"12"`` -> 12.0, ``"v3"``/``"m-3"`` -> 3.0 (the last run
    of digits); NaN when there is none."""
    if model_version is None:
        return math.nan
    if isinstance(model_version, (int, float)):
        return float(model_version)
    found = re.findall(r"\d+(?:\.\d+)?", str(model_version))
    return float(found[-1]) if found else math.nan


# --- registries: what each push sends ----------------------------------------------------------


def publish_registry(
    rows: int,
    users: int,
    model_version: str | int | None,
    finished_at: float,
    *,
    dag_id: str = NIGHTLY_DAG,
) -> CollectorRegistry:
    """The gauges of a successful publish: last success time, rows, users, model version."""
    registry = CollectorRegistry()
    Gauge(
        "recs_last_success_timestamp_seconds",
        "When the last successful run published its lists (unix seconds).",
        ["dag"],
        registry=registry,
    ).labels(dag=dag_id).set(float(finished_at))
    Gauge("recs_published_rows", "Rows of the last publish.", registry=registry).set(int(rows))
    Gauge("recs_published_users", "Users of the last publish.", registry=registry).set(int(users))
    Gauge(
        "recs_model_version",
        "The serving champion's model version, as a number.",
        registry=registry,
    ).set(version_number(model_version))
    return registry


def failure_registry(dag_id: str, failed_at: float) -> CollectorRegistry:
    """The gauge of a run that failed for good (no retry left)."""
    registry = CollectorRegistry()
    Gauge(
        "recs_last_failure_timestamp_seconds",
        "When a run last failed for good (unix seconds).",
        ["dag"],
        registry=registry,
    ).labels(dag=dag_id).set(float(failed_at))
    return registry


def psi_status(value: float) -> int:
    """0 (ok), 1 (warn: >= :data:`WARN_PSI`), 2 (alert: >= :data:`ALERT_PSI`); -1 for NaN."""
    if math.isnan(value):
        return STATUS_CODES["unknown"]
    if value >= ALERT_PSI:
        return STATUS_CODES["alert"]
    return STATUS_CODES["warn"] if value >= WARN_PSI else STATUS_CODES["ok"]


PsiInput = Mapping[str, tuple[str | None, float]] | pd.DataFrame | None


def split_monitoring_rows(rows: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, float]]:
    """Rows in the monitoring table's shape (metric, subject, value, status: what
    ``pipeline.serving.store.record_monitoring`` stores) as PSI rows (feature, group, psi,
    status; ``metric == "psi"``, the subject is the feature) and health values (the other
    metrics; ``metric.subject`` when a subject is set)."""
    subject = rows["subject"] if "subject" in rows.columns else pd.Series("", index=rows.index)
    subject = subject.fillna("").astype(str)
    is_psi = rows["metric"].astype(str) == PSI_METRIC
    psi = pd.DataFrame({"feature": subject[is_psi], "psi": rows.loc[is_psi, "value"]})
    for column in ("group", "status"):
        if column in rows.columns:
            psi[column] = rows.loc[is_psi, column]
    psi = psi[psi["feature"] != ""]
    health = {
        (f"{metric}.{sub}" if sub else str(metric)): value
        for metric, sub, value in zip(
            rows.loc[~is_psi, "metric"], subject[~is_psi], rows.loc[~is_psi, "value"]
        )
    }
    return psi, health


def psi_frame(psi: PsiInput) -> pd.DataFrame:
    """PSI rows as a frame with columns feature, group, psi, status (a code of
    :data:`STATUS_CODES`).

    ``psi`` is a mapping feature -> (group, psi), or a frame with columns feature, psi and
    optionally group and status (``ok``/``warn``/``alert``/``unknown``). A missing status
    follows from :data:`WARN_PSI` and :data:`ALERT_PSI`; a missing group is ``all``."""
    if psi is None:
        rows = pd.DataFrame(columns=["feature", "group", "psi"])
    elif isinstance(psi, pd.DataFrame):
        rows = psi.copy()
    else:
        rows = pd.DataFrame(
            [
                {"feature": feature, "group": group, "psi": value}
                for feature, (group, value) in psi.items()
            ],
            columns=["feature", "group", "psi"],
        )
    missing = {"feature", "psi"} - set(rows.columns)
    if missing:
        raise ValueError(f"PSI rows lack the column(s) {sorted(missing)}")
    if "group" not in rows.columns:
        rows["group"] = UNGROUPED
    if "status" not in rows.columns:
        rows["status"] = None
    rows["feature"] = rows["feature"].astype(str)
    rows["group"] = [UNGROUPED if _blank(group) else str(group) for group in rows["group"]]
    rows["psi"] = pd.to_numeric(rows["psi"], errors="coerce").astype("float64")
    rows["status"] = [
        psi_status(value)
        if _blank(status)
        else STATUS_CODES.get(str(status).lower(), STATUS_CODES["unknown"])
        for value, status in zip(rows["psi"], rows["status"])
    ]
    rows["status"] = rows["status"].astype("int64")
    return rows[["feature", "group", "psi", "status"]].reset_index(drop=True)


def _blank(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value == ""


def _seconds(moment: float | dt.datetime) -> float:
    """Unix seconds of a number or a datetime (naive ones are taken as UTC)."""
    if isinstance(moment, dt.datetime):
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.timezone.utc)
        return moment.timestamp()
    return float(moment)


def monitor_registry(
    psi: PsiInput,
    health: Mapping[str, float] | None = None,
    *,
    as_of: float | dt.datetime | None = None,
) -> CollectorRegistry:
    """The gauges of one monitor run: PSI per feature and group, drift status per feature
    (the worst of its groups), the number of features in alert, when it measured (``as_of``,
    if given), and the data-health values (:data:`HEALTH_GAUGES`; other keys go to
    ``recs_health_metric{metric=...}``).

    ``psi`` is what :func:`psi_frame` takes, or a frame in the monitoring table's shape
    (columns metric, subject, value, status: see :func:`split_monitoring_rows`), whose health
    rows are merged under ``health`` (``health`` wins)."""
    registry = CollectorRegistry()
    if isinstance(psi, pd.DataFrame) and "metric" in psi.columns and "feature" not in psi.columns:
        psi, from_rows = split_monitoring_rows(psi)
        health = {**from_rows, **(health or {})}
    rows = psi_frame(psi)
    psi_gauge = Gauge(
        "recs_feature_psi",
        "Population stability index of a feature against the champion's training window.",
        ["feature", "group"],
        registry=registry,
    )
    for row in rows.itertuples(index=False):
        psi_gauge.labels(feature=row.feature, group=row.group).set(row.psi)
    status_gauge = Gauge(
        "recs_drift_status",
        "Worst drift status of a feature over its groups: -1 unknown, 0 ok, 1 warn, 2 alert.",
        ["feature"],
        registry=registry,
    )
    worst = rows.groupby("feature", sort=True)["status"].max()
    for feature, status in worst.items():
        status_gauge.labels(feature=feature).set(status)
    Gauge(
        "recs_monitor_alerts", "Features whose drift status is 2 (alert).", registry=registry
    ).set(int((worst >= STATUS_CODES["alert"]).sum()))
    if as_of is not None:
        Gauge(
            "recs_monitor_last_run_timestamp_seconds",
            "The moment the last monitor run measured (unix seconds).",
            registry=registry,
        ).set(_seconds(as_of))
    other = None
    for key, value in sorted((health or {}).items()):
        key = HEALTH_ALIASES.get(key, key)
        value = math.nan if value is None else float(value)
        if key in HEALTH_GAUGES:
            name, doc = HEALTH_GAUGES[key]
            Gauge(name, doc, registry=registry).set(value)
            continue
        if other is None:
            other = Gauge(
                OTHER_HEALTH_GAUGE,
                "A data-health value without a gauge of its own.",
                ["metric"],
                registry=registry,
            )
        other.labels(metric=key).set(value)
    return registry


# --- pushes --------------------------------------------------------------------------------------


def push_registry(
    registry: CollectorRegistry, group: str, *, replace_group: bool, url: str | None = None
) -> bool:
    """Push ``registry`` to the group ``{pipeline=group}`` of the job: PUT (replace the whole
    group) when ``replace_group``, else POST (replace the pushed metric names only). True when
    the gateway took it; False (warning logged) when it did not, or no gateway is set."""
    url = url or pushgateway_url()
    if not url:
        logger.debug("no %s: not pushing the %s metrics", URL_ENV, group)
        return False
    push = push_to_gateway if replace_group else pushadd_to_gateway
    job = pushgateway_job()
    try:
        push(url, job=job, registry=registry, grouping_key={GROUP_LABEL: group}, timeout=TIMEOUT_S)
    except Exception as exc:  # whatever went wrong, metrics never fail the pipeline
        logger.warning(
            "could not push the %s metrics to the Pushgateway at %s: %s: %s",
            group,
            url,
            type(exc).__name__,
            exc,
        )
        return False
    logger.info("pushed the %s metrics to the Pushgateway at %s (job %s)", group, url, job)
    return True


def push_publish(
    rows: int,
    users: int,
    model_version: str | int | None,
    finished_at: float,
    *,
    dag_id: str = NIGHTLY_DAG,
    url: str | None = None,
) -> bool:
    """After a successful publish: last success time, published rows and users, model version
    (group ``pipeline=<dag_id>``, POST: the last failure stays)."""
    registry = publish_registry(rows, users, model_version, finished_at, dag_id=dag_id)
    return push_registry(registry, dag_id, replace_group=False, url=url)


def push_failure(dag_id: str, failed_at: float, *, url: str | None = None) -> bool:
    """When a run failed for good: its time (group ``pipeline=<dag_id>``, POST: the last
    success stays)."""
    return push_registry(failure_registry(dag_id, failed_at), dag_id, replace_group=False, url=url)


def push_monitor(
    psi: PsiInput,
    health: Mapping[str, float] | None = None,
    *,
    as_of: float | dt.datetime | None = None,
    group: str = MONITOR_GROUP,
    url: str | None = None,
) -> bool:
    """After a monitor run: PSI, drift status and data health (group ``pipeline=monitor``,
    PUT: the snapshot replaces the previous one). ``as_of`` is the moment measured (unix
    seconds or a datetime). See :func:`monitor_registry` for what ``psi`` and ``health`` take."""
    registry = monitor_registry(psi, health, as_of=as_of)
    return push_registry(registry, group, replace_group=True, url=url)


__all__ = [
    "ALERT_PSI",
    "HEALTH_GAUGES",
    "STATUS_CODES",
    "WARN_PSI",
    "failure_registry",
    "monitor_registry",
    "psi_frame",
    "psi_status",
    "publish_registry",
    "push_failure",
    "push_monitor",
    "push_publish",
    "push_registry",
    "pushgateway_job",
    "pushgateway_url",
    "split_monitoring_rows",
    "version_number",
]
