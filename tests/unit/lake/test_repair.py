"""``repair``: taking back what one landing file brought into the lake (issue 15), its edge
cases: an unknown file, twice, parts shared with other files, a dry run, ambiguous names, the
withheld bytes, a crash half-way, the lock."""

from __future__ import annotations

import datetime as dt
import json
import threading

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import cli
from pipeline.core.errors import DataError
from pipeline.lake import event_ids
from pipeline.lake import repair as repair_module
from pipeline.lake.ingest import file_sha256, ingest_landing, ingest_lock, read_manifest
from pipeline.lake.repair import repair_landing_file
from pipeline.lake.repair_log import read_repair_log, withheld_digests
from pipeline.lake.snapshot import load_snapshot
from pipeline.lake.storage import lake_part_files

UTC = dt.timezone.utc
NOW = dt.datetime(2024, 1, 10, tzinfo=UTC)
LATER = dt.datetime(2024, 1, 10, 6, tzinfo=UTC)
CUTOFF = dt.datetime(2024, 1, 9, tzinfo=UTC)
HEADER = "event_id,user_id,item_id,event_type,timestamp,value\n"
A = HEADER + (
    "a1,u1,i1,view,2024-01-01T10:00:00Z,1\n"
    "a2,u2,i2,click,2024-01-02T10:00:00Z,1\n"
    "a3,u3,i3,view,not a time,1\n"
)  # quarantined
B = HEADER + ("b1,u1,i2,view,2024-01-01T12:00:00Z,1\nb2,u4,i1,view,2024-01-02T12:00:00Z,1\n")


@pytest.fixture
def world(tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    return {"landing": landing, "lake": tmp_path / "lake" / "events", "root": tmp_path / "lake"}


def _ingest(world, at=NOW):
    return ingest_landing(
        world["landing"], world["lake"], ingested_at=at, settle_seconds=0.0, max_bad_row_share=0.5
    )


def _ids(world) -> list[str]:
    return sorted(load_snapshot(world["lake"], CUTOFF, 30)["event_id"])


def _state(world) -> dict:
    """Everything repair may touch, to compare before and after."""
    root = world["root"]
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != ".ingest.lock")
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def test_unknown_file_is_refused_naming_it(world, capsys, monkeypatch):
    (world["landing"] / "a.csv").write_text(A)
    _ingest(world)
    before = _state(world)
    with pytest.raises(DataError, match="no entry for 'never-sent.csv'") as error:
        repair_landing_file(world["lake"], "never-sent.csv")
    assert error.value.file == "never-sent.csv"
    assert _state(world) == before
    monkeypatch.setenv("RECS_DATA_DIR", str(world["root"].parent))
    (world["root"].parent / "lake").rename(world["root"].parent / "lake-moved")
    assert cli.main(["repair", "never-sent.csv"]) == 1  # no lake at all: refused too
    assert "repair refused: file never-sent.csv: no entry" in capsys.readouterr().err
    assert not world["root"].exists()  # and none created


def test_repair_removes_rows_quarantine_caches_and_entry_and_is_idempotent(world):
    (world["landing"] / "a.csv").write_text(A)
    (world["landing"] / "b.csv").write_text(B)
    _ingest(world)
    digest = file_sha256(world["landing"] / "a.csv")
    quarantine = world["root"] / "quarantine" / f"a.csv.{digest[:12]}.parquet"
    assert quarantine.exists()
    result = repair_landing_file(world["lake"], "a.csv", repaired_at=LATER)
    assert (result.lake_rows, result.quarantine_rows) == (2, 1)
    assert result.rows_by_date == {"2024-01-01": 1, "2024-01-02": 1}
    assert len(result.parts_deleted) == 2 and result.parts_rewritten == []
    assert _ids(world) == ["b1", "b2"] and not quarantine.exists()
    assert [r["file"] for r in read_manifest(world["root"])] == ["b.csv"]
    parts = lake_part_files(world["lake"])
    caches = {p for root in event_ids.CACHE_FOLDERS for p in (world["lake"] / root).glob("*/*")}
    assert caches == {c for p in parts for c in event_ids.part_cache_paths(world["lake"], p)}
    index, _ = event_ids.load_lake_index(world["lake"])
    found = index.contains(*event_ids.hash_event_ids(pa.array(["a1", "a2", "b1"])))
    assert found.tolist() == [False, False, True]
    log = read_repair_log(world["root"])
    assert [r["status"] for r in log] == ["started", "done"]
    assert log[-1]["manifest_record"]["sha256"] == digest and log[-1]["lake_rows"] == 2
    assert '"a1"' not in json.dumps(log)  # counts only, no ids

    before = _state(world)
    again = repair_landing_file(world["lake"], "a.csv")  # twice: nothing to do
    assert again.already_repaired_at == LATER.isoformat() and again.lake_rows == 0
    assert _state(world) == before
    assert "already repaired" in again.describe()
    assert repair_landing_file(world["lake"], digest).already_repaired_at  # by sha256 too


