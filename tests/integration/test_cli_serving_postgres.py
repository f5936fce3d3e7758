"""``pipeline.cli.serving_dsn`` connects as the connection says: user, host, port and
database come through, for JSON and URI connections, with a login and a password holding
``@ : / %`` (the role is created with that password, so this holds under password auth too;
under trust auth only the password goes unchecked, and the unit tests parse it)."""

from __future__ import annotations

import json
import os
import urllib.parse
import uuid
from collections.abc import Iterator

import psycopg2
import pytest
from psycopg2 import sql

from pipeline.cli import serving_dsn
from pipeline.serving.postgres import connect as pg_connect

pytestmark = pytest.mark.integration

PASSWORD = "p@ss:w/rd %20x@"


def _admin_dsn() -> str:  # as in tests/conftest.py
    return os.environ.get("RECS_TEST_PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture
def odd_role() -> Iterator[str]:
    """A login role whose name holds ``@ : / %`` and a space, with :data:`PASSWORD`."""
    name = f"recs cli@{uuid.uuid4().hex[:6]}:x/y %z"
    admin = psycopg2.connect(_admin_dsn(), connect_timeout=5)
    admin.autocommit = True
    with admin.cursor() as cur:
        # no query parameters: the "%" in the name must not read as a placeholder
        cur.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(name), sql.Literal(PASSWORD)
            )
        )
    try:
        yield name
    finally:
        with admin.cursor() as cur:
            cur.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))
        admin.close()


@pytest.mark.parametrize("form", ["json", "uri"])
def test_serving_dsn_connects_as_the_connection_says(pg_dsn, odd_role, form, monkeypatch):
    parts = urllib.parse.urlsplit(pg_dsn)
    host, port, dbname = parts.hostname, parts.port or 5432, parts.path.lstrip("/")
    if form == "json":
        value = json.dumps(
            {
                "conn_type": "postgres",
                "login": odd_role,
                "password": PASSWORD,
                "host": host,
                "port": port,
                "schema": dbname,
            }
        )
    else:
        quote = lambda text: urllib.parse.quote(text, safe="")  # noqa: E731
        value = f"postgresql://{quote(odd_role)}:{quote(PASSWORD)}@{host}:{port}/{dbname}"
    monkeypatch.setenv("AIRFLOW_CONN_RECS_SERVING", value)
    conn = pg_connect(serving_dsn(), lock_timeout_ms=5_000)  # how pipeline.serving connects
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT current_user, current_database(), inet_server_port()")
            assert cur.fetchone() == (odd_role, dbname, port)
    finally:
        conn.close()


def test_cli_ingest_with_a_key_prints_only_its_json_report_on_stdout(pg_dsn, tmp_path):
    """A loader reads `cli ingest`'s stdout as JSON; with a key the command reaches the
    serving DB (the pseudonym mapping) through Airflow's connection parser, whose import
    routes logging to stdout: the logs must stay on stderr."""
    import subprocess
    import sys
    from pathlib import Path

    landing = tmp_path / "data" / "landing" / "events"
    landing.mkdir(parents=True)
    (landing / "a.csv").write_text(
        "user_id,item_id,event_type,timestamp\nu1,i1,view,2024-01-02T10:00:00Z\n"
    )
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AIRFLOW_CONN_", "RECS_"))
    }
    env.update(
        {
            "RECS_DATA_DIR": str(tmp_path / "data"),
            "RECS_LANDING_SETTLE_SECONDS": "0",
            "RECS_PSEUDONYM_KEY": "integration-test-key-0123456789",
            "AIRFLOW_CONN_RECS_SERVING": pg_dsn,
        }
    )
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "ingest"],
        cwd=Path(__file__).parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rows_new"] == 1
    assert "lake index" in done.stderr or "ingest" in done.stderr
