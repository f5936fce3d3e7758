"""Data health: is the input arriving, on time, complete and clean?

Each check is a plain function of what the lake already records (event timestamps, the ingest
manifest), so it is cheap and needs no model. Statuses compare a value with two thresholds in
the direction that is bad for that metric; :data:`HEALTH_THRESHOLDS` holds the defaults.

=================  ============================================================  ====  =====
metric             meaning                                                       warn  alert
=================  ============================================================  ====  =====
volume_ratio       events on the last full day before the as-of moment, over      <0.7  <0.5
                   the median day of the trailing window before it                 >2    >3
newest_event_age   seconds between the newest event before as-of and as-of        >1 d  >3 d
quarantine_share   rows the newest ingest kept out of the lake (bad, future,      >1%   >5%
                   too late) over the rows it read
late_share         rows the newest ingest rejected as too late (older than the    >1%   >5%
                   lake's watermark minus the allowed lateness) over rows read
new_item_share     events of the current window on items the reference window     >10%  >25%
                   never saw (a flood of new items the champion cannot know)
ctr_ratio          the last day's CTR of recommended items over the median day    <0.8  <0.5
                   of the window before it (from the impact DAG, when present)
conversion_ratio   the same for conversion per active user                       <0.8  <0.5
=================  ============================================================  ====  =====

Two more read the validation log (``<data_dir>/gx/validation_log.jsonl``,
:func:`pipeline.lake.validate.read_validation_log`: one record per landing file validated at
ingest and per nightly ``validate`` that checked rows), over the ``days`` days of validation
time up to its newest record (validations happen when files arrive, not at a logical date, as
the quarantine share reads the newest ingest): ``validation_failed_share``, the share whose
Great Expectations result failed (warn above 50%), and ``validation_bad_row_share``, the rows
they rejected over the rows they evaluated (warn above 1%, alert above 5%).

A catalogue that renews itself (news) has a high new-item share every day: raise its
thresholds through ``HEALTH_THRESHOLDS`` rather than living with a permanent alert.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.core.config import DEFAULT_USER

#: Trailing days whose median daily volume is the baseline of ``volume_ratio``.
TRAILING_DAYS = 28
#: List sources that are not personal: a user whose first item comes from one is cold-start.
FALLBACK_SOURCES = ("popular",)


@dataclass(frozen=True)
class Threshold:
    """Warn/alert bounds; ``low_*`` fire below, ``high_*`` above (None: no bound)."""

    low_warn: float | None = None
    low_alert: float | None = None
    high_warn: float | None = None
    high_alert: float | None = None

    def status(self, value: float | None) -> str:
        if value is None or not math.isfinite(value):
            return "unknown"
        if (self.low_alert is not None and value < self.low_alert) or (
            self.high_alert is not None and value > self.high_alert
        ):
            return "alert"
        if (self.low_warn is not None and value < self.low_warn) or (
            self.high_warn is not None and value > self.high_warn
        ):
            return "warn"
        return "ok"


HEALTH_THRESHOLDS: Mapping[str, Threshold] = {
    "volume_ratio": Threshold(low_warn=0.7, low_alert=0.5, high_warn=2.0, high_alert=3.0),
    "newest_event_age": Threshold(high_warn=86_400.0, high_alert=3 * 86_400.0),
    "quarantine_share": Threshold(high_warn=0.01, high_alert=0.05),
    "late_share": Threshold(high_warn=0.01, high_alert=0.05),
    "new_item_share": Threshold(high_warn=0.1, high_alert=0.25),
    "ctr_ratio": Threshold(low_warn=0.8, low_alert=0.5),
    "conversion_ratio": Threshold(low_warn=0.8, low_alert=0.5),
    "validation_failed_share": Threshold(high_warn=0.5),
    "validation_bad_row_share": Threshold(high_warn=0.01, high_alert=0.05),
}


def daily_counts(timestamps: pd.Series, as_of: dt.datetime, days: int) -> pd.Series:
    """Events per UTC day for the ``days`` full days before ``as_of`` (oldest first; days
    without events count 0). ``as_of`` should be a midnight; a later time ends the last day
    there."""
    end = pd.Timestamp(as_of).floor("D")
    index = pd.date_range(end=end - pd.Timedelta(days=1), periods=days, freq="D", tz="UTC")
    ts = pd.to_datetime(timestamps, utc=True)
    ts = ts[(ts >= index[0]) & (ts < end)]
    counts = ts.dt.floor("D").value_counts()
    return counts.reindex(index, fill_value=0).astype("int64").rename("events")


def volume_ratio(daily: pd.Series) -> float:
    """The last day's count over the median of the days before it (NaN without history or
    with a zero median)."""
    if len(daily) < 2:
        return float("nan")
    median = float(np.median(daily.to_numpy()[:-1]))
    return float(daily.iloc[-1]) / median if median > 0 else float("nan")


def newest_event_age(newest: pd.Timestamp | None, as_of: dt.datetime) -> float:
    """Seconds from the newest event before ``as_of`` to ``as_of`` (NaN when there is none)."""
    if newest is None or pd.isna(newest):
        return float("nan")
    return float((pd.Timestamp(as_of) - pd.Timestamp(newest)).total_seconds())


def last_ingest_shares(manifest: Iterable[Mapping]) -> dict[str, float]:
    """Quarantine and late shares of the newest ingest (the manifest records sharing the
    latest ``ingested_at``); NaN when the manifest is empty or that ingest read no rows."""
    records = list(manifest)
    if not records:
        return {"quarantine_share": float("nan"), "late_share": float("nan")}
    newest = max(r["ingested_at"] for r in records)
    batch = [r for r in records if r["ingested_at"] == newest]
    read = sum(int(r.get("rows_read") or 0) for r in batch)
    kept_out = sum(
        int(r.get(key) or 0) for r in batch for key in ("rows_rejected", "rows_future", "rows_late")
    )
    late = sum(int(r.get("rows_late") or 0) for r in batch)
    if read == 0:
        return {"quarantine_share": float("nan"), "late_share": float("nan")}
    return {"quarantine_share": kept_out / read, "late_share": late / read}


def health_table(
    timestamps: pd.Series,
    manifest: Iterable[Mapping],
    as_of: dt.datetime,
    *,
    trailing_days: int = TRAILING_DAYS,
    thresholds: Mapping[str, Threshold] = HEALTH_THRESHOLDS,
) -> pd.DataFrame:
    """One row per health metric (``metric``, ``value``, ``status``) for ``as_of``, from the
    event timestamps of at least the ``trailing_days + 1`` days before it and the manifest."""
    ts = pd.to_datetime(timestamps, utc=True)
    before = ts[ts < pd.Timestamp(as_of)]
    values = {
        "volume_ratio": volume_ratio(daily_counts(before, as_of, trailing_days + 1)),
        "newest_event_age": newest_event_age(before.max() if len(before) else None, as_of),
        **last_ingest_shares(manifest),
    }
    return pd.DataFrame(
        {
            "metric": list(values),
            "subject": "",
            "value": [float(v) for v in values.values()],
            "status": [thresholds[m].status(v) for m, v in values.items()],
        }
    )


def validation_health(
    log: Iterable[Mapping],
    days: int,
    *,
    thresholds: Mapping[str, Threshold] = HEALTH_THRESHOLDS,
) -> pd.DataFrame:
    """Rows ``validation_failed_share`` and ``validation_bad_row_share`` from the validation
    log's records of the ``days`` days up to the newest one (NaN, status unknown, without
    records or rows)."""
    records = [r for r in log if r.get("run_time")]
    values = {"validation_failed_share": math.nan, "validation_bad_row_share": math.nan}
    if records:
        times = pd.to_datetime([r["run_time"] for r in records], utc=True, format="ISO8601")
        recent = [r for r, t in zip(records, times >= times.max() - pd.Timedelta(days=days)) if t]
        values["validation_failed_share"] = sum(not r.get("success") for r in recent) / len(recent)
        rows = sum(int(r.get("rows") or 0) for r in recent)
        rejected = sum(int(r.get("rows_rejected") or 0) for r in recent)
        values["validation_bad_row_share"] = rejected / rows if rows else math.nan
    return pd.DataFrame(
        {
            "metric": list(values),
            "subject": "",
            "value": [float(v) for v in values.values()],
            "status": [thresholds[m].status(v) for m, v in values.items()],
        }
    )


def online_ratios(
    daily: pd.DataFrame, *, thresholds: Mapping[str, Threshold] = HEALTH_THRESHOLDS
) -> pd.DataFrame:
    """Online drops from the impact DAG's daily rows (day, clicks, impressions,
    converted_users, users_active; any versions and variants, summed per day): the last day's
    CTR and conversion over the median of the days before it. Empty without two days."""
    if daily.empty or daily["day"].nunique() < 2:
        return pd.DataFrame(columns=["metric", "subject", "value", "status"])
    per_day = (
        daily.groupby("day")[["clicks", "impressions", "converted_users", "users_active"]]
        .sum()
        .sort_index()
    )
    rates = {
        "ctr_ratio": per_day["clicks"] / per_day["impressions"].where(per_day["impressions"] > 0),
        "conversion_ratio": per_day["converted_users"]
        / per_day["users_active"].where(per_day["users_active"] > 0),
    }
    rows = []
    for metric, rate in rates.items():
        earlier = rate.iloc[:-1].dropna()
        median = float(np.median(earlier)) if len(earlier) else float("nan")
        value = float(rate.iloc[-1]) / median if median > 0 else float("nan")
        rows.append((metric, value, thresholds[metric].status(value)))
    return pd.DataFrame(rows, columns=["metric", "value", "status"]).assign(subject="")


def new_item_share(reference_items: pd.Series, current_items: pd.Series) -> float:
    """Share of the current events (their item ids) on items absent from the reference's
    (NaN without current events)."""
    if not len(current_items):
        return float("nan")
    return float((~current_items.isin(pd.Index(reference_items.unique()))).mean())


def list_stats(lists: pd.DataFrame, catalogue: int) -> dict[str, float]:
    """Cold-start share (users whose first item is a fallback) and catalogue coverage
    (distinct listed items over ``catalogue`` items) of published lists."""
    personal = lists[lists["user_id"] != DEFAULT_USER]
    first = personal[personal["rank"] == 1]
    cold = float(first["source"].isin(FALLBACK_SOURCES).mean()) if len(first) else math.nan
    coverage = personal["item_id"].nunique() / catalogue if catalogue else math.nan
    return {"cold_start_share": cold, "catalogue_coverage": float(coverage)}
