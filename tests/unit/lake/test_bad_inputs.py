"""A corpus of bad landing inputs, generated per test in tmp dirs: each has a named outcome, and
in every case the recommendations already published stay readable and unchanged.

Outcomes: "fails" = IngestFailed naming the file (nothing from it enters the lake, it is not in
the manifest, the run stops before training); "quarantined" = the bad rows go to a quarantine
Parquet with a reason per row and the run continues; "deferred" = left for the next run.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.core.config import REPO_ROOT
from pipeline.core.errors import DataError, IngestFailed, ValidationFailed
from pipeline.lake.ingest import IngestReport, ingest_landing, read_manifest
from pipeline.lake.snapshot import write_snapshot
from pipeline.lake.validate import ValidationReport, validate_events_file
from pipeline.serving.store import publish_lists, read_all
from tests.conftest import build_lists

UTC = dt.timezone.utc
NOW = dt.datetime(2024, 3, 10, 12, tzinfo=UTC)  # the time of ingestion
CUTOFF = dt.datetime(2024, 3, 6, tzinfo=UTC)
SUITE = REPO_ROOT / "expectations" / "events.json"
HEADER = "event_id,user_id,item_id,event_type,timestamp,value,device,session_id"
OLD = NOW.timestamp() - 3600  # mtime of a settled file


def good_rows(n: int = 100, prefix: str = "e") -> list[str]:
    """``n`` valid CSV lines, 2024-03-01 .. 2024-03-05, ids ``<prefix>000..``."""
    types = ["view", "click", "purchase", "like"]
    return [
        f"{prefix}{i:03d},u{i % 9},i{i % 13},{types[i % 4]},"
        f"2024-03-0{1 + i % 5}T{i % 24:02d}:15:00Z,{i % 7}.5,mobile,s{i // 4}"
        for i in range(n)
    ]


def write(folder: Path, name: str, content: str | bytes, *, settled: bool = True) -> Path:
    path = folder / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    if settled:
        os.utime(path, (OLD, OLD))
    return path


def csv_text(lines: list[str], header: str = HEADER) -> str:
    return "\n".join([header, *lines]) + "\n"


@pytest.fixture
def world(tmp_path: Path) -> dict:
    """Landing + lake folders and a serving DB with a small list set already published."""
    landing = tmp_path / "landing" / "events"
    landing.mkdir(parents=True)
    sqlite = tmp_path / "serving.sqlite"
    publish_lists(
        build_lists(),
        dsn=None,
        sqlite_path=sqlite,
        model_version="1",
        logical_date=dt.datetime(2024, 3, 1, tzinfo=UTC),
    )
    return {
        "landing": landing,
        "lake": tmp_path / "lake" / "events",
        "run": tmp_path / "run",
        "sqlite": sqlite,
        "published": read_all(dsn=None, sqlite_path=sqlite),
    }


def run_stages(world: dict, **ingest_options) -> tuple[IngestReport, ValidationReport]:
    """ingest + snapshot + validate, as the nightly run does (minus wall-clock)."""
    options = {"ingested_at": NOW, **ingest_options}
    report = ingest_landing(world["landing"], world["lake"], **options)
    raw = world["run"] / "events_raw.parquet"
    write_snapshot(world["lake"], CUTOFF, 365, raw)
    validation = validate_events_file(
        raw,
        clean_path=world["run"] / "events.parquet",
        suite_path=SUITE,
        cutoff=CUTOFF,
        allowed_event_types=["view", "click", "like", "share", "add_to_cart", "purchase", "rating"],
        quarantine_path=world["run"] / "quarantine.parquet",
    )
    return report, validation


def assert_published_unchanged(world: dict) -> None:
    pd.testing.assert_frame_equal(
        read_all(dsn=None, sqlite_path=world["sqlite"]), world["published"]
    )


def lake_frame(world: dict) -> pd.DataFrame:
    parts = sorted(world["lake"].glob("event_date=*/*.parquet"))
    return pd.concat([pd.read_parquet(p) for p in parts]) if parts else pd.DataFrame()


def quarantined(report: IngestReport) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in report.quarantine_files])


def expect_failure(world: dict, name: str, *patterns: str) -> IngestFailed:
    """The ingest fails naming ``name``; the bad file left no rows and no manifest entry."""
    with pytest.raises(IngestFailed) as caught:
        run_stages(world)
    message = str(caught.value)
    assert name in message
    for pattern in patterns:
        assert pattern in message, message
    assert name not in {r["file"] for r in read_manifest(world["lake"].parent)}
    assert name not in set(lake_frame(world).get("source_file", pd.Series(dtype=str)))
    assert not (world["lake"].parent / "_staging").exists() or not any(
        (world["lake"].parent / "_staging").iterdir()
    )
    return caught.value


# ---- files that fail the run ------------------------------------------------------------------
def test_truncated_gzip_fails_naming_the_file_and_keeps_good_files(world):
    write(world["landing"], "good.csv", csv_text(good_rows(50)))
    packed = gzip.compress(csv_text(good_rows(2000, prefix="z")).encode())
    write(world["landing"], "broken.csv.gz", packed[: len(packed) // 2])

    error = expect_failure(world, "broken.csv.gz", "cannot be read as csv")
    assert error.report.files == 1 and error.report.rows_new == 50  # the good file went in
    assert_published_unchanged(world)


def test_wrong_delimiter_fails_with_a_hint(world):
    write(
        world["landing"],
        "semi.csv",
        csv_text([r.replace(",", ";") for r in good_rows(5)], header=HEADER.replace(",", ";")),
    )
    expect_failure(world, "semi.csv", "missing required column", "';'-delimited")
    assert_published_unchanged(world)


def test_missing_required_column_fails_naming_file_and_column(world):
    header = HEADER.replace(",event_type", "")
    lines = [",".join(r.split(",")[:3] + r.split(",")[4:]) for r in good_rows(5)]
    write(world["landing"], "no_type.csv", csv_text(lines, header=header))
    error = expect_failure(world, "no_type.csv", "column 'event_type'")
    assert error.column == "event_type"
    assert_published_unchanged(world)


def test_zero_byte_file_fails_when_settled_and_is_deferred_when_young(world):
    write(world["landing"], "young.csv", b"", settled=False)
    os.utime(world["landing"] / "young.csv", (NOW.timestamp() - 5, NOW.timestamp() - 5))
    write(world["landing"], "ok.csv", csv_text(good_rows(10)))
    report, _ = run_stages(world)
    assert report.deferred == ["young.csv"] and report.rows_new == 10

    os.utime(world["landing"] / "young.csv", (OLD, OLD))
    expect_failure(world, "young.csv", "0 bytes")
    assert_published_unchanged(world)


def test_too_many_bad_rows_fail_the_file_naming_rows_and_reasons(world):
    lines = good_rows(20)
    lines[3] = lines[3].replace(",u3,", ",,")  # data row 4
    lines[7] = lines[7].replace(",u7,", ",NaN,")  # data row 8
    write(world["landing"], "holes.csv", csv_text(lines))
    error = expect_failure(
        world, "holes.csv", "2 of 20 rows (10.00%)", "user_id missing", "row 4", "row 8"
    )
    assert error.row == 4
    assert_published_unchanged(world)


# ---- rows that are quarantined -----------------------------------------------------------------
def test_nan_or_empty_ids_are_quarantined_with_reasons(world):
    lines = good_rows(100)
    lines[10] = lines[10].replace(",u1,", ",,")  # data row 11: empty user id
    lines[20] = lines[20].replace(",i7,", ",nan,")  # data row 21: NaN item id
    write(world["landing"], "ids.csv", csv_text(lines))
    report, validation = run_stages(world)
    rejected = quarantined(report)
    assert dict(zip(rejected["source_row"], rejected["reason"])) == {
        11: "user_id missing",
        21: "item_id missing",
    }
    assert report.rows_new == 98 and validation.passed and validation.bad_rows == 0
    assert_published_unchanged(world)


def test_negative_values_are_quarantined_by_validation(world):
    lines = good_rows(100)
    lines[5] = lines[5].replace(",5.5,", ",-3,")
    write(world["landing"], "neg.csv", csv_text(lines))
    report, validation = run_stages(world)
    assert report.rows_new == 100  # the lake keeps them; the run's validation sorts them out
    bad = pd.read_parquet(validation.quarantine_path)
    assert list(bad["event_id"]) == ["e005"]
    assert list(bad["reason"]) == ["expect_column_values_to_be_between(value)"]
    assert validation.passed and validation.bad_rows == 1
    clean = pd.read_parquet(world["run"] / "events.parquet")
    assert len(clean) == 99 and (clean["value"].dropna() >= 0).all()
    assert_published_unchanged(world)


def test_non_utf8_bytes_are_replaced_and_their_rows_quarantined(world):
    header = HEADER + ",name"
    lines = [f"{r},Zoe" for r in good_rows(100)]
    raw = csv_text(lines, header=header).encode()
    raw = raw.replace(b"e004,u4,", b"e004,u\xff4,")  # data row 5: invalid byte in an id
    raw = raw.replace(b",Zoe\ne010", b",Zo\xeb\ne010")  # Latin-1 in a dropped column: harmless
    write(world["landing"], "latin.csv", raw)
    report, validation = run_stages(world)
    rejected = quarantined(report)
    assert dict(zip(rejected["source_row"], rejected["reason"])) == {5: "invalid UTF-8 in user_id"}
    assert report.rows_new == 99 and "name" in report.pii_columns and validation.passed
    assert not lake_frame(world)["user_id"].str.contains("\ufffd").any()
    assert_published_unchanged(world)


def test_a_mostly_non_utf8_file_fails_naming_file_and_row(world):
    lines = [r.replace(",u", ",\xfc") for r in good_rows(20)]
    write(world["landing"], "cp1252.csv", csv_text(lines).encode("latin-1"))
    expect_failure(world, "cp1252.csv", "invalid UTF-8 in user_id", "row 1")
    assert_published_unchanged(world)


def test_events_after_the_time_of_ingestion_are_quarantined_at_the_door(world):
    lines = good_rows(100)
    soon = (NOW + dt.timedelta(minutes=1)).isoformat()  # within the clock skew: fine
    lines[0] = lines[0].replace("2024-03-01T00:15:00Z", soon)
    lines[1] = lines[1].replace("2024-03-02T01:15:00Z", "2099-01-01T00:00:00Z")
    lines[2] = lines[2].replace("2024-03-03T02:15:00Z", str(int(NOW.timestamp()) + 86400))
    write(world["landing"], "future.csv", csv_text(lines))
    report, validation = run_stages(world)
    assert report.rows_future == 2 and report.rows_new == 98
    assert set(quarantined(report)["reason"]) == {"timestamp after ingestion time"}
    assert not any(p.name.startswith("event_date=2099") for p in world["lake"].iterdir())
    assert validation.passed
    assert_published_unchanged(world)


def test_mixed_timestamp_formats_land_in_their_utc_partition(world):
    lines = [
        "e1,u1,i1,view,2024-03-02T23:30:00-02:00,1,mobile,s1",  # 2024-03-03 01:30 UTC
        "e2,u1,i2,view,1709337600,1,mobile,s1",  # epoch s: 2024-03-02 00:00 UTC
        "e3,u1,i3,view,1709337600000,1,mobile,s1",  # epoch ms: the same instant
        "e4,u1,i4,view,2024-03-04 10:00:00,1,mobile,s1",  # no offset: UTC
        "e5,u1,i5,view,2024-03-05T10:00:00.123+05:30,1,mobile,s1",
    ]
    write(world["landing"], "mixed.csv", csv_text(lines))
    report, validation = run_stages(world)
    lake = lake_frame(world).set_index("event_id")["timestamp"]
    assert lake.to_dict() == {
        "e1": pd.Timestamp("2024-03-03T01:30:00Z"),
        "e2": pd.Timestamp("2024-03-02T00:00:00Z"),
        "e3": pd.Timestamp("2024-03-02T00:00:00Z"),
        "e4": pd.Timestamp("2024-03-04T10:00:00Z"),
        "e5": pd.Timestamp("2024-03-05T04:30:00.123Z"),
    }
    assert (world["lake"] / "event_date=2024-03-03").is_dir()
    assert report.rows_new == 5 and validation.passed
    assert_published_unchanged(world)


def test_ten_thousand_duplicated_rows_are_stored_once(world):
    lines = good_rows(100) + [good_rows(2)[1]] * 10_000
    write(world["landing"], "dupes.csv", csv_text(lines))
    # the first 10 events again, 3 times, without their ids: derived ids dedupe the copies,
    # and their content is that of e000..e009 (issue 15: no longer stored a second time)
    no_ids = [",".join(r.split(",")[1:]) for r in good_rows(10)] * 3
    write(world["landing"], "dupes_no_id.csv", csv_text(no_ids, header=HEADER[9:]))
    report, validation = run_stages(world)
    assert (report.rows_read, report.rows_new, report.rows_duplicate) == (10_130, 100, 10_030)
    assert len(lake_frame(world)) == 100 and lake_frame(world)["event_id"].is_unique
    assert validation.passed and validation.bad_rows == 0
    assert_published_unchanged(world)


def test_extra_and_pii_columns_never_reach_the_lake(world):
    header = HEADER + ",email,ip,name,phone,address,referrer"
    pii = [
        "alice@example.com",
        "203.0.113.7",
        "Alice Liddell",
        "+44 20 7946 0000",
        "1 Rabbit Hole Lane",
    ]
    lines = [f"{r},{','.join(pii)},https://shop.example/x" for r in good_rows(30)]
    write(world["landing"], "pii.csv", csv_text(lines, header=header))
    jsonl = "\n".join(
        json.dumps(
            {
                "event_id": f"j{i}",
                "user_id": "u1",
                "item_id": "i1",
                "event_type": "view",
                "timestamp": "2024-03-02T10:00:00Z",
                "user_email": pii[0],
                "client_ip": pii[1],
            }
        )
        for i in range(5)
    )
    write(world["landing"], "pii.jsonl.gz", gzip.compress((jsonl + "\n").encode()))
    broken = csv_text(good_rows(30, prefix="b")) + f"b99,u1,{pii[0]}"  # malformed last line
    write(world["landing"], "pii_tail.csv", broken)
    report, validation = run_stages(world)
    assert report.rows_new == 65 and report.rows_rejected == 1 and validation.passed
    assert set(report.pii_columns) == {
        "email",
        "ip",
        "name",
        "phone",
        "address",
        "user_email",
        "client_ip",
    }
    assert "referrer" in report.dropped_columns
    lake_root = world["lake"].parent
    files = [p for p in lake_root.rglob("*") if p.is_file()]
    assert any(p.suffix == ".parquet" and "quarantine" in p.parts for p in files)
    allowed = {
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
        "ingested_at",
        "reason",
    }
    for path in files:
        if path.suffix == ".parquet":
            assert set(pq.read_schema(path).names) <= allowed, path
            text = pd.read_parquet(path).astype(str).to_csv()
        else:
            text = path.read_text(errors="replace")
        for value in pii:
            assert value not in text, (path, value)
    assert_published_unchanged(world)


def test_header_only_file_is_ingested_as_empty(world):
    write(world["landing"], "empty.csv", HEADER + "\n")
    write(world["landing"], "ok.csv", csv_text(good_rows(10)))
    report, validation = run_stages(world)
    assert (report.files, report.rows_read, report.rows_new) == (2, 0 + 10, 10)
    assert "empty.csv" in {r["file"] for r in read_manifest(world["lake"].parent)}
    assert validation.passed
    assert_published_unchanged(world)


def test_file_still_being_written_is_deferred_then_ingested_once(world):
    partial = csv_text(good_rows(50)) + "e050,u5,i"  # the writer is mid-line
    path = write(world["landing"], "live.csv", partial, settled=False)
    os.utime(path, (NOW.timestamp() - 2, NOW.timestamp() - 2))
    write(world["landing"], "ok.csv", csv_text(good_rows(5, prefix="k")))
    report, _ = run_stages(world, settle_seconds=60)
    assert report.deferred == ["live.csv"] and report.rows_new == 5

    os.utime(path, (OLD, OLD))  # the writer died: the partial last line is quarantined
    report, validation = run_stages(world, allowed_lateness=dt.timedelta(days=30))
    rejected = quarantined(report)
    assert list(rejected["source_row"]) == [51]
    assert list(rejected["reason"]) == ["malformed row: expected 8 fields, got 3"]
    assert report.rows_new == 50 and validation.passed

    path.write_text(csv_text(good_rows(60)))  # the file completed later: only the rest is new
    os.utime(path, (OLD, OLD))
    report, _ = run_stages(world, allowed_lateness=dt.timedelta(days=30))
    assert (report.rows_new, report.rows_duplicate) == (10, 50)
    assert len(lake_frame(world)) == 65
    assert_published_unchanged(world)


def test_validation_failure_names_file_expectation_and_rows(world):
    lines = good_rows(20)
    for i in (0, 2):  # a view and a purchase
        lines[i] = lines[i].replace(",view,", ",teleport,").replace(",purchase,", ",teleport,")
    write(world["landing"], "types.csv", csv_text(lines))
    with pytest.raises(ValidationFailed) as caught:
        run_stages(world)
    message = str(caught.value)
    assert "expect_column_values_to_be_in_set on column 'event_type'" in message
    assert "types.csv row 1" in message and "types.csv row 3" in message
    assert not (world["run"] / "events.parquet").exists()  # nothing for training
    assert_published_unchanged(world)


def test_unreadable_column_mapping_names_the_file(tmp_path):
    from pipeline.lake.mapping import load_column_mapping

    path = tmp_path / "column_mapping.json"
    path.write_text('{"email": "user_id"}')
    with pytest.raises(DataError, match="personal data"):
        load_column_mapping(path)
    path.write_text("{not json")
    with pytest.raises(DataError, match="column_mapping.json"):
        load_column_mapping(path)


# ---- line endings and entries that are not plain files ---------------------------------------
@pytest.mark.parametrize("newline", ["\r", "\r\n"])
def test_cr_only_and_crlf_files_are_ingested_like_lf_ones(world, newline):
    write(world["landing"], "old_mac.csv", newline.join([HEADER, *good_rows(20)]) + newline)
    report, validation = run_stages(world)
    assert report.rows_new == 20 and report.files_failed == 0
    assert sorted(lake_frame(world)["event_id"]) == [f"e{i:03d}" for i in range(20)]


@pytest.mark.parametrize("kind", ["directory", "fifo", "dangling link", "link outside"])
def test_entries_that_are_not_regular_files_fail_alone_and_are_never_read(world, tmp_path, kind):
    """Named in the failure, nothing read from them (a link to a file outside the landing
    folder is not followed, so no line of it can be echoed), and the good file still lands."""
    secret = tmp_path / "secret.csv"
    secret.write_text(HEADER + "\nTOPSECRET,u,i,view,2024-03-01T00:00:00Z,1,mobile,s\n")
    write(world["landing"], "good.csv", csv_text(good_rows(30)))
    odd = world["landing"] / "odd.csv"
    if kind == "directory":
        odd.mkdir()
    elif kind == "fifo":
        os.mkfifo(odd)
    elif kind == "dangling link":
        odd.symlink_to(tmp_path / "gone.csv")
    else:
        odd.symlink_to(secret)
    reason = {
        "directory": "a directory",
        "fifo": "a FIFO",
        "dangling link": "dangling",
        "link outside": "outside the landing folder",
    }[kind]
    error = expect_failure(world, "odd.csv", reason)
    assert "TOPSECRET" not in str(error)
    assert error.report.rows_new == 30 and error.report.failed == ["odd.csv"]
    assert_published_unchanged(world)


def test_a_link_to_a_file_in_the_landing_folder_is_read(world):
    write(world["landing"], "real.csv", csv_text(good_rows(10)))
    (world["landing"] / "alias.csv").symlink_to(world["landing"] / "real.csv")
    report, _ = run_stages(world)
    assert report.rows_new == 10 and report.files_failed == 0  # the alias: same content


def test_a_file_that_cannot_be_read_fails_alone_naming_it(world, monkeypatch):
    """An error no reader anticipated (permissions, I/O) fails that file only, named, and the
    files after it are still ingested."""
    import pipeline.lake.ingest as ingest_module

    real = ingest_module.file_sha256

    def unreadable(path):
        if path.name == "a_locked.csv":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(ingest_module, "file_sha256", unreadable)
    write(world["landing"], "a_locked.csv", csv_text(good_rows(5, prefix="x")))
    write(world["landing"], "b_good.csv", csv_text(good_rows(40)))
    error = expect_failure(world, "a_locked.csv", "cannot be read", "PermissionError")
    assert error.report.rows_new == 40 and error.report.failed == ["a_locked.csv"]


def test_a_byte_order_mark_before_a_quoted_header_or_a_json_line_is_read_as_one(world):
    quoted = ",".join(f'"{name}"' for name in HEADER.split(","))
    write(world["landing"], "bom.csv", "\ufeff" + csv_text(good_rows(5), header=quoted))
    lines = [
        json.dumps(
            {
                "event_id": f"j{i}",
                "user_id": "u1",
                "item_id": "i1",
                "event_type": "view",
                "timestamp": "2024-03-01T00:00:00Z",
            }
        )
        for i in range(3)
    ]
    write(world["landing"], "bom.jsonl", "\ufeff" + "\n".join(lines) + "\n")
    report, _ = run_stages(world)
    assert report.files_failed == 0 and report.rows_rejected == 0
    assert sorted(lake_frame(world)["event_id"]) == [
        *(f"e{i:03d}" for i in range(5)),
        "j0",
        "j1",
        "j2",
    ]  # ids kept, not derived


def test_ids_have_one_text_form_whatever_their_type_in_the_file(world):
    """JSON 196 and 196.0 are one user, a Parquet float id 7.0 is "7", an object or array
    where an id belongs is quarantined; device and event type ignore case and spaces."""
    records = [
        {
            "event_id": "a1",
            "user_id": 196,
            "item_id": "i1",
            "event_type": "view",
            "timestamp": "2024-03-01T00:00:00Z",
            "device": " Mobile",
        },
        {
            "event_id": "a2",
            "user_id": 196.0,
            "item_id": "i2",
            "event_type": " VIEW ",
            "timestamp": "2024-03-01T00:00:00Z",
        },
        {
            "event_id": "a3",
            "user_id": {"id": 9, "email": "x@example.com"},
            "item_id": "i1",
            "event_type": "view",
            "timestamp": "2024-03-01T00:00:00Z",
        },
    ]
    records += [
        {
            "event_id": f"b{i}",
            "user_id": f"u{i}",
            "item_id": "i1",
            "event_type": "view",
            "timestamp": "2024-03-01T00:00:00Z",
        }
        for i in range(40)
    ]
    write(world["landing"], "mixed.jsonl", "\n".join(json.dumps(r) for r in records) + "\n")
    floats = pd.DataFrame(
        {
            "event_id": ["p1", "p2"],
            "user_id": [7.0, 0.0],
            "item_id": [3.0, 2.5],
            "event_type": ["click", "click"],
            "timestamp": ["2024-03-01T00:00:00Z"] * 2,
        }
    )
    floats.to_parquet(world["landing"] / "floats.parquet")
    os.utime(world["landing"] / "floats.parquet", (OLD, OLD))
    report, _ = run_stages(world)
    lake = lake_frame(world).set_index("event_id")
    assert lake.loc["a1", "user_id"] == lake.loc["a2", "user_id"] == "196"
    assert lake.loc["a1", "device"] == "mobile" and lake.loc["a2", "event_type"] == "view"
    assert list(lake.loc[["p1", "p2"], "user_id"]) == ["7", "0"]
    assert list(lake.loc[["p1", "p2"], "item_id"]) == ["3", "2.5"]
    assert "a3" not in lake.index
    assert list(quarantined(report)["reason"]) == ["user_id is a JSON object or array, not an id"]
