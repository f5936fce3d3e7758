"""Pseudonymised ids through the pipeline on the embedded SQLite serving DB: ingest with a key
stores no raw id anywhere under ``lake/`` (bytes scanned) and fills ``user_pseudonyms``;
``users.csv`` is keyed the same way; publish maps pseudonyms back to the CMS's ids and assigns
experiment variants by the CMS id, as without a key; an unmapped pseudonym is skipped and
counted (or fails the publish when many are); erasure by CMS id reaches the pseudonyms and the
mapping; the simulated CMS writes CMS ids."""

from __future__ import annotations

import dataclasses
import datetime as dt
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import Settings
from pipeline.core.errors import ConfigError
from pipeline.core.privacy import pseudonym
from pipeline.lake.ingest import ingest_lake, ingest_landing
from pipeline.lake.snapshot import load_snapshot
from pipeline.serving import erasure
from pipeline.serving.experiments import Experiment
from pipeline.serving.pseudonyms import pseudonym_recorder, read_pseudonyms, to_cms_ids

UTC = dt.timezone.utc
NOW = dt.datetime(2024, 1, 10, tzinfo=UTC)
KEY = b"unit-test-pseudonym-key-0123456789"
RAW = ["alice@example.com", "bob@example.com", "carol-9f3e7", "dave-77aa01"]


