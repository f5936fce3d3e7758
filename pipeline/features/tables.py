"""Point-in-time features: RFM and context per user, popularity and age per item, and the
matrix-aligned pieces the ranker uses (recent history, category affinity, demographics).

Every function takes the run's ``cutoff`` and uses only events strictly before it, so a
feature row never sees the future even when the frame passed in holds later events.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pipeline.core.arrays import run_starts
from pipeline.core.schema import DEVICES
from pipeline.features.matrix import lookup
from pipeline.features.popularity import count_distinct

logger = logging.getLogger(__name__)

FREQUENCY_WINDOWS = (7, 30, 90)
POPULARITY_WINDOWS = (1, 7, 30)
#: users.csv attributes used as (target-encoded) demographic features and cold-start segments.
DEMOGRAPHICS = ("age_band", "gender", "occupation")
DAYPARTS = {"night": (0, 6), "morning": (6, 12), "afternoon": (12, 18), "evening": (18, 24)}


def before(events: pd.DataFrame, cutoff: dt.datetime) -> pd.DataFrame:
    """The events strictly before ``cutoff``."""
    return events[events["timestamp"] < cutoff]


def build_user_features(events: pd.DataFrame, cutoff: dt.datetime) -> pd.DataFrame:
    """One row per user: recency, frequency per window, monetary, device and time profile."""
    events = before(events, cutoff)
    users = _UserGroups(events["user_id"])
    by_user = events.groupby(users.key, observed=True)
    age_days = (cutoff - events["timestamp"]).dt.total_seconds() / 86400.0
    frame = pd.DataFrame(
        {
            "recency_days": (cutoff - users.named(by_user["timestamp"].max())).dt.total_seconds()
            / 86400.0,
            "tenure_days": (cutoff - users.named(by_user["timestamp"].min())).dt.total_seconds()
            / 86400.0,
            "events_total": users.named(by_user.size()),
            "items_distinct": count_distinct(events, by="user_id", of="item_id"),
            "monetary": users.named(by_user["value"].sum(min_count=0)).fillna(0.0),
        }
    )
    for days in FREQUENCY_WINDOWS:
        recent = (age_days <= days).to_numpy()
        counts = np.bincount(users.codes[recent & (users.codes >= 0)], minlength=len(users.ids))
        frame[f"frequency_{days}d"] = pd.Series(counts, users.ids).reindex(
            frame.index, fill_value=0
        )
    device = events["device"]
    device_codes = pd.Categorical(device, categories=DEVICES).codes.astype(np.int64)
    device_codes[device.isna().to_numpy()] = DEVICES.index("other")  # missing is "other"
    frame = frame.join(_shares(users, device_codes, "device", DEVICES))
    bounds = [lo for lo, _ in DAYPARTS.values()][1:]  # the day parts are contiguous, in order
    daypart = np.digitize(events["timestamp"].dt.hour.to_numpy(), bounds)
    frame = frame.join(_shares(users, daypart, "daypart", tuple(DAYPARTS)))
    weekend = (events["timestamp"].dt.day_of_week >= 5).astype("float64")
    frame["weekend_share"] = users.named(weekend.groupby(users.key, observed=True).mean())
    frame = frame.join(_session_stats(events, users))
    frame.index.name = "user_id"
    return frame.reset_index().sort_values("user_id", kind="stable").reset_index(drop=True)


class _UserGroups:
    """The events' users, numbered once for every per-user aggregate of
    :func:`build_user_features`: ``ids`` (sorted distinct users), ``codes`` (each event's
    position in ``ids``, -1 without a user) and ``key``, a Categorical of the codes that
    pandas groups by without hashing the ids again (each ``groupby("user_id")`` factorizes
    every event's id: a quarter of ``build_features`` on 58M events). On non-negative
    integer codes (the run's encoded ids) the numbering is a ``bincount``."""

    def __init__(self, users: pd.Series) -> None:
        values = users.to_numpy()
        if values.dtype.kind in "iu" and len(values) and values.min() >= 0:
            present = np.bincount(values) > 0
            self.ids = pd.Index(np.flatnonzero(present).astype(values.dtype), name="user_id")
            self.codes = (np.cumsum(present) - 1)[values]
        else:
            self.codes, uniques = pd.factorize(users, sort=True)
            self.ids = pd.Index(uniques, name="user_id")
        self.key = pd.Categorical.from_codes(self.codes, categories=pd.RangeIndex(len(self.ids)))

    def named(self, result: pd.Series) -> pd.Series:
        """A per-user result grouped by ``key``, indexed by the user ids instead."""
        return result.set_axis(self.ids.take(np.asarray(result.index.codes)))


def build_item_features(
    events: pd.DataFrame, cutoff: dt.datetime, items: pd.DataFrame | None = None
) -> pd.DataFrame:
    """One row per item: distinct users per window, trend, age since first seen, category."""
    events = before(events, cutoff)
    by_item = events.groupby("item_id", observed=True)
    frame = pd.DataFrame(
        {
            "users_total": count_distinct(events),
            "first_seen_days": (cutoff - by_item["timestamp"].min()).dt.total_seconds() / 86400.0,
            "value_mean": by_item["value"].mean(),
        }
    )
    for days in POPULARITY_WINDOWS:
        recent = events[events["timestamp"] >= cutoff - dt.timedelta(days=days)]
        counts = count_distinct(recent)
        frame[f"popularity_{days}d"] = counts.reindex(frame.index, fill_value=0)
    frame["newcomer_popularity_30d"] = _newcomer_popularity(events, cutoff, 30).reindex(
        frame.index, fill_value=0
    )
    # Trend: last week's daily rate against the 30-day daily rate (1.0 = steady).
    frame["trend"] = (
        (frame["popularity_7d"] / 7.0 + 1e-3) / (frame["popularity_30d"] / 30.0 + 1e-3)
    ).astype("float64")
    frame.index.name = "item_id"
    frame = frame.reset_index()
    if items is not None and len(items):
        side = items.drop_duplicates("item_id").set_index("item_id")
        if "category" in side:
            frame["category"] = frame["item_id"].map(side["category"]).astype("string")
        if "published_at" in side:
            published = pd.to_datetime(
                frame["item_id"].map(side["published_at"]), utc=True, errors="coerce"
            )
            frame["age_days"] = (cutoff - published).dt.total_seconds() / 86400.0
    if "age_days" not in frame:
        frame["age_days"] = frame["first_seen_days"]
    frame["age_days"] = frame["age_days"].fillna(frame["first_seen_days"])
    return frame.sort_values("item_id", kind="stable").reset_index(drop=True)


def _shares(
    users: _UserGroups, codes: np.ndarray, prefix: str, levels: tuple[str, ...]
) -> pd.DataFrame:
    """Per user, the share of their events at each of ``levels`` (``codes`` index into it per
    event; -1, a value outside the levels, counts nowhere): a crosstab by integer codes."""
    codes = np.asarray(codes, dtype=np.int64)
    ok = (codes >= 0) & (users.codes >= 0)
    counts = np.bincount(
        users.codes[ok] * len(levels) + codes[ok], minlength=len(users.ids) * len(levels)
    ).reshape(-1, len(levels))
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    return pd.DataFrame(shares, index=users.ids, columns=[f"{prefix}_{c}_share" for c in levels])


def _session_stats(events: pd.DataFrame, users: _UserGroups) -> pd.DataFrame:
    """Sessions per user and mean events / duration per session (sessions = session_id).

    One sort of packed (user, session) keys instead of pandas' two-key groupby (a fifth of
    ``build_features`` on 58M events), in the same (user, session) order, so that pandas'
    per-user means add up the same numbers in the same order. Session ids that are not the
    run's codes are numbered first, in sorted order."""
    sessions = events["session_id"]
    if sessions.dtype.kind in "iu":
        session = sessions.to_numpy(np.int64, na_value=-1)
    else:
        session = pd.factorize(sessions, sort=True)[0].astype(np.int64)
    rows = (session >= 0) & (users.codes >= 0)
    if not rows.any():
        return pd.DataFrame(
            columns=["sessions", "events_per_session", "session_minutes"], dtype="float64"
        )
    user, session = users.codes[rows].astype(np.int64), session[rows]
    stamps = pd.DatetimeIndex(events["timestamp"])
    per_second = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}[stamps.unit]
    key = user * (np.int64(session.max()) + 1) + session
    order = np.argsort(key, kind="stable")
    key, moments = key[order], stamps.asi8[rows][order]
    starts = run_starts(key)
    per = pd.DataFrame(
        {
            "size": np.diff(np.r_[starts, len(key)]),
            "minutes": (np.maximum.reduceat(moments, starts) - np.minimum.reduceat(moments, starts))
            / per_second
            / 60.0,
        }
    )
    owner = pd.Categorical.from_codes(user[order][starts], categories=pd.RangeIndex(len(users.ids)))
    by_user = per.groupby(owner, observed=True)
    return pd.DataFrame(
        {
            "sessions": users.named(by_user.size()),
            "events_per_session": users.named(by_user["size"].mean()),
            "session_minutes": users.named(by_user["minutes"].mean()),
        }
    )


def _newcomer_popularity(events: pd.DataFrame, cutoff: dt.datetime, days: int) -> pd.Series:
    """Distinct users per item among users whose first event falls in the last ``days``."""
    first = events.groupby("user_id", observed=True)["timestamp"].transform("min")
    recent = events[first >= cutoff - dt.timedelta(days=days)]
    return count_distinct(recent)


@dataclass(frozen=True)
class FeatureFrames:
    """The user and item feature tables "as of" a time: what ``build_features`` writes once
    per run (on encoded events: ``user_id``/``item_id`` are codes) and training and
    evaluation read instead of recomputing them.

    Attributes:
        as_of: the cutoff; only events strictly before it went in.
        user: :func:`build_user_features` of every user.
        item: :func:`build_item_features` of every item.
    """

    as_of: dt.datetime
    user: pd.DataFrame
    item: pd.DataFrame

    @classmethod
    def build(
        cls, events: pd.DataFrame, as_of: dt.datetime, items: pd.DataFrame | None = None
    ) -> FeatureFrames:
        return cls(
            as_of, build_user_features(events, as_of), build_item_features(events, as_of, items)
        )

    def folder(self, root: Path) -> Path:
        return Path(root) / f"as_of={self.as_of:%Y-%m-%dT%H%M%S}"

    def write(self, root: Path) -> Path:
        """``<root>/as_of=<time>/{user,item}_features.parquet``; returns the folder."""
        folder = self.folder(root)
        folder.mkdir(parents=True, exist_ok=True)
        for name, frame in (("user", self.user), ("item", self.item)):
            tmp = folder / f".{name}_features.parquet.{os.getpid()}.tmp"
            frame.to_parquet(tmp, index=False)
            os.replace(tmp, folder / f"{name}_features.parquet")
        return folder

    @classmethod
    def read(cls, root: Path, as_of: dt.datetime) -> FeatureFrames:
        folder = cls(as_of, pd.DataFrame(), pd.DataFrame()).folder(root)
        return cls(
            as_of,
            pd.read_parquet(folder / "user_features.parquet"),
            pd.read_parquet(folder / "item_features.parquet"),
        )


# ---- matrix-aligned features (rows/columns of an InteractionMatrix) ----------------------
def recent_history(
    events: pd.DataFrame,
    cutoff: dt.datetime,
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    n_recent: int,
    rows_only: np.ndarray | None = None,
) -> sp.csr_matrix:
    """users x items, 1.0 for each user's ``n_recent`` most recently touched distinct items
    (ties to the lower column); events of ids outside ``user_ids``/``item_ids`` are ignored.
    With ``rows_only`` (rows of ``user_ids``), only those rows are filled (training reads a
    sample of users: sorting every user's history for it was ~6 s a window at 200k users)."""
    events = before(events, cutoff)
    rows = lookup(user_ids, events["user_id"].to_numpy())
    cols = lookup(item_ids, events["item_id"].to_numpy())
    ok = (rows >= 0) & (cols >= 0)
    if rows_only is not None:
        wanted = np.zeros(len(user_ids), bool)
        wanted[np.asarray(rows_only, np.int64)] = True
        ok &= wanted[np.maximum(rows, 0)]
    rows, cols = rows[ok].astype(np.int64), cols[ok].astype(np.int64)
    when = events["timestamp"].to_numpy(dtype="datetime64[us]").view(np.int64)[ok]
    # newest first within each user (ties to the lower column): a pair's first occurrence is
    # its latest touch, and the first n_recent distinct pairs of a user are the recent items
    order = np.lexsort((cols, -when, rows))
    rows, cols = rows[order], cols[order]
    pair = rows * len(item_ids) + cols
    seen_first = np.zeros(len(pair), bool)
    seen_first[np.unique(pair, return_index=True)[1]] = True
    rows, cols = rows[seen_first], cols[seen_first]
    starts = np.r_[0, np.flatnonzero(np.diff(rows)) + 1]
    position = np.arange(len(rows)) - np.repeat(starts, np.diff(np.r_[starts, len(rows)]))
    keep = position < n_recent
    return sp.csr_matrix(
        (np.ones(int(keep.sum()), np.float32), (rows[keep], cols[keep])),
        shape=(len(user_ids), len(item_ids)),
    )


def item_category_codes(
    item_ids: np.ndarray, items: pd.DataFrame | None
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Category code per item column (-1 unknown) and the category names, sorted."""
    codes = np.full(len(item_ids), -1, np.int64)
    if items is None or "category" not in items:
        return codes, ()
    side = items.drop_duplicates("item_id").set_index("item_id")["category"]
    labels = pd.Series(item_ids, dtype=object).map(side).astype("string")
    names = tuple(sorted(labels.dropna().unique()))
    known = labels.notna().to_numpy()
    codes[known] = np.searchsorted(
        np.asarray(names, dtype=object), labels[known].to_numpy(dtype=object)
    )
    return codes, names


def category_affinity(
    confidence: sp.csr_matrix, codes: np.ndarray, n_categories: int
) -> np.ndarray:
    """users x categories: share of each user's distinct items that fall in each category."""
    n_cat = max(n_categories, 1)
    known = codes >= 0
    onehot = sp.csr_matrix(
        (np.ones(int(known.sum()), np.float32), (np.flatnonzero(known), codes[known])),
        shape=(len(codes), n_cat),
    )
    counts = np.asarray(((confidence > 0).astype(np.float32) @ onehot).todense())
    totals = counts.sum(axis=1, keepdims=True)
    return (counts / np.maximum(totals, 1.0)).astype(np.float32)


def segment_labels(
    users: pd.DataFrame | None, user_ids: np.ndarray, columns: tuple[str, ...]
) -> np.ndarray:
    """Segment key per user ("25-34|F"), or ``None`` where any attribute is unknown."""
    out = np.full(len(user_ids), None, dtype=object)
    if users is None or not len(users) or not columns or not set(columns) <= set(users):
        return out
    # label each distinct id once (callers pass one id per event or pair: many repeats)
    codes, distinct = pd.factorize(np.asarray(user_ids, dtype=object))
    side = users.drop_duplicates("user_id").set_index("user_id")
    parts = [pd.Series(distinct, dtype=object).map(side[c]).astype("string") for c in columns]
    key = parts[0]
    for part in parts[1:]:
        key = key + "|" + part
    labels = np.full(len(distinct), None, dtype=object)
    known = key.notna().to_numpy()
    labels[known] = key[known].to_numpy(dtype=object)
    found = codes >= 0
    out[found] = labels[codes[found]]
    return out


# ---- everything the ranker reads, aligned to one matrix ----------------------------------
@dataclass(frozen=True)
class FeatureTables:
    """Point-in-time feature arrays aligned to an :class:`InteractionMatrix`.

    Attributes:
        user: users x ``user_names`` (matrix rows), float32, NaN where undefined.
        item: items x ``item_names`` (matrix columns), float32.
        affinity: users x categories, share of the user's items in each category.
        item_category: category code per item column (-1 unknown).
        segment_popularity: segments x items, share of a segment's users (last
            ``segment_days``) who engaged with the item; the last row is the global share.
        user_segment: users x ``segment_names``: the user's row in ``segment_popularity`` for
            each demographic attribute (-1 = unknown, read as the global row).
        segment_names: the demographic attributes (``users.csv`` columns) used.
        item_log_basis: distinct users per item (all time before the cutoff).
        user_taste: users x 2: mean log(1 + users) and mean age (days) of the user's items.
    """

    user: np.ndarray
    user_names: tuple[str, ...]
    item: np.ndarray
    item_names: tuple[str, ...]
    affinity: np.ndarray
    item_category: np.ndarray
    segment_popularity: np.ndarray
    user_segment: np.ndarray
    segment_names: tuple[str, ...]
    item_log_basis: np.ndarray
    user_taste: np.ndarray

    ARRAY_FIELDS = (
        "user",
        "item",
        "affinity",
        "item_category",
        "segment_popularity",
        "user_segment",
        "item_log_basis",
        "user_taste",
    )

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays by field name (for saving and fingerprints)."""
        return {name: getattr(self, name) for name in self.ARRAY_FIELDS}


def build_feature_tables(
    events: pd.DataFrame,
    cutoff: dt.datetime,
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    confidence: sp.csr_matrix,
    items: pd.DataFrame | None = None,
    users: pd.DataFrame | None = None,
    segments: tuple[str, ...] = DEMOGRAPHICS,
    segment_days: int = 30,
    feature_rows: np.ndarray | None = None,
    frames: FeatureFrames | None = None,
) -> FeatureTables:
    """All ranker features from events before ``cutoff``, on the matrix's rows and columns;
    with ``feature_rows``, user features (each computed from its user's events alone) only for
    those rows, NaN elsewhere: training reads a sample of users. ``frames``: the user and
    item tables as of ``cutoff``, already built (``build_features``), on the same ids."""
    events = before(events, cutoff)
    if frames is not None and frames.as_of != cutoff:
        raise ValueError(f"features as of {frames.as_of} given for a cutoff of {cutoff}")
    if frames is None:
        user_events = (
            events
            if feature_rows is None
            else events[events["user_id"].isin(np.asarray(user_ids)[feature_rows])]
        )
        frames = FeatureFrames(
            cutoff,
            build_user_features(user_events, cutoff),
            build_item_features(events, cutoff, items),
        )
    user_frame = frames.user.set_index("user_id").reindex(user_ids)
    item_frame = frames.item.set_index("item_id").reindex(item_ids)
    item_frame = item_frame.drop(columns=[c for c in ("category",) if c in item_frame])
    codes, names = item_category_codes(item_ids, items)
    used = tuple(c for c in segments if users is not None and c in users)
    recent = events[events["timestamp"] >= cutoff - dt.timedelta(days=segment_days)]
    seg_pop, user_seg = _segment_popularity(recent, user_ids, item_ids, users, used)
    item_matrix = item_frame.to_numpy(np.float32, na_value=np.nan)
    basis = item_frame["users_total"].fillna(0).to_numpy(np.float32)
    return FeatureTables(
        user=user_frame.to_numpy(np.float32, na_value=np.nan),
        user_names=tuple(user_frame.columns),
        item=item_matrix,
        item_names=tuple(item_frame.columns),
        affinity=category_affinity(confidence, codes, len(names)),
        item_category=codes,
        segment_popularity=seg_pop,
        user_segment=user_seg,
        segment_names=used,
        item_log_basis=basis,
        user_taste=_user_taste(
            confidence,
            np.log1p(basis),
            item_frame["age_days"].to_numpy(np.float32, na_value=np.nan),
        ),
    )


def _user_taste(confidence: sp.csr_matrix, log_pop: np.ndarray, age: np.ndarray) -> np.ndarray:
    """Mean log-popularity and mean age of each user's distinct items."""
    seen = (confidence > 0).astype(np.float32).tocsr()
    counts = np.maximum(np.asarray(seen.sum(axis=1)).ravel(), 1.0)
    age = np.nan_to_num(age, nan=float(np.nanmean(age)) if np.isfinite(age).any() else 0.0)
    taste = np.column_stack([seen @ log_pop, seen @ age]) / counts[:, None]
    return taste.astype(np.float32)


def _segment_popularity(
    recent: pd.DataFrame,
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    users: pd.DataFrame | None,
    columns: tuple[str, ...],
) -> tuple[np.ndarray, np.ndarray]:
    """(segments + global) x items popularity shares, and each user's row per attribute."""
    pairs = recent[["user_id", "item_id"]].drop_duplicates()
    cols = lookup(item_ids, pairs["item_id"].to_numpy())
    ok = cols >= 0
    # each distinct user is labelled once (not once per pair: the labels are strings)
    user_codes, distinct = pd.factorize(pairs["user_id"])
    distinct = np.asarray(distinct, dtype=object)
    counted = np.zeros(len(distinct), bool)  # users with a pair on a known item
    counted[user_codes[ok]] = True
    n_items = len(item_ids)
    blocks, user_seg, offset = [], np.full((len(user_ids), len(columns)), -1, np.int64), 0
    for k, column in enumerate(columns):
        labels = segment_labels(users, distinct, (column,))
        has = pd.notna(labels)
        names = np.asarray(sorted(set(labels[has])), dtype=object)
        table = np.zeros((len(names), n_items), np.float32)
        if len(names):
            segment = np.full(len(distinct), -1, np.int64)
            segment[has] = np.searchsorted(names, labels[has])
            seg = segment[user_codes]
            known = (seg >= 0) & ok
            cells = np.bincount(seg[known] * n_items + cols[known], minlength=table.size)
            table += cells.reshape(table.shape).astype(np.float32)
            sizes = np.bincount(segment[counted & has], minlength=len(names)).astype(np.float32)
            table /= np.maximum(sizes, 1.0)[:, None]
            mine = segment_labels(users, np.asarray(user_ids, dtype=object), (column,))
            has = pd.notna(mine)
            pos = np.minimum(np.searchsorted(names, mine[has].astype(object)), len(names) - 1)
            user_seg[has, k] = np.where(names[pos] == mine[has], pos + offset, -1)
        blocks.append(table)
        offset += len(names)
    glob = np.bincount(cols[ok], minlength=n_items).astype(np.float32)[None, :]
    glob /= max(len(distinct), 1)
    return np.vstack([*blocks, glob]), user_seg
