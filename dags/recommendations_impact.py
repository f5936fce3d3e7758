"""
### Recommendations impact

What the published lists did: runs on the `recs://lake/events` Asset (every ingest) and
attributes the feedback events of the last `days` days (impressions, clicks, carts,
purchases) to the lists served then, per model version and variant: users served and active,
CTR, engaged share, conversion, revenue per active user, and the same for the first 3
positions. With an experiment's `control` variant present, every variant is compared with it
(two-proportion tests on users, Bonferroni, the minimum detectable effect, a sample-ratio
check). Results: `$RECS_DATA_DIR/impact/<date>/` (CSV, a PNG of daily CTR and conversion
with 95% intervals, summary.json) and the MLflow experiment `impact`.

**As-of date:** the triggering ingest's `cutoff`; for a manual run, the `as_of` Param, else
the logical date, else midnight of the trigger time.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, get_current_context, task
from recs_support import LAKE_EVENTS, as_of_date, notify_failure, serving_dsn, triggered_by

PARAMS = {
    "as_of": Param(
        None,
        type=["null", "string"],
        format="date-time",
        title="As of (manual runs)",
        description="Attribute the window that ends here (empty: the triggering "
        "ingest's cutoff, else the logical date).",
    ),
    "days": Param(
        14,
        type="integer",
        minimum=1,
        maximum=365,
        title="Window (days)",
        description="Days of served lists and feedback attributed.",
    ),
    "engage_days": Param(
        1,
        type="integer",
        minimum=1,
        maximum=30,
        title="Engagement days",
        description="A click, cart or purchase of a recommended item counts "
        "for a visit up to this many days before it.",
    ),
    "control": Param(
        "control",
        type="string",
        title="Control variant",
        description="The variant every other one is compared with.",
    ),
    "online_metric": Param(
        "engaged",
        type="string",
        enum=["engaged", "converted"],
        title="Online gate metric",
        description="What an online-test version must improve, "
        "significantly, over the champion's variant to become "
        "champion (engaged share or conversion of active "
        "users), read at the experiment's planned horizon.",
    ),
}


@dag(
    dag_id="recommendations_impact",
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
    tags=["recommendations", "monitoring", "experiments"],
    doc_md=__doc__,
)
def recommendations_impact():
    @task(execution_timeout=pendulum.duration(hours=1))
    def impact() -> dict:
        from pipeline.core.config import Settings, as_utc
        from pipeline.impact import run_impact
        from pipeline.monitoring.report import format_impact

        context = get_current_context()
        params = context["params"]
        summary = run_impact(
            Settings(),
            as_utc(as_of_date(context).isoformat()),
            serving_dsn(),
            days=params["days"],
            engage_days=params["engage_days"],
            control=params["control"],
            online_metric=params["online_metric"],
            triggered_by=triggered_by(context, "impact"),
        )
        for line in format_impact(summary).splitlines():
            print(line)
        return {key: summary[key] for key in ("as_of", "variants", "srm", "report", "online_gate")}

    impact()


recommendations_impact()
