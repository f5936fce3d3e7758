"""``pipeline.cli.serving_dsn``: the ``recs_serving`` connection parsed as Airflow parses it,
so that logins and passwords holding ``@ : / %`` survive (JSON and URI forms).

What libpq makes of the DSN is checked with ``psycopg2.extensions.parse_dsn`` after
:mod:`pipeline.serving`'s own normalisation; connecting for real is in
``tests/integration/test_cli_serving_postgres.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
from psycopg2.extensions import parse_dsn

from pipeline.cli import serving_dsn
from pipeline.serving.postgres import normalize_dsn

REPO = Path(__file__).resolve().parents[2]
LOGIN, PASSWORD = "recs user@x:y/z", "p@ss:w/rd %20x@"
FIELDS = {
    "user": LOGIN,
    "password": PASSWORD,
    "host": "db.example",
    "port": "5433",
    "dbname": "recs db",
}


def _libpq(dsn: str) -> dict:
    """What libpq reads from ``dsn`` once pipeline.serving has normalised it."""
    return parse_dsn(normalize_dsn(dsn))


def _quote(text: str) -> str:
    return urllib.parse.quote(text, safe="")


def test_unset_means_the_embedded_sqlite(monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_RECS_SERVING", raising=False)
    assert serving_dsn() is None
    monkeypatch.setenv("AIRFLOW_CONN_RECS_SERVING", "  ")
    assert serving_dsn() is None


@pytest.mark.parametrize("port", [5433, "5433"])
def test_json_connection_with_awkward_login_and_password(monkeypatch, port):
    monkeypatch.setenv(
        "AIRFLOW_CONN_RECS_SERVING",
        json.dumps(
            {
                "conn_type": "postgres",
                "login": LOGIN,
                "password": PASSWORD,
                "host": "db.example",
                "port": port,
                "schema": "recs db",
            }
        ),
    )
    dsn = serving_dsn()
    assert dsn.startswith("postgres://")  # Airflow's spelling for conn_type postgres
    assert PASSWORD not in dsn and _quote(PASSWORD) in dsn
    assert _libpq(dsn) == FIELDS


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_uri_connection_round_trips(monkeypatch, scheme):
    uri = (
        f"{scheme}://{_quote(LOGIN)}:{_quote(PASSWORD)}@db.example:5433/{_quote('recs db')}"
        "?sslmode=require"
    )
    monkeypatch.setenv("AIRFLOW_CONN_RECS_SERVING", uri)
    assert _libpq(serving_dsn()) == {**FIELDS, "sslmode": "require"}


def test_json_without_conn_type_is_postgres(monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_RECS_SERVING",
        json.dumps(
            {
                "login": "recs",
                "password": "a@b",
                "host": "127.0.0.1",
                "port": 5432,
                "schema": "postgres",
            }
        ),
    )
    assert _libpq(serving_dsn()) == {
        "user": "recs",
        "password": "a@b",
        "host": "127.0.0.1",
        "port": "5432",
        "dbname": "postgres",
    }


def test_only_serving_dsn_imports_airflow():
    """The pipeline package never imports Airflow; the one exception is the lazy import
    inside ``pipeline.cli.serving_dsn`` (a command-line entry point), when the connection is
    set."""
    script = """
import importlib, os, pkgutil, sys
import pipeline
for module in pkgutil.walk_packages(pipeline.__path__, "pipeline."):
    importlib.import_module(module.name)
