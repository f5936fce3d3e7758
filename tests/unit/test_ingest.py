"""Ingest: formats, normalisation, dedupe, partitions, point-in-time snapshot, clear errors."""

from __future__ import annotations

import datetime as dt
import gzip
import json

import pandas as pd
import pytest

from pipeline.errors import DataError
from pipeline.ingest import (
    derive_event_ids,
    ingest_landing,
    load_snapshot,
    normalise_events,
    parse_timestamps,
    read_event_file,
)

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
    values = pd.Series(["2024-01-01T12:00:00+02:00", "1704110400", "1704110400000", "garbage",
                        None])
    parsed = parse_timestamps(values)
    expected = pd.Timestamp("2024-01-01T10:00:00Z")
    assert parsed.iloc[0] == expected
    assert parsed.iloc[1] == pd.Timestamp("2024-01-01T12:00:00Z")
    assert parsed.iloc[2] == pd.Timestamp("2024-01-01T12:00:00Z")
    assert parsed.iloc[3:].isna().all()


def test_normalise_drops_pii_and_no_consent_and_rejects_unreadable_rows():
    raw = pd.DataFrame({
        "user_id": ["u1", "u2", "", "u4"], "item_id": ["i1", "i1", "i1", "i1"],
        "event_type": ["view", "view", "view", "view"],
        "timestamp": ["2024-01-01T00:00:00Z", "2024-01-01T00:00:00Z", "2024-01-01T00:00:00Z",
                      "not a time"],
        "consent": ["true", "false", "true", "true"], "ip": ["1.2.3.4"] * 4})
    events, rejected, no_consent, dropped = normalise_events(raw, source="f.csv")
    assert list(events["user_id"]) == ["u1"]
    assert no_consent == 1
    assert dropped == ["ip"] and "ip" not in events.columns
    assert sorted(rejected["reason"]) == ["timestamp unreadable", "user_id missing"]
    assert list(rejected["source_row"]) == [3, 4]
    assert events["event_id"].iloc[0].startswith("h")  # derived when absent


def test_derived_event_ids_are_deterministic_and_distinct():
    frame = pd.DataFrame({"user_id": ["u", "u"], "item_id": ["a", "b"],
                          "event_type": ["view", "view"],
                          "timestamp": pd.to_datetime(["2024-01-01", "2024-01-01"], utc=True),
                          "value": [1.0, 1.0], "session_id": [None, None]})
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
        "event_date=2024-01-01", "event_date=2024-01-02"]


def test_reingest_is_idempotent_and_dedupes_by_event_id(tmp_path):
    events_dir, lake = _landing(tmp_path)
    (events_dir / "a.csv").write_text(CSV)
    first = ingest_landing(events_dir, lake)
    (events_dir / "b.csv").write_text(CSV)  # the same events again, in a second file
    second = ingest_landing(events_dir, lake)
    assert first.rows_new == 3
    assert second.rows_new == 0 and second.rows_duplicate == 6
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


@pytest.mark.parametrize("content,message", [
    (b"", "0 bytes"),
    (gzip.compress(CSV.encode())[:40], "cannot be read"),
    (b"user_id,item_id,event_type,timestamp\nu,\xff\xfe,view,2024-01-01\n", "cannot be read"),
])
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
