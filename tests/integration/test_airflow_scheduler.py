"""The nightly DAG as its users run it: `make airflow`, the REST API, the real scheduler.

`make airflow` (airflow standalone: scheduler, DAG processor, triggerer, API server, the
LocalExecutor) starts on free local ports against a throwaway metadata DB, log folder, data
folder, MLflow store and Postgres database, with its own generated secrets file and a real
SMTP server for the failure notifier. The tests then do what users do, in order:

1. unpause the DAG: the scheduler runs today's 02:00 slot at once; the demo-style log ends
   long before, so ``ingest`` fails on its first try, says which date would work, and mails;
2. trigger a run through the REST API with a logical date in the data and ``top_n`` = 7:
   it succeeds and the view serves 7 items per user;
3. backfill two older dates: both runs succeed and are recorded, production is untouched;
4. a loader lands a week whose sessions all moved to the TV app, ingests it and posts the
   lake Asset event: the monitor runs on it, alerts (mail and drift Asset), and the nightly
   retrains on that Asset, recording why; the same day a product team starts an A/B
   experiment from the command line, so that retrain publishes both variants;
5. the CMS's feedback on those lists (the simulated CMS of `make run`) lands and is ingested,
   the lake Asset event runs the impact DAG, which compares the variants and writes the
   serving DB's ``impact`` table.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from email import message_from_bytes
from email.message import Message
from pathlib import Path

import httpx
import pandas as pd
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DAG = "recommendations_nightly"
LIVE_DATE = "2024-02-01T00:00:00Z"
CONF = {"top_n": 7, "als_factors": 8, "als_iterations": 3, "holdout_days": 7, "ranker_bags": 1}
START_TIMEOUT_S = 240
RUN_TIMEOUT_S = 900


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _Mailbox:
    """A real SMTP server (aiosmtpd) on a free local port that keeps what it receives."""

    def __init__(self) -> None:
        from aiosmtpd.controller import Controller

        self.messages: list[Message] = []
        self.port = _free_port()
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802 (aiosmtpd)
        self.messages.append(message_from_bytes(envelope.content))
        return "250 OK"

    def __enter__(self) -> _Mailbox:
        self._controller.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._controller.stop()


class _Airflow:
    """`make airflow` in its own process group, and a REST client logged in as admin."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env = root, env
        self.url = f"http://127.0.0.1:{env['AIRFLOW__API__PORT']}"
        self.log_path = root / "make-airflow.log"
        self.proc: subprocess.Popen | None = None
        self.client: httpx.Client | None = None

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["make", "--no-print-directory", "-C", str(REPO), "airflow"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._healthy():
            assert self.proc.poll() is None, f"make airflow exited:\n{self.log_tail()}"
            assert time.monotonic() < deadline, f"Airflow not healthy:\n{self.log_tail()}"
            time.sleep(1)
        password = json.loads(
            Path(self.env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]).read_text()
        )["admin"]
        token = httpx.post(
            f"{self.url}/auth/token", json={"username": "admin", "password": password}
        ).json()
        self.client = httpx.Client(
            base_url=f"{self.url}/api/v2",
            timeout=30,
            headers={"Authorization": f"Bearer {token['access_token']}"},
        )
        self.wait(
            lambda: self.client.get(f"/dags/{DAG}").status_code == 200,
            120,
            "the DAG processor did not parse the DAG",
        )

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def _healthy(self) -> bool:
        try:
            health = httpx.get(f"{self.url}/api/v2/monitor/health", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            return False
        return all(
            health.get(part, {}).get("status") == "healthy"
            for part in ("metadatabase", "scheduler", "dag_processor")
        )

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait(self, ready, timeout_s: float, what: str):
        deadline = time.monotonic() + timeout_s
        while True:
            value = ready()
            if value:
                return value
            assert self.proc.poll() is None, f"Airflow exited: {what}\n{self.log_tail()}"
            assert time.monotonic() < deadline, f"timed out: {what}\n{self.log_tail()}"
            time.sleep(2)

    def runs(self, dag: str = DAG) -> list[dict]:
        response = self.client.get(f"/dags/{dag}/dagRuns", params={"limit": 100})
        response.raise_for_status()
        return response.json()["dag_runs"]

    def quiet(self) -> bool:
        """No run of any DAG queued or running."""
        response = self.client.get(
            "/dags/~/dagRuns", params={"state": ["queued", "running"], "limit": 1}
        )
        response.raise_for_status()
        return response.json()["total_entries"] == 0

    def finished(self, run_ids: set[str], dag: str = DAG) -> list[dict] | None:
        runs = [r for r in self.runs(dag) if r["dag_run_id"] in run_ids]
        done = len(runs) == len(run_ids) and all(r["state"] in ("success", "failed") for r in runs)
        return runs if done else None

    def task_instances(self, run_id: str, dag: str = DAG) -> dict[str, dict]:
        response = self.client.get(f"/dags/{dag}/dagRuns/{run_id}/taskInstances")
        response.raise_for_status()
        return {ti["task_id"]: ti for ti in response.json()["task_instances"]}

    def task_log(self, run_id: str, task_id: str, try_number: int = 1) -> list[dict]:
        """The task's log records as the UI shows them (structured JSON lines)."""
        path = (
            Path(self.env["AIRFLOW__LOGGING__BASE_LOG_FOLDER"])
            / f"dag_id={DAG}"
            / f"run_id={run_id}"
            / f"task_id={task_id}"
            / f"attempt={try_number}.log"
        )
        records = []
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                records.append({"level": "raw", "event": line})
        return records


@pytest.fixture(scope="module")
def mailbox() -> Iterator[_Mailbox]:
    with _Mailbox() as box:
        yield box


@pytest.fixture(scope="module")
def airflow(tmp_path_factory, pg_dsn_module, mailbox) -> Iterator[_Airflow]:
    from pipeline.lake.demo import write_landing
    from pipeline.lake.demo.synthetic import generate_clickstream

    root = tmp_path_factory.mktemp("scheduler")
    data = generate_clickstream(n_users=200, n_items=120, n_days=40, start="2024-01-01", seed=11)
    write_landing(data, root / "data" / "landing", name="clicks", fmt="csv", gzip=True)
    port = _free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AIRFLOW__", "AIRFLOW_CONN_", "MLFLOW_", "RECS_"))
    }
    env.update(
        {
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{root / 'airflow.db'}",
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(root / "logs"),
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(_free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(_free_port()),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(root / "passwords.json"),
            "AIRFLOW_SECRETS": str(root / "airflow-secrets.env"),
            "AIRFLOW_CONN_RECS_SERVING": pg_dsn_module,
            "AIRFLOW_CONN_SMTP_DEFAULT": f"smtp://127.0.0.1:{mailbox.port}"
            "?disable_tls=true&disable_ssl=true",
            "RECS_ALERT_EMAIL": "ops@example.com",
            "RECS_DATA_DIR": str(root / "data"),
            # pseudonymised, as `make airflow` runs by default; the loader's CLI shares the key
            "RECS_PSEUDONYM_KEY_FILE": str(root / "pseudonym.key"),
            "RECS_RETRAIN_COOLDOWN_HOURS": "0",  # the drift retrain follows earlier runs at once
            "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
            "MLFLOW_ARTIFACT_ROOT": str(root / "mlartifacts"),
        }
    )
    made = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "pseudonym-key", env["RECS_PSEUDONYM_KEY_FILE"]],
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert made.returncode == 0
    server = _Airflow(root, env)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def serving(airflow, pg_dsn_module):
    """Reads the whole view the CMS reads."""
    from pipeline.serving.store import read_all

    return lambda: read_all(dsn=pg_dsn_module, sqlite_path=Path("/nonexistent"))


