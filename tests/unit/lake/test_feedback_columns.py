"""The CMS feedback contract in the lake: ``impression`` events, ``position`` and ``placement``
normalised (or quarantined with a reason naming the column), stored, read back (older part
files without the columns read as nulls), and event ids derived as before for rows without
them."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.config import DEFAULT_EVENT_WEIGHTS, REPO_ROOT
from pipeline.core.schema import EVENT_COLUMNS, LAKE_EVENT_COLUMNS
from pipeline.lake.ingest import ingest_landing
from pipeline.lake.normalise import (
    POSITION_REASON,
    derive_event_ids,
    normalise_events,
    parse_positions,
)
from pipeline.lake.snapshot import load_snapshot, write_snapshot
from pipeline.lake.storage import LAKE_SCHEMA, lake_part_files
from pipeline.lake.validate import validate_events_file

UTC = dt.timezone.utc
NOW = dt.datetime(2024, 1, 10, tzinfo=UTC)
CUTOFF = dt.datetime(2024, 1, 9, tzinfo=UTC)
SUITE = REPO_ROOT / "expectations" / "events.json"
ALLOWED = sorted(DEFAULT_EVENT_WEIGHTS)


def _raw(**columns) -> pd.DataFrame:
    """Raw landing columns (text, as CSV gives them) for len(first column) rows."""
    n = len(next(iter(columns.values())))
    base = {
        "user_id": [f"u{k}" for k in range(n)],
        "item_id": ["i1"] * n,
        "event_type": ["impression"] * n,
        "timestamp": ["2024-01-02T10:00:00Z"] * n,
    }
    return pd.DataFrame({**base, **columns})


def _reasons(rejected: pd.DataFrame) -> dict[int, str]:
    return dict(zip(rejected["source_row"].astype(int), rejected["reason"], strict=True))


# ---- normalisation ---------------------------------------------------------------------------


def test_impression_is_a_known_type_weighted_zero_by_default():
    assert DEFAULT_EVENT_WEIGHTS["impression"] == 0.0
    suite = json.loads(SUITE.read_text())
    in_set = next(
        e
        for e in suite["expectations"]
        if e["type"] == "expect_column_values_to_be_in_set"
        and e["kwargs"]["column"] == "event_type"
    )
    assert sorted(in_set["kwargs"]["value_set"]) == ALLOWED


def test_good_positions_and_placements_are_normalised():
    raw = _raw(
        position=["1", " 2 ", "3.0", "+4", "", None, "null", "12"],
        placement=["home_recs", "  article_end ", "", None, "x", "Home Recs", "nan", "a"],
    )
    events, rejected, _, dropped = normalise_events(raw, source="f.csv")
    assert rejected.empty and dropped == []
    assert str(events["position"].dtype) == "Int64"
    assert str(events["placement"].dtype) == "string"
    assert events["position"].tolist() == [1, 2, 3, 4, pd.NA, pd.NA, pd.NA, 12]
    assert events["placement"].tolist() == [
        "home_recs",
        "article_end",
        pd.NA,
        pd.NA,
        "x",
        "Home Recs",
        pd.NA,
        "a",
    ]  # text kept as written


def test_files_without_the_feedback_columns_get_nulls():
    raw = _raw(position=["1"]).drop(columns=["position"])
    events, rejected, _, _ = normalise_events(raw, source="f.csv")
    assert rejected.empty and list(events.columns[: len(LAKE_EVENT_COLUMNS)]) == list(
        LAKE_EVENT_COLUMNS
    )
    assert events["position"].isna().all() and events["placement"].isna().all()
    assert str(events["position"].dtype) == "Int64"


@pytest.mark.parametrize(
    "bad", ["0", "-1", "1.5", "abc", "true", "3 rows", "inf", "1e40", "2147483648", "\ufffd"]
)
def test_a_position_that_is_not_an_integer_from_1_quarantines_the_row(bad):
    raw = _raw(position=["2", bad])
    events, rejected, _, _ = normalise_events(raw, source="f.csv")
    assert events["position"].tolist() == [2]
    assert _reasons(rejected) == {2: POSITION_REASON}
    assert "position" in POSITION_REASON and ">= 1" in POSITION_REASON


@pytest.mark.parametrize(
    ("values", "expected", "bad"),
    [
        (pd.Series([1, 7, 0, -3], dtype="int64"), [1, 7, None, None], [False, False, True, True]),
        (pd.Series([1.0, np.nan, 2.5, 4.0]), [1, None, None, 4], [False, False, True, False]),
        (pd.Series([1, None, 3], dtype="Int64"), [1, None, 3], [False, False, False]),
        (pd.Series([True, False]), [None, None], [True, True]),
        (
            pd.Series([3, "4", None, {"a": 1}], dtype=object),
            [3, 4, None, None],
            [False, False, False, True],
        ),
    ],
)
def test_positions_from_typed_columns(values, expected, bad):
    positions, is_bad = parse_positions(values)
    assert str(positions.dtype) == "Int64"
    assert [None if pd.isna(v) else int(v) for v in positions] == expected
    assert is_bad.tolist() == bad


@pytest.mark.parametrize(
    ("placement", "reason"),
    [
        ("home\x00recs", "placement contains a control character"),
        ("home\trecs", "placement contains a control character"),
        ("p" * 513, "placement longer than 512 characters"),
        ('{"slot": "home"}', "placement is a JSON object or array, not text"),
    ],
)
def test_a_bad_placement_quarantines_the_row_like_an_id(placement, reason):
    raw = _raw(placement=["home_recs", placement])
    events, rejected, _, _ = normalise_events(raw, source="f.csv")
    assert events["placement"].tolist() == ["home_recs"]
    assert _reasons(rejected) == {2: reason}


def test_placement_of_512_characters_is_kept():
    events, rejected, _, _ = normalise_events(_raw(placement=["p" * 512]), source="f.csv")
    assert rejected.empty and events["placement"].str.len().tolist() == [512]


def test_invalid_utf8_in_placement_quarantines_the_row():
    raw = _raw(placement=["home_recs", "home\ufffd"])
    _, rejected, _, _ = normalise_events(raw, source="f.csv", check_replacement=True)
    assert _reasons(rejected) == {2: "invalid UTF-8 in placement"}


# ---- event ids -------------------------------------------------------------------------------


def test_derived_event_ids_of_rows_without_position_or_placement_are_unchanged():
    """Known answers computed by the derivation as it was before the feedback columns."""
    raw = pd.DataFrame(
        {
            "user_id": ["u1", "u2"],
            "item_id": ["i1", "i9"],
            "event_type": ["Click", "view"],
            "timestamp": ["2024-01-01T10:00:00Z", "1704103200"],
            "value": ["2.5", ""],
            "device": ["mobile", None],
            "session_id": ["s1", None],
        }
    )
    expected = ["h4cc15beb5a5b85fceb54", "hedb42c9a645510596ef5"]
    events, _, _, _ = normalise_events(raw, source="x.csv")
    assert events["event_id"].tolist() == expected
    # the same rows with empty feedback columns: still the same ids
    empty = raw.assign(position=["", None], placement=[None, "  "])
    assert normalise_events(empty, source="y.csv")[0]["event_id"].tolist() == expected
    # and derive_event_ids on a frame of the event columns alone (no feedback columns)
    assert derive_event_ids(events[list(EVENT_COLUMNS)]).tolist() == expected


def test_impressions_at_other_positions_or_placements_are_other_events():
    raw = _raw(
        user_id=["u1"] * 5,
        position=["1", "2", "1", "1", None],
        placement=["home_recs", "home_recs", "article_end", "home_recs", "home_recs"],
    )
    ids = normalise_events(raw, source="f.csv")[0]["event_id"].tolist()
    assert len(set(ids)) == 4  # rows 1 and 4 are the same event (deduplicated in the lake)
    assert ids[0] == ids[3] and len({ids[0], ids[1], ids[2], ids[4]}) == 4
    without = normalise_events(raw.drop(columns=["position", "placement"]), source="f.csv")[0]
    assert ids[4] != without["event_id"].iloc[4]  # a placement alone takes part too
    # same click without a position: the id it always had
    assert (
        normalise_events(_raw(user_id=["u1"]), source="g.csv")[0]["event_id"].iloc[0]
        == without["event_id"].iloc[0]
    )


# ---- the lake --------------------------------------------------------------------------------

HEADER = "user_id,item_id,event_type,timestamp,position,placement,device\n"


def _landing(tmp_path):
    landing = tmp_path / "landing" / "events"
    landing.mkdir(parents=True)
    return landing, tmp_path / "lake" / "events"


def _ingest(landing, lake, **kwargs):
    return ingest_landing(
        landing,
        lake,
        ingested_at=NOW,
        settle_seconds=0.0,
        suite_path=SUITE,
        allowed_event_types=ALLOWED,
        **kwargs,
    )


def test_impressions_with_position_and_placement_round_trip_in_every_format(tmp_path):
    landing, lake = _landing(tmp_path)
    (landing / "a.csv").write_text(
        HEADER
        + "u1,i1,impression,2024-01-02T10:00:00Z,1,home_recs,mobile\n"
        + "u1,i2,impression,2024-01-02T10:00:00Z,2,home_recs,mobile\n"
        + "u1,i1,click,2024-01-02T10:00:05Z,1,home_recs,mobile\n"
        + "u2,i3,view,2024-01-02T11:00:00Z,,,desktop\n"
    )
    (landing / "b.jsonl").write_text(
        json.dumps(
            {
                "event_id": "j1",
                "user_id": 7,
                "item_id": "i1",
                "event_type": "IMPRESSION",
                "timestamp": 1704189600,
                "position": 3.0,
                "placement": "article_end",
            }
        )
        + "\n"
        + json.dumps(
            {
                "event_id": "j2",
                "user_id": 7,
                "item_id": "i1",
                "event_type": "purchase",
                "timestamp": 1704189700,
                "value": 9.5,
            }
        )
        + "\n"
    )
    pq.write_table(
        pa.table(
            {
                "event_id": ["p1", "p2"],
                "user_id": ["u3", "u3"],
                "item_id": ["i4", "i5"],
                "event_type": ["impression", "add_to_cart"],
                "timestamp": pa.array(
                    [dt.datetime(2024, 1, 3, 9, tzinfo=UTC)] * 2, pa.timestamp("us", "UTC")
                ),
                "position": pa.array([5, None], pa.int64()),
                "placement": ["home_recs", None],
            }
        ),
        landing / "c.parquet",
    )
    report = _ingest(landing, lake)
    assert report.rows_new == 8 and report.rows_rejected == 0
    snap = load_snapshot(lake, CUTOFF, 30)
    assert str(snap["position"].dtype) == "Int64" and str(snap["placement"].dtype) == "string"
    got = {
        (r.user_id, r.item_id, r.event_type): (
            None if pd.isna(r.position) else r.position,
            None if pd.isna(r.placement) else r.placement,
        )
        for r in snap.itertuples()
    }
    assert got == {
        ("u1", "i1", "impression"): (1, "home_recs"),
        ("u1", "i2", "impression"): (2, "home_recs"),
        ("u1", "i1", "click"): (1, "home_recs"),
        ("u2", "i3", "view"): (None, None),
        ("7", "i1", "impression"): (3, "article_end"),
        ("7", "i1", "purchase"): (None, None),
        ("u3", "i4", "impression"): (5, "home_recs"),
        ("u3", "i5", "add_to_cart"): (None, None),
    }
    written = write_snapshot(lake, CUTOFF, 30, tmp_path / "snap.parquet")
    assert written.rows == 8
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "snap.parquet"), snap)
    for part in lake_part_files(lake):
        assert pq.read_schema(part).names[: len(LAKE_EVENT_COLUMNS)] == list(LAKE_EVENT_COLUMNS)


def test_bad_positions_are_quarantined_at_ingest_with_the_reason(tmp_path):
    landing, lake = _landing(tmp_path)
    good = "".join(
        f"u{k},i{k % 4},impression,2024-01-02T10:00:{k:02d}Z,{k % 10 + 1},home_recs,mobile\n"
        for k in range(40)
    )
    (landing / "a.csv").write_text(
        HEADER
        + good
        + "u1,i1,impression,2024-01-02T11:00:00Z,0,home_recs,mobile\n"
        + "u1,i1,impression,2024-01-02T11:00:00Z,1.5,home_recs,tv\n"
    )
    report = _ingest(landing, lake, max_bad_row_share=0.1)
    assert report.rows_new == 40 and report.rows_rejected == 2
    assert report.rejected_reasons == {POSITION_REASON: 2}
    quarantine = pd.read_parquet(next((tmp_path / "lake" / "quarantine").glob("a.csv.*")))
    assert quarantine["source_row"].tolist() == [41, 42]
    assert set(quarantine["reason"]) == {POSITION_REASON}


def test_many_bad_positions_fail_the_file_naming_the_column(tmp_path):
    landing, lake = _landing(tmp_path)
    rows = "".join(
        f"u{k},i1,impression,2024-01-02T10:00:{k:02d}Z,first,home_recs,mobile\n" for k in range(10)
    )
    (landing / "a.csv").write_text(HEADER + rows)
    with pytest.raises(Exception, match="position is not an integer >= 1"):
        _ingest(landing, lake)


def test_a_column_mapping_can_name_the_feedback_columns(tmp_path):
    from pipeline.lake.mapping import ColumnMapping

    landing, lake = _landing(tmp_path)
    (landing / "a.csv").write_text(
        "uid,item_id,kind,ts,rank,slot\nu1,i1,impression,2024-01-02T10:00:00Z,4,home_recs\n"
    )
    mapping = ColumnMapping(
        {
            "uid": "user_id",
            "kind": "event_type",
            "ts": "timestamp",
            "rank": "position",
            "slot": "placement",
        }
    )
    _ingest(landing, lake, column_mapping=mapping)
    snap = load_snapshot(lake, CUTOFF, 30)
    assert snap[["position", "placement"]].astype(object).values.tolist() == [[4, "home_recs"]]


def _old_part(lake, day: str, events: pd.DataFrame) -> None:
    """A lake part file as written before the feedback columns existed."""
    schema = pa.schema([f for f in LAKE_SCHEMA if f.name not in ("position", "placement")])
    frame = events.assign(
        source_file="old.csv",
        source_row=np.arange(1, len(events) + 1),
        ingested_at=pd.Timestamp(NOW).as_unit("us"),
    )
    table = pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)
    path = lake / f"event_date={day}" / "part-0123456789abcdef.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(table, path)


def test_old_part_files_without_the_feedback_columns_still_read(tmp_path):
    landing, lake = _landing(tmp_path)
    old = pd.DataFrame(
        {
            "event_id": ["o1", "o2"],
            "user_id": ["u1", "u2"],
            "item_id": ["i1", "i2"],
            "event_type": ["view", "click"],
            "timestamp": pd.to_datetime(
                ["2024-01-02T08:00:00Z", "2024-01-02T09:00:00Z"], utc=True
            ).as_unit("us"),
            "value": [1.0, np.nan],
            "device": ["mobile", None],
            "session_id": [None, "s"],
        }
    ).astype(
        {
            "event_id": "string",
            "user_id": "string",
            "item_id": "string",
            "event_type": "string",
            "device": "string",
            "session_id": "string",
        }
    )
    _old_part(lake, "2024-01-02", old)
    (landing / "new.csv").write_text(
        "event_id,"
        + HEADER
        + "o1,u1,i1,view,2024-01-02T08:00:00Z,,,mobile\n"  # already in the lake
        + "n1,u1,i1,impression,2024-01-02T10:00:00Z,2,home_recs,mobile\n"
    )
    report = _ingest(landing, lake)
    assert report.rows_new == 1 and report.rows_duplicate == 1
    snap = load_snapshot(lake, CUTOFF, 30)
    assert snap["event_id"].tolist() == ["o1", "o2", "n1"]
    assert snap["position"].tolist() == [pd.NA, pd.NA, 2]
    assert snap["placement"].tolist() == [pd.NA, pd.NA, "home_recs"]
    write_snapshot(lake, CUTOFF, 30, tmp_path / "snap.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "snap.parquet"), snap)

    # the run's validate reads the mixed snapshot (rows of the old part are checked again)
    clean = tmp_path / "run" / "events.parquet"
    report = validate_events_file(
        tmp_path / "snap.parquet",
        clean_path=clean,
        suite_path=SUITE,
        cutoff=CUTOFF,
        allowed_event_types=ALLOWED,
        quarantine_path=tmp_path / "run" / "quarantine.parquet",
        data_docs_dir=tmp_path / "run" / "data_docs",
        validated_sources=["new.csv"],
    )
    assert report.passed and report.rows == 3 and report.bad_rows == 0
    assert report.data_docs_path is not None and report.data_docs_path.exists()
    pd.testing.assert_frame_equal(pd.read_parquet(clean), snap)
