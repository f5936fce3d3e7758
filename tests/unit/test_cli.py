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
FIELDS = {"user": LOGIN, "password": PASSWORD, "host": "db.example", "port": "5433",
          "dbname": "recs db"}


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
    monkeypatch.setenv("AIRFLOW_CONN_RECS_SERVING", json.dumps({
        "conn_type": "postgres", "login": LOGIN, "password": PASSWORD, "host": "db.example",
        "port": port, "schema": "recs db"}))
    dsn = serving_dsn()
    assert dsn.startswith("postgres://")  # Airflow's spelling for conn_type postgres
    assert PASSWORD not in dsn and _quote(PASSWORD) in dsn
    assert _libpq(dsn) == FIELDS


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_uri_connection_round_trips(monkeypatch, scheme):
    uri = (f"{scheme}://{_quote(LOGIN)}:{_quote(PASSWORD)}@db.example:5433/{_quote('recs db')}"
           "?sslmode=require")
    monkeypatch.setenv("AIRFLOW_CONN_RECS_SERVING", uri)
    assert _libpq(serving_dsn()) == {**FIELDS, "sslmode": "require"}


def test_json_without_conn_type_is_postgres(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_RECS_SERVING", json.dumps({
        "login": "recs", "password": "a@b", "host": "127.0.0.1", "port": 5432,
        "schema": "postgres"}))
    assert _libpq(serving_dsn()) == {"user": "recs", "password": "a@b", "host": "127.0.0.1",
                                     "port": "5432", "dbname": "postgres"}


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
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
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
        script = (f'set -a; . "{path}"; set +a; printf "%s\\n" "$AIRFLOW__API_AUTH__JWT_SECRET" '
                  '"$AIRFLOW__CORE__FERNET_KEY"')
        out = subprocess.run(["bash", "-c", script], env={"PATH": "/usr/bin:/bin", **env},
                             capture_output=True, text=True, check=True).stdout.split()
        return {"jwt": out[0], "fernet": out[1]}

    values = sourced()
    assert len(values["jwt"]) >= 86 and values["jwt"] in first
    Fernet(values["fernet"].encode())  # a valid Fernet key
    assert sourced(AIRFLOW__CORE__FERNET_KEY="from-the-deployment")["fernet"] == \
        "from-the-deployment"
