"""Right to erasure end to end (issue 15): run the nightly, forget a user with the
``recommendations_forget_user`` DAG, re-run the nightly with the old landing file still
present and the same export sent again, and the user is nowhere: lake, quarantine, run
folders, served-list history, serving tables. Real Postgres, temporary MLflow store."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import re
from contextlib import closing

import psycopg2
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.integration

UTC = dt.timezone.utc
CUTOFF = dt.datetime(2024, 2, 1, tzinfo=UTC)
CONF = {"top_n": 5, "als_iterations": 5, "als_factors": 16, "holdout_days": 7, "ranker_bags": 2}


def _parquet_mentions(path, user: str) -> bool:
    table = pq.read_table(path)
    for column in table.columns:
        kind = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
        if (pa.types.is_string(kind) or pa.types.is_large_string(kind)) and user in set(
            column.to_pylist()
        ):
            return True
    return False


def _files_mentioning(root, user: str) -> list[str]:
    """Every file under ``root`` that holds ``user``: a Parquet text value equal to it, or the
    id as a whole word in a text file."""
    word = re.compile(rb"(?<![\w@.-])" + re.escape(user.encode()) + rb"(?![\w@.-])")
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.suffix == ".parquet":
            if _parquet_mentions(path, user):
                found.append(str(path.relative_to(root)))
        elif path.suffix in (".json", ".jsonl", ".csv", ".html", ".txt") and word.search(
            path.read_bytes()
        ):
            found.append(str(path.relative_to(root)))
    return found


def _serving_rows(dsn: str, user: str) -> int:
    with closing(psycopg2.connect(dsn)) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = "
            "c.relnamespace JOIN pg_attribute a ON a.attrelid = c.oid WHERE n.nspname "
            "= 'recs' AND c.relkind = 'r' AND a.attname = 'user_id'"
        )
        tables = [row[0] for row in cur.fetchall()]
        assert tables
        total = 0
        for table in tables:
            cur.execute(f'SELECT count(*) FROM recs."{table}" WHERE user_id = %s', (user,))
            total += cur.fetchone()[0]
        return total


def test_a_forgotten_user_is_nowhere_and_stays_out_after_reingesting(world, published):
    from pipeline.serving.erasure import read_erasures

    data = world["root"] / "data"
    nightly = world["dags"]["recommendations_nightly"]
    assert nightly.test(logical_date=CUTOFF, run_conf=CONF).state == "success"
    rows = published()
    counts = rows.loc[rows["user_id"] != "__default__", "user_id"].value_counts()
    user = str(counts.index[0])
    assert _serving_rows(world["dsn"], user) > 0 and _files_mentioning(data / "runs", user)
    version = json.loads((data / "runs" / "2024-02-01T000000" / "register.json").read_text())[
        "version"
    ]

    forget = world["dags"]["recommendations_forget_user"]
    run = forget.test(run_conf={"user_ids": [user], "requested_by": "dpo", "reason": "GDPR-17"})
    assert run.state == "success"

    stores = [data / "lake", data / "runs"]
    for store in stores:
        assert _files_mentioning(store, user) == [], store
    assert _serving_rows(world["dsn"], user) == 0
    erasures = read_erasures(dsn=world["dsn"], sqlite_path=data / "unused.sqlite")
    assert len(erasures) == 1
    record = erasures.iloc[0]
    assert record["requested_by"] == "dpo" and record["reason"] == "GDPR-17"
    assert record["model_versions"] == [str(version)]
    assert record["removed"]["lake_events"] > 0 and record["removed"]["serving_list_rows"] > 0
    assert user not in erasures.to_json()

    # The old landing file is still there (skipped: ingested already), and the CMS sends the
    # same export again under another name (other bytes: ingested).
    landing = data / "landing" / "events"
    (old,) = landing.glob("*.gz")
    (landing / "resent.csv").write_bytes(gzip.decompress(old.read_bytes()))
    try:
        next_day = CUTOFF + dt.timedelta(days=1)
        assert nightly.test(logical_date=next_day, run_conf=CONF).state == "success"
    finally:
        (landing / "resent.csv").unlink()
    ingested = json.loads((data / "runs" / "2024-02-02T000000" / "ingest.json").read_text())
    assert ingested["rows_erased"] > 0 and ingested["rows_new"] == 0

    for store in stores:
        assert _files_mentioning(store, user) == [], store
    assert _serving_rows(world["dsn"], user) == 0
    assert user not in set(published()["user_id"])
    exported = gzip.decompress(old.read_bytes())  # the CMS's export is left as it is
    assert f'"{user}"'.encode() in exported or f",{user},".encode() in exported
