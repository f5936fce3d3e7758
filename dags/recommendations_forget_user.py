"""
### Forget users (right to erasure)

Removes the users named in `user_ids` (ids as the CMS knows them) from everything the pipeline
keeps: their events in the lake and the quarantine, the run folders (`runs/<cutoff>/`), the
served-list history, and every serving table (live and kept list versions, assignments), with a
plain `DELETE` (no view swap: the CMS keeps reading). It adds them to the lake's tombstone (keyed
hashes, no ids), so an old landing file or a re-sent export cannot bring them back, and records
the erasure (who, when, why, counts per store, the model versions trained on their data) in the
serving DB's `erasures` table. Those models are replaced by the next nightly's retraining.

Trigger it by hand ("Trigger DAG") with the ids, one per line, who asked and the ticket. Same as
`python -m pipeline.cli forget-user`. Safe to retry: every step is idempotent. The run's
configuration (the ids) stays in Airflow's metadata DB with the run: delete the run afterwards
if that matters (README, "Privacy").
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, get_current_context, task
from recs_support import TIMEOUTS, notify_failure, pseudonym_key, serving_dsn, triggered_by


@dag(
    dag_id="recommendations_forget_user",
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
        "user_ids": Param(
            [],
            type="array",
            minItems=1,
            maxItems=10_000,
            items={"type": "string", "minLength": 1, "maxLength": 512, "pattern": r"^\S(.*\S)?$"},
            title="User ids",
            description="The users to forget, as the CMS knows them, one per line.",
        ),
        "requested_by": Param(
            None,
            type=["null", "string"],
            maxLength=200,
            title="Requested by",
            description="Who asked for the erasure (recorded); empty = the user who triggers "
            "the run.",
        ),
        "reason": Param(
            None,
            type=["null", "string"],
            maxLength=2000,
            title="Reason",
            description="Why: the ticket or request reference (recorded).",
        ),
    },
    tags=["recommendations", "privacy", "operations"],
    doc_md=__doc__,
)
def recommendations_forget_user():
    @task(execution_timeout=TIMEOUTS["forget"])
    def forget() -> dict:
        from pipeline.core.config import Settings
        from pipeline.serving.erasure import forget_users

        context = get_current_context()
        params = context["params"]
        requested_by = params.get("requested_by") or triggered_by(context, prefix="forget_user")
        # the lake holds the users' pseudonyms: the key (Airflow's, else the environment's)
        return forget_users(
            Settings(pseudonym_key=pseudonym_key()),
            params["user_ids"],
            requested_by=requested_by,
            reason=params.get("reason"),
            dsn=serving_dsn(),
            request_id=f"airflow:{context['dag_run'].run_id}",
        )

    forget()


recommendations_forget_user()
