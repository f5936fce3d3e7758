"""The demo's hostile landing files: every valid row is recognised as an event the landing
folder already holds, every bad row is quarantined with its reason, no file fails."""

from __future__ import annotations

import datetime as dt
import os

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from pipeline.core.config import REPO_ROOT
from pipeline.lake.demo import DemoData, write_landing
from pipeline.lake.demo.hostile import ROWS, write_hostile_landing
from pipeline.lake.ingest import ingest_landing

UTC = dt.timezone.utc
NOW = dt.datetime(1998, 5, 1, tzinfo=UTC)


def _movielens_like(n: int = 1200) -> pd.DataFrame:
    """Contract events shaped like the demo's MovieLens ratings (numeric ids, whole seconds,
    ``rating`` with a value, ids ``ml100k-<user>-<item>-<seconds>``)."""
    rng = np.random.default_rng(3)
    users = rng.integers(1, 944, n).astype(str)
    items = rng.integers(1, 1683, n).astype(str)
    seconds = np.sort(rng.integers(874_724_710, 893_286_638, n))
    frame = pd.DataFrame(
        {
            "event_id": [f"ml100k-{u}-{i}-{s}" for u, i, s in zip(users, items, seconds)],
            "user_id": users,
            "item_id": items,
            "event_type": "rating",
            "timestamp": pd.to_datetime(seconds, unit="s", utc=True),
            "value": rng.integers(1, 6, n).astype("float64"),
            "device": None,
            "session_id": None,
        }
    )
    return frame.drop_duplicates(["user_id", "item_id", "timestamp"]).reset_index(drop=True)


def test_hostile_files_add_nothing_but_quarantine_their_bad_rows(tmp_path):
    events = _movielens_like()
    landing = tmp_path / "landing"
    write_landing(
        DemoData(
            events=events,
            items=pd.DataFrame({"item_id": ["1"]}),
            users=pd.DataFrame({"user_id": ["1"]}),
        ),
        landing,
        name="ml-100k",
        fmt="csv",
        gzip=True,
    )
    bad = write_hostile_landing(events, landing / "events")
    assert all(n / (ROWS + n) < 0.05 for n in bad.values())  # each within the threshold
    old = NOW.timestamp() - 3600
    for path in (landing / "events").iterdir():
        os.utime(path, (old, old))

    report = ingest_landing(
        landing / "events",
        tmp_path / "lake" / "events",
        ingested_at=NOW,
        allowed_lateness=dt.timedelta(days=10_000),
        suite_path=REPO_ROOT / "expectations" / "events.json",
        allowed_event_types=["view", "click", "like", "share", "add_to_cart", "purchase", "rating"],
    )
    assert report.files == 5 and report.files_failed == 0, report.failed
    assert report.rows_new == len(events)  # the hostile files' valid rows were known events
    assert report.rows_rejected == sum(bad.values()), report.rejected_reasons
    assert report.rows_duplicate == 4 * ROWS
    quarantined = pd.concat([pq.read_table(p).to_pandas() for p in report.quarantine_files])
    assert len(quarantined) == sum(bad.values())
    reasons = quarantined["reason"].astype(str)
    assert reasons.str.len().gt(0).all()
    assert reasons.str.contains("consent").any() and reasons.str.contains("control").any()
    # quarantine keeps what was sent (Parquet holds a NUL; PostgreSQL never sees it)
    assert quarantined["user_id"].astype(str).str.contains("\x00").sum() == 1
