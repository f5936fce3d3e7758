"""Attribution on a hand-made world with known answers."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from pipeline.lake.served import read_served, write_served
from pipeline.monitoring.impact import attribute, user_outcomes

UTC = dt.timezone.utc
DAY1 = dt.datetime(2024, 3, 1, tzinfo=UTC)
DAY2 = DAY1 + dt.timedelta(days=1)


def _lists() -> pd.DataFrame:
    rows = [("u1", r, f"i{r}", "A") for r in (1, 2, 3, 4)]
    rows += [
        ("u2", 1, "i5", "B"),
        ("u2", 2, "i6", "B"),
        ("u3", 1, "i1", "A"),
        ("u3", 2, "i2", "A"),
        ("__default__", 1, "i1", None),
        ("__default__:A", 1, "i1", "A"),
    ]
    return pd.DataFrame(rows, columns=["user_id", "rank", "item_id", "variant"])


def _events() -> pd.DataFrame:
    at = lambda day, hour: pd.Timestamp(day) + pd.Timedelta(hours=hour)  # noqa: E731
    rows = [
        ("u1", "i1", "impression", at(DAY1, 9), np.nan),
        ("u1", "i2", "impression", at(DAY1, 9), np.nan),
        ("u1", "i4", "impression", at(DAY1, 9), np.nan),
        ("u1", "i1", "click", at(DAY1, 10), np.nan),
        ("u1", "i1", "purchase", at(DAY1, 11), 10.0),
        ("u1", "i9", "click", at(DAY1, 12), np.nan),  # not recommended
        ("u2", "i5", "impression", at(DAY1, 9), np.nan),
        ("u2", "i6", "impression", at(DAY1, 9), np.nan),
        ("u4", "i1", "click", at(DAY1, 9), np.nan),  # never served
        ("u2", "i6", "add_to_cart", at(DAY2, 8), 5.0),
    ]
    return pd.DataFrame(rows, columns=["user_id", "item_id", "event_type", "timestamp", "value"])


@pytest.fixture
def served(tmp_path) -> pd.DataFrame:
    write_served(tmp_path, _lists(), cutoff=DAY1, published_at=DAY1, model_version="1")
    write_served(tmp_path, _lists(), cutoff=DAY2, published_at=DAY2, model_version="2")
    return read_served(tmp_path, DAY1, DAY2 + dt.timedelta(days=1))


def test_served_history_round_trip(tmp_path, served):
    assert len(served) == 2 * len(_lists())
    first = served[served["cutoff"] == pd.Timestamp(DAY1)]
    assert first["live_until"].unique().tolist() == [pd.Timestamp(DAY2)]
    assert first["model_version"].unique().tolist() == ["1"]
    assert first["user_id"].is_monotonic_increasing  # keyed by user, for erasure
    assert read_served(tmp_path, DAY2 + dt.timedelta(days=5))["cutoff"].unique().tolist() == [
        pd.Timestamp(DAY2)
    ]  # the newest set is still live
    newest = read_served(tmp_path, DAY2 + dt.timedelta(days=5))
    assert newest["live_until"].isna().all() and str(newest["live_until"].dtype).endswith("UTC]")
    # A re-publish of a cutoff replaces its file.
    write_served(tmp_path, _lists().head(2), cutoff=DAY1, published_at=DAY2, model_version="1")
    assert len(read_served(tmp_path, DAY1, DAY2)) == 2


def test_daily_impact_per_version_and_variant(served):
    daily = attribute(served, _events(), start=DAY1, end=DAY2 + dt.timedelta(days=1))
    rows = daily.set_index(["day", "variant"])
    a = rows.loc[(pd.Timestamp(DAY1), "A")]
    assert (a.model_version, a.users_served, a.users_active) == ("1", 2, 1)
    assert (a.impressions, a.clicks, a.ctr) == (3, 1, pytest.approx(1 / 3))
    assert (a.engaged_users, a.converted_users, a.revenue) == (1, 1, 10.0)
    assert (a.conversion, a.revenue_per_active) == (1.0, 10.0)
    assert (a.impressions_top3, a.clicks_top3, a.ctr_top3) == (2, 1, 0.5)  # i4 is rank 4
    b = rows.loc[(pd.Timestamp(DAY1), "B")]
    assert (b.users_served, b.users_active, b.impressions, b.clicks, b.ctr) == (1, 1, 2, 0, 0.0)
    assert (b.engaged_users, b.conversion) == (0, 0.0)  # the cart is the next day
    b2 = rows.loc[(pd.Timestamp(DAY2), "B")]
    assert b2.model_version == "2" and b2.impressions == 0 and np.isnan(b2.ctr)
    assert (b2.engaged_users, b2.converted_users, b2.revenue) == (1, 1, 0.0)
    assert len(daily) == 3  # nobody in A was active on day 2


def test_an_engagement_window_of_two_days_credits_the_earlier_visit(served):
    daily = attribute(served, _events(), start=DAY1, end=DAY2, engage_days=2)
    b = daily.set_index("variant").loc["B"]
    assert (b.engaged_users, b.converted_users, b.conversion) == (1, 1, 1.0)


def test_user_outcomes_count_each_user_once(served):
    users = user_outcomes(served, _events(), start=DAY1, end=DAY2)
    got = users.set_index("user_id")
    assert set(got.index) == {"u1", "u2", "u3"}
    assert len(users) == 3 and set(users["model_version"]) == {"1"}  # day 2's set is out
    assert bool(got.loc["u1", "active"]) and bool(got.loc["u1", "converted"])
    assert (got.loc["u1", "impressions"], got.loc["u1", "clicks"]) == (3, 1)
    assert not got.loc["u3", "active"] and not got.loc["u3", "engaged"]
    assert got.loc["u2", "impressions"] == 2 and got.loc["u2", "clicks"] == 0


def test_sitewide_outcomes_count_every_assigned_user_active_or_not():
    from pipeline.monitoring.impact import sitewide_outcomes

    at = lambda hour: pd.Timestamp(DAY1) + pd.Timedelta(hours=hour)  # noqa: E731
    events = pd.DataFrame(
        [
            ("u1", "i1", "impression", at(9), np.nan),  # shown a list, did nothing: not active
            ("u2", "i1", "view", at(9), np.nan),
            ("u2", "i1", "purchase", at(10), 12.0),
            ("u3", "i2", "add_to_cart", at(9), 4.0),
            ("u3", "i2", "purchase", at(10), 4.0),
            ("u4", "i3", "purchase", at(10), 99.0),  # outside the experiment
            ("u9", "i3", "purchase", at(10), 50.0),  # new in the window: not in the population
            ("u2", "i1", "purchase", at(30), 70.0),  # after the window
        ],
        columns=["user_id", "item_id", "event_type", "timestamp", "value"],
    )
    assignment = {"u1": "model", "u2": "model", "u3": "holdout", "u5": "holdout"}
    out = sitewide_outcomes(
        events,
        ["u1", "u2", "u3", "u4", "u5"],
        lambda ids: np.array([assignment.get(u) for u in ids], dtype=object),
        start=DAY1,
        end=DAY2,
    ).set_index("variant")
    assert out.loc["model", ["users", "active_any", "converted_any"]].tolist() == [2, 1, 1]
    assert out.loc["holdout", ["users", "active_any", "converted_any"]].tolist() == [2, 1, 1]
    assert out.loc["model", "revenue_any"] == 12.0 and out.loc["holdout", "revenue_any"] == 4.0
    assert out.loc["model", "conversion_any"] == 0.5
    assert out.loc["holdout", "revenue_per_user_any"] == 2.0
    assert out.loc["(outside)", "users"] == 1 and out.loc["(outside)", "revenue_any"] == 99.0