def _champion(airflow: _Airflow) -> str | None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=airflow.env["MLFLOW_TRACKING_URI"])
    try:
        return str(client.get_model_version_by_alias("recommender", "champion").version)
    except MlflowException:
        return None


def test_the_secrets_are_generated_once_for_every_component(airflow):
    secrets = Path(airflow.env["AIRFLOW_SECRETS"])
    text = secrets.read_text()
    assert oct(secrets.stat().st_mode & 0o777) == "0o600"
    assert "AIRFLOW__API_AUTH__JWT_SECRET=${AIRFLOW__API_AUTH__JWT_SECRET:-" in text
    assert "AIRFLOW__CORE__FERNET_KEY=${AIRFLOW__CORE__FERNET_KEY:-" in text
    jwt = text.split("AIRFLOW__API_AUTH__JWT_SECRET:-", 1)[1].split("}", 1)[0]
    assert len(jwt) >= 86  # 64 random bytes, URL-safe base64


def test_unpausing_runs_today_which_fails_at_ingest_at_once_and_says_why(airflow, mailbox):
    response = airflow.client.patch(f"/dags/{DAG}", json={"is_paused": False})
    response.raise_for_status()
    runs = airflow.wait(
        lambda: [
            r
            for r in airflow.runs()
            if r["run_type"] == "scheduled" and r["state"] in ("success", "failed")
        ],
        RUN_TIMEOUT_S,
        "the scheduled run after unpausing",
    )
    run = runs[0]
    assert run["state"] == "failed"
    tis = airflow.task_instances(run["dag_run_id"])
    assert tis["ingest"]["state"] == "failed" and tis["ingest"]["try_number"] == 1  # no retry
    assert all(tis[t]["state"] == "upstream_failed" for t in ("validate", "train", "publish"))
    errors = " ".join(
        str(r.get("event")) + str(r.get("error_detail", ""))
        for r in airflow.task_log(run["dag_run_id"], "ingest")
    )
    assert "WindowError" in errors and "fewer than the minimum of 100" in errors
    assert "logical date 2024-02-10" in errors  # the day after the log's last event
    mail = airflow.wait(lambda: mailbox.messages, 60, "the failure mail")[0]
    assert mail["To"] == "ops@example.com"
    assert f"{DAG} failed: task ingest, try 1" in mail["Subject"]
    body = mail.get_payload(decode=False)
    text = (
        body
        if isinstance(body, str)
        else "".join(
            part.get_payload(decode=True).decode()
            for part in mail.walk()
            if part.get_content_type() == "text/html"
        )
    )
    assert run["dag_run_id"] in text and "fewer than the minimum of 100" in text
    assert "WindowError" in text


