"""Unit tests for pipeline.lake.validate on tiny frames with known answers."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import DEFAULT_EVENT_WEIGHTS, REPO_ROOT
from pipeline.core.errors import ValidationFailed
from pipeline.lake.validate import (
    DEFAULT_CLOCK_SKEW,
    MAX_TIMESTAMP_PARAMETER,
    EventValidationFailed,
    ValidationReport,
    validate_events,
)

SUITE_PATH = REPO_ROOT / "expectations" / "events.json"
CUTOFF = dt.datetime(2024, 6, 1, tzinfo=dt.timezone.utc)
EVENT_TYPES = tuple(DEFAULT_EVENT_WEIGHTS)
SOURCE = "events_2024-05-31.csv"

NOT_NULL = "expect_column_values_to_not_be_null"
IN_SET = "expect_column_values_to_be_in_set"
BETWEEN = "expect_column_values_to_be_between"
UNIQUE = "expect_column_values_to_be_unique"
EXISTS = "expect_column_to_exist"
OF_TYPE = "expect_column_values_to_be_of_type"


def make_events(n: int = 40) -> pd.DataFrame:
    """A clean normalised frame; row i is data row i + 1 of SOURCE."""
    types = ["view", "click", "like", "share", "add_to_cart", "purchase", "rating"]
    devices = ["desktop", "mobile", "tablet", "tv", "other", None]
    frame = pd.DataFrame(
        {
            "event_id": pd.array([f"e{i:04d}" for i in range(n)], dtype="string"),
            "user_id": pd.array([f"u{i % 7}" for i in range(n)], dtype="string"),
            "item_id": pd.array([f"i{i % 11}" for i in range(n)], dtype="string"),
            "event_type": pd.array([types[i % len(types)] for i in range(n)], dtype="string"),
            "timestamp": pd.Series(
                pd.date_range("2024-05-01", periods=n, freq="h", tz="UTC")
            ).astype("datetime64[us, UTC]"),
            "value": np.where(np.arange(n) % 3 == 0, np.nan, np.arange(n, dtype="float64")),
            "device": pd.array([devices[i % len(devices)] for i in range(n)], dtype="string"),
            "session_id": pd.array(
                [f"s{i // 5}" if i % 4 else None for i in range(n)], dtype="string"
            ),
            "source_file": pd.array([SOURCE] * n, dtype="string"),
            "source_row": np.arange(1, n + 1, dtype="int64"),
        }
    )
    return frame


def run(
    events: pd.DataFrame, tmp_path: Path, **kwargs: object
) -> tuple[pd.DataFrame, ValidationReport]:
    """validate_events with the test defaults; kwargs override them."""
    options: dict = {
        "suite_path": SUITE_PATH,
        "cutoff": CUTOFF,
        "allowed_event_types": EVENT_TYPES,
        "quarantine_path": tmp_path / "quarantine" / "events.parquet",
    }
    options.update(kwargs)
    return validate_events(events, **options)


def reasons_by_source_row(path: Path) -> dict[int, str]:
    quarantined = pd.read_parquet(path)
    return dict(zip(quarantined["source_row"].tolist(), quarantined["reason"].tolist()))


# ---- the suite file ------------------------------------------------------------------------
def test_suite_json_loads_with_the_expected_expectations() -> None:
    import great_expectations as gx

    with open(SUITE_PATH, encoding="utf-8") as fh:
        config = json.load(fh)
    suite = gx.ExpectationSuite(**config)

    assert suite.name == "events"
    listed = [(e.expectation_type, e.column) for e in suite.expectations]
    assert listed == [
        (EXISTS, "user_id"),
        (EXISTS, "item_id"),
        (EXISTS, "event_type"),
        (EXISTS, "timestamp"),
        (EXISTS, "event_id"),
        (OF_TYPE, "event_id"),
        (OF_TYPE, "user_id"),
        (OF_TYPE, "item_id"),
        (OF_TYPE, "event_type"),
        (OF_TYPE, "timestamp"),
        (OF_TYPE, "value"),
        (NOT_NULL, "event_id"),
        (NOT_NULL, "user_id"),
        (NOT_NULL, "item_id"),
        (NOT_NULL, "event_type"),
        (NOT_NULL, "timestamp"),
        (IN_SET, "event_type"),
        (BETWEEN, "value"),
        (IN_SET, "device"),
        (UNIQUE, "event_id"),
        (BETWEEN, "timestamp"),
    ]
    assert all(e.meta.get("notes") for e in suite.expectations)
    assert suite.suite_parameter_options == (MAX_TIMESTAMP_PARAMETER,)
    by_key = {(e.expectation_type, e.column): e for e in suite.expectations}
    assert set(by_key[(IN_SET, "event_type")].value_set) == set(DEFAULT_EVENT_WEIGHTS)
    assert list(by_key[(IN_SET, "device")].value_set) == [
        "desktop",
        "mobile",
        "tablet",
        "tv",
        "other",
    ]
    assert by_key[(BETWEEN, "value")].min_value == 0
    assert by_key[(BETWEEN, "value")].max_value == 1e7
    assert by_key[(BETWEEN, "timestamp")].max_value == {"$PARAMETER": MAX_TIMESTAMP_PARAMETER}
    oldest = dt.datetime(1990, 1, 1, tzinfo=dt.timezone.utc)
    assert by_key[(BETWEEN, "timestamp")].min_value == oldest
    assert config["meta"]["volume"]["min_ratio_to_trailing_median"] == 0.5


# ---- clean data ----------------------------------------------------------------------------
def test_clean_frame_passes_and_removes_a_stale_quarantine_file(tmp_path: Path) -> None:
    events = make_events()
    stale = tmp_path / "quarantine" / "events.parquet"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"stale")

    clean, report = run(events, tmp_path)

    assert report.passed
    assert (report.rows, report.bad_rows, report.bad_share) == (40, 0, 0.0)
    assert report.failures == ()
    assert report.quarantine_path is None
    assert not stale.exists()
    pd.testing.assert_frame_equal(clean, events)


# ---- row-level failures under the threshold --------------------------------------------------
def test_bad_rows_are_quarantined_with_reasons_and_run_continues(tmp_path: Path) -> None:
    events = make_events()
    events.loc[3, "user_id"] = pd.NA  # data row 4
    events.loc[8, "value"] = -1.0  # data row 9
    events.loc[12, "event_type"] = "teleport"  # data row 13
    events.loc[20, "user_id"] = pd.NA  # data row 21: two reasons
    events.loc[20, "value"] = -5.0

    clean, report = run(events, tmp_path, max_bad_row_share=0.2)

    assert report.passed
    assert (report.rows, report.bad_rows) == (40, 4)
    assert report.bad_share == pytest.approx(0.1)
    assert report.quarantine_path == tmp_path / "quarantine" / "events.parquet"
    assert reasons_by_source_row(report.quarantine_path) == {
        4: f"{NOT_NULL}(user_id)",
        9: f"{BETWEEN}(value)",
        13: f"{IN_SET}(event_type)",
        21: f"{NOT_NULL}(user_id); {BETWEEN}(value)",
    }
    quarantined = pd.read_parquet(report.quarantine_path)
    assert list(quarantined.columns) == [*events.columns, "reason"]
    assert set(quarantined["source_file"]) == {SOURCE}

    assert len(clean) == 36
    assert clean.index.equals(pd.RangeIndex(36))
    assert not set(clean["source_row"]) & {4, 9, 13, 21}

    failures = {(f.expectation, f.column): f for f in report.failures}
    assert set(failures) == {(NOT_NULL, "user_id"), (BETWEEN, "value"), (IN_SET, "event_type")}
    assert failures[(NOT_NULL, "user_id")].unexpected_count == 2
    assert failures[(NOT_NULL, "user_id")].examples == ((SOURCE, 4, None), (SOURCE, 21, None))
    assert failures[(BETWEEN, "value")].examples == ((SOURCE, 9, -1.0), (SOURCE, 21, -5.0))
    assert failures[(IN_SET, "event_type")].examples == ((SOURCE, 13, "teleport"),)
    # failures come in suite order
    assert [f.expectation for f in report.failures] == [NOT_NULL, IN_SET, BETWEEN]

    as_dict = json.loads(json.dumps(report.to_dict()))
    assert as_dict["bad_rows"] == 4
    assert as_dict["failures"][0]["examples"] == [[SOURCE, 4, None], [SOURCE, 21, None]]


def test_events_are_not_modified(tmp_path: Path) -> None:
    events = make_events()
    events.loc[3, "user_id"] = pd.NA
    before = events.copy()

    run(events, tmp_path, max_bad_row_share=0.5)

    pd.testing.assert_frame_equal(events, before)


# ---- fatal failures ---------------------------------------------------------------------------
def test_bad_share_above_threshold_raises_naming_expectation_column_file_and_row(
    tmp_path: Path,
) -> None:
    events = make_events(20)
    events.loc[[2, 5], "user_id"] = pd.NA  # data rows 3 and 6: 10% > 5%

    with pytest.raises(ValidationFailed) as caught:
        run(events, tmp_path)

    message = str(caught.value)
    assert NOT_NULL in message
    assert "'user_id'" in message
    assert "10.00%" in message
    assert f"{SOURCE} row 3" in message
    assert f"{SOURCE} row 6" in message
    assert isinstance(caught.value, EventValidationFailed)
    assert not caught.value.report.passed
    # the bad rows are kept for inspection
    assert reasons_by_source_row(tmp_path / "quarantine" / "events.parquet") == {
        3: f"{NOT_NULL}(user_id)",
        6: f"{NOT_NULL}(user_id)",
    }


def test_missing_required_column_raises(tmp_path: Path) -> None:
    events = make_events().drop(columns=["user_id"])

    with pytest.raises(ValidationFailed) as caught:
        run(events, tmp_path)

    message = str(caught.value)
    assert EXISTS in message
    assert "'user_id'" in message
    failures = caught.value.report.failures  # type: ignore[attr-defined]
    assert (EXISTS, "user_id", "table") in {(f.expectation, f.column, f.level) for f in failures}


def test_expectation_that_cannot_run_raises(tmp_path: Path) -> None:
    events = make_events()
    events["timestamp"] = events["timestamp"].dt.tz_localize(None)  # breaks the contract

    with pytest.raises(ValidationFailed) as caught:
        run(events, tmp_path)

    message = str(caught.value)
    assert f"{BETWEEN} on column 'timestamp' could not run" in message


def test_suite_with_an_unknown_expectation_is_rejected(tmp_path: Path) -> None:
    config = json.loads(SUITE_PATH.read_text(encoding="utf-8"))
    config["expectations"][0]["type"] = "expect_column_to_exsit"
    broken = tmp_path / "events.json"
    broken.write_text(json.dumps(config), encoding="utf-8")

    with pytest.raises(ValueError, match="only 20 of 21 expectations"):
        run(make_events(), tmp_path, suite_path=broken)


# ---- specific row-level rules ------------------------------------------------------------------
def test_future_timestamp_after_cutoff_plus_skew_is_quarantined(tmp_path: Path) -> None:
    events = make_events()
    events.loc[5, "timestamp"] = CUTOFF + DEFAULT_CLOCK_SKEW  # on the edge
    events.loc[6, "timestamp"] = CUTOFF + DEFAULT_CLOCK_SKEW + dt.timedelta(seconds=1)
    events.loc[7, "timestamp"] = CUTOFF + dt.timedelta(days=30)

    clean, report = run(events, tmp_path, max_bad_row_share=0.1)

    assert reasons_by_source_row(report.quarantine_path) == {
        7: f"{BETWEEN}(timestamp)",
        8: f"{BETWEEN}(timestamp)",
    }
    assert 6 in set(clean["source_row"])
    (failure,) = report.failures
    assert failure.examples[0] == (SOURCE, 7, "2024-06-01T00:05:01+00:00")


def test_cutoff_is_a_run_time_parameter(tmp_path: Path) -> None:
    events = make_events()  # timestamps 2024-05-01 00:00 .. 2024-05-02 15:00
    naive_early_cutoff = dt.datetime(2024, 5, 2, 12, 0)  # naive: taken as UTC

    _, report = run(
        events,
        tmp_path,
        cutoff=naive_early_cutoff,
        max_bad_row_share=0.2,
        clock_skew=dt.timedelta(0),
    )

    assert sorted(reasons_by_source_row(report.quarantine_path)) == [38, 39, 40]


def test_duplicate_event_id_keeps_first_occurrence(tmp_path: Path) -> None:
    events = make_events()
    events.loc[10, "event_id"] = "e0002"  # data row 11 repeats data row 3
    events.loc[30, "event_id"] = "e0002"  # data row 31 too

    clean, report = run(events, tmp_path, max_bad_row_share=0.1)

    assert reasons_by_source_row(report.quarantine_path) == {
        11: f"{UNIQUE}(event_id)",
        31: f"{UNIQUE}(event_id)",
    }
    assert (clean["event_id"] == "e0002").sum() == 1
    assert clean.loc[clean["event_id"] == "e0002", "source_row"].item() == 3
    (failure,) = report.failures
    assert failure.unexpected_count == 2


def test_allowed_event_types_override_the_suite(tmp_path: Path) -> None:
    events = make_events(14)
    events.loc[0, "event_type"] = "teleport"

    clean, report = run(events, tmp_path, allowed_event_types=[*EVENT_TYPES, "teleport"])
    assert report.bad_rows == 0 and len(clean) == 14

    narrowed = [t for t in EVENT_TYPES if t != "rating"]
    clean, report = run(
        events, tmp_path, allowed_event_types=[*narrowed, "teleport"], max_bad_row_share=0.5
    )
    assert sorted(reasons_by_source_row(report.quarantine_path)) == [7, 14]
    assert set(reasons_by_source_row(report.quarantine_path).values()) == {f"{IN_SET}(event_type)"}


def test_unknown_device_is_quarantined_but_missing_device_is_fine(tmp_path: Path) -> None:
    events = make_events()
    events.loc[1, "device"] = "toaster"
    assert events["device"].isna().any()

    _, report = run(events, tmp_path, max_bad_row_share=0.1)

    assert reasons_by_source_row(report.quarantine_path) == {2: f"{IN_SET}(device)"}


def test_empty_frame_passes(tmp_path: Path) -> None:
    clean, report = run(make_events().iloc[:0], tmp_path)

    assert report.passed and report.rows == 0 and report.bad_share == 0.0
    assert clean.empty


# ---- data docs --------------------------------------------------------------------------------
def test_data_docs_index_is_built_when_asked(tmp_path: Path) -> None:
    events = make_events()
    events.loc[3, "user_id"] = pd.NA

    _, report = run(events, tmp_path, max_bad_row_share=0.1, data_docs_dir=tmp_path / "docs")

    assert report.data_docs_path == (tmp_path / "docs" / "index.html").resolve()
    assert report.data_docs_path.is_file()
    assert list((tmp_path / "docs" / "validations").rglob("*.html"))
    assert report.to_dict()["data_docs_path"] == str(report.data_docs_path)


def test_no_data_docs_by_default(tmp_path: Path) -> None:
    _, report = run(make_events(), tmp_path)

    assert report.data_docs_path is None
    assert not (tmp_path / "docs").exists()


# ---- streaming over a file ----------------------------------------------------------------------
def test_file_validation_in_chunks_matches_whole_frame_and_catches_cross_chunk_duplicates(
    tmp_path: Path,
) -> None:
    from pipeline.lake.validate import validate_events_file

    events = make_events()
    events.loc[3, "user_id"] = pd.NA
    events.loc[25, "event_id"] = "e0002"  # a copy of row 3, in another chunk
    raw = tmp_path / "raw.parquet"
    events.to_parquet(raw, index=False)

    report = validate_events_file(
        raw,
        clean_path=tmp_path / "clean.parquet",
        suite_path=SUITE_PATH,
        cutoff=CUTOFF,
        allowed_event_types=EVENT_TYPES,
        max_bad_row_share=0.1,
        quarantine_path=tmp_path / "q.parquet",
        chunk_rows=10,
    )

    assert (report.rows, report.bad_rows, report.passed) == (40, 2, True)
    assert reasons_by_source_row(tmp_path / "q.parquet") == {
        4: f"{NOT_NULL}(user_id)",
        26: f"{UNIQUE}(event_id)",
    }
    clean = pd.read_parquet(tmp_path / "clean.parquet")
    pd.testing.assert_frame_equal(clean, events.drop(index=[3, 25]).reset_index(drop=True))


def test_file_validation_failure_writes_no_clean_file(tmp_path: Path) -> None:
    from pipeline.lake.validate import validate_events_file

    events = make_events(20)
    events.loc[[2, 5], "user_id"] = pd.NA
    raw = tmp_path / "raw.parquet"
    events.to_parquet(raw, index=False)
    with pytest.raises(EventValidationFailed, match=f"{SOURCE} row 3"):
        validate_events_file(
            raw,
            clean_path=tmp_path / "clean.parquet",
            suite_path=SUITE_PATH,
            cutoff=CUTOFF,
            allowed_event_types=EVENT_TYPES,
            quarantine_path=tmp_path / "q.parquet",
            chunk_rows=7,
        )
    assert not (tmp_path / "clean.parquet").exists()
    assert (tmp_path / "q.parquet").exists()


def test_a_day_under_half_the_trailing_median_is_a_warning_not_a_failure(tmp_path: Path) -> None:
    days = [10, 10, 12, 9, 11, 10, 4]  # the last day before the cutoff is thin
    stamps = [
        pd.Timestamp("2024-05-25T10:00Z") + pd.Timedelta(days=d)
        for d, count in enumerate(days)
        for _ in range(count)
    ]
    events = make_events(len(stamps))
    events["timestamp"] = pd.Series(stamps).astype("datetime64[us, UTC]")

    clean, report = run(events, tmp_path)

    assert report.passed and len(clean) == len(events)
    assert report.volume_warnings == ({"date": "2024-05-31", "rows": 4, "trailing_median": 10.0},)
    assert report.to_dict()["volume_warnings"][0]["date"] == "2024-05-31"
