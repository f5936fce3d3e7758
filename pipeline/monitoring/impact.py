"""Attribution: what the published lists did.

Joins the served-list history (:mod:`pipeline.lake.served`: which user was shown which items,
from which model version and variant, live from a cutoff until the next one) with what the
users did afterwards (lake events, the CMS's feedback: ``impression``, ``click``,
``add_to_cart``, ``purchase``).

For each day ``d`` the list set live on ``d`` is the one with the newest cutoff ``<= d``. An
event is *on a recommended item* when its (user, item) pair is in that user's list of that
set. Per day, model version and variant:

=======================  ======================================================================
``users_served``         users with a personal list in the set (``__default__`` excluded)
``users_active``         served users with any event that day (impressions included: a visit)
``impressions``          impressions of recommended items
``clicks``               clicks on recommended items
``ctr``                  clicks / impressions (NaN when the CMS logs no impressions)
``engaged_users``        active users who clicked, carted or bought a recommended item within
                         ``engage_days`` days from ``d`` (the fallback when there are no
                         impressions: "served and then engaged")
``engaged_share``        engaged_users / users_active
``converted_users``      active users with an ``add_to_cart`` or ``purchase`` of a recommended
                         item within ``engage_days``
``conversion``           converted_users / users_active
``revenue``              ``value`` of purchases of recommended items within ``engage_days``
``revenue_per_active``   revenue / users_active
=======================  ======================================================================

and the same restricted to the first :data:`TOP_POSITIONS` ranks (suffix ``_top3``).
:func:`sitewide_outcomes` counts every user of a pre-window population by variant instead,
listed or not, active or not (intent to treat): the view a holdout group (no
recommendations) is compared in. The
user-level view (:func:`user_outcomes`) counts each served user once over a period (active,
engaged, converted at least once), the unit that the experiment's two-proportion tests need:
user-days of one user are not independent.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable

import numpy as np
import pandas as pd

from pipeline.core.config import DEFAULT_USER, as_utc

logger = logging.getLogger(__name__)

TOP_POSITIONS = 3
ENGAGE_TYPES = ("click", "add_to_cart", "purchase")
CONVERT_TYPES = ("add_to_cart", "purchase")
GROUP = ["day", "cutoff", "model_version", "variant"]
NO_VARIANT = "(none)"
#: The variant of users outside the running experiment in the site-wide table.
OUTSIDE = "(outside)"
SITEWIDE_COLUMNS = [
    "variant",
    "users",
    "active_any",
    "converted_any",
    "revenue_any",
    "conversion_any",
    "revenue_per_user_any",
]


def user_days(
    served: pd.DataFrame,
    events: pd.DataFrame,
    *,
    start: dt.datetime,
    end: dt.datetime,
    engage_days: int = 1,
) -> pd.DataFrame:
    """One row per served user active on a day of ``[start, end)``: the day, the live set's
    cutoff, model version and variant, and per scope (all ranks, then ``_top3``) the
    impressions and clicks of recommended items that day, whether the user engaged or
    converted on a recommended item within ``engage_days``, and the revenue of those
    purchases."""
    start_ts, end_ts = pd.Timestamp(as_utc(start)), pd.Timestamp(as_utc(end))
    lists = served[_personal(served)].copy()
    lists["variant"] = lists["variant"].fillna(NO_VARIANT).astype(str)
    lists["model_version"] = lists["model_version"].fillna("").astype(str)
    lists["cutoff"] = pd.to_datetime(lists["cutoff"], utc=True)
    ev = events[
        (events["timestamp"] >= start_ts)
        & (events["timestamp"] < end_ts + pd.Timedelta(days=engage_days))
    ]
    ev = pd.DataFrame(
        {
            "user_id": ev["user_id"].astype(str),
            "item_id": ev["item_id"].astype(str),
            "event_type": ev["event_type"].astype(str),
            "value": ev["value"].astype("float64"),
            "day": ev["timestamp"].dt.floor("D"),
        }
    )
    cutoffs = np.sort(lists["cutoff"].unique())
    if not len(cutoffs) or ev.empty:
        return pd.DataFrame(columns=USER_DAY_COLUMNS)
    # The set live on a day: the newest cutoff at or before the day's start.
    position = np.searchsorted(cutoffs, ev["day"].to_numpy(), side="right") - 1
    ev = ev[position >= 0].assign(cutoff=pd.to_datetime(cutoffs[position[position >= 0]], utc=True))
    who = lists.drop_duplicates(["cutoff", "user_id"])[
        ["cutoff", "user_id", "variant", "model_version"]
    ]
    ev = ev.merge(who, on=["cutoff", "user_id"], how="inner")  # served users only
    ev = ev.merge(
        lists[["cutoff", "user_id", "item_id", "rank"]],
        on=["cutoff", "user_id", "item_id"],
        how="left",
    )
    visits = ev[(ev["day"] >= start_ts) & (ev["day"] < end_ts)].drop_duplicates(["day", "user_id"])[
        ["day", "user_id", "cutoff", "model_version", "variant"]
    ]
    out = visits.set_index(["day", "user_id"])
    for suffix, rec in (("", ev["rank"].notna()), ("_top3", ev["rank"].le(TOP_POSITIONS))):
        mine = ev[rec]
        same_day = mine[(mine["day"] >= start_ts) & (mine["day"] < end_ts)]
        counts = same_day.groupby(["day", "user_id", "event_type"]).size().unstack(fill_value=0)
        for kind, name in (("impression", "impressions"), ("click", "clicks")):
            column = counts[kind] if kind in counts else pd.Series(dtype="int64")
            out[name + suffix] = column.reindex(out.index, fill_value=0).to_numpy()
        hits = mine[mine["event_type"].isin(ENGAGE_TYPES)]
        # An outcome on day e counts for the user's visits on days e - lag, lag < engage_days.
        later = pd.concat(
            [hits.assign(day=hits["day"] - pd.Timedelta(days=lag)) for lag in range(engage_days)],
            ignore_index=True,
        )
        later = later.merge(visits[["day", "user_id"]], on=["day", "user_id"])
        later = later.drop_duplicates(["day", "user_id", "item_id", "event_type", "value"])
        key = ["day", "user_id"]
        out["engaged" + suffix] = out.index.isin(pd.MultiIndex.from_frame(later[key]))
        converted = later[later["event_type"].isin(CONVERT_TYPES)]
        out["converted" + suffix] = out.index.isin(pd.MultiIndex.from_frame(converted[key]))
        revenue = later[later["event_type"] == "purchase"].groupby(key)["value"].sum()
        out["revenue" + suffix] = revenue.reindex(out.index, fill_value=0.0).to_numpy()
    return out.reset_index()[USER_DAY_COLUMNS]


def attribute(
    served: pd.DataFrame,
    events: pd.DataFrame,
    *,
    start: dt.datetime,
    end: dt.datetime,
    engage_days: int = 1,
) -> pd.DataFrame:
    """Daily impact rows (see the module docstring) for the days in ``[start, end)``."""
    days = user_days(served, events, start=start, end=end, engage_days=engage_days)
    if days.empty:
        return pd.DataFrame(columns=[*GROUP, *METRIC_COLUMNS])
    sums = {c: (c, "sum") for c in days.columns if c not in (*GROUP, "user_id")}
    out = days.groupby(GROUP).agg(users_active=("user_id", "size"), **sums).reset_index()
    out = out.rename(
        columns={
            f"{k}{s}": f"{k}_users{s}" for k in ("engaged", "converted") for s in ("", "_top3")
        }
    )
    lists = served[_personal(served)]
    served_per = (
        lists.drop_duplicates(["cutoff", "user_id"])
        .assign(
            cutoff=lambda f: pd.to_datetime(f["cutoff"], utc=True),
            variant=lambda f: f["variant"].fillna(NO_VARIANT).astype(str),
            model_version=lambda f: f["model_version"].fillna("").astype(str),
        )
        .groupby(["cutoff", "model_version", "variant"])
        .size()
        .rename("users_served")
    )
    out = out.join(served_per, on=["cutoff", "model_version", "variant"])
    for s in ("", "_top3"):
        imp = out[f"impressions{s}"]
        out[f"ctr{s}"] = out[f"clicks{s}"] / imp.where(imp > 0)
        out[f"engaged_share{s}"] = out[f"engaged_users{s}"] / out["users_active"]
        out[f"conversion{s}"] = out[f"converted_users{s}"] / out["users_active"]
        out[f"revenue_per_active{s}"] = out[f"revenue{s}"] / out["users_active"]
    return out[[*GROUP, *METRIC_COLUMNS]].sort_values(GROUP).reset_index(drop=True)


def user_outcomes(
    served: pd.DataFrame,
    events: pd.DataFrame,
    *,
    start: dt.datetime,
    end: dt.datetime,
    engage_days: int = 1,
) -> pd.DataFrame:
    """One row per user served in ``[start, end)`` and variant (a user served by two
    versions counts under each): active, engaged and converted at least once, and clicks
    and impressions of recommended items."""
    days = user_days(served, events, start=start, end=end, engage_days=engage_days)
    key = ["variant", "model_version", "user_id"]
    grouped = days.groupby(key)
    out = (
        grouped[["engaged", "converted"]]
        .max()
        .join(grouped[["impressions", "clicks"]].sum())
        .assign(active=True)
    )
    live = served[_personal(served)].assign(
        variant=lambda f: f["variant"].fillna(NO_VARIANT).astype(str),
        model_version=lambda f: f["model_version"].fillna("").astype(str),
        user_id=lambda f: f["user_id"].astype(str),
    )
    if "live_until" in live:
        start_ts, end_ts = pd.Timestamp(as_utc(start)), pd.Timestamp(as_utc(end))
        live = live[
            (pd.to_datetime(live["cutoff"], utc=True) < end_ts)
            & (live["live_until"].isna() | (live["live_until"] > start_ts))
        ]
    users = live.drop_duplicates(key)[key].set_index(key)
    out = users.join(out)
    for column in ("active", "engaged", "converted"):
        out[column] = out[column].astype("boolean").fillna(False).astype(bool)
    for column in ("impressions", "clicks"):
        out[column] = out[column].fillna(0).astype("int64")
    return out.reset_index()


def sitewide_outcomes(
    events: pd.DataFrame,
    population: Iterable[str],
    variant_of: Callable[[np.ndarray], np.ndarray],
    *,
    start: dt.datetime,
    end: dt.datetime,
    outside: str = OUTSIDE,
) -> pd.DataFrame:
    """Per variant, what the site got from every user of ``population`` in ``[start, end)``,
    whatever they were shown: the view a holdout group needs. A holdout user has no list, so
    nothing can be attributed to one; the question is whether the site as a whole does better
    with recommendations than without.

    Intent to treat: ``population`` is fixed before the window (the users active in a
    pre-period) and every one of them counts, active or not. Counting only *active* users
    would condition on the treatment: a visit with a list leaves impressions (and clicks a
    holdout user cannot make), so listed users look "active" more often than holdout users
    with the same behaviour. Users first seen in the window are left out for the same reason.

    ``variant_of`` maps user ids to their variant (None: outside the experiment, reported as
    ``outside``). Columns :data:`SITEWIDE_COLUMNS`: ``users`` (assigned), ``active_any``
    (users with an event other than an impression), ``converted_any`` (a cart or purchase of
    any item), ``revenue_any`` (the value of all purchases), and ``conversion_any`` and
    ``revenue_per_user_any`` per assigned user."""
    start_ts, end_ts = pd.Timestamp(as_utc(start)), pd.Timestamp(as_utc(end))
    users = pd.Index(pd.unique(pd.Series(list(population), dtype=object).astype(str)))
    if users.empty:
        return pd.DataFrame(columns=SITEWIDE_COLUMNS)
    ev = events[(events["timestamp"] >= start_ts) & (events["timestamp"] < end_ts)]
    user = ev["user_id"].astype(str)
    kind = ev["event_type"].astype(str)
    active = users.isin(user[kind != "impression"].unique())
    converted = users.isin(user[kind.isin(CONVERT_TYPES)].unique())
    bought = (kind == "purchase").to_numpy()
    revenue = (
        ev.loc[bought, "value"]
        .astype("float64")
        .fillna(0.0)
        .groupby(user[bought].to_numpy())
        .sum()
        .reindex(users, fill_value=0.0)
        .to_numpy()
    )
    variant = pd.Series(variant_of(users.to_numpy()), dtype=object).fillna(outside)
    per_user = pd.DataFrame(
        {
            "variant": variant.astype(str).to_numpy(),
            "active_any": active,
            "converted_any": converted,
            "revenue_any": revenue,
        }
    )
    out = per_user.groupby("variant").agg(
        users=("active_any", "size"),
        active_any=("active_any", "sum"),
        converted_any=("converted_any", "sum"),
        revenue_any=("revenue_any", "sum"),
    )
    out["conversion_any"] = out["converted_any"] / out["users"]
    out["revenue_per_user_any"] = out["revenue_any"] / out["users"]
    return out.reset_index()[SITEWIDE_COLUMNS]


def _personal(served: pd.DataFrame) -> pd.Series:
    """Rows of real users: not ``__default__`` nor a variant's ``__default__:<variant>``."""
    return ~served["user_id"].astype(str).str.startswith(DEFAULT_USER)


USER_DAY_COLUMNS = [
    "day",
    "user_id",
    "cutoff",
    "model_version",
    "variant",
    *[
        f"{k}{s}"
        for s in ("", "_top3")
        for k in ("impressions", "clicks", "engaged", "converted", "revenue")
    ],
]
METRIC_COLUMNS = [
    "users_served",
    "users_active",
    *[
        f"{k}{s}"
        for s in ("", "_top3")
        for k in (
            "impressions",
            "clicks",
            "ctr",
            "engaged_users",
            "engaged_share",
            "converted_users",
            "conversion",
            "revenue",
            "revenue_per_active",
        )
    ],
]