def test_a_rest_trigger_with_params_runs_under_the_scheduler_and_serves_them(airflow, serving):
    response = airflow.client.post(
        f"/dags/{DAG}/dagRuns", json={"logical_date": LIVE_DATE, "conf": CONF}
    )
    assert response.status_code == 200, response.text
    run_id = response.json()["dag_run_id"]
    (run,) = airflow.wait(lambda: airflow.finished({run_id}), RUN_TIMEOUT_S, run_id)
    tis = airflow.task_instances(run_id)
    assert run["state"] == "success", {t: ti["state"] for t, ti in tis.items()}
    assert all(ti["try_number"] == 1 for ti in tis.values())

    rows = serving()
    sizes = rows.groupby("user_id")["rank"].agg(["count", "min", "max"])
    assert len(sizes) > 100 and (sizes["count"] == 7).all() and (sizes["max"] == 7).all()
    assert (rows["generated_at"] == pd.Timestamp(LIVE_DATE)).all()
    assert set(rows["model_version"]) == {"1"} and _champion(airflow) == "1"
    # MLflow's progress lines are info in the task log, not errors.
    register_log = airflow.task_log(run_id, "register")
    assert any("registered model" in str(r.get("event")).lower() for r in register_log)
    assert not [r for r in register_log if r.get("level") == "error"], register_log

    again = airflow.client.post(
        f"/dags/{DAG}/dagRuns", json={"logical_date": LIVE_DATE, "conf": CONF}
    )
    assert again.status_code == 409  # README: clear the run, or pick another date


def test_a_backfill_of_two_older_dates_records_them_and_leaves_production_alone(airflow, serving):
    live = serving()
    # On SQLite (this test's metadata DB, and `make airflow`'s) Airflow refuses to create a
    # backfill while another writer holds the database (503 "Database is locked ... use
    # PostgreSQL"): let the runs the live run set off (the monitor, on the lake's Asset)
    # finish first, and retry a refusal as a user would.
    airflow.wait(airflow.quiet, RUN_TIMEOUT_S, "the runs before the backfill")
    for _ in range(6):
        response = airflow.client.post(
            "/backfills",
            json={
                "dag_id": DAG,
                "from_date": "2024-01-29T00:00:00Z",
                "to_date": "2024-01-30T02:00:00Z",
                "dag_run_conf": CONF,
                "max_active_runs": 2,
                "reprocess_behavior": "none",
            },
        )
        if response.status_code != 503 or "Database is locked" not in response.text:
            break
        time.sleep(5)
    assert response.status_code == 200, response.text
    backfill_id = response.json()["id"]
    runs = airflow.wait(
        lambda: [r for r in airflow.runs() if r["run_type"] == "backfill"], 60, "backfill runs"
    )
    assert len(runs) == 2, runs
    done = airflow.wait(
        lambda: airflow.finished({r["dag_run_id"] for r in runs}),
        RUN_TIMEOUT_S,
        f"backfill {backfill_id}",
    )
    assert [r["state"] for r in done] == ["success", "success"], done

    pd.testing.assert_frame_equal(serving(), live)  # the live lists are untouched
    assert _champion(airflow) == "1"
    data = Path(airflow.env["RECS_DATA_DIR"])
    for day in ("2024-01-29", "2024-01-30"):
        folder = data / "runs" / f"{day}T000000"
        assert (folder / "metrics.csv").exists()
        registered = json.loads((folder / "register.json").read_text())
        assert registered["decision"] == "backfill" and registered["serve_version"] is None
        assert "older than production's 2024-02-01" in registered["reason"]
        published = json.loads((folder / "publish.json").read_text())
        assert published["published"] is False
        # The version is recorded, but is no candidate for production: no alias, tagged.
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=airflow.env["MLFLOW_TRACKING_URI"])
        version = client.get_model_version("recommender", registered["version"])
        assert version.aliases == [] and version.tags["promotion_decision"] == "backfill"
        assert client.get_run(version.run_id).data.tags["backfill"] == "True"
    # The summary `make run` prints says so too.
    summary = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "summary", "2024-01-30"],
        cwd=REPO,
        env=airflow.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert summary.returncode == 0, summary.stderr
    assert "register   backfill: backfill: cutoff 2024-01-30" in summary.stdout
    assert "recorded, not a candidate (backfill)" in summary.stdout
    assert "publish    nothing published: backfill" in summary.stdout


