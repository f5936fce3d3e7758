"""Is there enough fresh data in the run's window?

Checked by ``ingest`` right after the snapshot, so that a run for a date without data (the
trigger form's default "now" on an old log, or a broken upstream export) fails at once, and
says which date would work, instead of failing in ``train`` after retries, or publishing lists
from last week's events.

* **too few events:** fewer than ``min_events`` events in ``[cutoff - lookback, cutoff)``;
* **stale:** the newest event in the window is more than ``max_staleness_days`` before the
  cutoff (an export that stopped: nightly runs would keep publishing the same old lists).

The suggested logical date is the day after the lake's newest event: its cutoff (midnight UTC)
takes every event in the lake.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import pandas as pd

from pipeline.core.errors import WindowError

__all__ = ["WindowCheck", "check_window", "suggest_logical_date"]


@dataclass(frozen=True)
class WindowCheck:
    """Facts about one run's window, small enough for XCom."""

    cutoff: dt.datetime
    start: dt.datetime
    rows: int
    newest: pd.Timestamp | None  # newest event in the window
    lake_newest: pd.Timestamp | None  # newest event anywhere in the lake

    @property
    def staleness_days(self) -> float | None:
        """Days between the newest event in the window and the cutoff."""
        if self.newest is None:
            return None
        return (pd.Timestamp(self.cutoff) - self.newest).total_seconds() / 86_400

    def to_dict(self) -> dict:
        staleness = self.staleness_days
        return {
            "window_start": self.start.isoformat(),
            "window_rows": self.rows,
            "window_newest": _iso(self.newest),
            "lake_newest": _iso(self.lake_newest),
            "staleness_days": None if staleness is None else round(staleness, 3),
        }


def suggest_logical_date(lake_newest: pd.Timestamp | None) -> dt.date | None:
    """The logical date whose cutoff (midnight UTC) is the first to include every lake event."""
    if lake_newest is None:
        return None
    return (pd.Timestamp(lake_newest).tz_convert("UTC").floor("D") + pd.Timedelta(days=1)).date()


def check_window(window: WindowCheck, *, min_events: int, max_staleness_days: float | None) -> None:
    """Raise :class:`WindowError` when the window is too thin or stale (see the module doc)."""
    cutoff = f"{window.cutoff:%Y-%m-%d %H:%M} UTC"
    span = f"[{window.start:%Y-%m-%d}, {window.cutoff:%Y-%m-%d})"
    if window.rows < min_events:
        problem = (
            f"the run's window {span} (cutoff {cutoff}) holds {window.rows:,} events, "
            f"fewer than the minimum of {min_events:,}"
        )
    elif (
        max_staleness_days is not None
        and window.staleness_days is not None
        and window.staleness_days > max_staleness_days
    ):
        problem = (
            f"the newest event before the cutoff {cutoff} is from "
            f"{_iso(window.newest)}, {window.staleness_days:.1f} days earlier: more "
            f"than max_staleness_days={max_staleness_days:g} (has the upstream export "
            f"stopped?)"
        )
    else:
        return
    raise WindowError(f"{problem}; {_hint(window)}")


def _hint(window: WindowCheck) -> str:
    if window.lake_newest is None:
        return (
            "the lake is empty: drop event files into the landing folder first; nothing "
            "was published"
        )
    suggestion = suggest_logical_date(window.lake_newest)
    return (
        f"the lake's newest event is {_iso(window.lake_newest)}, so logical date "
        f"{suggestion} (or an earlier one with data) would work; nothing was published. "
        f"Trigger the DAG for that date, or lower min_window_events / raise "
        f"max_staleness_days to run anyway"
    )


def _iso(value: pd.Timestamp | None) -> str | None:
    return None if value is None else pd.Timestamp(value).isoformat()
