"""MovieLens-100k loader: pure parsers on tiny samples, and the wheel handling without network."""

from __future__ import annotations

import gzip
import io
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.core.errors import DataError
from pipeline.core.schema import EVENT_COLUMNS, EVENT_DTYPES, ITEM_COLUMNS
from pipeline.lake.demo import AGE_BANDS, USER_COLUMNS, DemoData
from pipeline.lake.demo import movielens as ml

INTER = (
    "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    "196\t242\t3\t881250949\n"
    "22\t377\t1\t878887116\n"
    "196\t1\t5\t881250949\n"
)
ITEMS = (
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
    "1\tToy Story\t1995\tAnimation Children's Comedy\n"
    "242\tKolya\t1996\tComedy\n"
    "267\tunknown\t\t\n"
    "377\tHeavy, Metal\t1998\tAction Sci-Fi\n"
)
USERS = (
    "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
    "22\t17\tM\twriter\t40206\n"
    "196\t49\tF\tother\tT8H1N\n"
    "7\t56\t\tretired\t\n"
)


# ---- parsers -------------------------------------------------------------------------------
def test_parse_interactions_known_answer() -> None:
    events = ml.parse_interactions(INTER)

    assert list(events.columns) == list(EVENT_COLUMNS)
    assert events.dtypes.astype(str).to_dict() == EVENT_DTYPES
    # sorted by timestamp, then user, then item
    assert events["event_id"].tolist() == [
        "ml100k-22-377-878887116",
        "ml100k-196-1-881250949",
        "ml100k-196-242-881250949",
    ]
    assert events["value"].tolist() == [1.0, 5.0, 3.0]
    assert set(events["event_type"]) == {"rating"}
    assert events["timestamp"].iloc[0] == pd.Timestamp(878887116, unit="s", tz="UTC")
    assert events["device"].isna().all() and events["session_id"].isna().all()


def test_parse_interactions_accepts_bytes_and_buffers() -> None:
    from_text = ml.parse_interactions(INTER)
    from_bytes = ml.parse_interactions(INTER.encode())
    from_buffer = ml.parse_interactions(io.BytesIO(INTER.encode()))
    pd.testing.assert_frame_equal(from_text, from_bytes)
    pd.testing.assert_frame_equal(from_text, from_buffer)


def test_parse_interactions_names_the_bad_row() -> None:
    bad = INTER + "5\t6\tfive\t881250950\n"
    with pytest.raises(DataError, match=r"row 5, column 'rating'"):
        ml.parse_interactions(bad)


def test_parse_items_known_answer() -> None:
    items = ml.parse_items(ITEMS).set_index("item_id")

    assert list(items.reset_index().columns) == list(ITEM_COLUMNS)
    assert items.loc["1", "category"] == "Animation"
    assert items.loc["377", "category"] == "Action"
    assert items.loc["267", "category"] == "unknown"
    assert items.loc["1", "published_at"] == pd.Timestamp("1995-01-01", tz="UTC")
    assert pd.isna(items.loc["267", "published_at"])
    assert items.loc["377", "title"] == "Heavy, Metal"
    assert items["available"].dtype == bool and items["available"].all()
    assert items["price"].isna().all()
    assert str(items["published_at"].dtype) == "datetime64[us, UTC]"


def test_parse_items_latin1_bytes() -> None:
    raw = ITEMS.replace("Kolya", "Kolj\u00e1").encode("latin-1")  # not valid UTF-8
    items = ml.parse_items(raw).set_index("item_id")
    assert items.loc["242", "title"] == "Kolj\u00e1"


def test_parse_users_known_answer() -> None:
    users = ml.parse_users(USERS).set_index("user_id")

    assert list(users.reset_index().columns) == list(USER_COLUMNS)
    assert users.loc["22"].tolist() == ["<18", "M", "writer", "4"]
    assert users.loc["196"].tolist() == ["45-49", "F", "other", "unknown"]
    assert users.loc["7"].tolist() == ["56+", "unknown", "retired", "unknown"]
    assert (users.reset_index().dtypes.astype(str) == "string").all()


def test_band_ages_boundaries() -> None:
    ages = pd.Series([1, 17, 18, 24, 25, 34, 35, 44, 45, 49, 50, 55, 56, 73, np.nan])
    assert ml.band_ages(ages).tolist() == [
        "<18",
        "<18",
        "18-24",
        "18-24",
        "25-34",
        "25-34",
        "35-44",
        "35-44",
        "45-49",
        "45-49",
        "50-55",
        "50-55",
        "56+",
        "56+",
        "unknown",
    ]
    assert set(AGE_BANDS) <= set(ml.band_ages(pd.Series(range(100))))