def test_planted_drift_runs_the_monitor_which_retrains_through_the_drift_asset(
    airflow, mailbox, pg_dsn_module
):
    from pipeline.lake.demo import write_landing
    from pipeline.lake.demo.drift import DriftPlan, plant_drift
    from pipeline.lake.demo.synthetic import generate_clickstream
    from pipeline.serving.store import read_monitoring

    monitor = "recommendations_monitor"
    airflow.client.patch(f"/dags/{monitor}", json={"is_paused": False}).raise_for_status()
    # A new week (the world's last week again, a week later, new event ids), all on TV.
    data = generate_clickstream(n_users=200, n_items=120, n_days=40, start="2024-01-01", seed=11)
    events = data.events
    stamps = pd.to_datetime(events["timestamp"], utc=True)
    week = events[stamps >= pd.Timestamp("2024-02-03", tz="UTC")].copy()
    week["timestamp"] = pd.to_datetime(week["timestamp"], utc=True) + pd.Timedelta(days=7)
    week["event_id"] = week["event_id"].astype(str) + "-w2"
    data = plant_drift(
        dataclasses.replace(data, events=week),
        DriftPlan(start="2024-02-10", device_mix={"tv": 1.0}, seed=3),
    )
    landing = Path(airflow.env["RECS_DATA_DIR"]) / "landing"
    write_landing(data, landing, name="tv-week", fmt="csv", gzip=True)
    # The product team starts an A/B experiment (step 5 reads it): the next publish, the
    # retrain below, serves each user from their variant.
    config = airflow.root / "experiment.json"
    config.write_text(
        json.dumps(
            {
                "name": "model-vs-popular",
                "salt": "scheduler-ab",
                "planned_users_per_variant": 50,
                "variants": [
                    {"name": "control", "kind": "popularity", "share": 0.5},
                    {"name": "model", "kind": "model", "model": "champion", "share": 0.5},
                ],
            }
        )
    )
    started = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "experiment",
            "start",
            "--config",
            str(config),
            "--by",
            "product team",
        ],
        cwd=REPO,
        env=airflow.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert started.returncode == 0, started.stderr
    # The loader ingests (as `python -m pipeline.cli ingest`) and tells Airflow.
    loaded = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "ingest"],
        cwd=REPO,
        env=airflow.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert loaded.returncode == 0, loaded.stderr
    assert json.loads(loaded.stdout)["rows_new"] == len(week)
    assets = airflow.client.get("/assets", params={"uri_pattern": "recs://lake/events"})
    asset_id = assets.json()["assets"][0]["id"]
    posted = airflow.client.post(
        "/assets/events",
        json={"asset_id": asset_id, "extra": {"cutoff": "2024-02-17T00:00:00+00:00"}},
    )
    assert posted.status_code == 200, posted.text

    # The monitor runs on the Asset event, for the loader's cutoff, and alerts.
    monitor_runs = airflow.wait(
        lambda: [r for r in airflow.runs(monitor) if r["state"] in ("success", "failed")],
        RUN_TIMEOUT_S,
        "the monitor run on the lake Asset",
    )
    run = monitor_runs[0]
    tis = airflow.task_instances(run["dag_run_id"], monitor)
    assert run["run_type"] == "asset_triggered" and run["state"] == "success", tis
    assert {t: ti["state"] for t, ti in tis.items()} == {
        "monitor": "success",
        "notify": "success",
        "trigger_retrain": "success",
    }
    rows = read_monitoring(dsn=pg_dsn_module, sqlite_path=Path("/nonexistent"))
    device = rows[
        (rows.subject == "event.device") & (rows.run_date == pd.Timestamp("2024-02-17", tz="UTC"))
    ]
    assert device["status"].tolist() == ["alert"]
    assert device["model_version"].tolist() == ["1"]
    mail = airflow.wait(
        lambda: [m for m in mailbox.messages if "monitor 2024-02-17" in m["Subject"]],
        60,
        "the monitor's alert mail",
    )[0]
    assert "alert(s)" in mail["Subject"]

    # The nightly retrains on the drift Asset, for the monitor's date, and says why.
    retrain = airflow.wait(
        lambda: [
            r
            for r in airflow.runs()
            if r["run_type"] == "asset_triggered" and r["state"] in ("success", "failed")
        ],
        RUN_TIMEOUT_S,
        "the nightly run on the drift Asset",
    )[0]
    tis = airflow.task_instances(retrain["dag_run_id"])
    assert retrain["state"] == "success", {t: ti["state"] for t, ti in tis.items()}
    assert tis["publish"]["state"] == "success"
    registered = json.loads(
        (
            Path(airflow.env["RECS_DATA_DIR"]) / "runs" / "2024-02-17T000000" / "register.json"
        ).read_text()
    )
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=airflow.env["MLFLOW_TRACKING_URI"])
    version = client.get_model_version("recommender", registered["version"])
    why = client.get_run(version.run_id).data.tags["triggered_by"]
    assert why.startswith("asset_triggered: monitor 2024-02-17: ") and "event.device" in why
    import psycopg2

    with psycopg2.connect(pg_dsn_module) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT triggered_by FROM recs.model_promotions WHERE model_version = %s",
            (registered["version"],),
        )
        recorded = [r[0] for r in cur.fetchall()]
    assert recorded and all("event.device" in r for r in recorded), recorded


