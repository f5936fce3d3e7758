"""Ids encoded once: IdMap codes, the encoded events file and its known answers."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from pipeline.core.ids import EVENTS_FILE, EncodedEvents, IdMap, encode_events_file

WEIGHTS = {"view": 1.0, "purchase": 10.0, "rating": 1.0}


def _events() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "event_id": ["e1", "e2", "e3", "e4"],
            "user_id": pd.array(["u2", "u1", "u2", "u3"], dtype="string"),
            "item_id": pd.array(["b", "a", "a", "b"], dtype="string"),
            "event_type": pd.array(["view", "rating", "purchase", "share"], dtype="string"),
            "timestamp": pd.to_datetime(
                ["2024-01-01", "2024-01-02", "2024-01-03", "2024-01-04"], utc=True
            ).as_unit("us"),
            "value": [np.nan, 4.0, 20.0, np.nan],
            "device": pd.array(["mobile", None, "watch", "tv"], dtype="string"),
            "session_id": pd.array(["s2", None, "s1", "s2"], dtype="string"),
        }
    )


def test_idmap_codes_are_sorted_positions_and_extend_only_appends():
    ids = IdMap.from_values(["u3", "u1", "u3", "u2"])
    assert list(ids.ids) == ["u1", "u2", "u3"]
    assert ids.encode(["u2", "nope", "u1"]).tolist() == [1, -1, 0]
    assert ids.encode(["u2"]).dtype == np.int32
    assert list(ids.decode([2, 0])) == ["u3", "u1"]
    grown = ids.extend(["u0", "u2", "u9"])
    assert list(grown.ids) == ["u1", "u2", "u3", "u0", "u9"]  # old codes kept, new appended
    assert ids.extend(["u1"]) is ids
    assert len(IdMap().encode(["x"])) == 1 and IdMap().encode(["x"])[0] == -1


def test_idmap_rejects_duplicate_ids_on_use():
    with pytest.raises(ValueError, match="distinct"):
        IdMap(["a", "a"]).encode(["a"])


def test_rekey_drops_rows_the_map_does_not_hold():
    side = pd.DataFrame({"item_id": ["b", "zz", "a"], "title": ["B", "Z", "A"]})
    coded = IdMap(["a", "b"]).rekey(side, "item_id")
    assert coded.to_dict("list") == {"item_id": [1, 0], "title": ["B", "A"]}


def test_encoded_columns_have_the_documented_types_and_known_values():
    encoded = EncodedEvents.from_frame(_events(), WEIGHTS)
    frame = encoded.frame
    assert str(frame["user_id"].dtype) == "int32" and str(frame["item_id"].dtype) == "int32"
    assert frame["event_type"].cat.codes.dtype == np.int8
    assert str(frame["weight"].dtype) == "float32"
    assert str(frame["timestamp"].dtype) == "datetime64[us, UTC]"
    assert frame["user_id"].tolist() == [1, 0, 1, 2] and frame["item_id"].tolist() == [1, 0, 0, 1]
    # rating scales by value; a type without a weight weighs 0
    assert frame["weight"].tolist() == [1.0, 4.0, 10.0, 0.0]
    # unknown devices read as "other", missing stays missing
    assert frame["device"].astype(object).tolist()[::2] == ["mobile", "other"]
    assert pd.isna(frame["device"].iloc[1])
    assert frame["session_id"].tolist()[0] == 1 and pd.isna(frame["session_id"].iloc[1])
    assert encoded.shape == (3, 2)
    back = encoded.decoded()
    assert back["user_id"].tolist() == ["u2", "u1", "u2", "u3"]
    assert back["event_type"].tolist() == ["view", "rating", "purchase", "share"]


def test_before_is_a_timestamp_mask_on_the_same_id_maps():
    encoded = EncodedEvents.from_frame(_events(), WEIGHTS)
    early = encoded.before(dt.datetime(2024, 1, 3, tzinfo=dt.timezone.utc))
    assert len(early) == 2 and early.users is encoded.users and early.shape == encoded.shape


def test_file_encoding_matches_frame_encoding_and_round_trips(tmp_path):
    events = _events()
    events.to_parquet(tmp_path / "events.parquet")
    written = encode_events_file(tmp_path / "events.parquet", tmp_path, WEIGHTS)
    expected = EncodedEvents.from_frame(events, WEIGHTS)
    pd.testing.assert_frame_equal(written.frame, expected.frame)
    assert written.users == expected.users and written.items == expected.items
    read = EncodedEvents.read(tmp_path)
    pd.testing.assert_frame_equal(read.frame, expected.frame)
    assert read.users == expected.users and read.items == expected.items
    assert (tmp_path / EVENTS_FILE).exists()
    only = EncodedEvents.read(tmp_path, ("user_id", "item_id"))
    assert list(only.frame.columns) == ["user_id", "item_id"]


@pytest.mark.parametrize("drop", [[], ["value", "device", "session_id"]])
def test_file_encoding_streams_columns_of_many_row_groups_and_optional_columns(tmp_path, drop):
    """Each column is read and encoded on its own across row groups; files without the
    optional columns, and zone-less timestamps (read as UTC), encode as a frame does."""
    events = _events().drop(columns=drop)
    naive = events.assign(timestamp=events["timestamp"].dt.tz_localize(None))
    naive.to_parquet(tmp_path / "events.parquet", row_group_size=1)
    written = encode_events_file(tmp_path / "events.parquet", tmp_path, WEIGHTS)
    pd.testing.assert_frame_equal(written.frame, EncodedEvents.from_frame(events, WEIGHTS).frame)


def test_file_encoding_rejects_events_without_ids(tmp_path):
    events = _events()
    events.loc[2, "item_id"] = None
    events.to_parquet(tmp_path / "events.parquet")
    with pytest.raises(ValueError, match="1 validated events have no item_id"):
        encode_events_file(tmp_path / "events.parquet", tmp_path, WEIGHTS)
