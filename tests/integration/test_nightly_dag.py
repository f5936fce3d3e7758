"""The whole nightly DAG via ``dag.test()``: synthetic data, real Postgres, real MLflow store.

One module-scoped world (landing data, MLflow store, throwaway Postgres database) and runs
in order: a first run publishes, a re-run of the same date republishes identical rows, and a
run with a broken landing file fails without touching what is published.
"""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pytest

from pipeline.core.config import DEFAULT_USER

pytestmark = pytest.mark.integration

UTC = dt.timezone.utc
CUTOFF = dt.datetime(2024, 2, 1, tzinfo=UTC)
CONF = {"top_n": 5, "als_iterations": 5, "als_factors": 16, "holdout_days": 7, "ranker_bags": 2}


def test_first_run_publishes_a_list_for_every_user_seen_before_the_cutoff(world, published):
    run = world["dags"]["recommendations_nightly"].test(logical_date=CUTOFF, run_conf=CONF)
    assert run.state == "success"

    events = world["events"]
    before = events[pd.to_datetime(events["timestamp"], utc=True) < CUTOFF]
    rows = published()
    users = set(rows["user_id"])
    assert users == set(before["user_id"]) | {DEFAULT_USER}
    sizes = rows.groupby("user_id")["rank"].agg(["count", "min", "max"])
    assert (sizes["count"] == 5).all() and (sizes["min"] == 1).all() and (sizes["max"] == 5).all()
    # Point in time: items first seen after the cutoff are never recommended.
    only_later = set(events["item_id"]) - set(before["item_id"])
    assert set(rows["item_id"]).isdisjoint(only_later)
    assert (rows["generated_at"] == pd.Timestamp(CUTOFF)).all()
    assert rows["reason"].str.len().gt(0).all()
    assert set(rows["source"]) <= {"als", "ranker", "popular"}
    assert rows["model_version"].nunique() == 1
    # What was served is kept in the lake for attribution, keyed by user.
    from pipeline.lake.served import read_served

    served = read_served(world["root"] / "data" / "lake")
    assert len(served) == len(rows) and set(served["cutoff"]) == {pd.Timestamp(CUTOFF)}
    assert set(served["model_version"]) == set(rows["model_version"])


def test_rerun_of_the_same_date_publishes_identical_rows(world, published):
    first = published()
    run = world["dags"]["recommendations_nightly"].test(logical_date=CUTOFF, run_conf=CONF)
    assert run.state == "success"
    pd.testing.assert_frame_equal(first, published())


def test_a_malformed_landing_file_fails_the_run_and_keeps_what_is_published(world, published):
    before = published()
    landing = world["root"] / "data" / "landing" / "events"
    good = next(landing.glob("*.gz")).read_bytes()
    (landing / "broken.csv.gz").write_bytes(good[: len(good) // 2])  # truncated gzip
    dag = world["dags"]["recommendations_nightly"]
    dag.get_task("ingest").retries = 2  # bad input must fail at once, not after retry delays
    try:
        run = dag.test(logical_date=CUTOFF + dt.timedelta(days=1), run_conf=CONF)
        assert run.state == "failed"
        tis = {ti.task_id: ti for ti in run.get_task_instances()}
        assert tis["ingest"].state == "failed" and tis["publish"].state != "success"
        assert tis["ingest"].try_number == 1  # failed for good on the first try: no retry
    finally:
        dag.get_task("ingest").retries = 0
        (landing / "broken.csv.gz").unlink()
    pd.testing.assert_frame_equal(before, published())
