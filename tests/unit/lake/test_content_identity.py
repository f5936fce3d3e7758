"""Content-hash event identity (issue 15): the same events sent once with ``event_id`` and
once without are one set of lake rows, either way round, and rows that both carry ids of
their own are never merged by content."""

from __future__ import annotations

import datetime as dt
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipeline.lake import event_ids
from pipeline.lake.event_ids import EventIdIndex, content_keys, event_keys
from pipeline.lake.ingest import ingest_landing
from pipeline.lake.normalise import derive_event_ids, normalise_events
from pipeline.lake.snapshot import load_snapshot
from pipeline.lake.storage import lake_part_files, to_lake_table

UTC = dt.timezone.utc
NOW = dt.datetime(2024, 1, 10, tzinfo=UTC)
CUTOFF = dt.datetime(2024, 1, 9, tzinfo=UTC)
WITH_IDS = (
    "event_id,user_id,item_id,event_type,timestamp,value\n"
    "e1,u1,i1,view,2024-01-01T10:00:00Z,1\n"
    "e2,u1,i2,click,2024-01-01T11:00:00Z,\n"
    "e3,u2,i1,purchase,2024-01-02T09:30:00Z,30\n"
)
WITHOUT_IDS = (
    "user_id,item_id,event_type,timestamp,value\n"
    "u1,i1,view,2024-01-01T10:00:00Z,1\n"
    "u1,i2,click,2024-01-01T11:00:00Z,\n"
    "u2,i1,purchase,2024-01-02T09:30:00Z,30\n"
)


def _ingest(landing, lake, **kwargs):
    return ingest_landing(landing, lake, ingested_at=NOW, settle_seconds=0.0, **kwargs)


def _lake(lake) -> pd.DataFrame:
    return load_snapshot(lake, CUTOFF, 30)


