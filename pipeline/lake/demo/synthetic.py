"""Seeded synthetic e-commerce clickstream for tests and benchmarks.

The generative story, fully vectorised with NumPy and produced in chunks of users:

* items belong to categories and have power-law (Zipf) popularity; ~15% are published during
  the window, a few are unavailable, prices are lognormal around a per-category level;
* each category is split into a few "styles"; each user prefers 1-3 categories (popular
  categories more likely) and one style in each, and has a preference strength, an activity
  level and a primary device. Draws inside a user's taste use a flattened popularity, so a
  collaborative filter finds signal that global popularity does not (item-kNN and ALS beat
  popularity by ~1.5-2x in precision@10 on a time split);
* a user's sessions start on days weighted by a weekly rhythm and at hours following a daily
  curve; each session picks a category (mostly a preferred one) and a device (mostly the
  primary one), then a handful of views a few seconds to minutes apart, mostly in that
  category (and style), the rest drawn by global popularity, never before the item's
  ``published_at``;
* the funnel view -> click -> add_to_cart -> purchase (plus the occasional like/share after a
  click) has decreasing conversion probabilities that are higher for preferred categories,
  and every later stage is timestamped strictly after the earlier one in the same session.

Values: dwell seconds for views and clicks, the item's price for add_to_cart and purchase,
missing for like and share. Same arguments -> identical frames.

:func:`generate_world` returns the same frames plus the latent :class:`Truth` they were drawn
from (users' tastes, items' categories, styles and popularity), with
:meth:`Truth.affinity`, the true relevance of an item to a user; the simulated CMS in
:mod:`pipeline.lake.demo.simulate` turns it into clicks on served recommendation lists.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.config import as_utc
from pipeline.core.schema import DEVICES, EVENT_COLUMNS, EVENT_DTYPES, ITEM_COLUMNS
from pipeline.lake.demo import AGE_BANDS, USER_COLUMNS, DemoData

#: Event types in funnel order; the index is the "stage" code used internally.
STAGES: tuple[str, ...] = ("view", "click", "like", "share", "add_to_cart", "purchase")
_VIEW, _CLICK, _LIKE, _SHARE, _CART, _PURCHASE = range(len(STAGES))

CATEGORY_NAMES: tuple[str, ...] = (
    "electronics",
    "books",
    "fashion",
    "home",
    "beauty",
    "sports",
    "toys",
    "grocery",
    "garden",
    "automotive",
    "music",
    "movies",
    "games",
    "health",
    "pets",
    "office",
    "jewelry",
    "baby",
    "tools",
    "travel",
)
OCCUPATIONS: tuple[str, ...] = (
    "student",
    "engineer",
    "programmer",
    "educator",
    "administrator",
    "other",
    "writer",
    "technician",
    "executive",
    "healthcare",
    "marketing",
    "artist",
    "scientist",
    "salesman",
    "librarian",
    "lawyer",
    "retired",
    "entertainment",
    "homemaker",
    "none",
)

# Mixes and rhythms (sum need not be 1; normalised where used).
_DEVICE_MIX = np.array([0.45, 0.40, 0.08, 0.04, 0.03])  # order of schema.DEVICES
_AGE_MIX = np.array([0.05, 0.22, 0.30, 0.20, 0.09, 0.07, 0.07])  # order of AGE_BANDS
_GENDERS = ("F", "M", "unknown")
_GENDER_MIX = np.array([0.49, 0.47, 0.04])
_HOUR_CURVE = np.array(
    [
        0.6,
        0.4,
        0.3,
        0.25,
        0.25,
        0.3,
        0.5,
        0.8,
        1.0,
        1.1,
        1.15,
        1.2,
        1.3,
        1.25,
        1.15,
        1.1,
        1.1,
        1.2,
        1.4,
        1.6,
        1.7,
        1.6,
        1.3,
        0.9,
    ]
)
_WEEKDAY_CURVE = np.array([0.95, 0.92, 0.93, 0.97, 1.0, 1.12, 1.10])  # Monday first

# Behaviour knobs.
_PRIMARY_DEVICE_SHARE = 0.85
_SESSION_CATEGORY_SHARE = 0.9  # views that stay in the session's category
_NEW_ITEM_SHARE = 0.15  # items published inside the window
_UNAVAILABLE_SHARE = 0.03
_P_CLICK, _P_LIKE, _P_SHARE, _P_CART, _P_PURCHASE = 0.25, 0.06, 0.015, 0.2, 0.45
_PREF_BOOST, _OTHER_DAMP = 1.4, 0.6  # conversion multipliers in / outside preferred categories
_STYLE_SHARE = 0.8  # in-category views that stay in the user's style of that category
_TASTE_FLATTEN = 0.5  # exponent applied to popularity for draws within a user's taste
_STYLES = 4  # styles (sub-groups) per category: finer taste a collaborative filter can find
_STRENGTH_A, _STRENGTH_B = 8.0, 2.0  # beta prior of the share of sessions in a preferred category
_RESAMPLE_ROUNDS = 4
_CHUNK_USERS = 10_000
_SECONDS_PER_DAY = 86_400

#: Relative rate of session starts per hour of the day (UTC, midnight first); read-only.
HOUR_CURVE: np.ndarray = _HOUR_CURVE.copy()
HOUR_CURVE.flags.writeable = False

# Affinity (see Truth.affinity).
AFFINITY_BASE = 0.1  # relevance of an item outside the user's preferred categories (at most)
AFFINITY_POPULARITY_SHARE = 0.5  # share of that base that grows with sqrt(popularity)
AFFINITY_CATEGORY = 0.4  # share of the match reached by the category alone (rest: the style)


@dataclass(frozen=True)
class _GroupSampler:
    """Popularity-weighted draws of one item from a given group (category or style)."""

    order: np.ndarray  # items sorted by (group, popularity desc)
    keys: np.ndarray  # group + CDF within the group, aligned with ``order``
    first: np.ndarray  # per group: position in ``order`` of its most popular item

    def draw(self, rng: np.random.Generator, groups: np.ndarray) -> np.ndarray:
        """One item from each of ``groups`` (each group must be non-empty)."""
        pos = np.searchsorted(self.keys, groups + rng.random(groups.size), side="right")
        return self.order[np.minimum(pos, self.order.size - 1)]


@dataclass(frozen=True)
class _Catalog:
    """Item arrays the chunk generator samples from (index = item number)."""

    category: np.ndarray  # int, per item
    style: np.ndarray  # int, per item: its style within its category (0 .. n_styles - 1)
    weight: np.ndarray  # float, per item: Zipf popularity weight (the most popular one is 1)
    published: np.ndarray  # int64 epoch seconds, per item
    price: np.ndarray  # float, per item
    available: np.ndarray  # bool, per item
    global_cdf: np.ndarray  # popularity CDF over all items
    category_weights: np.ndarray  # probability of each category for a random view
    n_styles: np.ndarray  # per category: how many (non-empty) styles it has
    by_category: _GroupSampler
    by_style: _GroupSampler  # group = category * _STYLES + style
    fallback: np.ndarray  # per category: its most popular item published before the window


def generate_clickstream(
    n_users: int = 1000,
    n_items: int = 500,
    n_days: int = 60,
    start: str | dt.date | dt.datetime = "2024-01-01",
    seed: int = 0,
    sessions_per_user: float = 8.0,
    n_categories: int = 12,
    *,
    views_per_session: float = 5.0,
    popularity_exponent: float = 0.9,
) -> DemoData:
    """Generate a seeded clickstream over ``n_days`` days from ``start`` (UTC).

    About ``n_users * sessions_per_user * views_per_session * 1.4`` events are produced
    (~56 per user with the defaults). ``sessions_per_user`` and ``views_per_session`` are
    means; users' activity varies around them (every user has at least one session).
    """
    return generate_world(
        n_users,
        n_items,
        n_days,
        start,
        seed,
        sessions_per_user,
        n_categories,
        views_per_session=views_per_session,
        popularity_exponent=popularity_exponent,
    ).data


def generate_world(
    n_users: int = 1000,
    n_items: int = 500,
    n_days: int = 60,
    start: str | dt.date | dt.datetime = "2024-01-01",
    seed: int = 0,
    sessions_per_user: float = 8.0,
    n_categories: int = 12,
    *,
    views_per_session: float = 5.0,
    popularity_exponent: float = 0.9,
) -> World:
    """:func:`generate_clickstream`'s frames (identical for the same arguments) together with
    the latent :class:`Truth` they were drawn from."""
    if n_users < 1 or n_items < 1 or n_days < 1:
        raise ValueError("n_users, n_items and n_days must be positive")
    if sessions_per_user < 1 or views_per_session < 1:
        raise ValueError("sessions_per_user and views_per_session must be >= 1")
    n_categories = max(1, min(n_categories, n_items))
    window_start = int(as_utc(start).timestamp())
    window_end = window_start + n_days * _SECONDS_PER_DAY

    root = np.random.SeedSequence(seed)
    catalog_seq, chunks_seq = root.spawn(2)
    catalog_rng = np.random.default_rng(catalog_seq)
    catalog = _make_catalog(
        catalog_rng, n_items, n_categories, window_start, n_days, popularity_exponent
    )
    day_p = _day_weights(window_start, n_days)

    starts = range(0, n_users, _CHUNK_USERS)
    parts = []
    for first_user, chunk_seq in zip(starts, chunks_seq.spawn(len(starts)), strict=True):
        count = min(_CHUNK_USERS, n_users - first_user)
        parts.append(
            _generate_chunk(
                np.random.default_rng(chunk_seq),
                first_user,
                count,
                catalog,
                window_start,
                window_end,
                day_p,
                sessions_per_user,
                views_per_session,
            )
        )
    event_cols = {key: np.concatenate([ev[key] for ev, _, _ in parts]) for key in parts[0][0]}
    user_cols = {key: np.concatenate([us[key] for _, us, _ in parts]) for key in parts[0][1]}
    latent = {key: np.concatenate([la[key] for _, _, la in parts]) for key in parts[0][2]}
    data = DemoData(
        events=_build_events(event_cols, seed),
        items=_build_items(catalog),
        users=_build_users(user_cols),
    )
    truth = _build_truth(catalog, latent, window_start, n_days, sessions_per_user)
    return World(data=data, truth=truth)


# ---- ground truth --------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Truth:
    """The latent world behind a synthetic clickstream (index = user / item number).

    Users (arrays of length ``n_users``, aligned with ``user_ids``):

    * ``prefs`` (n_users, 3) int: preferred category codes, -1 for an unused slot;
    * ``styles`` (n_users, 3) int: the favourite style in each preferred category (compare
      with an item's ``style``; -1 for an unused slot);
    * ``strength``: share of the user's sessions spent in a preferred category (beta(8, 2));
    * ``activity``: session-rate multiplier (lognormal, mean 1);
    * ``sessions_per_day``: expected sessions per day, ``(1 + (sessions_per_user - 1) *
      activity) / n_days``, as in the generator;
    * ``primary_device``: device name of most of the user's sessions.

    Items (arrays of length ``n_items``, aligned with ``item_ids``): ``category`` code (name in
    ``category_names``), ``style`` within the category (its style group is the pair), Zipf
    ``popularity`` weight scaled so the most popular item has 1, ``price``, ``published_at``
    (``datetime64[s]``, UTC) and ``available``.

    A log without a latent truth (MovieLens-100k) gets an estimated stand-in from
    :func:`pipeline.lake.demo.simulate.empirical_truth` (genre tastes, one style per category).
    """

    user_ids: np.ndarray
    prefs: np.ndarray
    styles: np.ndarray
    strength: np.ndarray
    activity: np.ndarray
    sessions_per_day: np.ndarray
    primary_device: np.ndarray
    item_ids: np.ndarray
    category: np.ndarray
    style: np.ndarray
    popularity: np.ndarray
    price: np.ndarray
    published_at: np.ndarray
    available: np.ndarray
    category_names: tuple[str, ...]
    window_start: pd.Timestamp
    window_end: pd.Timestamp

    @property
    def n_users(self) -> int:
        return int(self.user_ids.size)

    @property
    def n_items(self) -> int:
        return int(self.item_ids.size)

    @property
    def visit_probability(self) -> np.ndarray:
        """Per user: probability of at least one session on a given day, ``1 - exp(-rate)``
        with ``rate = sessions_per_day`` (sessions are roughly Poisson)."""
        return -np.expm1(-self.sessions_per_day)

    @cached_property
    def _user_lookup(self) -> pd.Index:
        return pd.Index(self.user_ids)

    @cached_property
    def _item_lookup(self) -> pd.Index:
        return pd.Index(self.item_ids)

    def user_index(self, user_ids) -> np.ndarray:
        """Positions of ``user_ids`` (a 1-d array-like of ids); KeyError for an unknown id."""
        return _lookup(self._user_lookup, user_ids, "user")

    def item_index(self, item_ids) -> np.ndarray:
        """Positions of ``item_ids`` (a 1-d array-like of ids); KeyError for an unknown id."""
        return _lookup(self._item_lookup, item_ids, "item")

    def affinity(self, user_ids, item_ids) -> np.ndarray:
        """True relevance in [0, 1] of each item to each user, by id (arrays broadcast, so
        ``users[:, None]`` against ``items[None, :]`` gives a users x items matrix).

        With ``pop`` the item's popularity (1 for the most popular item) and ``s`` the user's
        strength::

            base  = AFFINITY_BASE * (1 - AFFINITY_POPULARITY_SHARE
                                     + AFFINITY_POPULARITY_SHARE * sqrt(pop))  # 0.05 .. 0.1
            match = s * (AFFINITY_CATEGORY + (1 - AFFINITY_CATEGORY) * same_style)
                    if the item's category is one of the user's preferred ones, else 0
            affinity = base + (1 - base) * match

        so an item in a preferred category and in the user's style of it scores
        ``base + (1 - base) * s`` (~0.8 at the mean strength 0.8), one in a preferred category
        but another style ~0.36, and any other item 0.05 .. 0.1, mildly increasing with
        popularity. Availability and publication time are not part of it.
        """
        user_ids, item_ids = np.asarray(user_ids, dtype=object), np.asarray(item_ids, dtype=object)
        users = self.user_index(user_ids.ravel()).reshape(user_ids.shape)
        items = self.item_index(item_ids.ravel()).reshape(item_ids.shape)
        return self.affinity_by_index(users, items)

    def affinity_by_index(self, users, items) -> np.ndarray:
        """:meth:`affinity` for user and item positions (integer arrays; they broadcast)."""
        users, items = np.broadcast_arrays(
            np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64)
        )
        base = AFFINITY_BASE * (
            1.0
            - AFFINITY_POPULARITY_SHARE
            + AFFINITY_POPULARITY_SHARE * np.sqrt(self.popularity[items])
        )
        in_cat = self.prefs[users] == self.category[items][..., None]
        same_style = (in_cat & (self.styles[users] == self.style[items][..., None])).any(axis=-1)
        match = np.where(
            in_cat.any(axis=-1),
            self.strength[users] * (AFFINITY_CATEGORY + (1.0 - AFFINITY_CATEGORY) * same_style),
            0.0,
        )
        return base + (1.0 - base) * match

    def affinity_matrix(self, users, items) -> np.ndarray:
        """``affinity_by_index(users[:, None], items[None, :])``, computed through a users x
        style-groups table (much faster when many items are scored per user)."""
        users, items = np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64)
        n_categories = len(self.category_names)
        table = np.zeros((users.size, n_categories, _STYLES))
        rows = np.arange(users.size)
        strength = self.strength[users]
        for slot in range(self.prefs.shape[1]):  # preferred categories of a user are distinct
            cat, style = self.prefs[users, slot], self.styles[users, slot]
            used = cat >= 0
            r, c, st = rows[used], cat[used], style[used]
            table[r, c, :] = (strength[used] * AFFINITY_CATEGORY)[:, None]
            table[r, c, st] = strength[used]
        match = table.reshape(users.size, -1)[:, self.category[items] * _STYLES + self.style[items]]
        base = AFFINITY_BASE * (
            1.0
            - AFFINITY_POPULARITY_SHARE
            + AFFINITY_POPULARITY_SHARE * np.sqrt(self.popularity[items])
        )
        return base + (1.0 - base) * match

    def users_frame(self) -> pd.DataFrame:
        """One row per user: id, preferred category names and styles per slot (empty / -1 when
        unused), strength, activity, sessions_per_day, primary_device."""
        names = np.asarray(self.category_names + ("",), dtype=object)  # -1 -> ""
        slots = range(self.prefs.shape[1])
        return pd.DataFrame(
            {
                "user_id": self.user_ids,
                **{f"pref_{k}": names[self.prefs[:, k]] for k in slots},
                **{f"style_{k}": self.styles[:, k] for k in slots},
                "strength": self.strength,
                "activity": self.activity,
                "sessions_per_day": self.sessions_per_day,
                "primary_device": self.primary_device,
            }
        )

    def items_frame(self) -> pd.DataFrame:
        """One row per item: id, category name, style, popularity, price, published_at,
        available."""
        return pd.DataFrame(
            {
                "item_id": self.item_ids,
                "category": np.asarray(self.category_names, dtype=object)[self.category],
                "style": self.style,
                "popularity": self.popularity,
                "price": self.price,
                "published_at": pd.to_datetime(self.published_at).tz_localize("UTC"),
                "available": self.available,
            }
        )


@dataclass(frozen=True)
class World:
    """A synthetic data set and the latent truth it was drawn from."""

    data: DemoData
    truth: Truth


def _lookup(index: pd.Index, ids, kind: str) -> np.ndarray:
    """Positions of ``ids`` in ``index``; KeyError naming the first few unknown ones.

    The distinct ids are looked up once (lists repeat each user and item many times)."""
    if not isinstance(ids, (pd.Series, pd.Index, pd.api.extensions.ExtensionArray)):
        ids = np.asarray(ids, dtype=object).ravel()
    codes, uniques = pd.factorize(ids, use_na_sentinel=False)
    found = index.get_indexer(pd.Index(uniques, dtype=object))
    if (found < 0).any():
        unknown = [str(u) for u in np.asarray(uniques, dtype=object)[found < 0]]
        raise KeyError(f"{len(unknown)} unknown {kind} id(s), e.g. {unknown[:5]}")
    return found.astype(np.int64)[codes]


def _build_truth(
    catalog: _Catalog,
    latent: dict[str, np.ndarray],
    window_start: int,
    n_days: int,
    sessions_per_user: float,
) -> Truth:
    """The :class:`Truth` of a generated world (a favourite style is reduced modulo the
    category's style count, as the generator does when it picks a session's style group)."""
    prefs = latent["prefs"].astype(np.int64)
    used = prefs >= 0
    styles = np.where(used, latent["styles"] % catalog.n_styles[np.where(used, prefs, 0)], -1)
    n_users, n_items = prefs.shape[0], catalog.category.size
    n_categories = catalog.category_weights.size
    names = list(CATEGORY_NAMES) + [
        f"category-{k}" for k in range(len(CATEGORY_NAMES), n_categories)
    ]
    start = pd.Timestamp(window_start, unit="s", tz="UTC")
    return Truth(
        user_ids=np.array([f"u{n}" for n in range(n_users)], dtype=object),
        prefs=prefs,
        styles=styles.astype(np.int64),
        strength=latent["strength"],
        activity=latent["activity"],
        sessions_per_day=(1.0 + (sessions_per_user - 1.0) * latent["activity"]) / n_days,
        primary_device=np.asarray(DEVICES, dtype=object)[latent["primary_device"]],
        item_ids=np.array([f"i{n}" for n in range(n_items)], dtype=object),
        category=catalog.category.astype(np.int64),
        style=catalog.style.astype(np.int64),
        popularity=catalog.weight / catalog.weight.max(),
        price=catalog.price,
        published_at=catalog.published.astype("datetime64[s]"),
        available=catalog.available,
        category_names=tuple(names[:n_categories]),
        window_start=start,
        window_end=start + pd.Timedelta(days=n_days),
    )


# ---- catalog -------------------------------------------------------------------------------
def _make_catalog(
    rng: np.random.Generator,
    n_items: int,
    n_categories: int,
    window_start: int,
    n_days: int,
    exponent: float,
) -> _Catalog:
    """Categories, styles, Zipf popularity, publication times and prices of the items."""
    cat_w = 1.0 / (1.0 + rng.permutation(n_categories)) ** 0.6
    cat_w /= cat_w.sum()
    # every category gets at least one item
    category = rng.permutation(
        np.concatenate(
            [np.arange(n_categories), rng.choice(n_categories, n_items - n_categories, p=cat_w)]
        )
    )
    weight = 1.0 / (1.0 + rng.permutation(n_items)) ** exponent
    by_category = _make_sampler(category, weight**_TASTE_FLATTEN, n_categories)

    # styles: round-robin over each category's popularity order, so none is empty or all-head
    counts = np.bincount(category, minlength=n_categories)
    rank = np.empty(n_items, dtype=np.int64)
    rank[by_category.order] = np.arange(n_items) - np.repeat(by_category.first, counts)
    n_styles = np.minimum(_STYLES, counts)
    style = rank % n_styles[category]
    by_style = _make_sampler(
        category * _STYLES + style, weight**_TASTE_FLATTEN, n_categories * _STYLES
    )

    # ~15% of items appear during the window, never a category's most popular one
    fallback = by_category.order[by_category.first]
    is_new = rng.random(n_items) < _NEW_ITEM_SHARE
    is_new[fallback] = False
    old_age = rng.integers(1, 730 * _SECONDS_PER_DAY, n_items)
    new_offset = rng.integers(0, max(1, int(0.8 * n_days * _SECONDS_PER_DAY)), n_items)
    published = np.where(is_new, window_start + new_offset, window_start - old_age)

    level = np.exp(rng.normal(3.0, 0.7, n_categories))
    price = np.maximum(0.99, np.round(level[category] * rng.lognormal(0.0, 0.5, n_items), 2))
    available = rng.random(n_items) >= _UNAVAILABLE_SHARE
    return _Catalog(
        category=category,
        style=style,
        weight=weight,
        published=published.astype(np.int64),
        price=price,
        available=available,
        global_cdf=np.cumsum(weight) / weight.sum(),
        category_weights=np.bincount(category, weights=weight) / weight.sum(),
        n_styles=n_styles,
        by_category=by_category,
        by_style=by_style,
        fallback=fallback,
    )


def _make_sampler(group: np.ndarray, weight: np.ndarray, n_groups: int) -> _GroupSampler:
    """Sampler drawing items of a group proportionally to ``weight`` (empty groups allowed)."""
    order = np.lexsort((-weight, group))
    sorted_group = group[order]
    cum = np.cumsum(weight[order])
    first = np.searchsorted(sorted_group, np.arange(n_groups))
    last = np.r_[first[1:], order.size] - 1
    before = np.r_[0.0, cum][first]  # cumulative weight before each group
    total = np.r_[cum, 0.0][last] - before
    keys = sorted_group + (cum - before[sorted_group]) / total[sorted_group]
    non_empty = last >= first
    keys[last[non_empty]] = np.flatnonzero(non_empty) + 1.0
    return _GroupSampler(order=order, keys=keys, first=first)


def _day_weights(window_start: int, n_days: int) -> np.ndarray:
    """Probability of each day of the window (weekly rhythm)."""
    first_weekday = dt.datetime.fromtimestamp(window_start, dt.timezone.utc).weekday()
    weights = _WEEKDAY_CURVE[(first_weekday + np.arange(n_days)) % 7]
    return weights / weights.sum()


# ---- events --------------------------------------------------------------------------------
def _generate_chunk(
    rng: np.random.Generator,
    first_user: int,
    n_users: int,
    catalog: _Catalog,
    window_start: int,
    window_end: int,
    day_p: np.ndarray,
    sessions_per_user: float,
    views_per_session: float,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Events, attribute codes and latent tastes of users ``first_user ..`` (``n_users``)."""
    n_cat = catalog.category_weights.size
    # -- users: preferred categories (Gumbel top-k by category popularity), habits, attributes
    n_pref = np.minimum(rng.choice(3, n_users, p=[0.4, 0.4, 0.2]) + 1, n_cat)
    gumbel = np.log(catalog.category_weights) + rng.gumbel(size=(n_users, n_cat))
    prefs = np.argsort(-gumbel, axis=1)[:, :3]
    if prefs.shape[1] < 3:
        prefs = np.pad(prefs, ((0, 0), (0, 3 - prefs.shape[1])), mode="edge")
    prefs = np.where(np.arange(3) < n_pref[:, None], prefs, -1)  # -1 = no preference slot
    styles = rng.integers(0, _STYLES, (n_users, 3))  # favourite style in each category
    strength = rng.beta(_STRENGTH_A, _STRENGTH_B, n_users)
    primary_device = rng.choice(len(DEVICES), n_users, p=_DEVICE_MIX / _DEVICE_MIX.sum())
    activity = rng.lognormal(-0.245, 0.7, n_users)  # mean 1
    occupation_w = 1.0 / (1.0 + np.arange(len(OCCUPATIONS))) ** 0.8
    attributes = {
        "age": rng.choice(len(AGE_BANDS), n_users, p=_AGE_MIX / _AGE_MIX.sum()),
        "gender": rng.choice(len(_GENDERS), n_users, p=_GENDER_MIX),
        "occupation": rng.choice(len(OCCUPATIONS), n_users, p=occupation_w / occupation_w.sum()),
        "region": rng.integers(0, 10, n_users),
    }

    # -- sessions, ordered by start within each user
    n_sess = 1 + rng.poisson((sessions_per_user - 1.0) * activity)
    n_s = int(n_sess.sum())
    sess_user = np.repeat(np.arange(n_users), n_sess)
    sess_start = (
        window_start
        + rng.choice(day_p.size, n_s, p=day_p) * _SECONDS_PER_DAY
        + rng.choice(24, n_s, p=_HOUR_CURVE / _HOUR_CURVE.sum()) * 3600
        + rng.integers(0, 3600, n_s)
    )
    sess_start = sess_start[np.lexsort((sess_start, sess_user))]
    sess_k = np.arange(n_s) - np.repeat(np.cumsum(n_sess) - n_sess, n_sess)
    sess_device = np.where(
        rng.random(n_s) < _PRIMARY_DEVICE_SHARE,
        primary_device[sess_user],
        rng.choice(len(DEVICES), n_s, p=_DEVICE_MIX / _DEVICE_MIX.sum()),
    )
    slot = rng.integers(0, n_pref[sess_user])
    random_cat = rng.choice(n_cat, n_s, p=catalog.category_weights)
    use_pref = rng.random(n_s) < strength[sess_user]
    sess_cat = np.where(use_pref, prefs[sess_user, slot], random_cat)
    sess_style = np.where(use_pref, styles[sess_user, slot], rng.integers(0, _STYLES, n_s))
    sess_group = sess_cat * _STYLES + sess_style % catalog.n_styles[sess_cat]

    # -- views
    n_views = 1 + rng.poisson(views_per_session - 1.0, n_s)
    n_v = int(n_views.sum())
    view_sess = np.repeat(np.arange(n_s), n_views)
    view_first = np.cumsum(n_views) - n_views
    view_k = np.arange(n_v) - view_first[view_sess]
    view_user = sess_user[view_sess]
    stay = rng.random(n_v) < _SESSION_CATEGORY_SHARE
    roam = np.searchsorted(catalog.global_cdf, rng.random(n_v), side="right")
    roam = np.minimum(roam, catalog.category.size - 1)
    in_style = rng.random(n_v) < _STYLE_SHARE
    item = np.where(
        in_style,
        catalog.by_style.draw(rng, sess_group[view_sess]),
        catalog.by_category.draw(rng, sess_cat[view_sess]),
    )
    item = np.where(stay, item, roam)

    boost = np.where(_in_prefs(prefs, view_user, catalog.category[item]), _PREF_BOOST, _OTHER_DAMP)
    dwell = np.round(np.clip(rng.lognormal(np.log(25.0), 0.9, n_v), 1.0, 1800.0), 1)
    clicked = rng.random(n_v) < _P_CLICK * boost
    click_dwell = np.round(np.clip(rng.lognormal(np.log(60.0), 0.8, n_v), 1.0, 3600.0), 1)
    step = (
        np.ceil(dwell)
        + np.where(clicked, np.ceil(click_dwell), 0)
        + np.ceil(rng.lognormal(np.log(8.0), 0.7, n_v))
    ).astype(np.int64)
    cum = np.cumsum(step) - step
    view_ts = sess_start[view_sess] + cum - cum[view_first][view_sess]

    item = _fix_unpublished(rng, catalog, item, view_ts)  # keeps categories, so boost holds
    liked = clicked & (rng.random(n_v) < _P_LIKE)
    shared = clicked & (rng.random(n_v) < _P_SHARE)
    carted = clicked & (rng.random(n_v) < _P_CART * boost)
    bought = carted & (rng.random(n_v) < _P_PURCHASE)

    click_ts = view_ts + np.ceil(dwell).astype(np.int64)
    click_span = np.ceil(click_dwell).astype(np.int64)
    like_ts = click_ts + 1 + (rng.random(n_v) * click_span).astype(np.int64)
    share_ts = click_ts + 1 + (rng.random(n_v) * click_span).astype(np.int64)
    cart_ts = click_ts + 1 + (rng.uniform(0.3, 1.0, n_v) * click_span).astype(np.int64)
    buy_ts = cart_ts + 1 + np.ceil(rng.lognormal(np.log(90.0), 0.8, n_v)).astype(np.int64)

    price = catalog.price[item]
    nan = np.full(n_v, np.nan)
    stages = [
        (_VIEW, None, view_ts, dwell),
        (_CLICK, clicked, click_ts, click_dwell),
        (_LIKE, liked, like_ts, nan),
        (_SHARE, shared, share_ts, nan),
        (_CART, carted, cart_ts, price),
        (_PURCHASE, bought, buy_ts, price),
    ]
    pick = [np.arange(n_v) if mask is None else np.flatnonzero(mask) for _, mask, _, _ in stages]
    idx = np.concatenate(pick)
    stage = np.concatenate(
        [np.full(p.size, code, np.int8) for (code, *_), p in zip(stages, pick, strict=True)]
    )
    ts = np.concatenate([t[p] for (_, _, t, _), p in zip(stages, pick, strict=True)])
    value = np.concatenate([v[p] for (_, _, _, v), p in zip(stages, pick, strict=True)])
    keep = ts < window_end
    idx, stage, ts, value = idx[keep], stage[keep], ts[keep], value[keep]
    sess = view_sess[idx]
    events = {
        "ts": ts,
        "user": (first_user + sess_user[sess]).astype(np.int64),
        "session_k": sess_k[sess].astype(np.int32),
        "position": (view_k[idx] * len(STAGES) + stage).astype(np.int64),
        "stage": stage,
        "item": item[idx].astype(np.int32),
        "value": value,
        "device": sess_device[sess].astype(np.int8),
    }
    latent = {
        "prefs": prefs,
        "styles": styles,
        "strength": strength,
        "activity": activity,
        "primary_device": primary_device,
    }  # read only: no draws, nothing changes
    return events, {key: col.astype(np.int16) for key, col in attributes.items()}, latent


def _in_prefs(prefs: np.ndarray, users: np.ndarray, categories: np.ndarray) -> np.ndarray:
    """Whether each category is one of the matching user's preferred categories."""
    return (prefs[users] == categories[:, None]).any(axis=1)


def _fix_unpublished(
    rng: np.random.Generator, catalog: _Catalog, item: np.ndarray, ts: np.ndarray
) -> np.ndarray:
    """Replace items viewed before their publication by items of the same category."""
    item = item.copy()
    bad = np.flatnonzero(catalog.published[item] > ts)
    for _ in range(_RESAMPLE_ROUNDS):
        if bad.size == 0:
            return item
        item[bad] = catalog.by_category.draw(rng, catalog.category[item[bad]])
        bad = bad[catalog.published[item[bad]] > ts[bad]]
    item[bad] = catalog.fallback[catalog.category[item[bad]]]
    return item


# ---- frames --------------------------------------------------------------------------------
def _build_events(cols: dict[str, np.ndarray], seed: int) -> pd.DataFrame:
    """Contract-typed event frame, ordered by timestamp."""
    order = np.argsort(cols["ts"], kind="stable")
    user_num = pa.array(cols["user"][order]).cast(pa.string())
    session_id = pc.binary_join_element_wise(
        "u", user_num, "-s", pa.array(cols["session_k"][order]).cast(pa.string()), ""
    )
    event_id = pc.binary_join_element_wise(
        f"syn{seed}-", session_id, "-e", pa.array(cols["position"][order]).cast(pa.string()), ""
    )
    item_num = pa.array(cols["item"][order]).cast(pa.string())
    seconds = cols["ts"][order]
    events = pd.DataFrame(
        {
            "event_id": _strings(event_id),
            "user_id": _strings(pc.binary_join_element_wise("u", user_num, "")),
            "item_id": _strings(pc.binary_join_element_wise("i", item_num, "")),
            "event_type": _strings(pa.array(STAGES).take(pa.array(cols["stage"][order]))),
            "timestamp": pd.Series((seconds * 1_000_000).astype("datetime64[us]")).dt.tz_localize(
                "UTC"
            ),
            "value": cols["value"][order],
            "device": _strings(pa.array(DEVICES).take(pa.array(cols["device"][order]))),
            "session_id": _strings(session_id),
        },
        columns=list(EVENT_COLUMNS),
    )
    return events.astype(EVENT_DTYPES)


def _build_items(catalog: _Catalog) -> pd.DataFrame:
    """Items side table: id, title, category name, published_at, available, price."""
    n_items = catalog.category.size
    names = list(CATEGORY_NAMES) + [
        f"category-{k}" for k in range(len(CATEGORY_NAMES), catalog.category_weights.size)
    ]
    category = [names[c] for c in catalog.category]
    items = pd.DataFrame(
        {
            "item_id": [f"i{n}" for n in range(n_items)],
            "title": [f"{name.title()} item {n}" for n, name in enumerate(category)],
            "category": category,
            "published_at": pd.Series(
                (catalog.published * 1_000_000).astype("datetime64[us]")
            ).dt.tz_localize("UTC"),
            "available": catalog.available,
            "price": catalog.price,
        },
        columns=list(ITEM_COLUMNS),
    )
    return items.astype({"item_id": "string", "title": "string", "category": "string"})


def _build_users(cols: dict[str, np.ndarray]) -> pd.DataFrame:
    """Users side table from the per-user attribute codes."""
    users = pd.DataFrame(
        {
            "user_id": [f"u{n}" for n in range(cols["age"].size)],
            "age_band": np.asarray(AGE_BANDS, dtype=object)[cols["age"]],
            "gender": np.asarray(_GENDERS, dtype=object)[cols["gender"]],
            "occupation": np.asarray(OCCUPATIONS, dtype=object)[cols["occupation"]],
            "region": cols["region"].astype(str),
        },
        columns=list(USER_COLUMNS),
    )
    return users.astype("string")


def _strings(values: pa.Array | pa.ChunkedArray) -> pd.arrays.ArrowStringArray:
    """Arrow strings as a pandas ``string`` extension array (no Python objects)."""
    return pd.arrays.ArrowStringArray(values)
