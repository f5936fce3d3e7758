"""Publishing to PostgreSQL: ``publish_lists`` against a plain COPY, and CMS latency meanwhile.

In a throwaway database (dropped at the end) on ``RECS_BENCH_PG_ADMIN_DSN`` (else
``RECS_TEST_PG_ADMIN_DSN``, else ``postgresql://postgres@127.0.0.1:5432/postgres``):

1. **raw COPY**: the rows rendered by the same Arrow CSV writer, ``COPY ... FROM STDIN`` into a
   plain table (no constraint, no index) in one transaction: the floor any loader pays;
2. **publish #1**: ``publish_lists`` of the same rows (prepare, COPY, validate, index, ANALYZE,
   swap) into an empty serving schema; goal >= 0.8x the raw COPY rows/s;
3. **publish #2** of the same rows while pgbench plays the CMS: two clients at a fixed rate
   running ``SELECT item_id, reason FROM recommendations WHERE user_id = $1 ORDER BY rank`` for
   random users (prepared, as a pooled CMS would); lookup latency p50/p99 over the publish
   (goal p99 < 5 ms), zero errors, next to the same lookups with no publish running (the
   floor of a shared machine).

Sizes: 1M users x 10 items (``--quick``: 100k x 10).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import psycopg2
from psycopg2 import sql

from pipeline.core.config import DEFAULT_USER
from pipeline.serving import postgres as serving_pg
from pipeline.serving import store as serving
from pipeline.serving.contract import prepare_lists

ITEMS_PER_USER = 10
CATALOGUE = 20_000
READER_CLIENTS = 2
READER_RATE_TPS = 200  # per pgbench run, all clients together
READER_RUN_S = 4  # pgbench runs back to back, each this long
IDLE_WINDOW_S = 4  # lookups measured before publish #2 starts
COPY_RATIO_GOAL = 0.8
P99_GOAL_MS = 5.0
UNUSED = Path("/nonexistent/serving.sqlite")
LOGICAL_DATE = dt.datetime(2024, 5, 1, tzinfo=dt.timezone.utc)


def run(quick: bool) -> None:
    """Print publish rows/s against raw COPY, and CMS latency during a publish."""
    n_users = 100_000 if quick else 1_000_000
    lists = _make_lists(n_users)
    rows = len(lists)
    print(f"{n_users:,} users x {ITEMS_PER_USER} items + {DEFAULT_USER} = {rows:,} rows")
    timings = _PhaseLog()
    with _throwaway_database() as dsn, timings.capture():
        raw_s = _time_raw_copy(dsn, lists)
        _report("raw COPY (plain table)", rows, raw_s)
        first_s = _time_publish(dsn, lists, "bench-1")
        _report("publish_lists #1", rows, first_s)
        print(f"  phases: {timings.summary()}")
        with _PgbenchReaders(dsn, n_users) as readers:
            time.sleep(1.0)  # readers warm up on version 1
            idle_start = time.time()
            time.sleep(IDLE_WINDOW_S)  # the same lookups without a publish: the machine's floor
            window_start = time.time()
            second_s = _time_publish(dsn, lists, "bench-2")
            window_end = time.time()
            time.sleep(1.0)  # and read version 2 for a moment
        _report("publish_lists #2 (CMS readers on)", rows, second_s)
        print(f"  phases: {timings.summary()}")
    ratio = (rows / first_s) / (rows / raw_s)
    print(
        f"publish/raw COPY throughput: {ratio:.2f}x  (goal >= {COPY_RATIO_GOAL}x: "
        f"{'met' if ratio >= COPY_RATIO_GOAL else 'NOT met'})"
    )
    idle = readers.latencies_ms(idle_start, window_start)
    during = readers.latencies_ms(window_start, window_end)
    if len(during) == 0 or len(idle) == 0:
        print("CMS lookups: none recorded (pgbench failed?)")
        return
    p50, p99 = np.percentile(idle, [50, 99])
    print(
        f"CMS lookups, no publish running:  {len(idle):>6,} queries, p50 {p50:.2f} ms, "
        f"p99 {p99:.2f} ms, max {idle.max():.1f} ms (this machine's floor)"
    )
    p50, p99 = np.percentile(during, [50, 99])
    print(
        f"CMS lookups during publish #2:    {len(during):>6,} queries, p50 {p50:.2f} ms, "
        f"p99 {p99:.2f} ms, max {during.max():.1f} ms, errors {readers.errors}  "
        f"(goal p99 < {P99_GOAL_MS:.0f} ms, 0 errors: "
        f"{'met' if p99 < P99_GOAL_MS and readers.errors == 0 else 'NOT met'})"
    )
    print(
        f"  machine load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )


def _make_lists(n_users: int) -> pd.DataFrame:
    """Lists shaped like the real ones: ids, titles in reasons, als/popular sources."""
    rng = np.random.default_rng(7)
    users = np.array([f"u{k}" for k in range(n_users)] + [DEFAULT_USER], dtype=object)
    titles = np.array(
        [f"because you rated Item Title Number {k} (199{k % 10})" for k in range(CATALOGUE)],
        dtype=object,
    )
    item_ids = np.array([f"item-{k:06d}" for k in range(CATALOGUE)], dtype=object)
    total = len(users) * ITEMS_PER_USER
    offsets = rng.integers(0, CATALOGUE, len(users))
    picks = (
        np.repeat(offsets, ITEMS_PER_USER) + np.tile(np.arange(ITEMS_PER_USER) * 37, len(users))
    ) % CATALOGUE
    return pd.DataFrame(
        {
            "user_id": np.repeat(users, ITEMS_PER_USER),
            "rank": np.tile(np.arange(1, ITEMS_PER_USER + 1, dtype=np.int16), len(users)),
            "item_id": item_ids[picks],
            "score": rng.random(total).astype(np.float32),
            "reason": titles[rng.integers(0, CATALOGUE, total)],
            "source": np.where(rng.random(total) < 0.8, "als", "popular").astype(object),
            "generated_at": pd.Timestamp(LOGICAL_DATE),
        }
    )


#: The columns of the raw table (the view's first eight; variant and experiment are NULL here).
RAW_COLUMNS = (
    "user_id",
    "rank",
    "item_id",
    "score",
    "reason",
    "source",
    "model_version",
    "generated_at",
)


def _time_raw_copy(dsn: str, lists: pd.DataFrame) -> float:
    """Seconds to COPY the same rows (same CSV renderer) into a plain table."""
    frame = prepare_lists(lists, "raw")  # not timed: the data a loader starts from
    with contextlib.closing(psycopg2.connect(dsn)) as conn:
        with conn.cursor() as cur:
            started = time.perf_counter()
            cur.execute(
                "CREATE TABLE raw_copy (user_id text, rank smallint, item_id text, "
                "score real, reason text, source text, model_version text, "
                "generated_at timestamptz)"
            )
            cur.copy_expert(
                "COPY raw_copy FROM STDIN WITH (FORMAT csv)",
                serving_pg.CsvChunkStream(frame, columns=RAW_COLUMNS),
                size=serving_pg.COPY_READ_BYTES,
            )
            conn.commit()
            elapsed = time.perf_counter() - started
            cur.execute("DROP TABLE raw_copy")
        conn.commit()
    return elapsed


def _time_publish(dsn: str, lists: pd.DataFrame, model_version: str) -> float:
    started = time.perf_counter()
    serving.publish_lists(
        lists,
        dsn=dsn,
        sqlite_path=UNUSED,
        model_version=model_version,
        logical_date=LOGICAL_DATE,
        keep_versions=1,
    )
    return time.perf_counter() - started


def _report(label: str, rows: int, seconds: float) -> None:
    print(f"{label:<36} {seconds:7.1f} s  {rows / seconds:>12,.0f} rows/s")


class _PhaseLog(logging.Handler):
    """Collects pipeline.serving's phase timings (DEBUG) to print after each publish."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("phase "):
            self.records.append(record.getMessage().removeprefix("phase "))

    def summary(self) -> str:
        text, self.records = ", ".join(self.records), []
        return text

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        log = logging.getLogger("pipeline.serving")  # store and its backends
        level, propagate = log.level, log.propagate
        log.setLevel(logging.DEBUG)
        log.propagate = False
        log.addHandler(self)
        try:
            yield
        finally:
            log.removeHandler(self)
            log.setLevel(level)
            log.propagate = propagate