def test_rows_of_other_files_in_a_shared_part_stay(world, monkeypatch):
    """A part holding rows of several files (a compacted lake, an older layout): only the
    repaired file's rows go, by their lineage; the part is rewritten and re-cached."""
    (world["landing"] / "a.csv").write_text(A)
    (world["landing"] / "b.csv").write_text(B)
    _ingest(world)
    for day in ("2024-01-01", "2024-01-02"):  # compact each date into one part
        folder = world["lake"] / f"event_date={day}"
        parts = sorted(folder.glob("*.parquet"))
        merged = pa.concat_tables([pq.read_table(p) for p in parts])
        for part in parts:
            part.unlink()
        pq.write_table(merged, folder / "part-compacted.parquet")
    event_ids.load_lake_index(world["lake"])  # caches of the compacted parts
    dry = repair_landing_file(world["lake"], "a.csv", dry_run=True)
    assert dry.lake_rows == 2 and len(dry.parts_rewritten) == 2 and dry.parts_deleted == []
    result = repair_landing_file(world["lake"], "a.csv")
    assert result.lake_rows == 2 and len(result.parts_rewritten) == 2
    rows = load_snapshot(world["lake"], CUTOFF, 30)
    assert sorted(rows["event_id"]) == ["b1", "b2"] and set(rows["source_file"]) == {"b.csv"}
    calls = []
    real = event_ids.hash_event_ids
    with monkeypatch.context() as patch:
        patch.setattr(event_ids, "hash_event_ids", lambda ids: calls.append(len(ids)) or real(ids))
        index, _ = event_ids.load_lake_index(world["lake"])  # rewritten parts were re-cached
    assert calls == [] and len(index) == 2 and len(index.contents) == 2
    # the events of a.csv are new again: a corrected a.csv gets in
    (world["landing"] / "a.csv").write_text(A.replace("T10:00", "T11:00"))
    assert _ingest(world, LATER).rows_new == 2
    assert _ids(world) == ["a1", "a2", "b1", "b2"]