def test_duplicate_user_is_an_error() -> None:
    with pytest.raises(DataError, match="duplicate id"):
        ml.parse_users(USERS + "22\t30\tM\twriter\t10001\n")


def test_clamp_published_at_moves_back_to_first_event() -> None:
    items = ml.parse_items(ITEMS)
    events = ml.parse_interactions(INTER)  # item 377 rated in 1997, "released" 1998
    clamped = ml.clamp_published_at(items, events).set_index("item_id")
    assert clamped.loc["377", "published_at"] == pd.Timestamp("1997-11-07", tz="UTC")
    assert clamped.loc["1", "published_at"] == pd.Timestamp("1995-01-01", tz="UTC")
    assert pd.isna(clamped.loc["267", "published_at"])


# ---- wheel handling ------------------------------------------------------------------------
def _fake_wheel(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{ml.ML100K_PREFIX}.inter", INTER)
        wheel.writestr(f"{ml.ML100K_PREFIX}.item", ITEMS)
        wheel.writestr(f"{ml.ML100K_PREFIX}.user", USERS)
        wheel.writestr("recbole/__init__.py", "")
    return path


@pytest.fixture
def no_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    def _fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("pip must not run when the wheel is cached")

    monkeypatch.setattr(ml.subprocess, "run", _fail)


def test_load_uses_cached_wheel(tmp_path: Path, no_pip: None) -> None:
    _fake_wheel(tmp_path / "recbole-1.2.1-py3-none-any.whl")
    data = ml.load_movielens_100k(tmp_path)

    assert isinstance(data, DemoData)
    assert len(data.events) == 3 and len(data.items) == 4 and len(data.users) == 3
    merged = data.events.merge(data.items, on="item_id")
    assert (merged["timestamp"] >= merged["published_at"]).all()


def test_fetch_downloads_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def _fake_pip(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        assert kwargs.get("check") is True
        _fake_wheel(Path(cmd[cmd.index("-d") + 1]) / "recbole-1.2.1-py3-none-any.whl")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(ml.subprocess, "run", _fake_pip)
    cache = tmp_path / "cache"
    first = ml.fetch_recbole_wheel(cache)
    second = ml.fetch_recbole_wheel(cache)

    assert first == second == cache / "recbole-1.2.1-py3-none-any.whl"
    assert len(calls) == 1
    assert calls[0][1:] == [
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "recbole==1.2.1",
        "-d",
        calls[0][-1],
    ]
    assert sorted(p.name for p in cache.iterdir()) == [first.name]  # temp dir cleaned up


def test_fetch_failure_reports_pip_stderr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def _failing_pip(cmd: list[str], **kwargs: object) -> None:
        raise subprocess.CalledProcessError(
            1, cmd, output="", stderr="ERROR: No matching distribution found"
        )

    monkeypatch.setattr(ml.subprocess, "run", _failing_pip)
    with pytest.raises(RuntimeError, match="No matching distribution found"):
        ml.fetch_recbole_wheel(tmp_path)
    assert not list(tmp_path.iterdir())


def test_missing_member_is_a_data_error(tmp_path: Path, no_pip: None) -> None:
    with zipfile.ZipFile(tmp_path / "recbole-1.2.1-py3-none-any.whl", "w") as wheel:
        wheel.writestr("recbole/__init__.py", "")
    with pytest.raises(DataError, match="ml-100k.inter not found"):
        ml.load_movielens_100k(tmp_path)


def test_write_demo_landing_round_trips(tmp_path: Path, no_pip: None) -> None:
    _fake_wheel(tmp_path / "recbole-1.2.1-py3-none-any.whl")
    landing = tmp_path / "landing"
    data = ml.write_demo_landing(tmp_path, landing)

    events_path = landing / "events" / "ml-100k.csv.gz"
    with gzip.open(events_path, "rt") as fh:
        assert fh.readline().strip() == ",".join(EVENT_COLUMNS)
    back = pd.read_csv(events_path, dtype={"user_id": str, "item_id": str})
    assert back["timestamp"].str.endswith("Z").all()
    back["timestamp"] = pd.to_datetime(back["timestamp"], format="ISO8601", utc=True)
    assert back["timestamp"].tolist() == data.events["timestamp"].tolist()
    assert back["event_id"].tolist() == data.events["event_id"].tolist()
    items = pd.read_csv(landing / "items.csv", dtype={"item_id": str})
    assert items.loc[items["item_id"] == "377", "title"].item() == "Heavy, Metal"
    assert list(pd.read_csv(landing / "users.csv").columns) == list(USER_COLUMNS)
