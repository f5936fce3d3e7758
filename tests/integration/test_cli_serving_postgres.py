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
    return os.environ.get("RECS_TEST_PG_ADMIN_DSN",
                          "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture
def odd_role() -> Iterator[str]:
    """A login role whose name holds ``@ : / %`` and a space, with :data:`PASSWORD`."""
    name = f"recs cli@{uuid.uuid4().hex[:6]}:x/y %z"
    admin = psycopg2.connect(_admin_dsn(), connect_timeout=5)
    admin.autocommit = True
    with admin.cursor() as cur:
        # no query parameters: the "%" in the name must not read as a placeholder
        cur.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(name),
                                                                       sql.Literal(PASSWORD)))
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
        value = json.dumps({"conn_type": "postgres", "login": odd_role, "password": PASSWORD,
                            "host": host, "port": port, "schema": dbname})
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
