"""Synthetic clickstream: contract, funnel/session/publication invariants, determinism, signal,
and the landing writer's round trip for every format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.core.schema import DEVICES, EVENT_COLUMNS, EVENT_DTYPES, ITEM_COLUMNS
from pipeline.lake.demo import AGE_BANDS, USER_COLUMNS, DemoData, format_iso_utc, write_landing
from pipeline.lake.demo import synthetic as syn

START = pd.Timestamp("2024-03-04", tz="UTC")  # a Monday
N_DAYS = 28
FUNNEL = ["view", "click", "add_to_cart", "purchase"]


@pytest.fixture(scope="module")
def data() -> DemoData:
    return syn.generate_clickstream(
        n_users=400, n_items=200, n_days=N_DAYS, start="2024-03-04", seed=3
    )


@pytest.fixture(scope="module")
def events_with_items(data: DemoData) -> pd.DataFrame:
    return data.events.merge(data.items, on="item_id", how="left", validate="many_to_one")


# ---- contract ------------------------------------------------------------------------------
def test_event_columns_and_dtypes(data: DemoData) -> None:
    events = data.events
    assert list(events.columns) == list(EVENT_COLUMNS)
    assert events.dtypes.astype(str).to_dict() == EVENT_DTYPES
    assert events["event_id"].is_unique
    assert events["event_id"].str.startswith("syn3-").all()
    assert set(events["event_type"]) == {
        "view",
        "click",
        "like",
        "share",
        "add_to_cart",
        "purchase",
    }
    assert set(events["device"]) <= set(DEVICES)
    assert events[["user_id", "item_id", "timestamp", "device", "session_id"]].notna().all().all()
    assert events["timestamp"].is_monotonic_increasing
    assert events["timestamp"].min() >= START
    assert events["timestamp"].max() < START + pd.Timedelta(days=N_DAYS)


def test_values_per_event_type(data: DemoData) -> None:
    events = data.events
    valued = events["event_type"].isin(["view", "click", "add_to_cart", "purchase"])
    assert (events.loc[valued, "value"] > 0).all()
    assert events.loc[~valued, "value"].isna().all()
    price = events.merge(data.items, on="item_id").query("event_type == 'purchase'")
    assert np.allclose(price["value"], price["price"])


def test_side_tables(data: DemoData) -> None:
    items, users = data.items, data.users
    assert list(items.columns) == list(ITEM_COLUMNS)
    assert items["item_id"].is_unique and len(items) == 200
    assert str(items["published_at"].dtype) == "datetime64[us, UTC]"
    assert items["available"].dtype == bool
    assert 0 < (~items["available"]).sum() < 0.1 * len(items)  # a few unavailable
    assert (items["price"] > 0).all()
    assert (items["published_at"] >= START).any()  # some published inside the window
    assert list(users.columns) == list(USER_COLUMNS)
    assert users["user_id"].is_unique and len(users) == 400
    assert set(users["age_band"]) <= set(AGE_BANDS)
    assert set(data.events["user_id"]) <= set(users["user_id"])
    assert set(data.events["item_id"]) <= set(items["item_id"])


# ---- behaviour -----------------------------------------------------------------------------
def test_funnel_counts_are_non_increasing(data: DemoData) -> None:
    counts = data.events["event_type"].value_counts()
    stages = [int(counts.get(t, 0)) for t in FUNNEL]
    assert stages == sorted(stages, reverse=True)
    assert stages[-1] > 0


@pytest.mark.parametrize(
    ("later", "earlier"),
    [
        ("click", "view"),
        ("like", "click"),
        ("share", "click"),
        ("add_to_cart", "click"),
        ("purchase", "add_to_cart"),
    ],
)
def test_every_stage_has_an_earlier_step_in_the_same_session(
    data: DemoData, later: str, earlier: str
) -> None:
    keys = ["user_id", "item_id", "session_id"]
    events = data.events
    first_earlier = (
        events[events["event_type"] == earlier]
        .groupby(keys)["timestamp"]
        .min()
        .rename("earlier_ts")
    )
    late = events[events["event_type"] == later].join(first_earlier, on=keys)
    assert len(late) > 0
    assert (late["earlier_ts"] < late["timestamp"]).all()  # NaT (no earlier step) fails too


def test_no_event_before_publication(events_with_items: pd.DataFrame) -> None:
    merged = events_with_items
    assert (merged["timestamp"] >= merged["published_at"]).all()
    new = merged[merged["published_at"] > START]
    assert len(new) > 0  # items published inside the window do get traffic


def test_sessions_are_short_and_keep_user_and_device(data: DemoData) -> None:
    by_session = data.events.groupby("session_id")
    span = by_session["timestamp"].max() - by_session["timestamp"].min()
    assert span.quantile(0.95) < pd.Timedelta(hours=1)
    assert by_session.size().mean() > 3
    assert (by_session["user_id"].nunique() == 1).all()
    assert (by_session["device"].nunique() == 1).all()
    per_user = pd.crosstab(data.events["user_id"], data.events["device"])
    assert (per_user.max(axis=1) / per_user.sum(axis=1)).mean() > 0.75


def test_daily_rhythm(data: DemoData) -> None:
    hours = data.events["timestamp"].dt.hour.value_counts()
    assert hours[20] > 2 * hours[4]


def test_popularity_is_skewed(data: DemoData) -> None:
    counts = data.events["item_id"].value_counts()
    top_decile = counts.iloc[: len(data.items) // 10].sum() / counts.sum()
    assert top_decile > 0.25


def test_users_mostly_stay_in_few_categories(events_with_items: pd.DataFrame) -> None:
    views = events_with_items[events_with_items["event_type"] == "view"]
    per_user = views.groupby(["user_id", "category"]).size().sort_values(ascending=False)
    top3 = (
        per_user.groupby(level=0).head(3).groupby(level=0).sum() / per_user.groupby(level=0).sum()
    )
    overall_top3 = views["category"].value_counts(normalize=True).iloc[:3].sum()
    assert top3.mean() > 0.8 > overall_top3


def test_item_knn_beats_popularity(data: DemoData) -> None:
    """A collaborative filter finds signal that popularity cannot (precision@10, new items)."""
    events = data.events
    cutoff = START + pd.Timedelta(days=N_DAYS - 7)
    users = pd.Index(sorted(events["user_id"].unique()))
    items = pd.Index(sorted(events["item_id"].unique()))
    train, test = events[events["timestamp"] < cutoff], events[events["timestamp"] >= cutoff]
    seen = np.zeros((len(users), len(items)))
    seen[users.get_indexer(train["user_id"]), items.get_indexer(train["item_id"])] = 1.0
    truth = np.zeros_like(seen)
    truth[users.get_indexer(test["user_id"]), items.get_indexer(test["item_id"])] = 1.0
    truth[seen > 0] = 0.0
    active = (truth.sum(axis=1) > 0) & (seen.sum(axis=1) > 0)
    norms = np.sqrt(seen.sum(axis=0)) + 1e-9
    similarity = seen.T @ seen / np.outer(norms, norms)
    np.fill_diagonal(similarity, 0.0)

    def precision_at_10(scores: np.ndarray) -> float:
        ranked = np.argsort(-np.where(seen > 0, -np.inf, scores), axis=1)[:, :10]
        return float(np.take_along_axis(truth, ranked, axis=1)[active].sum(axis=1).mean() / 10)

    knn = precision_at_10(seen @ similarity)
    popularity = precision_at_10(np.broadcast_to(seen.sum(axis=0), seen.shape))
    assert knn > 1.25 * popularity


# ---- determinism and scale -----------------------------------------------------------------
def test_same_seed_same_frames(data: DemoData) -> None:
    again = syn.generate_clickstream(
        n_users=400, n_items=200, n_days=N_DAYS, start="2024-03-04", seed=3
    )
    pd.testing.assert_frame_equal(again.events, data.events)
    pd.testing.assert_frame_equal(again.items, data.items)
    pd.testing.assert_frame_equal(again.users, data.users)


def test_different_seed_different_frames(data: DemoData) -> None:
    other = syn.generate_clickstream(
        n_users=400, n_items=200, n_days=N_DAYS, start="2024-03-04", seed=4
    )
    assert not other.events["event_id"].equals(data.events["event_id"])
    assert not other.items["price"].equals(data.items["price"])
    assert set(other.events["event_id"]).isdisjoint(data.events["event_id"])


def test_chunks_keep_ids_unique(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(syn, "_CHUNK_USERS", 7)
    data = syn.generate_clickstream(n_users=30, n_items=20, n_days=5, seed=1, sessions_per_user=3)
    assert data.events["event_id"].is_unique
    assert set(data.events["user_id"]) == set(data.users["user_id"])
    assert len(data.users) == 30


def test_tiny_catalog_and_validation() -> None:
    tiny = syn.generate_clickstream(n_users=3, n_items=2, n_days=1, n_categories=5, seed=0)
    assert set(tiny.events["item_id"]) <= {"i0", "i1"}
    with pytest.raises(ValueError):
        syn.generate_clickstream(n_users=0)


# ---- landing writer ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small() -> DemoData:
    data = syn.generate_clickstream(n_users=20, n_items=30, n_days=3, seed=5)
    return DemoData(events=data.events.head(300), items=data.items, users=data.users)


def _read_events(path: Path, fmt: str) -> pd.DataFrame:
    if fmt == "parquet":
        return pd.read_parquet(path)
    if fmt == "csv":
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    else:
        frame = pd.read_json(path, lines=True, dtype=False)
    assert frame["timestamp"].str.endswith("Z").all()
    frame["timestamp"] = pd.to_datetime(frame["timestamp"], format="ISO8601", utc=True)
    return frame.astype(EVENT_DTYPES)


@pytest.mark.parametrize(
    ("fmt", "gzip", "suffix"),
    [
        ("csv", False, ".csv"),
        ("csv", True, ".csv.gz"),
        ("jsonl", False, ".jsonl"),
        ("jsonl", True, ".jsonl.gz"),
        ("parquet", False, ".parquet"),
    ],
)
def test_write_landing_round_trips(
    small: DemoData, tmp_path: Path, fmt: str, gzip: bool, suffix: str
) -> None:
    paths = write_landing(small, tmp_path, name="day-1", fmt=fmt, gzip=gzip)

    assert paths == [
        tmp_path / "events" / f"day-1{suffix}",
        tmp_path / "items.csv",
        tmp_path / "users.csv",
    ]
    if gzip:
        assert paths[0].read_bytes()[:2] == b"\x1f\x8b"
    back = _read_events(paths[0], fmt)
    pd.testing.assert_frame_equal(back, small.events.reset_index(drop=True))

    items = pd.read_csv(
        paths[1], dtype={"item_id": "string", "title": "string", "category": "string"}
    )
    items["published_at"] = pd.to_datetime(
        items["published_at"], format="ISO8601", utc=True
    ).astype("datetime64[us, UTC]")
    pd.testing.assert_frame_equal(items, small.items)
    users = pd.read_csv(paths[2], dtype="string")
    pd.testing.assert_frame_equal(users, small.users)
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.startswith(".")]
    assert leftovers == []


def test_write_landing_rejects_gzipped_parquet(small: DemoData, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="parquet"):
        write_landing(small, tmp_path, name="x", fmt="parquet", gzip=True)
    assert not (tmp_path / "events").exists()


def test_write_landing_replaces_existing_file(small: DemoData, tmp_path: Path) -> None:
    write_landing(small, tmp_path, name="x")
    half = DemoData(events=small.events.head(10), items=small.items, users=small.users)
    path = write_landing(half, tmp_path, name="x")[0]
    assert len(pd.read_csv(path)) == 10


def test_format_iso_utc() -> None:
    stamps = pd.Series(
        pd.to_datetime(["2024-01-01T08:30:00", None, "2024-01-02T00:00:00.25"], format="ISO8601")
    )
    assert format_iso_utc(stamps).tolist() == [
        "2024-01-01T08:30:00.000000Z",
        pd.NA,
        "2024-01-02T00:00:00.250000Z",
    ]
    whole = pd.Series(pd.to_datetime(["2024-01-01T10:30:00+02:00"], utc=True))
    assert format_iso_utc(whole).tolist() == ["2024-01-01T08:30:00Z"]
