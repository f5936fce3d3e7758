"""Ingest: formats, normalisation, dedupe, partitions, point-in-time snapshot, clear errors."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import shutil

import pandas as pd
import pyarrow as pa
import pytest

from pipeline.core.errors import DataError
from pipeline.lake.ingest import ingest_landing, read_manifest
from pipeline.lake.normalise import derive_event_ids, normalise_events, parse_timestamps
from pipeline.lake.readers import read_event_file
from pipeline.lake.snapshot import load_snapshot

UTC = dt.timezone.utc
CSV = (
    "event_id,user_id,item_id,event_type,timestamp,value,device,email\n"
    "e1,u1,i1,view,2024-01-01T10:00:00Z,12.5,mobile,a@b.c\n"
    "e2,u1,i2,CLICK,2024-01-01T11:00:00+02:00,,desktop,a@b.c\n"
    "e3,u2,i1,purchase,1704153600,30,,x@y.z\n"
)


def _landing(tmp_path):
    events = tmp_path / "landing" / "events"
    events.mkdir(parents=True)
    return events, tmp_path / "lake" / "events"


def test_parse_timestamps_mixed_formats_to_utc():
    values = pd.Series(
        ["2024-01-01T12:00:00+02:00", "1704110400", "1704110400000", "garbage", None]
    )
    parsed = parse_timestamps(values)
    expected = pd.Timestamp("2024-01-01T10:00:00Z")
    assert parsed.iloc[0] == expected
    assert parsed.iloc[1] == pd.Timestamp("2024-01-01T12:00:00Z")
    assert parsed.iloc[2] == pd.Timestamp("2024-01-01T12:00:00Z")
    assert parsed.iloc[3:].isna().all()


@pytest.mark.parametrize(
    ("values", "micros"),
    [
        (["1706745600123", "1706745600000"], 123_000),  # epoch ms with a ms part
        ([1706745600123, 1706745600000], 123_000),  # the same as numbers (JSONL)
        (["1706745600.123", "1706745600"], 123_000),  # fractional epoch seconds
        (["1706745600123456", "1706745600000000"], 123_456),  # epoch microseconds
        (["1706745600123.5", "1706745600000"], 123_500),  # fractional milliseconds
        (["2024-02-01T00:00:00.123456789Z", "2024-02-01T00:00:00Z"], 123_456),  # ISO, ns
    ],
)
def test_parse_timestamps_keeps_sub_second_parts_to_the_microsecond(values, micros):
    parsed = parse_timestamps(pd.Series(values))
    assert str(parsed.dtype) == "datetime64[us, UTC]"
    assert parsed.iloc[1] == pd.Timestamp("2024-02-01T00:00:00Z")
    assert parsed.iloc[0] - parsed.iloc[1] == pd.Timedelta(microseconds=micros)


def test_parse_timestamps_out_of_range_epochs_are_unreadable_not_a_crash():
    parsed = parse_timestamps(pd.Series(["1e30", "99999999999999999999", "-5e20", "inf"]))
    assert parsed.isna().all()


def test_normalise_drops_pii_and_no_consent_and_rejects_unreadable_rows():
    raw = pd.DataFrame(
        {
            "user_id": ["u1", "u2", "", "u4"],
            "item_id": ["i1", "i1", "i1", "i1"],
            "event_type": ["view", "view", "view", "view"],
            "timestamp": [
                "2024-01-01T00:00:00Z",
                "2024-01-01T00:00:00Z",
                "2024-01-01T00:00:00Z",
                "not a time",
            ],
            "consent": ["true", "false", "true", "true"],
            "ip": ["1.2.3.4"] * 4,
        }
    )
    events, rejected, no_consent, dropped = normalise_events(raw, source="f.csv")
    assert list(events["user_id"]) == ["u1"]
    assert no_consent == 1
    assert dropped == ["ip"] and "ip" not in events.columns
    assert sorted(rejected["reason"]) == ["timestamp unreadable", "user_id missing"]
    assert list(rejected["source_row"]) == [3, 4]
    assert events["event_id"].iloc[0].startswith("h")  # derived when absent


@pytest.mark.parametrize(
    "consent",
    [
        ["true", "", "false", "maybe"],  # blank and unrecognised among good values
        [True, None, False, "maybe"],  # JSONL: some records carry no consent
        [" YES ", "  ", "0", "maybe"],  # the documented words, any case and spacing
    ],
)
def test_consent_that_is_neither_true_nor_false_quarantines_the_row(consent):
    """One rule, chosen for privacy: consent is never assumed. Blank and unrecognised values
    are quarantined (kept out of the lake with a reason); false drops the event."""
    raw = pd.DataFrame(
        {
            "user_id": ["u1", "u2", "u3", "u4"],
            "item_id": ["i1"] * 4,
            "event_type": ["view"] * 4,
            "timestamp": ["2024-01-01T00:00:00Z"] * 4,
            "consent": consent,
        }
    )
    events, rejected, no_consent, _ = normalise_events(raw, source="f.csv")
    assert list(events["user_id"]) == ["u1"] and no_consent == 1
    assert list(rejected["user_id"]) == ["u2", "u4"]
    assert set(rejected["reason"]) == {"consent blank or unreadable (neither true nor false)"}


def test_an_all_blank_consent_column_quarantines_every_row():
    raw = pd.DataFrame(
        {
            "user_id": ["u1", "u2"],
            "item_id": ["i1"] * 2,
            "event_type": ["view"] * 2,
            "timestamp": ["2024-01-01T00:00:00Z"] * 2,
            "consent": ["", None],
        }
    )
    events, rejected, no_consent, _ = normalise_events(raw, source="f.csv")
    assert events.empty and len(rejected) == 2 and no_consent == 0


def test_derived_event_ids_are_deterministic_and_distinct():
    frame = pd.DataFrame(
        {
            "user_id": ["u", "u"],
            "item_id": ["a", "b"],
            "event_type": ["view", "view"],
            "timestamp": pd.to_datetime(["2024-01-01", "2024-01-01"], utc=True),
            "value": [1.0, 1.0],
            "session_id": [None, None],
        }
    )
    first, second = derive_event_ids(frame), derive_event_ids(frame)
    assert list(first) == list(second)
    assert first.iloc[0] != first.iloc[1]


@pytest.mark.parametrize("fmt", ["csv", "csv.gz", "jsonl", "jsonl.gz", "parquet", "tsv"])
def test_reads_every_supported_format(tmp_path, fmt):
    events_dir, lake = _landing(tmp_path)
    frame = pd.read_csv(pd.io.common.StringIO(CSV), dtype=str)
    path = events_dir / f"events.{fmt}"
    if fmt.startswith("csv"):
        frame.to_csv(path, index=False)
    elif fmt == "tsv":
        frame.to_csv(path, index=False, sep="\t")
    elif fmt.startswith("jsonl"):
        text = "\n".join(json.dumps(r) for r in frame.to_dict("records")) + "\n"
        path.write_bytes(gzip.compress(text.encode()) if fmt.endswith(".gz") else text.encode())
    else:
        frame.to_parquet(path, index=False)
    report = ingest_landing(events_dir, lake)
    assert (report.rows_read, report.rows_new, report.dropped_columns) == (3, 3, ["email"])
    # e1 and e2 fall on 2024-01-01 (e2 is 09:00 UTC); e3 (epoch 1704153600) on 2024-01-02.
    assert sorted(p.parent.name for p in lake.glob("*/*.parquet")) == [
        "event_date=2024-01-01",
        "event_date=2024-01-02",
    ]


def test_reingest_skips_known_content_and_dedupes_replays_by_event_id(tmp_path):
    events_dir, lake = _landing(tmp_path)
    (events_dir / "a.csv").write_text(CSV)
    first = ingest_landing(events_dir, lake)
    (events_dir / "b.csv").write_text(CSV)  # the same bytes under another name
    second = ingest_landing(events_dir, lake)
    (events_dir / "c.csv").write_text(CSV.replace("12.5", "13"))  # new bytes, same event ids
    third = ingest_landing(events_dir, lake)
    assert first.rows_new == 3 and first.files == 1
    assert (second.files, second.files_skipped, second.rows_new) == (0, 2, 0)
    assert sorted(second.skipped) == ["a.csv", "b.csv"]
    assert (third.files, third.rows_read, third.rows_new, third.rows_duplicate) == (1, 3, 0, 3)
    lake_rows = sum(len(pd.read_parquet(p)) for p in lake.glob("*/*.parquet"))
    assert lake_rows == 3


def test_snapshot_is_point_in_time(tmp_path):
    events_dir, lake = _landing(tmp_path)
    (events_dir / "a.csv").write_text(CSV)
    ingest_landing(events_dir, lake)
    cutoff = dt.datetime(2024, 1, 2, tzinfo=UTC)
    snapshot = load_snapshot(lake, cutoff, lookback_days=30)
    assert list(snapshot["event_id"]) == ["e2", "e1"]  # e2 is 09:00 UTC, e1 10:00 UTC
    assert (snapshot["timestamp"] < cutoff).all()
    assert list(snapshot["source_file"]) == ["a.csv", "a.csv"]
    assert load_snapshot(lake, cutoff, lookback_days=0).empty


def test_missing_column_names_file_and_column(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("user_id,item_id,timestamp\nu,i,2024-01-01\n")
    with pytest.raises(DataError, match=r"bad\.csv.*column 'event_type'"):
        read_event_file(path)


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "0 bytes"),
        (gzip.compress(CSV.encode())[:40], "cannot be read"),
    ],
)
def test_unreadable_files_raise_a_data_error_naming_the_file(tmp_path, content, message):
    name = "broken.csv.gz" if content[:2] == b"\x1f\x8b" else "broken.csv"
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as info:
        read_event_file(path)
    assert name in str(info.value)


def test_empty_landing_folder_is_an_error(tmp_path):
    events_dir, lake = _landing(tmp_path)
    with pytest.raises(DataError, match="no event files"):
        ingest_landing(events_dir, lake)


# ---- exactly once -------------------------------------------------------------------------------
NOW = dt.datetime(2024, 3, 10, tzinfo=UTC)


def _lake_rows(lake) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted(lake.glob("*/*.parquet"))])


def test_dropping_the_same_export_twice_leaves_the_lake_unchanged(tmp_path):
    from pipeline.lake.demo import write_landing
    from pipeline.lake.demo.synthetic import generate_clickstream

    events_dir, lake = _landing(tmp_path)
    data = generate_clickstream(n_users=40, n_items=30, n_days=10, start="2024-02-20", seed=3)
    (path,) = write_landing(data, tmp_path / "landing", name="ml", fmt="csv", gzip=True)[:1]
    first = ingest_landing(events_dir, lake, ingested_at=NOW)
    (events_dir / "ml_copy.csv.gz").write_bytes(path.read_bytes())  # dropped again, renamed
    second = ingest_landing(events_dir, lake, ingested_at=NOW)
    assert first.rows_new == len(data.events) == len(_lake_rows(lake))
    assert (second.rows_new, second.files_skipped, second.skipped) == (
        0,
        2,
        ["ml.csv.gz", "ml_copy.csv.gz"],
    )
    assert len(_lake_rows(lake)) == len(data.events)
    (manifest_record,) = read_manifest(lake.parent)
    assert manifest_record["file"] == "ml.csv.gz" and manifest_record["rows_new"] == first.rows_new


def test_replayed_event_with_another_timestamp_is_not_stored_twice(tmp_path):
    events_dir, lake = _landing(tmp_path)
    (events_dir / "a.csv").write_text(CSV)
    ingest_landing(events_dir, lake, ingested_at=NOW)
    replay = CSV.replace("e1,u1,i1,view,2024-01-01T10:00:00Z", "e1,u1,i1,view,2024-01-02T09:00:00Z")
    (events_dir / "b.csv").write_text(replay)
    report = ingest_landing(events_dir, lake, ingested_at=NOW)
    assert (report.rows_new, report.rows_duplicate) == (0, 3)
    lake_rows = _lake_rows(lake)
    assert lake_rows["event_id"].tolist().count("e1") == 1
    assert lake_rows.set_index("event_id").loc["e1", "timestamp"] == pd.Timestamp(
        "2024-01-01T10:00:00Z"
    )


def test_crash_between_partition_write_and_manifest_update_is_retried_exactly_once(
    tmp_path, monkeypatch
):
    import pipeline.lake.ingest as ingest_module

    events_dir, lake = _landing(tmp_path)
    (events_dir / "a.csv").write_text(CSV)
    real_append = ingest_module.append_manifest

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed after the partitions were written")

    monkeypatch.setattr(ingest_module, "append_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        ingest_landing(events_dir, lake, ingested_at=NOW)
    assert len(_lake_rows(lake)) == 3 and read_manifest(lake.parent) == []

    monkeypatch.setattr(ingest_module, "append_manifest", real_append)
    retry = ingest_landing(events_dir, lake, ingested_at=NOW)
    assert (retry.files, retry.rows_new, retry.rows_duplicate) == (1, 0, 3)
    assert len(_lake_rows(lake)) == 3
    assert [r["file"] for r in read_manifest(lake.parent)] == ["a.csv"]
    assert not list((lake.parent / "_staging").glob("*"))
    again = ingest_landing(events_dir, lake, ingested_at=NOW)
    assert again.files_skipped == 1 and len(_lake_rows(lake)) == 3


def test_late_events_inside_the_window_land_in_their_partition_later_ones_are_quarantined(tmp_path):
    events_dir, lake = _landing(tmp_path)
    (events_dir / "a.csv").write_text(
        "event_id,user_id,item_id,event_type,timestamp\ne1,u1,i1,view,2024-03-05T10:00:00Z\n"
    )  # the watermark
    ingest_landing(events_dir, lake, ingested_at=NOW)
    (events_dir / "b.csv").write_text(
        "event_id,user_id,item_id,event_type,timestamp\n"
        "e2,u1,i2,view,2024-03-03T10:00:00Z\n"  # 2 days late: within 3 days
        "e3,u1,i3,view,2024-02-20T10:00:00Z\n"
    )  # too late
    report = ingest_landing(
        events_dir, lake, ingested_at=NOW, allowed_lateness=dt.timedelta(days=3)
    )
    assert (report.rows_new, report.rows_late) == (1, 1)
    assert report.watermark == "2024-03-05T10:00:00+00:00"
    assert (lake / "event_date=2024-03-03").is_dir()
    assert not (lake / "event_date=2024-02-20").exists()
    late = pd.read_parquet(report.quarantine_files[0])
    assert late["event_id"].tolist() == ["e3"] and late["reason"].iloc[0].startswith("late:")


def test_column_mapping_points_at_a_site_layout(tmp_path):
    from pipeline.lake.mapping import load_column_mapping

    events_dir, lake = _landing(tmp_path)
    (events_dir / "site.tsv").write_text(
        "UID\tts\tkind\tproduct\tEmail\nu1\t1709287200000\tview\tp1\ta@b.c\n"
    )
    (events_dir / "legacy.csv").write_text("usr,ts,kind,product\nu2,1709287200,click,p2\n")
    config = tmp_path / "landing" / "column_mapping.json"
    config.write_text(
        json.dumps(
            {
                "columns": {
                    "uid": "user_id",
                    "ts": "timestamp",
                    "kind": "event_type",
                    "product": "item_id",
                },
                "files": {"legacy*": {"usr": "user_id"}},
            }
        )
    )
    mapping = load_column_mapping(config, override='{"KIND": "event_type"}')
    report = ingest_landing(events_dir, lake, ingested_at=NOW, column_mapping=mapping)
    rows = _lake_rows(lake).sort_values("user_id")
    assert report.rows_new == 2 and report.pii_columns == ["email"]
    assert rows["item_id"].tolist() == ["p1", "p2"]
    assert (rows["timestamp"] == pd.Timestamp("2024-03-01T10:00:00Z")).all()


def test_mapping_onto_a_non_contract_column_is_refused(tmp_path):
    from pipeline.lake.mapping import load_column_mapping

    with pytest.raises(DataError, match="not a contract column"):
        load_column_mapping(None, override='{"uid": "userid"}')


def test_snapshot_file_matches_the_in_memory_snapshot_and_keeps_dtypes(tmp_path):
    from pipeline.lake.snapshot import write_snapshot
    from pipeline.lake.storage import lake_watermark

    events_dir, lake = _landing(tmp_path)
    (events_dir / "a.csv").write_text(CSV)
    ingest_landing(events_dir, lake, ingested_at=NOW)
    cutoff = dt.datetime(2024, 1, 3, tzinfo=UTC)
    snapshot = write_snapshot(lake, cutoff, 30, tmp_path / "snap.parquet")
    written = pd.read_parquet(tmp_path / "snap.parquet")
    assert snapshot.rows == 3 and snapshot.newest == written["timestamp"].max()
    assert snapshot.start == cutoff - dt.timedelta(days=30)
    assert lake_watermark(lake) >= snapshot.newest
    assert lake_watermark(tmp_path / "no-lake") is None
    pd.testing.assert_frame_equal(written, load_snapshot(lake, cutoff, 30))
    assert list(written.columns) == [
        "event_id",
        "user_id",
        "item_id",
        "event_type",
        "timestamp",
        "value",
        "device",
        "session_id",
        "position",
        "placement",
        "source_file",
        "source_row",
    ]
    assert str(written["timestamp"].dtype) == "datetime64[us, UTC]"
    assert str(written["user_id"].dtype) == "string" and str(written["source_row"].dtype) == "int64"


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_chunked_reading_keeps_every_row_and_its_source_row(tmp_path, fmt):
    from pipeline.lake.readers import iter_raw_chunks

    frame = pd.DataFrame(
        {
            "event_id": [f"e{i}" for i in range(4)],
            "user_id": ["u"] * 4,
            "item_id": ["i"] * 4,
            "event_type": ["view"] * 4,
            "timestamp": ["2024-01-01T00:00:00Z"] * 4,
        }
    )
    path = tmp_path / f"events.{fmt}"
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path, index=False)
    chunks = list(iter_raw_chunks(path, {}, chunk_rows=2))  # CSV chunks follow Arrow blocks
    assert [len(c.frame) for c in chunks] == ([4] if fmt == "csv" else [2, 2])
    assert [r for c in chunks for r in c.rows] == [1, 2, 3, 4]
    assert [e for c in chunks for e in c.frame["event_id"]] == ["e0", "e1", "e2", "e3"]


def test_lake_index_hashes_each_part_once_and_follows_rewritten_and_removed_parts(
    tmp_path, monkeypatch, caplog
):
    import numpy as np
    import pyarrow.parquet as pq

    from pipeline.lake import event_ids
    from pipeline.lake.demo import write_landing
    from pipeline.lake.demo.synthetic import generate_clickstream
    from pipeline.lake.storage import lake_part_files

    events_dir, lake = _landing(tmp_path)
    data = generate_clickstream(n_users=40, n_items=30, n_days=10, start="2024-02-20", seed=3)
    write_landing(data, tmp_path / "landing", name="ml", fmt="csv")
    ingest_landing(events_dir, lake, ingested_at=NOW)
    parts = lake_part_files(lake)
    assert len(parts) > 3 and all(event_ids._hash_cache_path(lake, p).exists() for p in parts)

    real_hash = event_ids.hash_event_ids

    def ids_found(index, ids):
        return index.contains(*real_hash(pa.array(ids, type=pa.string())))

    all_ids = _lake_rows(lake)["event_id"].tolist()
    calls = []
    monkeypatch.setattr(
        event_ids, "hash_event_ids", lambda ids: calls.append(len(ids)) or real_hash(ids)
    )
    index, _ = event_ids.load_lake_index(lake)  # every part cached at commit: nothing re-hashed
    assert calls == [] and len(index) == len(all_ids)
    assert ids_found(index, all_ids + ["never-seen"]).tolist() == [True] * len(all_ids) + [False]

    rewritten, removed, torn = parts[0], parts[1], parts[2]
    table = pq.read_table(rewritten)
    kept = table.slice(0, table.num_rows // 2)
    pq.write_table(kept, rewritten)  # same name, other content: its cache is stale
    dropped = set(table.column("event_id").to_pylist()) - set(kept.column("event_id").to_pylist())
    gone = pq.read_table(removed).column("event_id").to_pylist()
    removed.unlink()
    event_ids._hash_cache_path(lake, torn).write_bytes(b"not a numpy archive")
    index, _ = event_ids.load_lake_index(lake)
    # the rewritten part: its ids and its content keys (every row has an own id); the torn
    # id cache: its ids only
    assert sorted(calls) == sorted([kept.num_rows, kept.num_rows, pq.read_table(torn).num_rows])
    assert not ids_found(index, sorted(dropped) + gone).any()
    assert ids_found(index, kept.column("event_id").to_pylist()).all()
    assert not event_ids._hash_cache_path(lake, removed).exists()  # pruned with its part
    assert "unreadable" in caplog.text
    calls.clear()
    event_ids.load_lake_index(lake)  # all rebuilt caches are used now
    assert calls == []
    with np.load(event_ids._hash_cache_path(lake, torn)) as rebuilt:
        assert len(rebuilt["h1"]) == pq.read_table(torn).num_rows
    shutil.rmtree(lake / event_ids._HASH_CACHE)  # the README: delete the folder freely
    index, _ = event_ids.load_lake_index(lake)
    assert len(calls) == len(lake_part_files(lake)) and len(index) == len(_lake_rows(lake))
    assert all(event_ids._hash_cache_path(lake, p).exists() for p in lake_part_files(lake))


def test_ids_no_database_could_store_are_quarantined_with_a_reason():
    raw = pd.DataFrame(
        {
            "user_id": ["u1", "u\x002", "u3", "u" * 600, "u5"],
            "item_id": ["i1", "i1", "i\t3", "i1", "i" * 512],
            "event_type": ["view"] * 5,
            "timestamp": ["2024-01-01T00:00:00Z"] * 5,
        }
    )
    events, rejected, _, _ = normalise_events(raw, source="f.csv")
    assert list(events["user_id"]) == ["u1", "u5"]  # 512 characters is still an id
    assert list(rejected["reason"]) == [
        "user_id contains a control character",
        "item_id contains a control character",
        "user_id longer than 512 characters",
    ]


def test_numeric_id_columns_print_whole_numbers_as_integers():
    from pipeline.lake.normalise import _canonical_ids

    floats, _ = _canonical_ids(pd.Series([7.0, 0.0, 2.5, float("nan"), -3.0]))
    assert floats.tolist()[:3] == ["7", "0", "2.5"] and pd.isna(floats[3])
    assert floats[4] == "-3"
    ints, _ = _canonical_ids(pd.Series([196, 2**62], dtype="int64"))
    assert ints.tolist() == ["196", str(2**62)]  # exact, no float round trip
    mixed, structured = _canonical_ids(pd.Series([196, 196.0, {"id": 9}, None], dtype=object))
    assert mixed.tolist()[:2] == ["196", "196"] and structured.tolist() == [0, 0, 1, 0]
