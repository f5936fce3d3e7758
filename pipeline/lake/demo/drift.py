"""Planted drift: change a demo data set's distribution from a known moment on, in a known way.

:func:`plant_drift` post-processes a :class:`~pipeline.lake.demo.DemoData` (typically from
:func:`~pipeline.lake.demo.synthetic.generate_clickstream`) according to a :class:`DriftPlan`,
so tests of a drift monitor get data whose distribution changes on a known day. Events before
``plan.start`` are never touched (same rows, same values); an all-defaults plan returns frames
equal to the input. The result is seeded: same data + same plan -> identical frames.

Units the knobs act on:

* a **session** is the ``session_id`` of an event; events without one (MovieLens has none) are
  grouped by (``user_id``, UTC date) instead;
* an **interaction** is one (session, item) pair: a view and the click, like, share,
  add_to_cart and purchase that follow it in the same session. Item changes are decided per
  interaction, so a remapped view keeps its click/cart/purchase (the funnel stays consistent);
* a session or interaction that already has events before ``start`` ("straddles" the start)
  keeps its pre-start part unchanged, necessarily; see each knob for what happens after start.

The knobs (each uses its own random stream derived from ``seed``, so turning one knob does not
change the random draws of another):

``start``
    The UTC moment the drift begins (datetime, date or ISO string; naive = UTC). Events with
    ``timestamp >= start`` are "post-start"; every other event is left exactly as it was.
``popularity_shift`` (0..1)
    Each post-start interaction not taken by the new-item flood is, with this probability,
    moved to another item through a fixed permutation that reverses the popularity ranking:
    the catalogue items published at or before ``start`` (or with no ``published_at``) are
    ranked by their number of pre-start events (ties: catalogue order) and the item of rank
    ``r`` is mapped to the item of rank ``n - 1 - r``: the head becomes the tail and vice
    versa. Items published after ``start`` and items missing from ``data.items`` map to
    themselves. The permutation does not depend on ``seed``; which interactions move does.
    Interactions that straddle ``start`` are never moved, so the realised share of moved
    post-start events is a little below ``(1 - new_item_share) * popularity_shift``.
``new_items`` / ``new_item_share`` (0..1)
    Adds ``new_items`` brand-new items to ``data.items`` (ids continue the catalogue's
    numbering, e.g. ``i100``, ``i101`` ... after ``i99``; each copies the category and other
    columns of a random existing item, with ``published_at = start``, ``available = True``,
    a title ``"<Category> item <n>"`` and a price of that item times a lognormal factor
    (sigma 0.3, rounded to cents, at least 0.99). Each post-start interaction is moved to a new
    item with probability ``new_item_share`` (which new item: Zipf-like weights
    ``1 / (k + 1) ** 0.9``, so the flood has its own head). ``new_items > 0`` with a zero share
    adds cold items that get no traffic; a positive share needs ``new_items > 0``. Straddling
    interactions are not moved (realised share a little below ``new_item_share``).
``device_mix``
    ``{device: weight}`` over :data:`pipeline.core.schema.DEVICES` (weights are normalised).
    Every session with post-start events draws one device from the mix and all of its
    post-start events get it; a session straddling ``start`` keeps its old device on its
    pre-start events (so it has two devices; sessions starting at or after ``start`` keep
    exactly one).
``volume`` (0..1)
    Each session whose first event is at or after ``start`` is kept with this probability
    (``0.3`` = about a 70% drop in post-start sessions, and so in events). Whole sessions are
    dropped, never parts of one; straddling sessions are always kept.
``seed``
    Seeds every random draw above.

Values of ``add_to_cart`` and ``purchase`` events whose item changed become the new item's
``price`` (as the generator sets them), when ``data.items`` has a non-missing price for it.
Event ids are kept as they are even when an event's item changes (synthetic ids embed the
session and the funnel position, not the item; ids are opaque), so they stay unique: rows are
only ever modified or dropped, never added. Dtypes of every column are unchanged; when sessions
are dropped from an events frame with a default ``RangeIndex``, the index is renumbered.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.core.config import as_utc
from pipeline.core.schema import DEVICES
from pipeline.lake.demo import DemoData

logger = logging.getLogger(__name__)

_NEW_ITEM_EXPONENT = 0.9  # Zipf exponent of the traffic over the flood of new items
_NEW_PRICE_SIGMA = 0.3  # lognormal spread of a new item's price around its template's
_PRICED_TYPES = ("add_to_cart", "purchase")  # event types whose value is the item's price
_STREAMS = ("items", "devices", "volume", "catalogue")  # one random stream per knob
_NUMBERED_ID = re.compile(r"^(\D*)(\d+)$")


@dataclass(frozen=True)
class DriftPlan:
    """What drift to plant and from when; see the module docstring for each knob."""

    start: dt.datetime | dt.date | str
    popularity_shift: float = 0.0
    new_items: int = 0
    new_item_share: float = 0.0
    device_mix: Mapping[str, float] | None = None
    volume: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", as_utc(self.start))
        for name in ("popularity_shift", "new_item_share", "volume"):
            value = float(getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within 0..1, got {value}")
            object.__setattr__(self, name, value)
        if int(self.new_items) != self.new_items or self.new_items < 0:
            raise ValueError(f"new_items must be a non-negative integer, got {self.new_items}")
        object.__setattr__(self, "new_items", int(self.new_items))
        if self.new_item_share > 0 and self.new_items == 0:
            raise ValueError("new_item_share > 0 needs new_items > 0")
        if self.device_mix is not None:
            mix = {str(k): float(v) for k, v in self.device_mix.items()}
            unknown = sorted(set(mix) - set(DEVICES))
            if unknown:
                raise ValueError(f"device_mix has unknown devices {unknown}; expected {DEVICES}")
            if any(not np.isfinite(v) or v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
                raise ValueError("device_mix weights must be finite, >= 0 and not all zero")
            object.__setattr__(self, "device_mix", MappingProxyType(mix))

    @property
    def start_utc(self) -> pd.Timestamp:
        """``start`` as an aware UTC pandas Timestamp."""
        return pd.Timestamp(self.start)

    @property
    def is_noop(self) -> bool:
        """Whether the plan changes nothing (all knobs at their defaults)."""
        return (
            self.popularity_shift == 0.0
            and self.new_items == 0
            and self.device_mix is None
            and self.volume == 1.0
        )

    def describe(self) -> str:
        """One line for logs, e.g. ``drift from 2024-01-16T00:00:00Z: volume=0.3 (seed 0)``."""
        parts = []
        if self.popularity_shift:
            parts.append(f"popularity_shift={self.popularity_shift:g}")
        if self.new_items:
            parts.append(f"new_items={self.new_items} at share {self.new_item_share:g}")
        if self.device_mix is not None:
            total = sum(self.device_mix.values())
            mix = ", ".join(f"{k}: {v / total:.2g}" for k, v in self.device_mix.items())
            parts.append(f"device_mix={{{mix}}}")
        if self.volume != 1.0:
            parts.append(f"volume={self.volume:g}")
        when = self.start_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
        return f"drift from {when}: {', '.join(parts) or 'none'} (seed {self.seed})"

    def __str__(self) -> str:
        return self.describe()


def plant_drift(data: DemoData, plan: DriftPlan) -> DemoData:
    """Return a copy of ``data`` with ``plan``'s drift applied to events at or after its start.

    Events before ``plan.start`` are unchanged; ``data`` itself is not modified. See the module
    docstring for the exact effect of each knob.
    """
    events, items = data.events, data.items
    if plan.is_noop:
        return DemoData(events=events.copy(), items=items.copy(), users=data.users.copy())
    streams = dict(zip(_STREAMS, np.random.SeedSequence(plan.seed).spawn(len(_STREAMS))))
    start = plan.start_utc
    post = (events["timestamp"] >= start).to_numpy(dtype=bool, na_value=False)
    sess = _session_codes(events)
    n_sess = int(sess.max()) + 1 if sess.size else 0
    has_pre = np.zeros(n_sess, dtype=bool)
    has_pre[sess[~post]] = True
    has_post = np.zeros(n_sess, dtype=bool)
    has_post[sess[post]] = True
    straddles = has_pre & has_post

    new_frame = _new_items(items, events, plan, np.random.default_rng(streams["catalogue"]))
    out_items = items
    if len(new_frame):
        out_items = pd.concat([items, new_frame], ignore_index=True).astype(items.dtypes.to_dict())

    columns: dict[str, pd.Series] = {}
    if plan.popularity_shift > 0 or plan.new_item_share > 0:
        columns.update(
            _drift_items(
                events,
                items,
                new_frame,
                plan,
                post,
                sess,
                straddles,
                np.random.default_rng(streams["items"]),
            )
        )
    if plan.device_mix is not None and post.any():
        columns["device"] = _drift_devices(
            events, plan.device_mix, post, sess, n_sess, np.random.default_rng(streams["devices"])
        )

    out = events.copy()
    for name, values in columns.items():
        out[name] = values
    if plan.volume < 1.0:
        droppable = has_post & ~has_pre
        drawn = np.random.default_rng(streams["volume"]).random(n_sess)
        keep = (~droppable | (drawn < plan.volume))[sess]
        if not keep.all():
            out = out[keep]
            if events.index.equals(pd.RangeIndex(len(events))):
                out = out.reset_index(drop=True)
    logger.info(
        "planted %s: %d -> %d events (%d post-start), %d new items",
        plan.describe(),
        len(events),
        len(out),
        int((out["timestamp"] >= start).sum()),
        len(new_frame),
    )
    return DemoData(events=out, items=out_items.copy(), users=data.users.copy())


# ---- sessions, devices ---------------------------------------------------------------------
def _session_codes(events: pd.DataFrame) -> np.ndarray:
    """Dense int64 session number per event: ``session_id``, else (user_id, UTC date)."""
    n = len(events)
    codes = np.empty(n, dtype=np.int64)
    if "session_id" in events.columns:
        has = events["session_id"].notna().to_numpy(dtype=bool)
    else:
        has = np.zeros(n, dtype=bool)
    n_named = 0
    if has.any():
        named, uniques = pd.factorize(events["session_id"][has])
        codes[has] = named
        n_named = len(uniques)
    if not has.all():
        rest = events[~has]
        users, _ = pd.factorize(rest["user_id"], use_na_sentinel=False)
        day = (
            rest["timestamp"]
            .dt.tz_convert("UTC")
            .dt.tz_localize(None)
            .to_numpy("datetime64[D]")
            .view(np.int64)
        )
        day = day - day.min()
        pairs, _ = pd.factorize(users.astype(np.int64) * (int(day.max()) + 1) + day)
        codes[~has] = n_named + pairs
    return codes


def _drift_devices(
    events: pd.DataFrame,
    mix: Mapping[str, float],
    post: np.ndarray,
    sess: np.ndarray,
    n_sess: int,
    rng: np.random.Generator,
) -> pd.Series:
    """New ``device`` column: one device per session from ``mix`` on its post-start events."""
    names = list(mix)
    weights = np.array([mix[k] for k in names], dtype=np.float64)
    drawn = rng.choice(len(names), n_sess, p=weights / weights.sum())
    codes, seen = pd.factorize(events["device"], use_na_sentinel=False)
    codes = codes.astype(np.int64)
    codes[post] = len(seen) + drawn[sess[post]]
    return _take_strings(pd.Index(seen).append(pd.Index(names)), codes, events["device"])


# ---- items ---------------------------------------------------------------------------------
def _drift_items(
    events: pd.DataFrame,
    items: pd.DataFrame,
    new_frame: pd.DataFrame,
    plan: DriftPlan,
    post: np.ndarray,
    sess: np.ndarray,
    straddles: np.ndarray,
    rng: np.random.Generator,
) -> dict[str, pd.Series]:
    """New ``item_id`` (and, where priced, ``value``) columns after the item knobs."""
    item_codes, seen = pd.factorize(events["item_id"], use_na_sentinel=False)
    item_codes = item_codes.astype(np.int64)
    n_seen = len(seen)
    # one id space: ids seen in events, catalogue ids never seen, then the new ids
    catalogue = pd.Index(items["item_id"].dropna().unique())
    lookup = pd.Index(seen).append(catalogue[~catalogue.isin(seen)])
    first_new = len(lookup)
    lookup = lookup.append(pd.Index(new_frame["item_id"]))

    # interaction = (session, item): one decision each, in order of first post-start event
    post_rows = np.flatnonzero(post)
    pair = sess * n_seen + item_codes
    pre_rows = np.flatnonzero(~post)
    straddling_pairs = pair[pre_rows[straddles[sess[pre_rows]]]]
    movable = ~np.isin(pair[post_rows], straddling_pairs)
    unit = pd.factorize(pair[post_rows])[0]
    n_units = int(unit.max()) + 1 if unit.size else 0
    to_new = rng.random(n_units) < plan.new_item_share
    shifted = ~to_new & (rng.random(n_units) < plan.popularity_shift)
    new_pick = np.zeros(n_units, dtype=np.int64)
    if len(new_frame):
        weights = 1.0 / (1.0 + np.arange(len(new_frame))) ** _NEW_ITEM_EXPONENT
        new_pick = rng.choice(len(new_frame), n_units, p=weights / weights.sum())

    permutation = _popularity_permutation(items, lookup[:first_new], item_codes, post, plan)
    old = item_codes[post_rows]
    new = np.where(shifted[unit], permutation[old], old)
    new = np.where(to_new[unit], first_new + new_pick[unit], new)
    new = np.where(movable, new, old)
    changed = new != old
    item_codes[post_rows] = new
    result = {"item_id": _take_strings(lookup, item_codes, events["item_id"])}

    if changed.any() and "price" in items.columns and "value" in events.columns:
        rows = post_rows[changed]
        priced = (
            events["event_type"].iloc[rows].isin(_PRICED_TYPES).to_numpy(dtype=bool, na_value=False)
        )
        rows = rows[priced]
        all_items = pd.concat([items, new_frame], ignore_index=True)
        price_of = all_items.drop_duplicates("item_id").set_index("item_id")["price"]
        price = price_of.reindex(lookup[item_codes[rows]]).to_numpy(
            dtype=np.float64, na_value=np.nan
        )
        known = ~np.isnan(price)
        if known.any():
            value = events["value"].to_numpy(dtype=np.float64, copy=True)
            value[rows[known]] = price[known]
            result["value"] = pd.Series(value, index=events.index, name="value").astype(
                events["value"].dtype
            )
    return result


def _popularity_permutation(
    items: pd.DataFrame, lookup: pd.Index, item_codes: np.ndarray, post: np.ndarray, plan: DriftPlan
) -> np.ndarray:
    """Code -> code over ``lookup``: eligible catalogue items ranked by pre-start events (ties:
    catalogue order) and reversed, rank r -> rank n - 1 - r; every other item maps to itself."""
    mapping = np.arange(len(lookup), dtype=np.int64)
    catalogue = items.dropna(subset=["item_id"]).drop_duplicates("item_id")
    if "published_at" in catalogue.columns:
        published = catalogue["published_at"]
        eligible = (published.isna() | (published <= plan.start_utc)).to_numpy(dtype=bool)
        catalogue = catalogue[eligible]
    if catalogue.empty:
        return mapping
    basis = ~post if (~post).any() else post  # no pre-start events: rank by what there is
    counts = np.bincount(item_codes[basis], minlength=len(lookup))
    codes = lookup.get_indexer(catalogue["item_id"])
    ranked = codes[np.argsort(-counts[codes], kind="stable")]  # head first
    mapping[ranked] = ranked[::-1]
    return mapping


# ---- new items -----------------------------------------------------------------------------
def _new_items(
    items: pd.DataFrame, events: pd.DataFrame, plan: DriftPlan, rng: np.random.Generator
) -> pd.DataFrame:
    """Rows for ``plan.new_items`` brand-new items (empty frame when none)."""
    if plan.new_items == 0:
        return items.iloc[:0]
    if items.empty:
        raise ValueError("new_items needs a non-empty data.items to copy categories from")
    taken = set(items["item_id"].dropna().astype(str)) | set(
        events["item_id"].dropna().unique().astype(str)
    )
    ids = _fresh_ids(items["item_id"].dropna().astype(str), taken, plan.new_items)
    template = rng.integers(0, len(items), plan.new_items)
    rows = items.iloc[template].reset_index(drop=True).copy()
    rows["item_id"] = ids
    if "published_at" in rows.columns:
        rows["published_at"] = plan.start_utc
    if "available" in rows.columns:
        rows["available"] = True
    if "price" in rows.columns:
        factor = rng.lognormal(0.0, _NEW_PRICE_SIGMA, plan.new_items)
        rows["price"] = np.maximum(
            0.99, np.round(rows["price"].to_numpy(dtype=np.float64, na_value=np.nan) * factor, 2)
        )
    if "title" in rows.columns:
        numbers = [m.group(2) if (m := _NUMBERED_ID.match(i)) else i for i in ids]
        if "category" in rows.columns:
            rows["title"] = [
                f"{c.title() if isinstance(c, str) else 'New'} item {n}"
                for c, n in zip(rows["category"], numbers)
            ]
        else:
            rows["title"] = [f"New item {n}" for n in numbers]
    return rows.astype(items.dtypes.to_dict())


def _fresh_ids(existing: pd.Series, taken: set[str], count: int) -> list[str]:
    """``count`` unused ids continuing the catalogue's most common ``<prefix><number>`` form."""
    parsed = existing.str.extract(_NUMBERED_ID.pattern)
    parsed = parsed[parsed[1].notna()]
    if len(parsed):
        prefix = parsed[0].value_counts().index[0]
        next_number = int(parsed.loc[parsed[0] == prefix, 1].astype(int).max()) + 1
    else:
        prefix, next_number = "drift-i", 0
    ids: list[str] = []
    while len(ids) < count:
        candidate = f"{prefix}{next_number}"
        next_number += 1
        if candidate not in taken:
            ids.append(candidate)
    return ids


def _take_strings(lookup: pd.Index, codes: np.ndarray, like: pd.Series) -> pd.Series:
    """``lookup[codes]`` as a Series with ``like``'s index, name and dtype (vectorised)."""
    values = pa.array(lookup.to_numpy(dtype=object), type=pa.string(), from_pandas=True)
    taken = values.take(pa.array(codes))
    return pd.Series(pd.arrays.ArrowStringArray(taken), index=like.index, name=like.name).astype(
        like.dtype
    )
