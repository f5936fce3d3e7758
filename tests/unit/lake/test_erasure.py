"""Right to erasure, lake side: lake parts, quarantine, served history, run folders, the
tombstone and the ingest filter, on tiny inputs."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.privacy import check_user_ids, stored_user_id
from pipeline.lake.erasure import ERASED_PREFIX, erase_users
from pipeline.lake.event_ids import load_lake_index
from pipeline.lake.ingest import ingest_landing, read_manifest
from pipeline.lake.served import read_served, write_served
from pipeline.lake.snapshot import load_snapshot
from pipeline.lake.storage import lake_part_files
from pipeline.lake.tombstone import (
    Tombstone,
    add_to_tombstone,
    served_user_ids,
    without_erased_users,
)

UTC = dt.timezone.utc
NOW = dt.datetime(2024, 1, 10, tzinfo=UTC)
FORGOTTEN = "gone@example.com"  # an e-mail as the id: the case that must not leak
CSV = (
    "event_id,user_id,item_id,event_type,timestamp,value\n"
    f"e1,{FORGOTTEN},i1,view,2024-01-01T10:00:00Z,1\n"
    "e2,u2,i1,view,2024-01-01T11:00:00Z,1\n"
    f"e3,{FORGOTTEN},i2,click,2024-01-02T10:00:00Z,1\n"
    f"e4,{FORGOTTEN},i3,view,2024-01-03T10:00:00Z,1\n"  # alone in its day: the part empties
    "e5,u2,i2,click,2024-01-02T12:00:00Z,1\n"
    "e6,u3,i1,view,2024-01-01T12:00:00Z,1\n"
)


def _ingest(tmp_path, name: str, text: str):
    landing = tmp_path / "landing" / "events"
    landing.mkdir(parents=True, exist_ok=True)
    (landing / name).write_text(text)
    return ingest_landing(
        landing,
        tmp_path / "lake" / "events",
        ingested_at=NOW,
        settle_seconds=0,
        max_bad_row_share=0.5,
    )


def _lake_users(tmp_path) -> list[str]:
    frame = load_snapshot(tmp_path / "lake" / "events", NOW, 365)
    return sorted(frame["user_id"].astype(str))


def _everything_text(root) -> bytes:
    return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file())


def test_check_user_ids_refuses_what_cannot_be_an_id_and_stored_ids_are_the_cms_ids():
    assert check_user_ids(["a", "b", "a"]) == ["a", "b"]
    for bad in (
        [],
        [""],
        [" a"],
        ["a\x00"],
        ["x" * 513],
        ["__default__"],
        ["__default__:model"],
        [7],
    ):
        with pytest.raises(ValueError):
            check_user_ids(bad)
    assert stored_user_id("u1") == "u1"  # identity until ids are pseudonymised at ingest


def test_the_tombstone_keeps_keyed_hashes_only_with_a_private_salt(tmp_path):
    lake = tmp_path / "lake"
    assert not Tombstone.load(lake) and not (lake / "_erased").exists()  # nothing made
    tombstone, added = add_to_tombstone(lake, [FORGOTTEN, "u9"])
    assert added == 2 and len(tombstone) == 2
    assert add_to_tombstone(lake, [FORGOTTEN])[1] == 0  # idempotent
    text = (lake / "_erased" / "tombstone.txt").read_text()
    assert FORGOTTEN not in text and "u9" not in text and len(text.split()) == 2
    assert stat.S_IMODE(os.stat(lake / "_erased" / "salt").st_mode) == 0o600
    loaded = Tombstone.load(lake)
    assert loaded.matches(pd.Series([FORGOTTEN, "u2", None, "u9"])).tolist() == [
        True,
        False,
        False,
        True,
    ]
    # another lake has another salt: the same id hashes differently
    other, _ = add_to_tombstone(tmp_path / "other", [FORGOTTEN])
    assert other.digest(FORGOTTEN) != loaded.digest(FORGOTTEN)


def test_erasure_removes_the_user_from_the_lake_and_keeps_the_index_exact(tmp_path):
    _ingest(tmp_path, "a.csv", CSV)
    lake_dir = tmp_path / "lake" / "events"
    parts_before = len(lake_part_files(lake_dir))

    dry = erase_users(tmp_path / "lake", tmp_path / "runs", [FORGOTTEN], dry_run=True)
    assert dry.lake_events == 3 and FORGOTTEN in _lake_users(tmp_path)
    assert not (tmp_path / "lake" / "_erased").exists()  # a dry run writes nothing

    done = erase_users(tmp_path / "lake", tmp_path / "runs", [FORGOTTEN])
    assert (done.lake_events, done.tombstone_added) == (3, 1)
    assert done.lake_parts_removed == 1 and done.lake_parts_rewritten == 2
    assert _lake_users(tmp_path) == ["u2", "u2", "u3"]
    assert len(lake_part_files(lake_dir)) == parts_before - 1
    index, _ = load_lake_index(lake_dir)
    assert len(index) == 3  # caches rebuilt for rewritten parts, pruned for the deleted one
    again = erase_users(tmp_path / "lake", tmp_path / "runs", [FORGOTTEN])
    assert again.lake_events == 0 and again.tombstone_added == 0  # idempotent


def test_ingest_drops_a_forgotten_users_rows_from_an_old_or_resent_file(tmp_path):
    _ingest(tmp_path, "a.csv", CSV)
    erase_users(tmp_path / "lake", tmp_path / "runs", [FORGOTTEN])
    # The CMS sends the same export again (other bytes: another file to ingest), with one of
    # the user's rows broken (it would be quarantined) and one row of a new user.
    resent = (
        CSV.replace("2024-01-03T10:00:00Z", "not a time") + "e7,u4,i1,view,2024-01-04T10:00:00Z,1\n"
    )
    report = _ingest(tmp_path, "b.csv", resent)
    assert report.rows_erased == 3 and report.rows_new == 1 and report.rows_rejected == 0
    assert FORGOTTEN not in _lake_users(tmp_path) and "u4" in _lake_users(tmp_path)
    assert read_manifest(tmp_path / "lake")[-1]["rows_erased"] == 3
    assert FORGOTTEN.encode() not in _everything_text(tmp_path / "lake")


def test_quarantine_rows_of_the_user_are_removed(tmp_path):
    bad = CSV.replace("2024-01-02T10:00:00Z", "garbage").replace(
        "e6,u3,i1,view,2024-01-01T12", "e6,u3,i1,view,garbage-01T12"
    )
    _ingest(tmp_path, "a.csv", bad)
    (quarantine,) = (tmp_path / "lake" / "quarantine").glob("*.parquet")
    assert sorted(pq.read_table(quarantine).column("user_id").to_pylist()) == [FORGOTTEN, "u3"]
    done = erase_users(tmp_path / "lake", tmp_path / "runs", [FORGOTTEN])
    assert done.quarantine_rows == 1
    table = pq.read_table(quarantine)
    assert table.column("user_id").to_pylist() == ["u3"] and "reason" in table.column_names


def test_served_history_rows_of_the_user_are_removed(tmp_path):
    lists = pd.DataFrame(
        {
            "user_id": ["u2", FORGOTTEN, FORGOTTEN, "__default__"],
            "rank": [1, 1, 2, 1],
            "item_id": ["i1", "i2", "i3", "i1"],
        }
    )
    cutoff = dt.datetime(2024, 1, 5, tzinfo=UTC)
    path = write_served(
        tmp_path / "lake", lists, cutoff=cutoff, published_at=cutoff, model_version="3"
    )
    schema = pq.read_schema(path)
    done = erase_users(tmp_path / "lake", tmp_path / "runs", [FORGOTTEN])
    assert done.served_history_rows == 2
    served = read_served(tmp_path / "lake")
    assert sorted(served["user_id"]) == ["__default__", "u2"]
    assert pq.read_schema(path).equals(schema)  # dictionary-encoded columns kept


def _run_folder(root):
    """A run folder shaped like a real one: id maps, text and code tables, a bundle."""
    run = root / "runs" / "2024-01-05T000000"
    (run / "model").mkdir(parents=True)
    (run / "features" / "as_of=2024-01-05T000000").mkdir(parents=True)
    (run / "data_docs").mkdir()
    (run / "data_docs" / "index.html").write_text("<p>failing rows</p>")
    users = ["u2", FORGOTTEN, "u3"]
    pq.write_table(pa.table({"user_id": pa.array(users, pa.string())}), run / "user_ids.parquet")
    events = pa.table(
        {
            "event_id": ["e1", "e2", "e3"],
            "user_id": [FORGOTTEN, "u2", "u3"],
            "item_id": ["i1", "i1", "i1"],
        }
    )
    pq.write_table(events, run / "events_raw.parquet")
    os.link(run / "events_raw.parquet", run / "events.parquet")  # as validate makes it
    pq.write_table(
        pa.table(
            {
                "user_id": pa.array([1, 0, 2, 1], pa.int32()),
                "item_id": pa.array([0, 0, 0, 1], pa.int32()),
            }
        ),
        run / "events_encoded.parquet",
    )
    pq.write_table(
        pa.table({"user_id": pa.array([0, 1, 2], pa.int32()), "recency_days": [1.0, 2.0, 3.0]}),
        run / "features" / "as_of=2024-01-05T000000" / "user_features.parquet",
    )
    # the bundle has its own id map (other codes) and the side file's rows
    pq.write_table(
        pa.table({"user_id": pa.array([FORGOTTEN, "u3"], pa.large_string())}),
        run / "model" / "users.parquet",
    )
    pq.write_table(
        pa.table({"user_id": ["u2", FORGOTTEN], "age_band": ["18-24", "25-34"]}),
        run / "model" / "side_users.parquet",
    )
    pq.write_table(pa.table({"item_id": ["i1"], "title": ["t"]}), run / "model" / "items.parquet")
    (run / "register.json").write_text(json.dumps({"version": "4", "decision": "promote"}))
    other = root / "runs" / "2023-12-01T000000"  # a run that never saw the user
    other.mkdir(parents=True)
    pq.write_table(pa.table({"user_id": pa.array(["u2"], pa.string())}), other / "user_ids.parquet")
    (other / "register.json").write_text(json.dumps({"version": "2"}))
    return run


def test_run_folders_drop_rows_blank_id_maps_and_name_the_model_versions(tmp_path):
    run = _run_folder(tmp_path)
    before = {p: pq.read_schema(p) for p in run.rglob("*.parquet")}
    dry = erase_users(tmp_path / "lake", tmp_path / "runs", [FORGOTTEN], dry_run=True)
    assert dry.model_versions == ["4"] and (run / "data_docs").exists()

    done = erase_users(tmp_path / "lake", tmp_path / "runs", [FORGOTTEN])
    assert done.model_versions == ["4"] and done.run_folders == 1
    assert done.run_ids_blanked == 2  # user_ids.parquet and model/users.parquet
    # events_raw 1 + events 1 + events_encoded 2 + user_features 1 + side_users 1
    assert done.run_rows == 6 and done.run_reports_removed == 1
    assert not (run / "data_docs").exists()
    ids = pq.read_table(run / "user_ids.parquet").column("user_id").to_pylist()
    assert ids == ["u2", f"{ERASED_PREFIX}1", "u3"]  # codes keep their meaning
    assert pq.read_table(run / "model" / "users.parquet").column("user_id").to_pylist() == [
        f"{ERASED_PREFIX}0",
        "u3",
    ]
    encoded = pq.read_table(run / "events_encoded.parquet").to_pydict()
    assert encoded == {"user_id": [0, 2], "item_id": [0, 0]}
    features = pq.read_table(run / "features" / "as_of=2024-01-05T000000" / "user_features.parquet")
    assert features.column("user_id").to_pylist() == [0, 2]
    for name in ("events_raw.parquet", "events.parquet"):
        assert pq.read_table(run / name).column("user_id").to_pylist() == ["u2", "u3"]
    assert pq.read_table(run / "model" / "side_users.parquet").column("user_id").to_pylist() == [
        "u2"
    ]
    for path, schema in before.items():  # same columns and types (no partition columns added)
        assert pq.read_schema(path).equals(schema, check_metadata=False), path
    assert FORGOTTEN.encode() not in _everything_text(tmp_path / "runs")
    again = erase_users(tmp_path / "lake", tmp_path / "runs", [FORGOTTEN])
    assert (again.run_rows, again.run_ids_blanked, again.model_versions) == (0, 0, [])


def test_an_erasure_leaves_other_users_untouched(tmp_path):
    _ingest(tmp_path, "a.csv", CSV)
    _run_folder(tmp_path)
    erase_users(tmp_path / "lake", tmp_path / "runs", ["nobody-at-all"])
    assert FORGOTTEN in _lake_users(tmp_path)
    ids = pq.read_table(tmp_path / "runs" / "2024-01-05T000000" / "user_ids.parquet")
    assert FORGOTTEN in ids.column("user_id").to_pylist()
    assert np.array_equal(
        Tombstone.load(tmp_path / "lake").matches(pd.Series([FORGOTTEN])), [False]
    )


def test_the_users_side_file_is_read_without_forgotten_users(tmp_path):
    users = pd.DataFrame(
        {"user_id": ["u2", FORGOTTEN], "age_band": ["18-24", "25-34"]}, dtype="string"
    )
    assert without_erased_users(users, tmp_path / "lake") is users  # nothing erased yet
    add_to_tombstone(tmp_path / "lake", [FORGOTTEN])
    kept = without_erased_users(users, tmp_path / "lake")
    assert kept["user_id"].tolist() == ["u2"]
    assert without_erased_users(None, tmp_path / "lake") is None


def test_publish_serves_neither_blanked_nor_tombstoned_ids(tmp_path):
    ids = np.array(["u2", f"{ERASED_PREFIX}1", FORGOTTEN, "u3"], dtype=object)
    assert served_user_ids(ids, tmp_path / "lake").tolist() == ["u2", FORGOTTEN, "u3"]
    # a run that read its snapshot before the erasure and publishes after it
    add_to_tombstone(tmp_path / "lake", [FORGOTTEN])
    assert served_user_ids(ids, tmp_path / "lake").tolist() == ["u2", "u3"]
