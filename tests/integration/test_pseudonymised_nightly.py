"""The nightly DAG with a pseudonymisation key, via ``dag.test()`` against Postgres: no CMS id
in any file under the data dir's ``lake/`` and ``runs/`` nor in the MLflow store (bytes
scanned), while the ``recommendations`` view carries the CMS's ids; ``cms_reader`` cannot read
the mapping; erasure by CMS id reaches the mapping; the simulated CMS writes CMS ids.

The CMS ids are distinctive e-mail-like strings, and the landing file has no ``event_id`` or
``session_id`` (the synthetic ones embed the user id, which a real export should not do: see
the README, "Pseudonymised ids")."""

from __future__ import annotations

import dataclasses
import datetime as dt
import gzip
from pathlib import Path

import pandas as pd
import psycopg2
import pytest

from pipeline.core.config import DEFAULT_USER

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
UTC = dt.timezone.utc
CUTOFF = dt.datetime(2024, 2, 1, tzinfo=UTC)
CONF = {"top_n": 5, "als_iterations": 5, "als_factors": 16, "holdout_days": 7, "ranker_bags": 1}
KEY = "integration-pseudonym-key-5f0c2a9e81d7"


def _cms_id(synthetic: str) -> str:
    return f"person.{synthetic[1:]}.q7x@example.org"


@pytest.fixture(scope="module")
def world(tmp_path_factory, pg_dsn_module, airflow_db):
    """Synthetic landing data with CMS-looking ids, every store in a temp folder or a
    throwaway Postgres database, a key in the environment, the DAGs with retries off."""
    from airflow.dag_processing.dagbag import BundleDagBag

    from pipeline.lake.demo import write_landing
    from pipeline.lake.demo.synthetic import generate_clickstream

    root = tmp_path_factory.mktemp("pseudo")
    data = generate_clickstream(n_users=150, n_items=100, n_days=40, start="2024-01-01", seed=11)
    events = data.events.drop(columns=["event_id", "session_id"]).assign(
        user_id=lambda f: f["user_id"].map(_cms_id)
    )
    users = data.users.assign(user_id=lambda f: f["user_id"].map(_cms_id))
    data = dataclasses.replace(data, events=events, users=users)
    write_landing(data, root / "data" / "landing", name="clicks", fmt="csv", gzip=True)
    env = pytest.MonkeyPatch()
    env.setenv("RECS_DATA_DIR", str(root / "data"))
    env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    env.setenv("MLFLOW_ARTIFACT_ROOT", str(root / "mlartifacts"))
    env.setenv("AIRFLOW_CONN_RECS_SERVING", pg_dsn_module)
    env.setenv("RECS_PSEUDONYM_KEY", KEY)
    env.delenv("RECS_PSEUDONYM_KEY_FILE", raising=False)
    dags = BundleDagBag(dag_folder=str(REPO / "dags"), bundle_path=REPO / "dags").dags
    for dag in dags.values():
        for task in dag.tasks:
            task.retries = 0
    yield {"root": root, "events": events, "dags": dags, "dsn": pg_dsn_module}
    env.undo()


def _files_holding(root: Path, ids: set[str]) -> list[str]:
    needles = [i.encode() for i in ids]
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            if path.suffix == ".gz":
                data += gzip.decompress(data)
            hits = [n.decode() for n in needles if n in data]
            if hits:
                found.append(f"{path.relative_to(root)}: {hits[:3]}")
    return found


def test_the_nightly_with_a_key_keeps_cms_ids_out_of_lake_runs_and_mlflow(world):
    from pipeline.serving.store import read_all

    run = world["dags"]["recommendations_nightly"].test(logical_date=CUTOFF, run_conf=CONF)
    assert run.state == "success"

    events = world["events"]
    before = events[pd.to_datetime(events["timestamp"], utc=True) < CUTOFF]
    view = read_all(dsn=world["dsn"], sqlite_path=Path("/nonexistent"))
    assert set(view["user_id"]) == set(before["user_id"]) | {DEFAULT_USER}

    ids = set(events["user_id"])
    root = world["root"]
    assert (root / "mlartifacts").exists() and (root / "data" / "runs").exists()
    for folder in (root / "data" / "lake", root / "data" / "runs", root / "mlartifacts"):
        assert _files_holding(folder, ids) == [], folder
    # anywhere else (the MLflow store's database included): only the CMS's landing files
    assert all(line.startswith("data/landing/") for line in _files_holding(root, ids))


def test_the_mapping_is_in_postgres_and_cms_reader_cannot_read_it(world):
    conn = psycopg2.connect(world["dsn"])
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*), count(DISTINCT user_id) FROM recs.user_pseudonyms")
            assert cur.fetchone() == (len(set(world["events"]["user_id"])),) * 2
            cur.execute("SET ROLE cms_reader")
            cur.execute("SELECT count(*) FROM recs.recommendations")  # the view: yes
            with pytest.raises(psycopg2.errors.InsufficientPrivilege):
                cur.execute("SELECT count(*) FROM recs.user_pseudonyms")
    finally:
        conn.rollback()
        conn.close()


def test_the_simulated_cms_writes_cms_ids(world):
    from pipeline.cli import main

    assert main(["simulate-day", CUTOFF.date().isoformat()]) == 0
    (path,) = (world["root"] / "data" / "landing" / "events").glob("simulated-*.csv.gz")
    simulated = pd.read_csv(path)
    assert len(simulated) and set(simulated["user_id"]) <= set(world["events"]["user_id"])
    path.unlink()


def test_forgetting_a_cms_id_reaches_its_pseudonym_and_mapping(world):
    from pipeline.core.config import Settings
    from pipeline.core.privacy import stored_user_id
    from pipeline.lake.snapshot import load_snapshot
    from pipeline.serving.erasure import forget_users
    from pipeline.serving.store import read_all

    user = sorted(set(world["events"]["user_id"]))[0]
    settings = Settings()
    result = forget_users(settings, [user], requested_by="dpo", dsn=world["dsn"])
    assert result["removed"]["lake_events"] > 0
    assert result["removed"]["serving_list_rows"] > 0
    lake = load_snapshot(settings.lake_events_dir, CUTOFF + dt.timedelta(days=30), 365)
    assert stored_user_id(user, settings.pseudonym_key) not in set(lake["user_id"])
    assert user not in set(read_all(dsn=world["dsn"], sqlite_path=Path("/x"))["user_id"])
    conn = psycopg2.connect(world["dsn"])
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM recs.user_pseudonyms WHERE user_id = %s", (user,))
            assert cur.fetchone() == (0,)
    finally:
        conn.close()