loaded = sorted(m for m in sys.modules if m.partition(".")[0] == "airflow")
assert not loaded, f"importing the pipeline package imported {loaded[:5]}"
from pipeline.cli import serving_dsn
os.environ.pop("AIRFLOW_CONN_RECS_SERVING", None)
assert serving_dsn() is None and "airflow" not in sys.modules
os.environ["AIRFLOW_CONN_RECS_SERVING"] = "postgresql://u@h/db"
assert serving_dsn() and "airflow" in sys.modules
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_airflow_secrets_are_written_once_private_and_yield_to_the_environment(tmp_path):
    from cryptography.fernet import Fernet

    from pipeline.cli import airflow_secrets

    path = tmp_path / "airflow-secrets.env"
    assert airflow_secrets(path) == 0
    first = path.read_text()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert airflow_secrets(path) == 0 and path.read_text() == first  # kept, never regenerated

    def sourced(**env: str) -> dict[str, str]:
        script = (
            f'set -a; . "{path}"; set +a; printf "%s\\n" "$AIRFLOW__API_AUTH__JWT_SECRET" '
            '"$AIRFLOW__CORE__FERNET_KEY"'
        )
        out = subprocess.run(
            ["bash", "-c", script],
            env={"PATH": "/usr/bin:/bin", **env},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        return {"jwt": out[0], "fernet": out[1]}

    values = sourced()
    assert len(values["jwt"]) >= 86 and values["jwt"] in first
    Fernet(values["fernet"].encode())  # a valid Fernet key
    assert (
        sourced(AIRFLOW__CORE__FERNET_KEY="from-the-deployment")["fernet"] == "from-the-deployment"
    )


# --------------------------------------------------------------------------- experiment


def _experiment_cli(tmp_path, monkeypatch, *args: str) -> int:
    """``python -m pipeline.cli experiment ...`` on the embedded SQLite file of ``tmp_path``."""
    from pipeline.cli import main

    monkeypatch.setenv("RECS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("AIRFLOW_CONN_RECS_SERVING", raising=False)
    return main(["experiment", *args])


def test_experiment_start_change_and_stop_are_recorded_and_saved(tmp_path, monkeypatch, capsys):
    from pipeline.serving.store import active_experiment, read_experiments

    config = {
        "name": "ab-1",
        "salt": "salt-1",
        "variants": [
            {"name": "control", "kind": "popularity", "share": 0.3},
            {"name": "model", "kind": "model", "model": "champion", "share": 0.3},
            {"name": "holdout", "kind": "holdout", "share": 0.1},
        ],
    }
    path = tmp_path / "ab-1.json"
    path.write_text(json.dumps(config))
    saved = tmp_path / "data" / "experiments" / "ab-1.json"
    sqlite = tmp_path / "data" / "serving.sqlite"
    run = lambda *args: _experiment_cli(tmp_path, monkeypatch, *args)  # noqa: E731

    assert run("start", "--config", str(path), "--by", "alice", "--reason", "why not") == 0
    assert "start recorded" in capsys.readouterr().out
    started = json.loads(saved.read_text())
    assert started["variants"][0]["buckets"] == [[0, 3000]]
    assert active_experiment(None, sqlite)["config"] == started
    assert run("start", "--config", str(path), "--by", "alice") == 0  # a retry: no new row

    grown = {
        **started,
        "variants": [{**started["variants"][0], "share": 0.4}, *started["variants"][1:]],
    }
    path.write_text(json.dumps(grown))
    assert run("change", "--config", str(path), "--by", "bob") == 0
    assert json.loads(saved.read_text())["version"] == 2

    current = json.loads(saved.read_text())  # the saved config is the one to edit
    shrunk = {
        **current,
        "variants": [{**current["variants"][0], "share": 0.2}, *current["variants"][1:]],
    }
    path.write_text(json.dumps(shrunk))
    capsys.readouterr()
    assert run("change", "--config", str(path), "--by", "bob") == 1
    assert "shrinking variant 'control'" in capsys.readouterr().err
    assert json.loads(saved.read_text())["version"] == 2
    assert run("change", "--config", str(path), "--by", "bob", "--force") == 0
    assert json.loads(saved.read_text())["last_change"]["forced"] is True

    assert run("stop", "--config", str(path), "--by", "carol", "--reason", "done") == 0
    assert active_experiment(None, sqlite) is None
    assert run("stop", "--config", str(path), "--by", "carol") == 0  # nothing left to stop
    assert "nothing to stop" in capsys.readouterr().out
    records = read_experiments(None, sqlite)
    assert list(records["action"]) == ["start", "change", "change", "stop"]
    assert list(records["changed_by"]) == ["alice", "bob", "bob", "carol"]
    assert run("start", "--config", str(path), "--by", "dave") == 1  # the name was used


def test_experiment_cli_refuses_bad_input(tmp_path, monkeypatch, capsys):
    run = lambda *args: _experiment_cli(tmp_path, monkeypatch, *args)  # noqa: E731
    missing = tmp_path / "missing.json"
    assert run("start", "--config", str(missing), "--by", "alice") == 1
    assert "cannot read" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    assert run("start", "--config", str(broken), "--by", "alice") == 1
    assert "invalid JSON" in capsys.readouterr().err
    never = tmp_path / "never.json"
    never.write_text(json.dumps({"name": "never", "salt": "s", "variants": []}))
    assert run("stop", "--config", str(never), "--by", "alice") == 1
    assert "never started" in capsys.readouterr().err
    assert run("stop", "--config", str(never), "--by", "alice", "--force") == 1
    with pytest.raises(SystemExit):
        run("start", "--config", str(never))  # --by is required