def test_dry_run_changes_nothing_and_prints_the_plan(world, capsys, monkeypatch):
    (world["landing"] / "a.csv").write_text(A)
    _ingest(world)
    before = _state(world)
    monkeypatch.setenv("RECS_DATA_DIR", str(world["root"].parent))
    assert cli.main(["repair", "a.csv", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run, nothing changed" in out and "would remove 2 rows" in out
    assert "would remove 1 rows (a.csv." in out
    assert _state(world) == before


def test_an_ambiguous_name_is_refused_and_a_sha256_prefix_picks_one(world):
    path = world["landing"] / "a.csv"
    path.write_text(A)
    _ingest(world)
    first = file_sha256(path)
    path.write_text(A + "a4,u5,i1,view,2024-01-03T10:00:00Z,1\n")  # same name, new content
    _ingest(world, LATER)
    with pytest.raises(DataError, match="2 manifest entries match 'a.csv'"):
        repair_landing_file(world["lake"], "a.csv")
    result = repair_landing_file(world["lake"], first[:12])
    # the rows it brought go, though the second file repeated a1 and a2 (deduplicated away
    # when it came: the README says to re-send such events)
    assert result.sha256 == first and result.lake_rows == 2
    assert _ids(world) == ["a4"]
    with pytest.raises(DataError, match="no entry for 'abc'"):
        repair_landing_file(world["lake"], "abc")  # too short to be a sha256 prefix


def test_running_the_same_command_after_the_resend_refuses_to_take_the_resend_back(world):
    path = world["landing"] / "a.csv"
    path.write_text(A)
    _ingest(world)
    repair_landing_file(world["lake"], "a.csv", repaired_at=NOW + dt.timedelta(hours=1))
    path.write_text(A.replace("T10:00", "T11:00"))  # the corrected re-send, same name
    assert _ingest(world, LATER).rows_new == 2
    with pytest.raises(DataError, match="ingested again since") as error:
        repair_landing_file(world["lake"], "a.csv")
    assert file_sha256(path) in str(error.value)
    assert _ids(world) == ["a1", "a2"]
    assert repair_landing_file(world["lake"], file_sha256(path)).lake_rows == 2  # by sha256


def test_repaired_bytes_left_in_landing_stay_out_unless_released(world, capsys, monkeypatch):
    (world["landing"] / "a.csv").write_text(A)
    _ingest(world)
    digest = file_sha256(world["landing"] / "a.csv")
    repair_landing_file(world["lake"], "a.csv")
    assert withheld_digests(world["root"]) == {digest}
    report = _ingest(world, LATER)  # the wrong file is still in the landing folder
    assert report.skipped == ["a.csv"] and _ids(world) == []
    (world["landing"] / "copy.csv").write_text(A)  # the same bytes under another name
    assert _ingest(world, LATER).rows_new == 0 and _ids(world) == []
    monkeypatch.setenv("RECS_DATA_DIR", str(world["root"].parent))
    assert cli.main(["repair", "a.csv", "--allow-resend"]) == 0  # e.g. the mapping is fixed
    assert "ingested again (--allow-resend)" in capsys.readouterr().out
    assert withheld_digests(world["root"]) == set()
    assert _ingest(world, LATER).rows_new == 2 and _ids(world) == ["a1", "a2"]


def test_a_crash_half_way_is_finished_by_the_next_run(world, monkeypatch):
    (world["landing"] / "a.csv").write_text(A)
    (world["landing"] / "b.csv").write_text(B)
    _ingest(world)

    def crash(*args):
        raise OSError("disk gone")

    monkeypatch.setattr(repair_module, "_remove_manifest_entry", crash)
    with pytest.raises(OSError):
        repair_landing_file(world["lake"], "a.csv")
    assert _ids(world) == ["b1", "b2"]  # the rows went, the entry did not
    assert "a.csv" in [r["file"] for r in read_manifest(world["root"])]
    monkeypatch.undo()
    result = repair_landing_file(world["lake"], "a.csv")
    assert result.lake_rows == 0 and result.already_repaired_at is None
    assert [r["file"] for r in read_manifest(world["root"])] == ["b.csv"]
    statuses = [r["status"] for r in read_repair_log(world["root"])]
    assert statuses == ["started", "started", "done"]  # the first one's counts are kept
    assert read_repair_log(world["root"])[0]["lake_rows"] == 2


def test_repair_waits_for_the_ingest_lock(world):
    (world["landing"] / "a.csv").write_text(A)
    _ingest(world)
    done = threading.Event()
    with ingest_lock(world["root"]):
        worker = threading.Thread(
            target=lambda: repair_landing_file(world["lake"], "a.csv") and done.set()
        )
        worker.start()
        assert not done.wait(0.5)  # blocked while an ingest holds the lock
        assert _ids(world) == ["a1", "a2"]
    worker.join(10)
    assert done.is_set() and _ids(world) == []


def test_orphan_parts_of_a_crashed_commit_go_too(world, monkeypatch):
    """A commit that crashed before the manifest left parts named after the file; the retry
    found their rows as duplicates. Repair takes both (all carry the file's content tag)."""
    from pipeline.lake import ingest as ingest_module

    (world["landing"] / "a.csv").write_text(A)
    real = ingest_module.append_manifest
    monkeypatch.setattr(
        ingest_module, "append_manifest", lambda *a: (_ for _ in ()).throw(OSError("crash"))
    )
    with pytest.raises(Exception, match="could not be ingested"):
        _ingest(world)
    monkeypatch.setattr(ingest_module, "append_manifest", real)
    report = _ingest(world, LATER)
    assert (report.rows_new, report.rows_duplicate) == (0, 2)
    result = repair_landing_file(world["lake"], "a.csv")
    assert result.lake_rows == 2 and _ids(world) == []
    frame = pd.DataFrame(read_repair_log(world["root"]))
    assert frame["status"].tolist() == ["started", "done"]