@pytest.fixture
def where(tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    return landing, tmp_path / "lake" / "events"


@pytest.mark.parametrize("first", ["with_ids", "without_ids"])
def test_the_same_three_events_with_and_without_event_id_are_three_lake_rows(where, first):
    landing, lake = where
    files = {"with_ids": WITH_IDS, "without_ids": WITHOUT_IDS}
    second = "without_ids" if first == "with_ids" else "with_ids"
    (landing / f"1-{first}.csv").write_text(files[first])
    assert _ingest(landing, lake).rows_new == 3
    (landing / f"2-{second}.csv").write_text(files[second])
    report = _ingest(landing, lake)
    assert (report.rows_new, report.rows_duplicate) == (0, 3)  # no new rows, either way round
    rows = _lake(lake)
    assert len(rows) == 3
    assert set(rows["source_file"]) == {f"1-{first}.csv"}  # the first copy is the one kept


def test_both_files_in_one_ingest_also_give_three_rows(where):
    landing, lake = where
    (landing / "a.csv").write_text(WITH_IDS)
    (landing / "b.csv").write_text(WITHOUT_IDS)
    report = _ingest(landing, lake)
    assert (report.rows_new, report.rows_duplicate) == (3, 3) and len(_lake(lake)) == 3


def test_rows_with_their_own_ids_are_never_merged_by_content(where):
    """Two purchases of one item in the same second, told apart by the sender's ids, are two
    events, in one file or in two; a copy without an id is one of them, not a third."""
    landing, lake = where
    header = "event_id,user_id,item_id,event_type,timestamp,value\n"
    (landing / "a.csv").write_text(
        header + "p1,u1,i1,purchase,2024-01-01T10:00:00Z,30\n"
        "p2,u1,i1,purchase,2024-01-01T10:00:00Z,30\n"
    )
    assert _ingest(landing, lake).rows_new == 2
    (landing / "b.csv").write_text(header + "p3,u1,i1,purchase,2024-01-01T10:00:00Z,30\n")
    assert _ingest(landing, lake).rows_new == 1  # a third purchase, with its own id
    (landing / "c.csv").write_text(
        WITHOUT_IDS.splitlines()[0] + "\nu1,i1,purchase,2024-01-01T10:00:00Z,30\n"
    )
    assert _ingest(landing, lake).rows_new == 0  # no id: it is one of those already there
    assert sorted(_lake(lake)["event_id"]) == ["p1", "p2", "p3"]


def test_other_fields_tell_events_apart(where):
    """The content key is the derived id's fields: another value, session or position is
    another event (README: which fields count)."""
    landing, lake = where
    (landing / "a.csv").write_text(
        "event_id,user_id,item_id,event_type,timestamp,value,session_id,position\n"
        "r1,u1,i1,rating,2024-01-01T10:00:00Z,4,s1,\n"
        "i1,u1,i2,impression,2024-01-01T10:00:00Z,,s1,1\n"
    )
    _ingest(landing, lake)
    (landing / "b.csv").write_text(
        "user_id,item_id,event_type,timestamp,value,session_id,position\n"
        "u1,i1,rating,2024-01-01T10:00:00Z,5,s1,\n"  # another value
        "u1,i1,rating,2024-01-01T10:00:00Z,4,s2,\n"  # another session
        "u1,i2,impression,2024-01-01T10:00:00Z,,s1,2\n"  # another position
        "u1,i2,impression,2024-01-01T10:00:00Z,,s1,1\n"
    )  # the same impression
    report = _ingest(landing, lake)
    assert (report.rows_new, report.rows_duplicate) == (3, 1)


def test_a_file_mixing_rows_with_and_without_ids_keeps_the_first_copy(where):
    landing, lake = where
    (landing / "mixed.csv").write_text(
        "event_id,user_id,item_id,event_type,timestamp\n"
        "a1,u1,i1,view,2024-01-01T10:00:00Z\n"
        ",u1,i1,view,2024-01-01T10:00:00Z\n"  # the same event without its id: dropped
        "a2,u1,i1,view,2024-01-01T10:00:00Z\n"  # an own id: another event
        ",u2,i1,view,2024-01-01T10:00:00Z\n"  # first without an id ...
        "b1,u2,i1,view,2024-01-01T10:00:00Z\n"
    )  # ... so this copy is that event
    report = _ingest(landing, lake)
    assert (report.rows_new, report.rows_duplicate) == (3, 2)
    kept = _lake(lake).sort_values("source_row")
    assert kept["source_row"].tolist() == [1, 3, 4]


def test_copies_in_later_batches_of_one_file_are_found_too(where):
    landing, lake = where
    lines = [f"x{k},u{k},i1,view,2024-01-01T10:00:{k:02d}Z" for k in range(30)]
    lines += [f",u{k},i1,view,2024-01-01T10:00:{k:02d}Z" for k in range(30)]
    (landing / "long.csv").write_text(
        "event_id,user_id,item_id,event_type,timestamp\n" + "\n".join(lines) + "\n"
    )
    report = _ingest(landing, lake, chunk_rows=7)  # batches of ~14 rows
    assert (report.rows_new, report.rows_duplicate) == (30, 30)


def test_a_lake_without_content_caches_builds_them_once(where, monkeypatch):
    """A lake written before the content caches existed: the next ingest computes them from
    the part files it has (once), and still recognises the events."""
    landing, lake = where
    (landing / "a.csv").write_text(WITH_IDS)
    _ingest(landing, lake)
    shutil.rmtree(lake / event_ids._CONTENT_CACHE)
    calls = []
    real = event_ids.content_keys
    monkeypatch.setattr(
        event_ids, "content_keys", lambda table: calls.append(table.num_rows) or real(table)
    )
    (landing / "b.csv").write_text(WITHOUT_IDS)
    report = _ingest(landing, lake)
    assert report.rows_new == 0 and len(_lake(lake)) == 3
    assert sum(calls) == 3  # every old row once, none of the new file's (no own ids)
    parts = lake_part_files(lake)
    assert all(
        event_ids._hash_cache_path(lake, p, event_ids._CONTENT_CACHE).exists() for p in parts
    )
    calls.clear()
    index, _ = event_ids.load_lake_index(lake)
    assert calls == [] and len(index.contents) == 3


def test_a_lake_without_own_ids_reads_only_event_ids_for_its_content_caches(where, monkeypatch):
    landing, lake = where
    (landing / "b.csv").write_text(WITHOUT_IDS)
    _ingest(landing, lake)
    shutil.rmtree(lake / event_ids._CONTENT_CACHE)
    monkeypatch.setattr(event_ids, "content_keys", lambda table: pytest.fail("not needed"))
    index, _ = event_ids.load_lake_index(lake)
    assert len(index) == 3 and len(index.contents) == 0


def test_content_key_is_the_derived_id_of_the_rows_fields():
    raw = pd.DataFrame(
        {
            "event_id": ["e1", None],
            "user_id": ["196", "196"],
            "item_id": ["i1", "i1"],
            "event_type": ["View", "view"],
            "timestamp": ["2024-01-01T10:00:00.5Z", "1704103200500"],
            "value": ["2", "2.0"],
            "position": [None, None],
        }
    )
    events, rejected, _, _ = normalise_events(raw, source="f.csv")
    assert rejected.empty
    table = to_lake_table(events, pd.Timestamp(NOW))
    keys = content_keys(table).to_pylist()
    assert keys[0] == keys[1] == events["event_id"].iloc[1]  # "View"/"view", 196, ms, "2.0"
    assert keys[0] == derive_event_ids(events.iloc[[0]]).iloc[0]
    identity = event_keys(table)
    assert identity.explicit.tolist() == [True, False]
    assert identity.k1[0] == identity.k1[1] == identity.h1[1]


def test_index_duplicates_rule_on_hash_pairs():
    def keys(ids, contents, own):
        h1, h2 = event_ids.hash_event_ids(pa.array(ids, pa.string()))
        k1, k2 = event_ids.hash_event_ids(pa.array(contents, pa.string()))
        own = np.array(own)
        return event_ids.EventKeys(h1, h2, own, np.where(own, k1, h1), np.where(own, k2, h2))

    index = EventIdIndex()
    index.add_keys(keys(["a", "hK2"], ["hK1", "hK2"], [True, False]))
    batch = keys(
        ["hK1", "b", "c", "hK3", "d"],
        ["hK1", "hK2", "hK1", "hK3", "hK3"],
        [False, True, True, False, True],
    )
    assert index.duplicates(batch).tolist() == [True, True, False, False, True]


def test_content_keys_equal_derived_ids_on_awkward_values():
    """The Arrow assembly of content keys gives, row for row, the text and id
    ``derive_event_ids`` gives (floats of every form, nulls, unicode, feedback columns)."""
    rng = np.random.default_rng(5)
    n = 2_000
    values = rng.choice(
        np.array([np.nan, 0.0, -0.0, 1.0, 2.5, 0.1 + 0.2, 1e-7, 1e22, 3.0, 123456789.125, 1 / 3]), n
    )
    frame = pd.DataFrame(
        {
            "event_id": pd.Series([f"x{k}" for k in range(n)], dtype="string"),
            "user_id": pd.Series(
                rng.choice(["u1", "196", "ü-ß", "a b", "x\u2028y"], n), dtype="string"
            ),
            "item_id": pd.Series(rng.choice(["i1", "0", "é"], n), dtype="string"),
            "event_type": pd.Series(
                rng.choice(["view", "impression", "rating"], n), dtype="string"
            ),
            "timestamp": pd.Series(
                pd.to_datetime(
                    rng.integers(0, 2**40, n) * 1000 + rng.integers(0, 1000, n), unit="us", utc=True
                )
            ).astype("datetime64[us, UTC]"),
            "value": values,
            "device": pd.Series([None] * n, dtype="string"),
            "session_id": pd.Series(rng.choice(["s1", None, ""], n), dtype="string"),
            "position": pd.array(rng.choice([None, 1, 7, 2**31 - 1], n), dtype="Int64"),
            "placement": pd.Series(rng.choice([None, "home_recs", ""], n), dtype="string"),
            "source_file": pd.Series(["f.csv"] * n, dtype="string"),
            "source_row": np.arange(1, n + 1),
        }
    )
    table = to_lake_table(frame, pd.Timestamp(NOW))
    assert content_keys(table).to_pylist() == derive_event_ids(frame).tolist()
    no_feedback = table.drop(["position", "placement"])
    old = no_feedback.append_column("position", pa.nulls(n, pa.int64())).append_column(
        "placement", pa.nulls(n, pa.string())
    )  # a part from before the feedback columns
    bare = frame.drop(columns=["position", "placement"])
    assert content_keys(old).to_pylist() == derive_event_ids(bare).tolist()