class _PgbenchReaders:
    """pgbench runs back to back (until stopped) replaying the CMS lookup at a fixed rate."""

    SCRIPT = (
        "\\set uid random(0, {last})\n"
        "SELECT item_id, reason FROM recs.recommendations "
        "WHERE user_id = 'u' || :uid::text ORDER BY rank;\n"
    )

    def __init__(self, dsn: str, n_users: int) -> None:
        self.dsn = dsn
        self.folder = Path(tempfile.mkdtemp(prefix="bench-pgbench-"))
        (self.folder / "cms.sql").write_text(self.SCRIPT.format(last=n_users - 1))
        self.stop = threading.Event()
        self.errors = 0
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _command(self, index: int) -> list[str]:
        parts = urllib.parse.urlsplit(self.dsn)
        return [
            _pgbench(),
            "-n",
            "-M",
            "prepared",
            "-f",
            str(self.folder / "cms.sql"),
            "-c",
            str(READER_CLIENTS),
            "-j",
            "1",
            "-T",
            str(READER_RUN_S),
            "-R",
            str(READER_RATE_TPS),
            "-l",
            "--log-prefix",
            str(self.folder / f"run{index}"),
            "-h",
            parts.hostname or "",
            "-p",
            str(parts.port or 5432),
            "-U",
            parts.username or "postgres",
            parts.path.lstrip("/"),
        ]

    def _loop(self) -> None:
        index = 0
        while not self.stop.is_set():
            done = subprocess.run(
                self._command(index), capture_output=True, text=True, check=False, cwd=self.folder
            )
            index += 1
            failed = [
                line
                for line in done.stdout.splitlines()
                if line.startswith("number of failed transactions")
            ]
            self.errors += int(failed[0].split(":")[1].split()[0]) if failed else 0
            if done.returncode != 0:
                self.errors += 1
                print(f"  pgbench failed ({done.returncode}): {done.stderr.strip()[-300:]}")
                self.stop.wait(0.5)

    def latencies_ms(self, start: float, end: float) -> np.ndarray:
        """Per-lookup latency (ms, client schedule lag excluded) of queries started in
        [start, end] (epoch seconds)."""
        values: list[float] = []
        for path in self.folder.glob("run*"):
            for line in path.read_text().splitlines():
                fields = line.split()
                # client_id transaction_no time script_no time_epoch time_us schedule_lag
                if len(fields) < 7 or fields[2] in ("skipped", "failed"):
                    continue
                finished = int(fields[4]) + int(fields[5]) / 1e6
                latency_us = int(fields[2]) - int(fields[6])
                if start <= finished - latency_us / 1e6 <= end:
                    values.append(latency_us / 1000)
        return np.asarray(values)

    def __enter__(self) -> _PgbenchReaders:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        self.thread.join(timeout=READER_RUN_S + 30)

    def __del__(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _pgbench() -> str:
    found = shutil.which("pgbench") or next(
        (str(p) for p in sorted(Path("/usr/lib/postgresql").glob("*/bin/pgbench"))), None
    )
    if not found:
        raise RuntimeError("pgbench not found (install the PostgreSQL client tools)")
    return found


@contextlib.contextmanager
def _throwaway_database() -> Iterator[str]:
    admin_dsn = (
        os.environ.get("RECS_BENCH_PG_ADMIN_DSN")
        or os.environ.get("RECS_TEST_PG_ADMIN_DSN")
        or "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    name = f"recs_bench_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(admin_dsn, connect_timeout=5)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        parts = urllib.parse.urlsplit(admin_dsn)
        yield urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        with admin.cursor() as cur:
            cur.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
        admin.close()
