"""Snapshots through ``pyarrow.dataset`` return exactly what the folder-globbing reader did
(rows, columns, dtypes, order), on a lake with several days, several parts a day, late events,
a part older than the feedback columns, a tie across parts and in-flight/cache files; and a
partition outside the window is never opened."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmarks.bench_snapshot import glob_snapshot, glob_write_snapshot
from pipeline.lake.ingest import ingest_landing
from pipeline.lake.snapshot import load_snapshot, write_snapshot
from pipeline.lake.storage import LAKE_SCHEMA, lake_part_files

UTC = dt.timezone.utc
HEADER = "event_id,user_id,item_id,event_type,timestamp,value,position,placement\n"


def _at(day: int, hour: int, minute: int = 0) -> dt.datetime:
    return dt.datetime(2024, 1, day, hour, minute, tzinfo=UTC)


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    root = tmp_path_factory.mktemp("snapshot-lake")
    landing, lake = root / "landing" / "events", root / "lake" / "events"
    landing.mkdir(parents=True)
    # first delivery: days 2..6 in two files (two parts a day), with events that share a
    # timestamp (ordered by event id) and impressions with feedback columns
    rows = [
        f"a{n:02d},u{n % 5},i{n % 7},{'impression' if n % 4 == 0 else 'view'},"
        f"{_at(2 + n // 6, (n * 5) % 24, 30 if n % 3 else 0).isoformat()},{n}.5,"
        f"{n % 4 + 1 if n % 4 == 0 else ''},{'home' if n % 4 == 0 else ''}\n"
        for n in range(30)
    ]
    rows += [
        "a90,u1,i2,view,2024-01-03T09:00:00Z,,,\n",
        "a89,u2,i3,click,2024-01-03T09:00:00Z,,,\n",
    ]
    (landing / "a1.csv").write_text(HEADER + "".join(rows[0::2]))
    (landing / "a2.csv").write_text(HEADER + "".join(rows[1::2]))
    _ingest(landing, lake, _at(7, 0))
    # a later delivery: late events for days 2 and 3 (new parts in old folders) and day 7
    (landing / "b.csv").write_text(
        HEADER
        + "".join(
            [
                "b1,u9,i1,view,2024-01-02T23:59:59.999999Z,,,\n",
                "b2,u8,i2,click,2024-01-03T09:00:00Z,,,\n",  # ties a89/a90 on time
                "b3,u7,i3,purchase,2024-01-07T06:00:00Z,20,,\n",
                "b4,u1,i1,view,2024-01-07T12:00:00Z,,,\n",
            ]
        )
    )
    _ingest(landing, lake, _at(8, 0))
    # a part written before the feedback columns existed (they read as nulls)
    old_schema = pa.schema([f for f in LAKE_SCHEMA if f.name not in ("position", "placement")])
    old = pd.DataFrame(
        {
            "event_id": ["o1", "o2"],
            "user_id": ["u1", "u2"],
            "item_id": ["i1", "i2"],
            "event_type": ["view", "click"],
            "timestamp": pd.to_datetime(["2024-01-04T08:00:00Z", "2024-01-04T12:00:00Z"]).as_unit(
                "us"
            ),
            "value": [1.0, None],
            "device": [None, "tv"],
            "session_id": [None, "s"],
            "source_file": "old.csv",
            "source_row": [1, 2],
            "ingested_at": pd.Timestamp("2024-01-05", tz="UTC").as_unit("us"),
        }
    )
    pq.write_table(
        pa.Table.from_pandas(old, schema=old_schema, preserve_index=False),
        lake / "event_date=2024-01-04" / "part-0000000000000000.parquet",
    )
    # a hand-written part repeating an event (same time and id, other lineage): ties keep
    # the part files' order in both readers
    tie = pq.read_table(lake_part_files(lake)[0]).slice(0, 1)
    tie = tie.set_column(
        tie.schema.get_field_index("source_file"),
        "source_file",
        pa.array(["copy.csv"], pa.string()),
    )
    pq.write_table(tie, lake / "event_date=2024-01-02" / "part-ffffffffffffffff.parquet")
    # an in-flight temp file (a dotfile) that neither reader may read
    (lake / "event_date=2024-01-05" / ".part-0123.parquet.99.tmp").write_bytes(b"partial")
    return lake


def _ingest(landing, lake, now):
    report = ingest_landing(
        landing,
        lake,
        ingested_at=now,
        settle_seconds=0.0,
        chunk_rows=4,
        allowed_lateness=dt.timedelta(days=30),
    )
    assert report.rows_new == report.rows_read and not report.files_failed, report
    return report


def test_the_lake_has_what_the_comparison_needs(lake):
    parts = lake_part_files(lake)
    per_day = pd.Series([p.parent.name for p in parts]).value_counts()
    assert len(per_day) == 6 and (per_day >= 2).sum() == 5, per_day
    assert any(p.name.startswith(".") for p in lake.iterdir())  # the event-id hash caches
    snap = load_snapshot(lake, _at(9, 0), 30)
    assert {"b1", "b2", "b3", "o1"} <= set(snap["event_id"])
    assert snap["position"].notna().any() and snap["placement"].notna().any()


@pytest.mark.parametrize(
    ("cutoff", "days"),
    [
        (_at(9, 0), 365),  # the whole lake
        (_at(7, 0), 3),  # from 2024-01-04 00:00: day 7 pruned, day 3 out
        (_at(5, 13, 15), 2),  # starts and ends mid-day
        (_at(3, 9, 0), 1),  # cutoff on the tied timestamp: excluded
        (_at(3, 9, 0) + dt.timedelta(microseconds=1), 1),
        (_at(2, 0), 10),  # before every event: days exist, no rows
        (dt.datetime(2023, 6, 1, tzinfo=UTC), 30),  # no partition at all
    ],
)
def test_load_snapshot_equals_the_globbing_reader(lake, cutoff, days):
    new = load_snapshot(lake, cutoff, days)
    pd.testing.assert_frame_equal(new, glob_snapshot(lake, cutoff, days), check_exact=True)
    assert new["timestamp"].is_monotonic_increasing


def test_write_snapshot_equals_the_globbing_writer(lake, tmp_path):
    for cutoff, days in ((_at(9, 0), 365), (_at(5, 13, 15), 2), (_at(2, 0), 10)):
        snap = write_snapshot(lake, cutoff, days, tmp_path / "new.parquet")
        rows = glob_write_snapshot(lake, cutoff, days, tmp_path / "old.parquet")
        new, old = (pd.read_parquet(tmp_path / f"{name}.parquet") for name in ("new", "old"))
        pd.testing.assert_frame_equal(new, old, check_exact=True)
        assert snap.rows == rows == len(new)
        assert pq.read_schema(tmp_path / "new.parquet").equals(
            pq.read_schema(tmp_path / "old.parquet")
        )
        assert snap.newest == (new["timestamp"].max() if len(new) else None)


def test_no_lake_reads_as_an_empty_snapshot(tmp_path):
    missing = tmp_path / "no-lake"
    pd.testing.assert_frame_equal(
        load_snapshot(missing, _at(9, 0), 30), glob_snapshot(missing, _at(9, 0), 30)
    )
    snap = write_snapshot(missing, _at(9, 0), 30, tmp_path / "empty.parquet")
    assert snap.rows == 0 and snap.newest is None
    assert pd.read_parquet(tmp_path / "empty.parquet").empty


def test_partitions_outside_the_window_are_never_opened(lake, tmp_path):
    """A corrupt part in a date folder outside the window: pruned by its folder name, so the
    scan never opens it; inside the window it fails the read."""
    import shutil

    copy = tmp_path / "lake"
    shutil.copytree(lake, copy)
    bad = copy / "event_date=2023-12-01" / "part-badbadbadbadbad0.parquet"
    bad.parent.mkdir()
    bad.write_bytes(b"not parquet at all")
    pd.testing.assert_frame_equal(
        load_snapshot(copy, _at(9, 0), 30), load_snapshot(lake, _at(9, 0), 30)
    )
    with pytest.raises(pa.ArrowInvalid):
        load_snapshot(copy, _at(9, 0), 60)


def test_files_that_are_not_lake_parts_are_never_read(lake, tmp_path):
    """Only ``event_date=*/*.parquet`` is the lake: a stray note, a folder of another shape
    or a non-Parquet file in a date folder is not part of the scan."""
    import shutil

    copy = tmp_path / "lake"
    shutil.copytree(lake, copy)
    (copy / "README.txt").write_text("not data")
    (copy / "backup").mkdir()
    (copy / "backup" / "old.parquet").write_bytes(b"not parquet either")
    day = sorted(copy.glob("event_date=*"))[-1]
    (day / "notes.csv").write_text("a,b\n1,2\n")
    pd.testing.assert_frame_equal(
        load_snapshot(copy, _at(9, 0), 30), load_snapshot(lake, _at(9, 0), 30)
    )


def test_window_users_are_the_snapshots_distinct_users(lake):
    from pipeline.lake.snapshot import window_users

    for days in (1, 3, 30):
        snapshot = load_snapshot(lake, _at(9, 0), days)
        assert window_users(lake, _at(9, 0), days) == sorted(set(snapshot["user_id"]))
    assert window_users(lake.parent / "no-lake", _at(9, 0), 30) == []