def test_feedback_on_an_ab_experiment_runs_the_impact_dag_on_the_lake_asset(airflow, pg_dsn_module):
    """Step 5: the lists the drift retrain published for 2024-02-17 (two variants) are shown
    by the simulated CMS for three days; the loader ingests the feedback and posts the lake
    Asset event; the impact DAG runs on it and compares the variants."""
    from pipeline.serving.store import read_impact

    impact, monitor = "recommendations_impact", "recommendations_monitor"
    # only the impact DAG should react to this ingest
    airflow.client.patch(f"/dags/{monitor}", json={"is_paused": True}).raise_for_status()
    airflow.client.patch(f"/dags/{impact}", json={"is_paused": False}).raise_for_status()
    for command in (["simulate-day", "2024-02-17", "--days", "3", "--seed", "5"], ["ingest"]):
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", *command],
            cwd=REPO,
            env=airflow.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, (command, done.stderr)
    assets = airflow.client.get("/assets", params={"uri_pattern": "recs://lake/events"})
    posted = airflow.client.post(
        "/assets/events",
        json={
            "asset_id": assets.json()["assets"][0]["id"],
            "extra": {"cutoff": "2024-02-20T00:00:00+00:00"},
        },
    )
    assert posted.status_code == 200, posted.text

    (run,) = airflow.wait(
        lambda: [r for r in airflow.runs(impact) if r["state"] in ("success", "failed")],
        RUN_TIMEOUT_S,
        "the impact run on the lake Asset",
    )
    tis = airflow.task_instances(run["dag_run_id"], impact)
    assert run["run_type"] == "asset_triggered" and run["state"] == "success", tis
    summary = json.loads(
        (Path(airflow.env["RECS_DATA_DIR"]) / "impact" / "2024-02-20" / "summary.json").read_text()
    )
    variants = {row["variant"]: row for row in summary["variants"]}
    assert {"control", "model"} <= set(variants), variants
    assert all(
        variants[v]["users_active"] > 0 and variants[v]["impressions"] > 0
        for v in ("control", "model")
    )
    assert summary["srm"]["expected_shares"] == {"control": 0.5, "model": 0.5}
    assert {row["variant"] for row in summary["comparison"]} == {"model"}
    table = read_impact(dsn=pg_dsn_module, sqlite_path=Path("/nonexistent"))
    simulated = table[table["day"] >= pd.Timestamp("2024-02-17", tz="UTC")]
    assert set(simulated["variant"]) >= {"control", "model"}
    assert (simulated["impressions"] > 0).all()
