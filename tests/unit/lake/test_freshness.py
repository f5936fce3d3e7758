"""Runs without enough fresh data stop at ingest and say which date would work."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pytest

from pipeline.core.errors import WindowError
from pipeline.lake.freshness import WindowCheck, check_window, suggest_logical_date

UTC = dt.timezone.utc
CUTOFF = dt.datetime(2026, 12, 2, tzinfo=UTC)
LAKE_NEWEST = pd.Timestamp("1998-04-22T23:59:19Z")


def _window(rows: int, newest: str | None, lake_newest=LAKE_NEWEST) -> WindowCheck:
    return WindowCheck(
        CUTOFF,
        CUTOFF - dt.timedelta(days=365),
        rows,
        None if newest is None else pd.Timestamp(newest),
        lake_newest,
    )


def test_the_suggested_date_is_the_first_whose_cutoff_takes_every_lake_event():
    assert suggest_logical_date(LAKE_NEWEST) == dt.date(1998, 4, 23)
    assert suggest_logical_date(pd.Timestamp("1998-04-22T00:00:00Z")) == dt.date(1998, 4, 23)
    assert suggest_logical_date(pd.Timestamp("1998-04-22T23:30:00-02:00")) == dt.date(1998, 4, 24)
    assert suggest_logical_date(None) is None


def test_an_empty_window_names_the_cutoff_the_lake_newest_event_and_a_date_that_works():
    with pytest.raises(WindowError) as caught:
        check_window(_window(0, None), min_events=100, max_staleness_days=3)
    message = str(caught.value)
    assert "[2025-12-02, 2026-12-02)" in message and "cutoff 2026-12-02 00:00 UTC" in message
    assert "holds 0 events, fewer than the minimum of 100" in message
    assert "1998-04-22T23:59:19+00:00" in message and "logical date 1998-04-23" in message
    assert "nothing was published" in message


def test_too_few_events_fail_and_enough_pass():
    with pytest.raises(WindowError, match="holds 99 events, fewer than the minimum of 100"):
        check_window(_window(99, "2026-12-01T20:00Z"), min_events=100, max_staleness_days=3)
    check_window(_window(100, "2026-12-01T20:00Z"), min_events=100, max_staleness_days=3)


def test_a_stale_window_fails_with_its_age_and_the_limit():
    window = _window(5_000, "2026-11-28T12:00Z")  # 3.5 days before the cutoff
    assert window.staleness_days == pytest.approx(3.5)
    with pytest.raises(WindowError, match=r"3\.5 days earlier: more than max_staleness_days=3"):
        check_window(window, min_events=100, max_staleness_days=3)
    check_window(window, min_events=100, max_staleness_days=4)
    check_window(window, min_events=100, max_staleness_days=None)  # no limit


def test_an_empty_lake_says_so():
    with pytest.raises(WindowError, match="the lake is empty"):
        check_window(_window(0, None, lake_newest=None), min_events=1, max_staleness_days=3)


def test_the_window_facts_travel_as_plain_values():
    facts = _window(42, "2026-12-01T12:00Z").to_dict()
    assert facts == {
        "window_start": "2025-12-02T00:00:00+00:00",
        "window_rows": 42,
        "window_newest": "2026-12-01T12:00:00+00:00",
        "lake_newest": "1998-04-22T23:59:19+00:00",
        "staleness_days": 0.5,
    }
