"""The CMS feedback contract end to end: the whole nightly DAG (``dag.test()``, real Postgres,
real MLflow store) on a landing folder of clicks and views plus ``impression`` rows with
``position`` and ``placement``. The lake keeps the impressions with their columns; nothing
trains on them, so the published lists equal those of the same world without impressions.

Two worlds, each with its own data folder, MLflow store and serving database: the plain
synthetic clickstream, and the same clickstream (some clicks carrying position and placement)
plus impressions in two more files (JSON lines and Parquet), among them impressions of users
and items that appear nowhere else.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import DEFAULT_USER

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
UTC = dt.timezone.utc
CUTOFF = dt.datetime(2024, 2, 1, tzinfo=UTC)
CONF = {"top_n": 5, "als_iterations": 3, "als_factors": 8, "holdout_days": 7, "ranker_bags": 1}
PLACEMENTS = ("home_recs", "article_end")


@pytest.fixture(scope="module")
def data():
    from pipeline.lake.demo.synthetic import generate_clickstream

    return generate_clickstream(n_users=300, n_items=150, n_days=40, start="2024-01-01", seed=7)


@pytest.fixture(scope="module")
def dags(airflow_db):
    from airflow.dag_processing.dagbag import BundleDagBag

    found = BundleDagBag(dag_folder=str(REPO / "dags"), bundle_path=REPO / "dags").dags
    for dag in found.values():
        for task in dag.tasks:
            task.retries = 0  # a failure should fail the run now, not after retry delays
    return found


def _impressions(events: pd.DataFrame, seed: int = 11) -> pd.DataFrame:
    """What the CMS showed: per view or click, three items in a row at positions 1-3 (the
    engaged item among them), in the same second, plus impressions of a user and an item
    known from nothing else. Contract columns only; no event ids (derived at ingest)."""
    rng = np.random.default_rng(seed)
    visits = events[events["event_type"].isin(["view", "click"])].reset_index(drop=True)
    items = events["item_id"].unique()
    n = len(visits)
    shown = rng.choice(items, (n, 3))
    shown[np.arange(n), rng.integers(0, 3, n)] = visits["item_id"].to_numpy()
    frame = pd.DataFrame(
        {
            "user_id": np.repeat(visits["user_id"].to_numpy(), 3),
            "item_id": shown.reshape(-1),
            "event_type": "impression",
            "timestamp": np.repeat(visits["timestamp"].to_numpy(), 3),
            "device": np.repeat(visits["device"].to_numpy(), 3),
            "session_id": np.repeat(visits["session_id"].to_numpy(), 3),
            "position": np.tile([1, 2, 3], n),
            "placement": np.repeat(rng.choice(PLACEMENTS, n), 3),
        }
    )
    strangers = pd.DataFrame(
        {
            "user_id": ["shown-only-user"] * 5 + list(visits["user_id"].iloc[:5]),
            "item_id": list(items[:5]) + ["shown-only-item"] * 5,
            "event_type": "impression",
            "timestamp": visits["timestamp"].iloc[:10].to_numpy(),
            "device": "mobile",
            "session_id": None,
            "position": np.arange(1, 11),
            "placement": "home_recs",
        }
    )
    out = pd.concat([frame, strangers], ignore_index=True)
    # the same item twice in a row of the same second: two events, told apart by position
    return out.drop_duplicates(["user_id", "item_id", "timestamp", "position"])


def _run_world(root: Path, dsn: str, dags, data, impressions: pd.DataFrame | None):
    """Write the landing folder, run the nightly for CUTOFF, return what was published."""
    from pipeline.lake.demo import format_iso_utc, write_landing
    from pipeline.serving.store import read_all

    env = pytest.MonkeyPatch()
    try:
        env.setenv("RECS_DATA_DIR", str(root / "data"))
        env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        env.setenv("MLFLOW_ARTIFACT_ROOT", str(root / "mlartifacts"))
        env.setenv("AIRFLOW_CONN_RECS_SERVING", dsn)
        landing = root / "data" / "landing"
        if impressions is None:
            write_landing(data, landing, name="clicks", fmt="csv", gzip=True)
        else:
            # clicks may carry where they happened too
            events = data.events.copy()
            clicks = (events["event_type"] == "click").to_numpy()
            events["position"] = pd.array(np.where(clicks, 1, 0), dtype="Int64")
            events.loc[~clicks, "position"] = pd.NA
            events["placement"] = pd.array(np.where(clicks, "home_recs", None), dtype="string")
            write_landing(
                dataclasses.replace(data, events=events),
                landing,
                name="clicks",
                fmt="csv",
                gzip=True,
            )
            half = len(impressions) // 2
            with open(landing / "events" / "impressions-1.jsonl", "w") as fh:
                part = impressions.iloc[:half].assign(
                    timestamp=format_iso_utc(impressions["timestamp"].iloc[:half])
                )
                for record in part.to_dict("records"):
                    fh.write(json.dumps({k: v for k, v in record.items() if v is not None}) + "\n")
            impressions.iloc[half:].to_parquet(
                landing / "events" / "impressions-2.parquet", index=False
            )
        run = dags["recommendations_nightly"].test(logical_date=CUTOFF, run_conf=CONF)
        assert run.state == "success"
        return read_all(dsn=dsn, sqlite_path=Path("/nonexistent"))
    finally:
        env.undo()


@pytest.fixture(scope="module")
def without_impressions(tmp_path_factory, pg_dsn_module, dags, data):
    root = tmp_path_factory.mktemp("plain")
    return _run_world(root, pg_dsn_module, dags, data, None)


def test_impressions_reach_the_lake_with_their_columns_and_change_no_list(
    tmp_path, pg_dsn, dags, data, without_impressions
):
    from pipeline.core.config import Settings
    from pipeline.lake.snapshot import load_snapshot

    impressions = _impressions(data.events)
    published = _run_world(tmp_path, pg_dsn, dags, data, impressions)

    # 1. the lake holds every impression, with its position and placement
    settings = Settings(data_dir=tmp_path / "data")
    lake = load_snapshot(settings.lake_events_dir, dt.datetime(2030, 1, 1, tzinfo=UTC), 36500)
    stored = lake[lake["event_type"] == "impression"]
    assert len(stored) == len(impressions)
    assert stored["position"].notna().all() and stored["event_id"].is_unique
    assert set(stored["placement"]) == set(PLACEMENTS)
    key = ["user_id", "item_id", "timestamp", "position"]
    expected = impressions.assign(
        timestamp=pd.to_datetime(impressions["timestamp"], utc=True).astype("datetime64[us, UTC]"),
        position=impressions["position"].astype("Int64"),
        placement=impressions["placement"].astype("string"),
    )
    got = stored[[*key, "placement"]].sort_values(key).reset_index(drop=True)
    want = expected[[*key, "placement"]].astype(got.dtypes.to_dict()).sort_values(key)
    pd.testing.assert_frame_equal(got, want.reset_index(drop=True))
    clicks = lake[lake["event_type"] == "click"]
    assert (clicks["position"] == 1).all() and (clicks["placement"] == "home_recs").all()
    others = lake[~lake["event_type"].isin(["impression", "click"])]
    assert others["position"].isna().all() and others["placement"].isna().all()

    # 2. build_features left them out (and said how many)
    run = settings.run_dir(CUTOFF)
    built = json.loads((run / "build_features.json").read_text())
    before = (pd.to_datetime(impressions["timestamp"], utc=True) < CUTOFF).sum()
    assert built["left_out"] == {"impression": int(before)}
    validated = json.loads((run / "validate.json").read_text())
    assert validated["passed"] and validated["bad_rows"] == 0

    # 3. the published lists are those of the world without impressions
    assert "shown-only-user" not in set(published["user_id"])
    assert "shown-only-item" not in set(published["item_id"])
    assert DEFAULT_USER in set(published["user_id"])
    pd.testing.assert_frame_equal(published, without_impressions)
