"""Shared fixtures: throwaway PostgreSQL databases and recommendation-list frames.

PostgreSQL is required for the integration tests (CI must start it): the admin DSN is
``RECS_TEST_PG_ADMIN_DSN`` (a ``postgresql://`` URI), default
``postgresql://postgres@127.0.0.1:5432/postgres`` (trust auth). An unreachable server fails the
tests that need it; it does not skip them.
"""

from __future__ import annotations

import importlib
import os
import tempfile
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

# Before anything imports numpy or Airflow: the numerics pin (one BLAS thread, fixed kernels;
# see pipeline.core.runtime), the project's airflow.cfg, and a throwaway Airflow metadata DB and log
# folder for this test session.
_REPO = Path(__file__).resolve().parent.parent
_AIRFLOW_TMP = Path(tempfile.mkdtemp(prefix="recs-airflow-"))
importlib.import_module("pipeline")  # its import runs pipeline.core.runtime.pin_numerics()
os.environ["GX_ANALYTICS_ENABLED"] = "false"
os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
os.environ["AIRFLOW_HOME"] = str(_REPO)
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_AIRFLOW_TMP / 'airflow.db'}"
os.environ["AIRFLOW__LOGGING__BASE_LOG_FOLDER"] = str(_AIRFLOW_TMP / "logs")
# Tests choose their own pseudonymisation key (make run's demo key must not leak in).
os.environ.pop("RECS_PSEUDONYM_KEY", None)
os.environ.pop("RECS_PSEUDONYM_KEY_FILE", None)

import pandas as pd
import psycopg2
import pytest
from psycopg2 import sql

from pipeline.core.config import DEFAULT_USER

ADMIN_DSN_ENV = "RECS_TEST_PG_ADMIN_DSN"
DEFAULT_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
GENERATED_AT = pd.Timestamp("2024-05-01T03:04:05.123456Z")


def _admin_dsn() -> str:
    return os.environ.get(ADMIN_DSN_ENV, DEFAULT_ADMIN_DSN)


def _connect_admin() -> psycopg2.extensions.connection:
    dsn = _admin_dsn()
    try:
        conn = psycopg2.connect(dsn, connect_timeout=5)
    except psycopg2.OperationalError as exc:
        parts = urllib.parse.urlsplit(dsn)
        pytest.fail(
            f"PostgreSQL is unreachable at {parts.hostname}:{parts.port or 5432} "
            f"(set {ADMIN_DSN_ENV} or start it, e.g. "
            "`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`): "
            f"{str(exc).strip()}",
            pytrace=False,
        )
    conn.autocommit = True
    return conn


@pytest.fixture
def pg_dsn() -> Iterator[str]:
    """DSN of a fresh database ``recs_test_<uuid8>``, dropped (connections terminated) after."""
    with _throwaway_database() as dsn:
        yield dsn


@pytest.fixture(scope="module")
def pg_dsn_module() -> Iterator[str]:
    """Like ``pg_dsn``, shared by the tests of one module."""
    with _throwaway_database() as dsn:
        yield dsn


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """Airflow's metadata DB for this session (SQLite in a temp folder), migrated once."""
    from airflow.utils.db import initdb

    initdb()
    return _AIRFLOW_TMP / "airflow.db"


@contextmanager
def _throwaway_database() -> Iterator[str]:
    admin = _connect_admin()
    name = f"recs_test_{uuid.uuid4().hex[:8]}"
    with admin.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = urllib.parse.urlunsplit(urllib.parse.urlsplit(_admin_dsn())._replace(path=f"/{name}"))
    try:
        yield dsn
    finally:
        with admin.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            cur.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
        admin.close()


def build_lists(
    n_users: int = 3,
    n_ranks: int = 3,
    *,
    item_prefix: str = "item",
    include_default: bool = True,
    generated_at: pd.Timestamp = GENERATED_AT,
) -> pd.DataFrame:
    """Valid lists: users ``u000..``, plus ``__default__``, ranks 1..n_ranks, awkward text."""
    users = [f"u{index:03d}" for index in range(n_users)]
    if include_default:
        users.append(DEFAULT_USER)
    rows = []
    for user_index, user in enumerate(users):
        for rank in range(1, n_ranks + 1):
            reason = {
                1: f'because you read "Ünïcode, {user}"',
                2: None,
                3: "",
            }.get(rank % 4, f"popular in Sports\nthis week ({rank})")
            rows.append(
                {
                    "user_id": user,
                    "rank": rank,
                    "item_id": f"{item_prefix}{(user_index * 7 + rank) % 97:03d}-{rank}",
                    "score": 1.0 / (rank + 0.1 * user_index),
                    "reason": reason,
                    "source": "popular"
                    if user == DEFAULT_USER
                    else ("ranker" if rank % 2 else "als"),
                    "generated_at": generated_at,
                }
            )
    return pd.DataFrame(rows)


@pytest.fixture
def make_lists() -> Callable[..., pd.DataFrame]:
    """Factory for valid list frames (see :func:`build_lists`)."""
    return build_lists
