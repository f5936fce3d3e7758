"""End to end, as an operator runs it (issue 15): a landing file with wrong rows that pass
validation is ingested; ``python -m pipeline.cli repair`` takes it back; the corrected re-send,
same event ids, is ingested; the lake holds exactly the corrected rows. Real processes, the
real CLI, the events suite at ingest."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline.lake.ingest import file_sha256, read_manifest
from pipeline.lake.repair_log import read_repair_log
from pipeline.lake.snapshot import load_snapshot

REPO = Path(__file__).resolve().parents[2]
UTC = dt.timezone.utc
CUTOFF = dt.datetime(2024, 1, 10, tzinfo=UTC)
HEADER = "event_id,user_id,item_id,event_type,timestamp,value,device\n"


def _events(prefix: str, n: int, stamp) -> list[str]:
    return [f"{prefix}{k:03d},u{k % 9},i{k % 7},view,{stamp(k)},1,mobile" for k in range(n)]


def _true_time(k: int) -> str:
    return f"2024-01-0{5 + k % 3}T{k % 24:02d}:10:00Z"


#: the sender exported its send time into ``timestamp`` instead of the event time: valid,
#: not in the future, so the suite passes them
WRONG = _events("d", 40, lambda k: f"2024-01-08T23:{k:02d}:00Z")
CORRECTED = _events("d", 40, _true_time)
OTHER = _events("o", 30, lambda k: f"2024-01-0{1 + k % 7}T08:{k:02d}:00Z")
BAD_ROW = "d999,u1,i1,teleport,2024-01-08T23:59:00Z,1,mobile"  # quarantined at ingest


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "landing" / "events").mkdir(parents=True)
    return tmp_path


def _cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RECS_DATA_DIR": str(data_dir), "RECS_LANDING_SETTLE_SECONDS": "0"}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _ingest(data_dir: Path) -> dict:
    done = _cli(data_dir, "ingest")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _write(data_dir: Path, name: str, lines: list[str]) -> Path:
    path = data_dir / "landing" / "events" / name
    path.write_text(HEADER + "\n".join(lines) + "\n")
    return path


def _lake(data_dir: Path) -> pd.DataFrame:
    return load_snapshot(data_dir / "lake" / "events", CUTOFF, 30)


def _rows(lines: list[str]) -> set[tuple[str, pd.Timestamp]]:
    return {(line.split(",")[0], pd.Timestamp(line.split(",")[4])) for line in lines}


def test_repair_then_corrected_resend_gives_exactly_the_corrected_rows(data_dir):
    _write(data_dir, "other.csv", OTHER)
    wrong = _write(data_dir, "day1.csv", WRONG + [BAD_ROW])
    wrong_sha = file_sha256(wrong)
    first = _ingest(data_dir)
    assert (first["rows_new"], first["rows_rejected"]) == (70, 1)
    lake = _lake(data_dir)
    assert _rows(WRONG) <= set(zip(lake["event_id"], lake["timestamp"], strict=True))
    quarantine = data_dir / "lake" / "quarantine" / f"day1.csv.{wrong_sha[:12]}.parquet"
    assert quarantine.exists()

    dry = _cli(data_dir, "repair", "day1.csv", "--dry-run")
    assert dry.returncode == 0 and "would remove 40 rows" in dry.stdout
    assert "would remove 1 rows" in dry.stdout and len(_lake(data_dir)) == 70
    done = _cli(data_dir, "repair", "day1.csv")
    assert done.returncode == 0, done.stderr
    assert "removed 40 rows" in done.stdout and wrong_sha in done.stdout
    assert "taken back: 40 lake rows" in done.stderr  # logged with its counts
    assert "1 quarantine rows" in done.stderr
    assert not quarantine.exists()
    assert set(_lake(data_dir)["source_file"]) == {"other.csv"}
    twice = _cli(data_dir, "repair", "day1.csv")
    assert twice.returncode == 0 and "already repaired" in twice.stdout

    # the wrong file, still in the landing folder, stays out ...
    assert _ingest(data_dir)["rows_new"] == 0 and len(_lake(data_dir)) == 70 - 40
    # ... and the corrected re-send (same name, same event ids) is ingested normally
    _write(data_dir, "day1.csv", CORRECTED)
    resend = _ingest(data_dir)
    assert (resend["rows_new"], resend["rows_duplicate"], resend["rows_rejected"]) == (40, 0, 0)
    lake = _lake(data_dir)
    assert len(lake) == 70 and lake["event_id"].is_unique
    day1 = lake[lake["source_file"] == "day1.csv"]
    assert set(zip(day1["event_id"], day1["timestamp"], strict=True)) == _rows(CORRECTED)
    other = lake[lake["source_file"] == "other.csv"]
    assert set(zip(other["event_id"], other["timestamp"], strict=True)) == _rows(OTHER)
    manifest = read_manifest(data_dir / "lake")
    assert sorted(r["file"] for r in manifest) == ["day1.csv", "other.csv"]
    assert wrong_sha not in {r["sha256"] for r in manifest}
    assert [r["status"] for r in read_repair_log(data_dir / "lake")] == ["started", "done"]
    refused = _cli(data_dir, "repair", "day1.csv")  # the same command again: not the re-send
    assert refused.returncode == 1 and "ingested again since" in refused.stderr


def test_a_resend_swallowed_before_the_repair_is_released_with_it(data_dir):
    """The issue's lock-up: the corrected file came before anyone noticed, and dedupe
    swallowed it (rows_new 0). Repairing both entries, the swallowed one with
    --allow-resend, lets its bytes in on the next ingest."""
    _write(data_dir, "other.csv", OTHER)
    wrong = _write(data_dir, "day1.csv", WRONG)
    wrong_sha = file_sha256(wrong)
    _ingest(data_dir)
    fixed = _write(data_dir, "day1-fixed.csv", CORRECTED)
    assert _ingest(data_dir)["rows_new"] == 0  # deduplicated away by event id
    missing = _cli(data_dir, "repair", "nope.csv")
    assert missing.returncode == 1 and "nope.csv" in missing.stderr
    assert _cli(data_dir, "repair", wrong_sha).returncode == 0
    released = _cli(data_dir, "repair", "day1-fixed.csv", "--allow-resend")
    assert released.returncode == 0 and "removed 0 rows" in released.stdout
    assert _ingest(data_dir)["rows_new"] == 40
    lake = _lake(data_dir)
    day1 = lake[lake["event_id"].str.startswith("d")]
    assert set(zip(day1["event_id"], day1["timestamp"], strict=True)) == _rows(CORRECTED)
    assert set(day1["source_file"]) == {fixed.name} and len(lake) == 70
