"""The monitor run: drift and data health after an ingest, to the places people look.

``run_monitor(settings, as_of, dsn)`` compares the ``window_days`` days before ``as_of`` (the
current window) with the same number of days before the serving champion's training cutoff
(the reference: the end of the window it was trained on; with no champion yet, the window
before the current one):

* **drift** (:mod:`pipeline.monitoring.drift`): PSI of every user RFM/context feature, item
  popularity feature, the event mix and the champion's scores, binned on the reference;
* **data health** (:mod:`pipeline.monitoring.health`): volume against the trailing median,
  newest event's age, quarantine and late shares of the newest ingest; the share of failed
  Great Expectations validations and of the rows they rejected, from the validation log;
* **lists** (from the live publish): cold-start share, catalogue coverage, and the share of
  the current window's events on items the champion never saw (new-item share);
* **online** (from the newest ``recommendations_impact`` run, when there is one): the last
  day's CTR and conversion against the median day before it.

A feature whose reference or current window holds fewer than ``min_sample`` values gets its
PSI but status "unknown": PSI over a handful of users is noise (its expectation is about
``(bins - 1) * (1/n_ref + 1/n_cur)`` with no drift at all).

The rows go to the serving DB's ``monitoring`` table (a re-run of a date replaces them), to
MLflow (experiment ``monitoring``, one run per date), to a PNG report under
``$RECS_DATA_DIR/monitoring/<date>/`` and, when ``RECS_PUSHGATEWAY_URL`` is set, to a
Prometheus Pushgateway. The summary names every alert; ``retrain`` is true when an alert is
about data at least as new as the champion's (a backfill's drift retrains nothing).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.config import Settings, as_utc, untrained_event_types

logger = logging.getLogger(__name__)

SOURCE = "monitor"
#: Levels of the ``event.item`` mix: the reference's most viewed items, the rest as other.
TOP_ITEMS = 20
#: Users per window whose champion scores ``model.score`` compares (a seeded sample).
SCORE_USERS = 2000
#: Features left out of drift: inside a window of a few days they describe the window, not
#: the world. "First seen" (and age, which falls back to it without ``published_at``) piles
#: up at the window's first day; a 1-day popularity compares the last day of each window,
#: two different weekdays with their own rhythm. On stationary synthetic data these three
#: alone raised every false alarm (18 of about 960 checks).
EXCLUDED_FEATURES = ("item.first_seen_days", "item.age_days", "item.popularity_1d")
MLFLOW_EXPERIMENT = "monitoring"


@dataclass(frozen=True)
class MonitorOptions:
    """Knobs of a monitor run (the monitor DAG's Params)."""

    window_days: int = 7
    psi_warn: float = 0.1
    psi_alert: float = 0.25
    min_sample: int = 200
    #: Days of monitoring history drawn in the report.
    report_days: int = 30


@dataclass(frozen=True)
class Reference:
    """What the current window is compared with."""

    cutoff: dt.datetime
    champion: str | None

    def describe(self, days: int) -> str:
        start = self.cutoff - dt.timedelta(days=days)
        who = f"champion v{self.champion}" if self.champion else "no champion: previous window"
        return f"{who}: [{start:%Y-%m-%d}, {self.cutoff:%Y-%m-%d})"


def run_monitor(
    settings: Settings,
    as_of: dt.datetime,
    dsn: str | None = None,
    options: MonitorOptions | None = None,
) -> dict:
    """Compute, record and export the monitoring metrics for ``as_of``; a JSON-able summary."""
    from pipeline.lake.ingest import read_manifest
    from pipeline.lake.snapshot import load_snapshot
    from pipeline.lake.validate import read_validation_log
    from pipeline.monitoring.health import TRAILING_DAYS, health_table, validation_health

    options = options or MonitorOptions()
    as_of = as_utc(as_of)
    days = dt.timedelta(days=options.window_days)
    reference = _reference(as_of, options.window_days)
    lake = settings.lake_events_dir
    # Feedback the models never train on (impressions, weight 0) is left out: it is what the
    # impact DAG reads, and its arrival would read as drift of the input.
    untrained = untrained_event_types(settings.event_weights)
    recent = _trained(
        load_snapshot(lake, as_of, max(options.window_days, TRAILING_DAYS + 1)), untrained
    )
    current = recent[recent["timestamp"] >= as_of - days]
    past = _trained(load_snapshot(lake, reference.cutoff, options.window_days), untrained)
    logger.info(
        "monitor %s: current window %d events, reference %s: %d events",
        f"{as_of:%Y-%m-%d}",
        len(current),
        reference.describe(options.window_days),
        len(past),
    )

    scorer = champion_scorer(reference.champion) if reference.champion else None
    drift = (
        drift_table(past, reference.cutoff, current, as_of, options, scorer)
        if len(past)
        else _no_reference(as_of)
    )
    health = pd.concat(
        [
            health_table(recent["timestamp"], read_manifest(lake.parent), as_of),
            validation_health(read_validation_log(settings.data_dir), options.window_days),
        ],
        ignore_index=True,
    )
    lists = _list_rows(settings, dsn, past, current)
    online = _online_rows(settings, as_of)
    rows = pd.concat([drift, health, lists, online], ignore_index=True)
    rows["window_start"], rows["window_end"] = as_of - days, as_of
    rows["reference"] = reference.describe(options.window_days)
    rows["model_version"] = reference.champion

    from pipeline.serving.store import read_monitoring, record_monitoring

    record_monitoring(
        rows, run_date=as_of, source=SOURCE, dsn=dsn, sqlite_path=settings.serving_sqlite_path
    )
    folder = settings.data_dir / "monitoring" / f"{as_of:%Y-%m-%d}"
    history = read_monitoring(
        dsn=dsn,
        sqlite_path=settings.serving_sqlite_path,
        source=SOURCE,
        since=as_of - dt.timedelta(days=options.report_days),
    )
    history = history[history["run_date"] <= as_of]
    report = _report(history, folder, options, as_of)
    alerts = _describe(rows[rows["status"] == "alert"])
    warnings = _describe(rows[rows["status"] == "warn"])
    retrain = bool(alerts) and (reference.champion is None or as_of >= reference.cutoff)
    summary = {
        "as_of": as_of.isoformat(),
        "reference": reference.describe(options.window_days),
        "champion": reference.champion,
        "current_events": int(len(current)),
        "reference_events": int(len(past)),
        "rows": int(len(rows)),
        "alerts": alerts,
        "warnings": warnings,
        "retrain": retrain,
        "report": str(report),
        "top_psi": _top(drift, 5),
        "health": {r.metric: _finite(r.value) for r in health.itertuples()},
        "lists": {r.metric: _finite(r.value) for r in lists.itertuples()},
        "options": dataclasses.asdict(options),
    }
    summary["mlflow_run_id"] = _log_mlflow(rows, summary, report, as_of)
    summary["pushed"] = _push(rows, as_of)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    rows.to_csv(folder / "metrics.csv", index=False)
    logger.info(
        "monitor %s: %d alert(s), %d warning(s)%s",
        f"{as_of:%Y-%m-%d}",
        len(alerts),
        len(warnings),
        f": {'; '.join(alerts)}" if alerts else "",
    )
    return summary


# ---- pieces -----------------------------------------------------------------------------------
def _reference(as_of: dt.datetime, window_days: int) -> Reference:
    """The champion's training cutoff (its ``logical_date`` tag), or the previous window."""
    from pipeline.registry.versions import champion_version, configure_mlflow, version_details

    configure_mlflow()
    champion = champion_version()
    if champion is not None:
        tag = version_details(champion)["tags"].get("logical_date")
        if tag:
            return Reference(as_utc(tag), champion)
    return Reference(as_of - dt.timedelta(days=window_days), None)


def drift_table(
    reference: pd.DataFrame,
    reference_cutoff: dt.datetime,
    current: pd.DataFrame,
    as_of: dt.datetime,
    options: MonitorOptions | None = None,
    scorer: Callable[[np.ndarray], np.ndarray] | None = None,
) -> pd.DataFrame:
    """PSI rows (metric ``psi``, subject = feature, value, status) of the ``window_days``
    before ``as_of`` against the same days before ``reference_cutoff``.

    Besides the features of :meth:`DriftProfile.from_events`, ``event.item`` is the share of
    events on each of the reference's :data:`TOP_ITEMS` most viewed items (the rest: other):
    a popularity shift or a flood of new items moves mass between the head and the rest,
    which per-item feature distributions do not see. With ``scorer`` (user ids -> the
    champion's top score per user), ``model.score`` compares the champion's scores of a
    seeded sample of :data:`SCORE_USERS` users active in each window. A feature with fewer
    than ``min_sample`` values in either window gets status "unknown"."""
    from pipeline.monitoring.drift import DriftProfile, status

    options = options or MonitorOptions()
    days = dt.timedelta(days=options.window_days)
    profile = DriftProfile.from_events(reference, reference_cutoff, window=days)
    in_window = reference[
        (reference["timestamp"] < reference_cutoff)
        & (reference["timestamp"] >= reference_cutoff - days)
    ]
    profile.add_categorical(
        "event.item",
        in_window["item_id"].astype(str).to_numpy(),
        group="event",
        max_levels=TOP_ITEMS,
    )
    now = current[(current["timestamp"] < as_of) & (current["timestamp"] >= as_of - days)]
    extra = {"event.item": now["item_id"].astype(str).to_numpy()}
    if scorer is not None and len(in_window) and len(now):
        profile.add_numeric("model.score", scorer(_sample_users(in_window)), group="model")
        extra["model.score"] = scorer(_sample_users(now))
    table = profile.compare(current, as_of, extra=extra)
    table = table[~table["feature"].isin(EXCLUDED_FEATURES)]
    small = (table["reference_n"] < options.min_sample) | (table["current_n"] < options.min_sample)
    statuses = [
        ("unknown" if tiny else status(value, options.psi_warn, options.psi_alert))
        for value, tiny in zip(table["psi"], small, strict=True)
    ]
    return pd.DataFrame(
        {
            "metric": "psi",
            "subject": table["feature"],
            "value": table["psi"].astype(float),
            "status": statuses,
        }
    )


def _trained(events: pd.DataFrame, untrained) -> pd.DataFrame:
    return events[~events["event_type"].astype(str).isin(list(untrained))] if untrained else events


def _online_rows(settings: Settings, as_of: dt.datetime) -> pd.DataFrame:
    """CTR and conversion drops from the newest impact run at or before ``as_of``."""
    from pipeline.monitoring.health import online_ratios

    runs = sorted(
        p
        for p in (settings.data_dir / "impact").glob("*/daily.csv")
        if p.parent.name <= f"{as_of:%Y-%m-%d}"
    )
    if not runs:
        return pd.DataFrame(columns=["metric", "subject", "value", "status"])
    daily = pd.read_csv(runs[-1], parse_dates=["day"])
    logger.info("monitor: online metrics from %s", runs[-1])
    return online_ratios(daily)


def _sample_users(events: pd.DataFrame, seed: int = 0) -> np.ndarray:
    users = np.sort(events["user_id"].astype(str).unique())
    if len(users) <= SCORE_USERS:
        return users
    return np.sort(np.random.default_rng(seed).choice(users, SCORE_USERS, replace=False))


def champion_scorer(version: str) -> Callable[[np.ndarray], np.ndarray]:
    """User ids -> the top score of the champion's list for each (a fallback list's score
    for users it does not know)."""
    from pipeline.registry.versions import load_version

    model, _ = load_version(version)
    recommender = model.unwrap_python_model().recommender

    def score(users: np.ndarray) -> np.ndarray:
        lists = recommender.recommend(users, 1)
        return lists.loc[lists["rank"] == 1, "score"].to_numpy(dtype=float)

    return score


def _no_reference(as_of: dt.datetime) -> pd.DataFrame:
    logger.warning(
        "monitor %s: the reference window holds no events: no drift metrics", f"{as_of:%Y-%m-%d}"
    )
    return pd.DataFrame(
        {"metric": ["psi"], "subject": [""], "value": [math.nan], "status": ["unknown"]}
    )


def _list_rows(
    settings: Settings, dsn: str | None, past: pd.DataFrame, current: pd.DataFrame
) -> pd.DataFrame:
    """The share of current events on items the reference window never saw, and cold-start
    share and catalogue coverage of the live lists (from their publish record)."""
    from pipeline.monitoring.health import HEALTH_THRESHOLDS, new_item_share
    from pipeline.serving.store import live_version

    rows = []
    if len(current):
        share = new_item_share(past["item_id"], current["item_id"])
        rows.append(("new_item_share", share, HEALTH_THRESHOLDS["new_item_share"].status(share)))
    live = live_version(dsn=dsn, sqlite_path=settings.serving_sqlite_path)
    if live is not None:
        record = settings.run_dir(live["logical_date"]) / "publish.json"
        stats = json.loads(record.read_text()).get("lists", {}) if record.exists() else {}
        rows += [
            (k, float(v), "ok")
            for k, v in stats.items()
            if k in ("cold_start_share", "catalogue_coverage")
        ]
    return pd.DataFrame(rows, columns=["metric", "value", "status"]).assign(subject="")


def _report(
    history: pd.DataFrame, folder: Path, options: MonitorOptions, as_of: dt.datetime
) -> Path:
    from pipeline.monitoring.report import write_report

    return write_report(
        history,
        folder / "report.png",
        warn=options.psi_warn,
        alert=options.psi_alert,
        title=f"recommendations monitor, {as_of:%Y-%m-%d}: PSI by feature",
    )


def _log_mlflow(rows: pd.DataFrame, summary: dict, report: Path, as_of: dt.datetime) -> str:
    """One MLflow run per monitored date in the ``monitoring`` experiment (a re-run of the
    date logs into the same run); metrics carry the date as their timestamp and step, so the
    UI's charts draw trends across runs."""
    import mlflow

    from pipeline.registry.versions import configure_mlflow

    configure_mlflow()
    experiment = mlflow.set_experiment(MLFLOW_EXPERIMENT)
    day = f"{as_of:%Y-%m-%d}"
    found = mlflow.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.as_of = '{day}'",
        output_format="list",
        max_results=1,
    )
    step = int(as_of.timestamp() // 86_400)
    stamp = int(as_of.timestamp() * 1000)
    metrics = [
        mlflow.entities.Metric(_metric_name(r.metric, r.subject), float(r.value), stamp, step)
        for r in rows.itertuples()
        if _finite(r.value) is not None
    ]
    with mlflow.start_run(
        run_id=found[0].info.run_id if found else None, run_name=None if found else f"monitor-{day}"
    ) as run:
        mlflow.set_tags(
            {
                "as_of": day,
                "reference": summary["reference"],
                "champion": str(summary["champion"]),
                "alerts": str(len(summary["alerts"])),
            }
        )
        client = mlflow.MlflowClient()
        for start in range(0, len(metrics), 1000):
            client.log_batch(run.info.run_id, metrics=metrics[start : start + 1000])
        mlflow.log_artifact(str(report))
        return run.info.run_id


def _push(rows: pd.DataFrame, as_of: dt.datetime) -> bool:
    from pipeline.monitoring import prometheus

    drift = rows[(rows["metric"] == "psi") & (rows["subject"] != "")]
    psi = pd.DataFrame(
        {
            "feature": drift["subject"],
            "group": drift["subject"].str.split(".").str[0],
            "psi": drift["value"],
            "status": drift["status"],
        }
    )
    health = {r.metric: r.value for r in rows[rows["metric"] != "psi"].itertuples()}
    return prometheus.push_monitor(psi, health, as_of=as_of)


def _metric_name(metric: str, subject: str) -> str:
    return f"{metric}.{subject}" if subject else metric


def _describe(rows: pd.DataFrame) -> list[str]:
    return [f"{_metric_name(r.metric, r.subject)} = {_fmt(r.value)}" for r in rows.itertuples()]


def _top(drift: pd.DataFrame, n: int) -> list[tuple[str, float]]:
    ranked = drift.dropna(subset=["value"]).sort_values("value", ascending=False).head(n)
    return [(str(r.subject), float(r.value)) for r in ranked.itertuples()]


def _finite(value) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None


def _fmt(value) -> str:
    if value is None or not np.isfinite(value):
        return "n/a"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
