"""The impact run: what the published lists did, per model version and variant.

``run_impact(settings, as_of, dsn)`` reads the served-list history and the lake's events of
the ``days`` before ``as_of`` (point in time: nothing at or after it), attributes them
(:mod:`pipeline.monitoring.impact`), compares every variant with the control
(:mod:`pipeline.monitoring.abstats`: two-proportion tests on users, Bonferroni across
variants, the minimum detectable effect at the sample reached, and a sample-ratio check
against the served split), and writes:

* the serving DB's ``impact`` table: one row per day, model version and variant (a re-run
  replaces the days it attributed, so late feedback updates them);
* ``$RECS_DATA_DIR/impact/<date>/``: ``daily.csv`` (per day, version and variant),
  ``variants.csv`` (per variant over the window, users as the unit), ``comparison.csv``,
  ``report.png`` (daily CTR and conversion per variant with 95% Wilson intervals) and
  ``summary.json``;
* MLflow, experiment ``impact``: one run per date (a re-run logs into it), metrics per variant
  (``<variant>.ctr``, ``<variant>.conversion``, ...) stamped with each day, so the UI's charts
  draw the daily trend.

The unit of the tests is the user (active in the window, engaged or converted at least once),
the unit the assignment randomises: impressions of one user are not independent trials.

The online gate (:func:`online_gate`): when the running experiment serves the champion to one
variant and a version that waits as ``online-test`` (the nightly's ``gate_online``) to
another, the run reads the experiment at its fixed horizon and moves ``champion`` to that
version only when it is significantly better online; the decision goes to
``model_promotions`` before the alias moves, like every other decision.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.config import Settings, as_utc

logger = logging.getLogger(__name__)

MLFLOW_EXPERIMENT = "impact"
CONTROL = "control"


def run_impact(
    settings: Settings,
    as_of: dt.datetime,
    dsn: str | None = None,
    *,
    days: int = 14,
    engage_days: int = 1,
    control: str = CONTROL,
    expected_shares: dict[str, float] | None = None,
    online_metric: str = "engaged",
    triggered_by: str = "impact",
) -> dict:
    """Attribute, compare and record the window ``[as_of - days, as_of)``; a JSON summary."""
    from pipeline.lake.served import read_served
    from pipeline.lake.snapshot import load_snapshot
    from pipeline.monitoring.impact import attribute, user_outcomes
    from pipeline.monitoring.report import write_impact_report

    as_of = as_utc(as_of)
    start = as_of - dt.timedelta(days=days)
    lake_root = settings.lake_events_dir.parent
    served = read_served(lake_root, start, as_of)
    events = load_snapshot(settings.lake_events_dir, as_of, days)
    daily = attribute(served, events, start=start, end=as_of, engage_days=engage_days)
    users = user_outcomes(served, events, start=start, end=as_of, engage_days=engage_days)
    variants = variant_table(users)
    experiment = _running_experiment(settings, dsn)
    if experiment is not None:
        control = experiment.control_variant or control
        if expected_shares is None:  # the designed split of the variants that serve lists
            kinds = {v.name: v.kind for v in experiment.variants}
            expected_shares = {
                name: share
                for name, share in experiment.shares.items()
                if kinds.get(name) != "holdout"
            }
    # Only the experiment's own groups are randomised against each other: lists served
    # before it started (variant "(none)") are another period, not a comparison group.
    compared = (
        variants
        if experiment is None
        else variants[variants["variant"].isin({v.name for v in experiment.variants})]
    )
    comparison, srm = _compare(compared, control, expected_shares)
    sitewide, holdout_comparison = _holdout(settings, experiment, events, start, as_of, dsn)
    if experiment is not None and experiment.planned_users_per_variant and len(comparison):
        comparison["decision"] = [
            _decision(row, experiment.planned_users_per_variant) for row in comparison.itertuples()
        ]
    folder = settings.data_dir / "impact" / f"{as_of:%Y-%m-%d}"
    folder.mkdir(parents=True, exist_ok=True)
    daily.to_csv(folder / "daily.csv", index=False)
    variants.to_csv(folder / "variants.csv", index=False)
    comparison.to_csv(folder / "comparison.csv", index=False)
    if len(sitewide):
        sitewide.to_csv(folder / "sitewide.csv", index=False)
        holdout_comparison.to_csv(folder / "holdout_comparison.csv", index=False)
    report = write_impact_report(
        daily,
        folder / "report.png",
        title=f"recommendations impact, {start:%Y-%m-%d} .. "
        f"{as_of - dt.timedelta(days=1):%Y-%m-%d}",
    )
    summary = {
        "as_of": as_of.isoformat(),
        "start": start.isoformat(),
        "days": days,
        "engage_days": engage_days,
        "served_sets": int(served["cutoff"].nunique()),
        "events": int(len(events)),
        "impressions": bool((daily.get("impressions", 0) > 0).any()) if len(daily) else False,
        "variants": json.loads(variants.to_json(orient="records")),
        "comparison": json.loads(comparison.to_json(orient="records")),
        "srm": srm,
        "report": str(report),
        "sitewide": json.loads(sitewide.to_json(orient="records")),
        "holdout_comparison": json.loads(holdout_comparison.to_json(orient="records")),
    }
    summary["online_gate"] = online_gate(
        settings, experiment, variants, dsn, metric=online_metric, triggered_by=triggered_by
    )
    from pipeline.serving.store import record_impact

    summary["impact_rows"] = record_impact(
        daily,
        start=start,
        end=as_of,
        as_of=as_of,
        dsn=dsn,
        sqlite_path=settings.serving_sqlite_path,
    )
    summary["mlflow_run_id"] = _log_mlflow(
        daily, variants, summary, report, as_of, sitewide=sitewide
    )
    (folder / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    logger.info(
        "impact %s: %d served set(s), %d variant(s)",
        f"{as_of:%Y-%m-%d}",
        summary["served_sets"],
        len(variants),
    )
    return summary


def _running_experiment(settings: Settings, dsn: str | None):
    from pipeline.serving.experiments import Experiment
    from pipeline.serving.store import active_experiment

    record = active_experiment(dsn, settings.serving_sqlite_path)
    return Experiment.from_dict(record["config"]) if record else None


ONLINE_METRICS = ("engaged", "converted")


def online_gate(
    settings: Settings,
    experiment,
    variants: pd.DataFrame,
    dsn: str | None,
    *,
    metric: str = "engaged",
    alpha: float = 0.05,
    triggered_by: str = "impact",
) -> list[dict]:
    """The online gate's verdicts (dicts of :class:`~pipeline.evaluation.gate.OnlineDecision`)
    for every ``online-test`` version that the running ``experiment`` serves beside the
    champion; empty when there is none.

    A variant serves the champion when its model is ``champion`` or the champion's version
    number; a challenger variant names a registered version whose newest decision in
    ``model_promotions`` is ``online-test``. Each challenger is compared with the champion's
    variant on ``metric`` (users as the unit; Bonferroni across challengers). At the fixed
    horizon (``planned_users_per_variant`` active users in both) the verdict is recorded, then
    acted on (``champion`` moves on ``promoted-online``), under the promotion lock; a version
    decided once is not decided again, so a daily re-run changes nothing.
    """
    from pipeline.evaluation.gate import ONLINE_TEST, PROMOTED_ONLINE, decide_online
    from pipeline.monitoring.abstats import compare_variants
    from pipeline.registry.versions import (
        champion_history,
        champion_version,
        configure_mlflow,
        set_champion,
        tag_decision,
    )
    from pipeline.serving.store import promotion_lock, record_promotion, recorded_decision

    if metric not in ONLINE_METRICS:
        raise ValueError(f"online_metric must be one of {ONLINE_METRICS}, got {metric!r}")
    if experiment is None or variants.empty:
        return []
    store = {"dsn": dsn, "sqlite_path": settings.serving_sqlite_path}
    configure_mlflow()
    champion = champion_version()
    models = {v.name: v.model for v in experiment.variants if v.kind == "model"}
    serving_champion = [name for name, model in models.items() if model in ("champion", champion)]
    tested = {
        name: model
        for name, model in models.items()
        if model
        and model.isdigit()
        and model != champion
        and recorded_decision(**store, model_name="recommender", model_version=model) == ONLINE_TEST
    }
    if not tested:
        return []
    if not serving_champion:
        logger.warning(
            "online gate: experiment %s serves v%s (online-test) but no variant "
            "serves the champion; nothing to compare with",
            experiment.name,
            ", v".join(tested.values()),
        )
        return []
    if not experiment.planned_users_per_variant:
        logger.warning(
            "online gate: experiment %s has no planned_users_per_variant (fixed "
            "horizon); the online gate decides only at a planned horizon",
            experiment.name,
        )
        return []
    control = serving_champion[0]
    frame = variants[variants["variant"].isin([control, *tested])].rename(
        columns={"users_active": "n", metric: "x"}
    )[["variant", "n", "x"]]
    if control not in set(frame["variant"]):
        return []
    verdicts = []
    for row in compare_variants(frame, control=control, alpha=alpha).itertuples():
        version = tested[row.variant]
        verdict = decide_online(
            version=version,
            champion_version=champion,
            metric=metric,
            n_challenger=int(row.n_variant),
            x_challenger=int(row.x_variant),
            n_champion=int(row.n_control),
            x_champion=int(row.x_control),
            diff_ci=(row.diff_low, row.diff_high),
            p_value=row.p_value_adjusted,
            alpha=alpha,
            planned_users=int(experiment.planned_users_per_variant),
        )
        if verdict.decision is not None:
            with promotion_lock(**store):
                # re-read under the lock: another run may have decided meanwhile
                recorded = recorded_decision(
                    **store, model_name="recommender", model_version=version
                )
                if recorded == PROMOTED_ONLINE and version not in champion_history():
                    # recorded, but the run died before the alias moved: finish it
                    set_champion(version, decision=recorded, reason=verdict.reason)
                    continue
                if recorded != ONLINE_TEST:
                    continue
                record_promotion(
                    **store,
                    model_name="recommender",
                    model_version=version,
                    decision=verdict.decision,
                    reason=verdict.reason,
                    metrics={
                        **verdict.to_dict(),
                        "experiment": experiment.name,
                        "variant": row.variant,
                        "control_variant": control,
                    },
                    triggered_by=triggered_by,
                )
                if verdict.promote:
                    set_champion(version, decision=verdict.decision, reason=verdict.reason)
                else:
                    tag_decision(version, decision=verdict.decision, reason=verdict.reason)
            logger.info("online gate: v%s %s: %s", version, verdict.decision, verdict.reason)
        verdicts.append({**verdict.to_dict(), "variant": row.variant})
    return verdicts


#: The holdout comparison's population: users active in this many days before the window.
POPULATION_DAYS = 28


def _holdout(
    settings: Settings,
    experiment,
    events: pd.DataFrame,
    start: dt.datetime,
    end: dt.datetime,
    dsn: str | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """With a running experiment that has a holdout variant: the site-wide table
    (:func:`~pipeline.monitoring.impact.sitewide_outcomes` over the users active in the
    :data:`POPULATION_DAYS` before the window, by their assignment) and each variant of the
    experiment compared with the holdout on site-wide conversion per assigned user (a cart or
    purchase of any item): the incremental effect of its lists. Empty frames otherwise."""
    from pipeline.lake.snapshot import window_users
    from pipeline.monitoring.abstats import compare_variants
    from pipeline.monitoring.impact import sitewide_outcomes

    holdouts = (
        [v.name for v in experiment.variants if v.kind == "holdout"]
        if experiment is not None
        else []
    )
    if not holdouts:
        return pd.DataFrame(), pd.DataFrame()
    from pipeline.serving.pseudonyms import to_cms_ids

    def variant_of(user_ids: np.ndarray) -> np.ndarray:
        # publish assigned each user by their CMS id: the lake's pseudonyms are mapped back
        # (a pseudonym without a row is outside: its user was never served)
        cms = to_cms_ids(user_ids, dsn=dsn, sqlite_path=settings.serving_sqlite_path)
        known = np.array([c is not None for c in cms], dtype=bool)
        out = np.full(len(cms), None, dtype=object)
        if known.any():
            out[known] = experiment.assign(cms[known])
        return out

    population = window_users(settings.lake_events_dir, start, POPULATION_DAYS)
    sitewide = sitewide_outcomes(events, population, variant_of, start=start, end=end)
    inside = sitewide[sitewide["variant"].isin({v.name for v in experiment.variants})]
    if holdouts[0] not in set(inside["variant"]) or len(inside) < 2:
        return sitewide, pd.DataFrame()
    frame = inside.rename(columns={"users": "n", "converted_any": "x"})[["variant", "n", "x"]]
    return sitewide, compare_variants(frame, control=holdouts[0]).assign(metric="converted_any")


def _decision(row, planned: int) -> str:
    """The fixed horizon: "keep running" until both groups reached the planned users, then
    the (Bonferroni-adjusted) verdict, read once."""
    if min(row.n_variant, row.n_control) < planned:
        return f"keep running ({min(row.n_variant, row.n_control):,} of {planned:,} users)"
    return "significant" if row.significant else "no significant difference"


def variant_table(users: pd.DataFrame) -> pd.DataFrame:
    """Per variant (users as the unit): served, active, engaged and converted users, their
    shares of the active users, and impressions, clicks and CTR."""
    if users.empty:
        return pd.DataFrame(
            columns=[
                "variant",
                "users_served",
                "users_active",
                "engaged",
                "converted",
                "engaged_share",
                "conversion",
                "impressions",
                "clicks",
                "ctr",
            ]
        )
    grouped = users.groupby("variant")
    out = pd.DataFrame(
        {
            "users_served": grouped["user_id"].nunique(),
            "users_active": grouped["active"].sum(),
            "engaged": grouped["engaged"].sum(),
            "converted": grouped["converted"].sum(),
            "impressions": grouped["impressions"].sum(),
            "clicks": grouped["clicks"].sum(),
        }
    )
    active = out["users_active"].where(out["users_active"] > 0)
    out["engaged_share"] = out["engaged"] / active
    out["conversion"] = out["converted"] / active
    out["ctr"] = out["clicks"] / out["impressions"].where(out["impressions"] > 0)
    return out.reset_index()


def _compare(
    variants: pd.DataFrame, control: str, expected: dict[str, float] | None
) -> tuple[pd.DataFrame, dict | None]:
    from pipeline.monitoring.abstats import compare_variants, srm_check

    if control not in set(variants["variant"]) or len(variants) < 2:
        return pd.DataFrame(), None
    parts = []
    for metric in ("engaged", "converted"):
        frame = variants.rename(columns={"users_active": "n", metric: "x"})[["variant", "n", "x"]]
        parts.append(compare_variants(frame, control=control).assign(metric=metric))
    comparison = pd.concat(parts, ignore_index=True)
    counts = dict(zip(variants["variant"], variants["users_served"].astype(int), strict=True))
    shares = {name: share for name, share in (expected or {}).items() if name in counts} or {
        name: 1.0 / len(counts) for name in counts
    }
    counts = {name: count for name, count in counts.items() if name in shares}
    result = srm_check(counts, shares)
    srm = {
        "chi2": result.chi2,
        "p_value": result.p_value,
        "mismatch": result.mismatch,
        "message": result.message,
        "expected_shares": shares,
    }
    return comparison, srm


def _log_mlflow(
    daily: pd.DataFrame,
    variants: pd.DataFrame,
    summary: dict,
    report: Path,
    as_of: dt.datetime,
    *,
    sitewide: pd.DataFrame | None = None,
) -> str:
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
    metrics = []
    for row in daily.itertuples():
        stamp = int(pd.Timestamp(row.day).timestamp() * 1000)
        step = int(pd.Timestamp(row.day).timestamp() // 86_400)
        for name in (
            "ctr",
            "engaged_share",
            "conversion",
            "revenue_per_active",
            "ctr_top3",
            "users_active",
        ):
            value = getattr(row, name)
            if value is not None and np.isfinite(value):
                key = f"{row.variant}.v{row.model_version}.{name}".replace("(", "").replace(")", "")
                metrics.append(mlflow.entities.Metric(key, float(value), stamp, step))
    with mlflow.start_run(
        run_id=found[0].info.run_id if found else None, run_name=None if found else f"impact-{day}"
    ) as run:
        mlflow.set_tags({"as_of": day, "days": str(summary["days"])})
        client = mlflow.MlflowClient()
        for first in range(0, len(metrics), 1000):
            client.log_batch(run.info.run_id, metrics=metrics[first : first + 1000])
        for row in variants.itertuples():
            for name in ("engaged_share", "conversion", "ctr"):
                value = getattr(row, name)
                if value is not None and np.isfinite(value):
                    mlflow.log_metric(
                        f"window.{row.variant}.{name}".replace("(", "").replace(")", ""),
                        float(value),
                    )
        for row in (sitewide if sitewide is not None else pd.DataFrame()).itertuples():
            for name in ("conversion_any", "revenue_per_user_any"):
                value = getattr(row, name)
                if value is not None and np.isfinite(value):
                    mlflow.log_metric(
                        f"sitewide.{row.variant}.{name}".replace("(", "").replace(")", ""),
                        float(value),
                    )
        mlflow.log_artifact(str(report))
        return run.info.run_id