def _raw_ids_in(root: Path, ids=RAW) -> list[str]:
    """Files under ``root`` whose bytes hold one of ``ids`` (UTF-8)."""
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path.relative_to(root)}: {i}" for i in ids if i.encode() in data]
    return found


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A data dir whose landing file holds four users' events (one row quarantined), a
    users.csv, and a key in the environment; ingested with the SQLite mapping."""
    monkeypatch.setenv("RECS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RECS_PSEUDONYM_KEY", KEY.decode())
    monkeypatch.delenv("AIRFLOW_CONN_RECS_SERVING", raising=False)
    settings = dataclasses.replace(Settings(), landing_settle_seconds=0.0, max_bad_row_share=0.5)
    landing = settings.landing_events_dir
    landing.mkdir(parents=True)
    rows = ["user_id,item_id,event_type,timestamp"]
    for n, user in enumerate(RAW):
        rows += [
            f"{user},i{n},view,2024-01-0{n + 1}T10:00:00Z",
            f"{user},i{n + 1},click,2024-01-0{n + 1}T11:00:00Z",
        ]
    rows.append(f"{RAW[0]},i9,view,not-a-time")  # quarantined, with its user id
    (landing / "a.csv").write_text("\n".join(rows) + "\n")
    (settings.landing_dir / "users.csv").write_text(
        "user_id,age_band\n" + "".join(f"{u},25-34\n" for u in RAW)
    )
    report = ingest_lake(
        settings, record_pseudonyms=pseudonym_recorder(None, settings.serving_sqlite_path)
    )
    assert report.rows_new == 8 and report.rows_rejected == 1
    return settings


def test_ingest_with_a_key_stores_no_raw_id_and_fills_the_mapping(world):
    lake_root = world.lake_events_dir.parent
    assert list((lake_root / "quarantine").glob("*.parquet"))
    assert _raw_ids_in(lake_root) == []
    events = load_snapshot(world.lake_events_dir, NOW, 365)
    assert set(events["user_id"]) == {pseudonym(u, KEY) for u in RAW}
    mapping = read_pseudonyms(dsn=None, sqlite_path=world.serving_sqlite_path)
    assert mapping.to_dict() == {pseudonym(u, KEY): u for u in RAW}


def test_ingest_with_a_key_needs_a_mapping(world):
    with pytest.raises(ConfigError, match="record_pseudonyms"):
        ingest_landing(world.landing_events_dir, world.lake_events_dir, pseudonym_key=KEY)


def test_a_quarantine_file_sent_back_keeps_its_pseudonyms(world, tmp_path):
    lake_root = world.lake_events_dir.parent
    (quarantined,) = (lake_root / "quarantine").glob("*.parquet")
    frame = pd.read_parquet(quarantined)
    assert frame["user_id"].tolist() == [pseudonym(RAW[0], KEY)]
    frame = frame.assign(timestamp="2024-01-05T10:00:00Z")[
        ["user_id", "item_id", "event_type", "timestamp"]
    ]
    frame.to_csv(world.landing_events_dir / "backfill.csv", index=False)
    recorded = []
    ingest_landing(
        world.landing_events_dir,
        world.lake_events_dir,
        pseudonym_key=KEY,
        record_pseudonyms=recorded.append,
        settle_seconds=0,
    )
    events = load_snapshot(world.lake_events_dir, NOW, 365)
    assert (events["user_id"] == pseudonym(RAW[0], KEY)).sum() == 3  # not hashed twice
    assert recorded == []  # no new pair: the id was stored already


def test_users_csv_is_keyed_like_the_events(world):
    from pipeline.nightly import _side_users

    users = _side_users(world)
    assert set(users["user_id"]) == {pseudonym(u, KEY) for u in RAW}


def test_publish_maps_back_and_assigns_by_the_cms_id(world):
    from pipeline.nightly import _as_cms, _cms_ids, _served_lists

    stored = np.array([pseudonym(u, KEY) for u in RAW], dtype=object)
    users, cms_of, unmapped = _cms_ids(world, None, stored)
    assert unmapped == 0 and list(cms_of.reindex(users)) == RAW

    experiment = Experiment.from_dict(
        {
            "name": "ab",
            "salt": "s",
            "variants": [
                {"name": "a", "kind": "model", "model": "1", "share": 0.5},
                {"name": "b", "kind": "model", "model": "1", "share": 0.5},
            ],
        }
    ).start()
    model = _FakeModel()
    rules = {
        "candidate_multiplier": 1,
        "n": 2,
        "max_per_category": None,
        "item_ttl_days": None,
        "cutoff": NOW,
        "items": None,
        "consumed": pd.DataFrame({"user_id": [], "item_id": []}),
    }
    served = _served_lists(
        model, "1", users, rules, experiment, load_recommender=lambda v: model, cms_of=cms_of
    )
    plain = _served_lists(
        model, "1", np.array(RAW, dtype=object), rules, experiment, load_recommender=lambda v: model
    )
    with_key = dict(
        zip(
            _as_cms(served.assignments["user_id"], cms_of),
            served.assignments["variant"],
            strict=True,
        )
    )
    assert with_key == dict(
        zip(plain.assignments["user_id"], plain.assignments["variant"], strict=True)
    )
    view = served.lists.assign(user_id=_as_cms(served.lists["user_id"], cms_of))
    assert set(view["user_id"]) - {"__default__", "__default__:a", "__default__:b"} == set(RAW)


def test_an_unmapped_pseudonym_is_skipped_and_many_fail_the_publish(world):
    from pipeline.nightly import _cms_ids

    stored = [pseudonym(u, KEY) for u in RAW] + [pseudonym("nobody", KEY)]
    loose = dataclasses.replace(world, max_bad_row_share=0.25)
    users, cms_of, unmapped = _cms_ids(loose, None, stored)
    assert unmapped == 1 and len(users) == 4 and pseudonym("nobody", KEY) not in set(users)
    with pytest.raises(ConfigError, match="user_pseudonyms"):
        _cms_ids(dataclasses.replace(world, max_bad_row_share=0.05), None, stored)
    assert list(
        to_cms_ids(["plain-id", "__default__"], dsn=None, sqlite_path=world.serving_sqlite_path)
    ) == ["plain-id", "__default__"]


def test_erasure_with_a_key_reaches_the_pseudonyms_and_the_mapping(world):
    result = erasure.forget_users(world, [RAW[0]], requested_by="dpo", now=NOW)
    assert result["removed"]["lake_events"] == 2
    assert result["removed"]["quarantine_rows"] == 1
    events = load_snapshot(world.lake_events_dir, NOW, 365)
    assert pseudonym(RAW[0], KEY) not in set(events["user_id"])
    with sqlite3.connect(world.serving_sqlite_path) as conn:
        left = conn.execute("SELECT user_id FROM user_pseudonyms ORDER BY user_id").fetchall()
    assert [u for (u,) in left] == sorted(RAW[1:])
    # the old landing file again: the tombstone keeps them out, and out of the mapping
    (world.landing_events_dir / "a-again.csv").write_text(
        (world.landing_events_dir / "a.csv").read_text() + "\n"
    )
    recorded: list[pd.DataFrame] = []
    report = ingest_lake(world, record_pseudonyms=recorded.append)
    assert report.rows_erased == 3
    assert all(RAW[0] not in set(frame["user_id"]) for frame in recorded)


def test_the_simulated_cms_writes_cms_ids(world):
    from pipeline.cli import _as_cms_events

    events = pd.DataFrame(
        {
            "user_id": pd.Series(
                [pseudonym(RAW[1], KEY), pseudonym("x", KEY), pseudonym(RAW[1], KEY)],
                dtype="string",
            ),
            "item_id": ["i1", "i2", "i3"],
        }
    )
    out, unmapped = _as_cms_events(world, events)
    assert unmapped == 1 and out["user_id"].tolist() == [RAW[1], RAW[1]]
    assert out["user_id"].dtype == events["user_id"].dtype


class _FakeModel:
    popular_ = pd.DataFrame(
        {"item_id": ["p1", "p2", "p3"], "score": [3.0, 2.0, 1.0], "reason": "popular"}
    )

    def recommend(self, users, k: int) -> pd.DataFrame:
        rows = [
            (u, r + 1, f"i{r}", 1.0 / (r + 1), "model", "ranker") for u in users for r in range(k)
        ]
        return pd.DataFrame(
            rows, columns=["user_id", "rank", "item_id", "score", "reason", "source"]
        )


def test_with_a_key_an_event_sent_with_and_without_an_id_is_stored_once(tmp_path):
    landing, lake = tmp_path / "landing", tmp_path / "lake" / "events"
    landing.mkdir()
    (landing / "a.csv").write_text(
        "event_id,user_id,item_id,event_type,timestamp\n"
        f"own-1,{RAW[2]},i1,view,2024-01-02T10:00:00Z\n"
    )
    (landing / "b.csv").write_text(
        "user_id,item_id,event_type,timestamp\n"
        f"{RAW[2]},i1,view,2024-01-02T10:00:00Z\n"
        f"{RAW[3]},i1,view,2024-01-02T10:00:00Z\n"
    )
    recorded: list[pd.DataFrame] = []
    report = ingest_landing(
        landing,
        lake,
        ingested_at=NOW,
        settle_seconds=0,
        pseudonym_key=KEY,
        record_pseudonyms=recorded.append,
    )
    assert report.rows_new == 2 and report.rows_duplicate == 1
    events = load_snapshot(lake, NOW, 365)
    derived = events.loc[events["user_id"] == pseudonym(RAW[3], KEY), "event_id"].iloc[0]
    from pipeline.lake.normalise import derive_event_ids

    assert (
        derived
        == derive_event_ids(
            events[events["user_id"] == pseudonym(RAW[3], KEY)].drop(columns="event_id")
        ).iloc[0]
    )  # of the pseudonym


NEW_KEY = b"rotated-pseudonym-key-abcdef0123456789"


def test_rekey_rewrites_lake_quarantine_served_history_and_mapping(world, tmp_path):
    from pipeline.cli import main
    from pipeline.lake.served import read_served, write_served

    lake_root = world.lake_events_dir.parent
    lists = pd.DataFrame(
        {
            "user_id": [pseudonym(RAW[1], KEY), "__default__"],
            "rank": [1, 1],
            "item_id": ["i1", "i2"],
        }
    )
    write_served(lake_root, lists, cutoff=NOW, published_at=NOW, model_version="1")
    key_file = tmp_path / "new.key"
    key_file.write_text(NEW_KEY.decode() + "\n")
    assert main(["rekey", "--new-key-file", str(key_file), "--dry-run"]) == 0
    assert set(load_snapshot(world.lake_events_dir, NOW, 365)["user_id"]) == {
        pseudonym(u, KEY) for u in RAW
    }  # a dry run changes nothing
    assert main(["rekey", "--new-key-file", str(key_file)]) == 0

    events = load_snapshot(world.lake_events_dir, NOW, 365)
    assert set(events["user_id"]) == {pseudonym(u, NEW_KEY) for u in RAW}
    (quarantined,) = (lake_root / "quarantine").glob("*.parquet")
    assert pd.read_parquet(quarantined)["user_id"].tolist() == [pseudonym(RAW[0], NEW_KEY)]
    assert set(read_served(lake_root)["user_id"]) == {pseudonym(RAW[1], NEW_KEY), "__default__"}
    mapping = read_pseudonyms(dsn=None, sqlite_path=world.serving_sqlite_path)
    assert {p: u for p, u in mapping.items() if u in RAW} == {
        **{pseudonym(u, KEY): u for u in RAW},
        **{pseudonym(u, NEW_KEY): u for u in RAW},
    }
    assert _raw_ids_in(lake_root) == []
    # under the new key, the same export is recognised: derived ids were derived again
    rotated = dataclasses.replace(world, pseudonym_key=NEW_KEY)
    (world.landing_events_dir / "a-again.csv").write_text(
        (world.landing_events_dir / "a.csv").read_text() + "\n"
    )
    report = ingest_lake(
        rotated, record_pseudonyms=pseudonym_recorder(None, world.serving_sqlite_path)
    )
    assert report.rows_new == 0 and report.rows_duplicate == 8
    # a second rotation to the same key finds nothing to do
    from pipeline.serving.pseudonyms import rekey

    assert rekey(world, NEW_KEY)["lake_rows"] == 0


def test_one_identity_per_lake_an_ingest_with_the_wrong_key_is_refused(world, tmp_path):
    """The lake's id mark: an ingest without the key (a loader's shell without it), or with
    another key, would store a second identity of every user beside the pseudonyms; refused
    before anything is written. `rekey` moves the mark with the ids."""
    import json

    from pipeline.cli import main
    from pipeline.lake.keymark import MARK_NAME

    lake_root = world.lake_events_dir.parent
    mark = json.loads((lake_root / MARK_NAME).read_text())
    assert mark["ids"] == "pseudonymised" and KEY.decode() not in json.dumps(mark)
    (world.landing_events_dir / "b.csv").write_text(
        "user_id,item_id,event_type,timestamp\nnew-user,i1,view,2024-01-05T10:00:00Z\n"
    )
    before = sorted(p.name for p in world.lake_events_dir.rglob("*.parquet"))
    recorder = pseudonym_recorder(None, world.serving_sqlite_path)
    with pytest.raises(ConfigError, match="no key is set"):
        ingest_lake(dataclasses.replace(world, pseudonym_key=None))
    with pytest.raises(ConfigError, match="not under the key set now"):
        ingest_lake(dataclasses.replace(world, pseudonym_key=NEW_KEY), record_pseudonyms=recorder)
    assert sorted(p.name for p in world.lake_events_dir.rglob("*.parquet")) == before
    key_file = tmp_path / "new.key"
    key_file.write_text(NEW_KEY.decode() + "\n")
    assert main(["rekey", "--new-key-file", str(key_file)]) == 0
    report = ingest_lake(
        dataclasses.replace(world, pseudonym_key=NEW_KEY), record_pseudonyms=recorder
    )
    assert report.rows_new == 1


def test_a_key_set_on_a_lake_of_clear_ids_asks_for_rekey_first(tmp_path, monkeypatch):
    monkeypatch.setenv("RECS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("RECS_PSEUDONYM_KEY", raising=False)
    settings = dataclasses.replace(Settings(), landing_settle_seconds=0.0)
    settings.landing_events_dir.mkdir(parents=True)
    (settings.landing_events_dir / "a.csv").write_text(
        "user_id,item_id,event_type,timestamp\nu1,i1,view,2024-01-02T10:00:00Z\n"
    )
    assert ingest_lake(settings).rows_new == 1  # clear ids, marked so
    with pytest.raises(ConfigError, match="rekey"):
        ingest_lake(
            dataclasses.replace(settings, pseudonym_key=KEY),
            record_pseudonyms=pseudonym_recorder(None, settings.serving_sqlite_path),
        )
