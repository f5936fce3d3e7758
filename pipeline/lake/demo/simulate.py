"""A simulated CMS: users of a synthetic world visit, see served recommendation lists and click.

Online A/B measurement needs an outcome the recommender does not grade itself on. Here it is
the latent :class:`~pipeline.lake.demo.synthetic.Truth` of a world made by
:func:`~pipeline.lake.demo.synthetic.generate_world`: :func:`simulate_day` plays one day of
visits to the "home_recs" placement against served lists (the serving view's shape: columns
``user_id``, ``rank``, ``item_id``, optionally ``variant``), and :func:`expected_ctr` gives the
analytical click-through rate the simulation converges to, so a test can say which variant is
truly better and by how much.

Click model (:class:`ClickModel`), position-based, per shown item at position ``k`` (its rank)
with ``a`` the true affinity of the item to the user (:meth:`Truth.affinity`)::

    P(examine | k)          = 1 / k ** position_decay                    (decay 1.0)
    P(click | examined)     = base_ctr_scale * a                         (scale 0.2)
    P(add_to_cart | click)  = cart_base + cart_slope * a                 (0.05 + 0.25 a)
    P(purchase | cart)      = purchase_base + purchase_slope * a         (0.30 + 0.30 a)

A list of perfectly matched items (affinity ~0.8 at the mean strength) is clicked ~16% of the
time at position 1, a global popularity list (mean affinity ~0.2) ~4%; over a 10-item list the
click-through rates (clicks / impressions) are ~4.6% and ~1.2%.

Visits: a user visits on a given day with probability ``Truth.visit_probability`` (``1 -
exp(-sessions_per_day)``, from the user's activity), or ``visit_rate`` when given, at most once;
a visiting user sees their list, or the ``__default__`` list when they have none (nothing when
there is no default either). Every shown item becomes an ``impression`` event, clicked items a
``click`` and possibly ``add_to_cart`` and ``purchase`` events; see :func:`simulate_day`.

Data without a latent truth (the MovieLens-100k demo data): :func:`empirical_truth` builds a
stand-in :class:`Truth` from an event log and the items table (each user's genre tastes as
their events show them: not what real users would do, used only by the demo and the tests;
no model sees it), and :func:`simulate_served` plays days against the served-list history
(``python -m pipeline.cli simulate-day DATE`` writes them to the landing zone with
:func:`write_simulated_events`).
"""

from __future__ import annotations

import datetime as dt
import gzip
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from pipeline.core.config import DEFAULT_USER
from pipeline.core.schema import DEVICES, EVENT_COLUMNS, EVENT_DTYPES, parse_bool
from pipeline.lake.demo import format_iso_utc
from pipeline.lake.demo.synthetic import HOUR_CURVE, Truth
from pipeline.lake.normalise import parse_timestamps
from pipeline.lake.storage import durable_write

#: Event types a simulated visit produces, in funnel order.
SIM_EVENT_TYPES: tuple[str, ...] = ("impression", "click", "add_to_cart", "purchase")
#: Columns of :func:`simulate_day`'s frame (``variant`` is appended when the lists have one).
SIM_COLUMNS: tuple[str, ...] = (*EVENT_COLUMNS, "position", "placement")
PLACEMENT = "home_recs"

_SECONDS_PER_DAY = 86_400
_MAX_SCAN_POSITION = 60  # a click on position k comes ~3 s * min(k, 60) after the impression
_SCAN_SECONDS = 3
_CLICK_DELAY, _CLICK_CAP = 10.0, 600  # median / cap (seconds) of the reading before a click
_CART_DELAY, _CART_CAP = 60.0, 1_800  # ... between click and add_to_cart
_BUY_DELAY, _BUY_CAP = 120.0, 1_800  # ... between add_to_cart and purchase
#: Longest visit (impression to purchase); visits start early enough to end within the day.
_MAX_SPAN = 3 + _SCAN_SECONDS * _MAX_SCAN_POSITION + _CLICK_CAP + _CART_CAP + _BUY_CAP
_CHUNK_ROWS = 2_000_000  # (user, shown item) pairs per chunk in expected_ctr / oracle_lists


@dataclass(frozen=True)
class ClickModel:
    """Position-based click model with an affinity-driven funnel (see the module docstring).

    ``position_decay`` >= 0 sets how fast attention falls with the rank (0: every position is
    examined); ``base_ctr_scale`` in [0, 1] is the click probability of an examined item of
    affinity 1. The cart and purchase probabilities are ``base + slope * affinity`` and must
    stay within [0, 1] for every affinity in [0, 1].
    """

    position_decay: float = 1.0
    base_ctr_scale: float = 0.2
    cart_base: float = 0.05
    cart_slope: float = 0.25
    purchase_base: float = 0.3
    purchase_slope: float = 0.3

    def __post_init__(self) -> None:
        if not self.position_decay >= 0:
            raise ValueError(f"position_decay must be >= 0, got {self.position_decay}")
        if not 0 <= self.base_ctr_scale <= 1:
            raise ValueError(f"base_ctr_scale must be within 0..1, got {self.base_ctr_scale}")
        for stage in ("cart", "purchase"):
            base, slope = getattr(self, f"{stage}_base"), getattr(self, f"{stage}_slope")
            if not (0 <= base <= 1 and 0 <= base + slope <= 1):
                raise ValueError(
                    f"{stage}_base and {stage}_base + {stage}_slope must be within "
                    f"0..1, got {base} and {base + slope}"
                )

    def p_examine(self, position) -> np.ndarray:
        """Probability that a user looks at position ``position`` (1-based)."""
        return 1.0 / np.asarray(position, dtype=np.float64) ** self.position_decay

    def p_click(self, affinity, position) -> np.ndarray:
        """Unconditional click probability of an item shown at ``position``."""
        return self.p_examine(position) * self.base_ctr_scale * np.asarray(affinity)

    def p_cart(self, affinity) -> np.ndarray:
        """Probability of an add_to_cart given a click."""
        return self.cart_base + self.cart_slope * np.asarray(affinity)

    def p_purchase(self, affinity) -> np.ndarray:
        """Probability of a purchase given an add_to_cart."""
        return self.purchase_base + self.purchase_slope * np.asarray(affinity)


@dataclass(frozen=True)
class OrganicModel:
    """What a visiting user does outside the recommendation placement (browsing, search):
    opens a Poisson(``views_per_visit``) number of items, drawn with probability proportional
    to the user's true affinity times the square root of the item's popularity (people browse
    what they like, and what is prominent), each a ``view`` event, and may add it to the
    cart and buy it with :class:`ClickModel`'s affinity-driven funnel. Every visiting user
    browses, with or without a list: a holdout group (no recommendations) then has the site's
    baseline conversion, and what the lists add on top of it is the recommendations'
    incremental effect."""

    views_per_visit: float = 2.0
    placement: str = "browse"

    def __post_init__(self) -> None:
        if not self.views_per_visit >= 0:
            raise ValueError(f"views_per_visit must be >= 0, got {self.views_per_visit}")


def simulate_day(
    truth: Truth,
    lists: pd.DataFrame,
    day: dt.date | dt.datetime | str,
    *,
    click_model: ClickModel = ClickModel(),
    visit_rate: float | None = None,
    seed: int = 0,
    placement: str = PLACEMENT,
    organic: OrganicModel | None = None,
) -> pd.DataFrame:
    """One day of visits to ``placement`` by ``truth``'s users, served ``lists``.

    ``lists`` has columns ``user_id``, ``rank`` (1-based) and ``item_id``, optionally
    ``variant`` (each user, ``__default__`` included, in one variant); every listed user and
    item must exist in ``truth``. Each user visits with probability
    ``truth.visit_probability`` (or ``visit_rate``), at most once, and sees their list or the
    ``__default__`` one. Returns the events ordered by time: :data:`SIM_COLUMNS` (the event
    contract plus ``position`` = rank and ``placement``) and ``variant`` when ``lists`` has
    one:

    * one ``impression`` per shown item at the visit's start, then ``click`` /
      ``add_to_cart`` / ``purchase`` per :class:`ClickModel`, each strictly later than the
      stage before and all within the UTC day (visits start following the generator's daily
      curve, compressed so the longest visit ends before midnight);
    * ``value`` is the item's price for ``add_to_cart`` and ``purchase`` (missing otherwise),
      ``device`` the user's primary device, ``session_id`` ``sim-<day>-<user_id>``, and
      ``event_id`` ``sim-<day>-<user_id>-r<rank>-<event_type>`` (unique, deterministic).

    With ``organic`` (:class:`OrganicModel`), every visiting user, listed or not, also browses:
    ``view`` events (``placement`` the organic one, no ``position``) and their carts and
    purchases, from a separate random stream, so the list events are the same with or without
    it; ``position`` is then a nullable integer.

    The same arguments give the same frame; the random stream depends on ``seed`` and the day.
    """
    day = _as_date(day)
    served = _Served.build(truth, lists)
    seq = np.random.SeedSequence([int(seed), day.toordinal()])
    rng = np.random.default_rng(seq)
    p_visit = _visit_probability(truth, visit_rate)
    visiting = rng.random(truth.n_users) < p_visit
    visits = np.flatnonzero(visiting & (served.length > 0))
    users, rows, visit_of = served.expand(visits)
    n_imp = rows.size

    affinity = truth.affinity_by_index(users, served.item[rows])
    position = served.rank[rows]
    clicked = rng.random(n_imp) < click_model.p_click(affinity, position)
    carted = clicked & (rng.random(n_imp) < click_model.p_cart(affinity))
    bought = carted & (rng.random(n_imp) < click_model.p_purchase(affinity))

    hour = rng.choice(24, visits.size, p=HOUR_CURVE / HOUR_CURVE.sum())
    offset = (hour + rng.random(visits.size)) * (
        3600.0 * (_SECONDS_PER_DAY - _MAX_SPAN - 1) / _SECONDS_PER_DAY
    )
    day_start = int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc).timestamp())
    imp_ts = day_start + offset.astype(np.int64)[visit_of]
    click_ts = (
        imp_ts
        + 1
        + _SCAN_SECONDS * np.minimum(position, _MAX_SCAN_POSITION)
        + _delay(rng, _CLICK_DELAY, _CLICK_CAP, n_imp)
    )
    cart_ts = click_ts + 1 + _delay(rng, _CART_DELAY, _CART_CAP, n_imp)
    buy_ts = cart_ts + 1 + _delay(rng, _BUY_DELAY, _BUY_CAP, n_imp)

    price = truth.price[served.item[rows]]
    nan = np.full(n_imp, np.nan)
    stages = [
        (None, imp_ts, nan),
        (clicked, click_ts, nan),
        (carted, cart_ts, price),
        (bought, buy_ts, price),
    ]
    pick = [np.arange(n_imp) if mask is None else np.flatnonzero(mask) for mask, _, _ in stages]
    idx = np.concatenate(pick)
    stage = np.concatenate([np.full(p.size, code, np.int8) for code, p in enumerate(pick)])
    ts = np.concatenate([t[p] for (_, t, _), p in zip(stages, pick)])
    value = np.concatenate([v[p] for (_, _, v), p in zip(stages, pick)])
    order = np.lexsort((position[idx], stage, visit_of[idx], ts))
    idx, stage, ts, value = idx[order], stage[order], ts[order], value[order]
    frame = _build_frame(
        truth,
        served,
        day,
        placement,
        users[idx],
        position[idx],
        served.item[rows[idx]],
        stage,
        ts,
        value,
    )
    if organic is None:
        return frame
    browsing = _organic_frame(
        truth,
        served,
        day,
        np.flatnonzero(visiting),
        click_model,
        organic,
        np.random.default_rng([int(seed), day.toordinal(), 1]),
    )
    frame = frame.astype({"position": "Int64"})
    both = pd.concat([frame, browsing], ignore_index=True) if len(browsing) else frame
    return both.sort_values("timestamp", kind="stable", ignore_index=True)


def _organic_frame(
    truth: Truth,
    served: _Served,
    day: dt.date,
    visitors: np.ndarray,
    click_model: ClickModel,
    organic: OrganicModel,
    rng: np.random.Generator,
) -> pd.DataFrame:
    """The browsing of ``visitors`` (user positions) on ``day``: see :class:`OrganicModel`."""
    n_views = rng.poisson(organic.views_per_visit, visitors.size)
    users = np.repeat(visitors, n_views)
    candidates = _candidates(truth, True, day)
    popularity = np.sqrt(truth.popularity[candidates].astype(np.float64))
    items = np.empty(users.size, np.int64)
    draws = rng.random(users.size)
    step = max(1, _CHUNK_ROWS // max(1, candidates.size))
    for first in range(0, users.size, step):  # inverse-CDF draws, one row per view
        chunk = slice(first, first + step)
        weight = np.cumsum(truth.affinity_matrix(users[chunk], candidates) * popularity, axis=1)
        pick = (weight < (draws[chunk] * weight[:, -1])[:, None]).sum(axis=1)
        items[chunk] = candidates[np.minimum(pick, candidates.size - 1)]
    affinity = truth.affinity_by_index(users, items)
    carted = rng.random(users.size) < click_model.p_cart(affinity)
    bought = carted & (rng.random(users.size) < click_model.p_purchase(affinity))
    nth = np.arange(users.size) - np.repeat(np.cumsum(n_views) - n_views, n_views)
    day_start = int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc).timestamp())
    span = _CART_CAP + _BUY_CAP + 2
    view_ts = day_start + (rng.random(users.size) * (_SECONDS_PER_DAY - span - 1)).astype(np.int64)
    cart_ts = view_ts + 1 + _delay(rng, _CART_DELAY, _CART_CAP, users.size)
    buy_ts = cart_ts + 1 + _delay(rng, _BUY_DELAY, _BUY_CAP, users.size)
    price = truth.price[items]
    parts = [
        (np.ones(users.size, bool), "view", view_ts, np.full(users.size, np.nan)),
        (carted, "add_to_cart", cart_ts, price),
        (bought, "purchase", buy_ts, price),
    ]
    user_text = truth.user_ids[users].astype(str)
    frames = []
    for mask, kind, ts, value in parts:
        session = np.char.add(f"sim-{day.isoformat()}-", user_text[mask])
        frames.append(
            pd.DataFrame(
                {
                    "event_id": np.char.add(
                        np.char.add(session, "-o"), np.char.add(nth[mask].astype(str), f"-{kind}")
                    ),
                    "user_id": user_text[mask],
                    "item_id": truth.item_ids[items[mask]].astype(str),
                    "event_type": kind,
                    "timestamp": pd.Series(
                        (ts[mask] * 1_000_000).astype("datetime64[us]")
                    ).dt.tz_localize("UTC"),
                    "value": value[mask],
                    "device": truth.primary_device[users[mask]].astype(str),
                    "session_id": session,
                    "position": pd.array([pd.NA] * int(mask.sum()), "Int64"),
                    "placement": organic.placement,
                },
                columns=list(SIM_COLUMNS),
            )
        )
    out = pd.concat(frames, ignore_index=True).astype(EVENT_DTYPES).astype({"position": "Int64"})
    out["placement"] = out["placement"].astype("string")
    if served.variants is not None:
        variant = served.user_variant[np.concatenate([users[m] for m, *_ in parts])]
        names = np.array([*served.variants, None], dtype=object)  # -1: no list, no variant
        out["variant"] = names[variant]
    return out


def expected_ctr(
    truth: Truth,
    lists: pd.DataFrame,
    click_model: ClickModel = ClickModel(),
    *,
    visit_rate: float | None = None,
) -> float | pd.Series:
    """The click-through rate (clicks / impressions) :func:`simulate_day` converges to.

    ``sum_u w_u * sum_k P(click_uk) / sum_u w_u * len_u`` over the users served a list (their
    own or ``__default__``), ``w_u`` their visit probability: the ratio of expected clicks to
    expected impressions of a day. A float, or a Series indexed by variant (name
    ``expected_ctr``) when ``lists`` has a ``variant`` column.
    """
    served = _Served.build(truth, lists)
    weight = _visit_probability(truth, visit_rate)
    users = np.flatnonzero(served.length > 0)
    n_variants = 1 if served.variants is None else max(1, len(served.variants))
    clicks, shown = np.zeros(n_variants), np.zeros(n_variants)
    for chunk in _chunks(users, served.length):
        u, rows, _ = served.expand(chunk)
        p = click_model.p_click(truth.affinity_by_index(u, served.item[rows]), served.rank[rows])
        code = served.user_variant[u] if served.variants is not None else np.zeros_like(u)
        clicks += np.bincount(code, weights=weight[u] * p, minlength=n_variants)
        shown += np.bincount(code, weights=weight[u], minlength=n_variants)
    with np.errstate(invalid="ignore", divide="ignore"):
        ctr = clicks / shown
    if served.variants is None:
        return float(ctr[0])
    return pd.Series(ctr, index=served.variants, name="expected_ctr")


def observed_ctr(events: pd.DataFrame) -> float | pd.Series:
    """Clicks / impressions of simulated ``events``; per variant (a Series named
    ``ctr``) when they have a ``variant`` column."""
    is_imp = (events["event_type"] == "impression").to_numpy(bool)
    is_click = (events["event_type"] == "click").to_numpy(bool)
    if "variant" not in events.columns:
        return float(is_click.sum() / is_imp.sum()) if is_imp.any() else float("nan")
    frame = pd.DataFrame(
        {"variant": events["variant"].to_numpy(), "imp": is_imp, "click": is_click}
    )
    counts = frame.groupby("variant", sort=True)[["imp", "click"]].sum()
    return (counts["click"] / counts["imp"]).rename("ctr")


def oracle_lists(
    truth: Truth,
    k: int = 10,
    *,
    users=None,
    available_only: bool = True,
    as_of: dt.date | dt.datetime | str | None = None,
) -> pd.DataFrame:
    """Each user's ``k`` items of highest true affinity (``user_id``, ``rank``, ``item_id``),
    best first; ``users`` (ids) defaults to all. Unavailable items, and with ``as_of`` items
    published after it, are left out. The best any recommender could serve."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    candidates = _candidates(truth, available_only, as_of)
    k = min(k, candidates.size)
    user_idx = (
        np.arange(truth.n_users)
        if users is None
        else truth.user_index(np.asarray(users, dtype=object))
    )
    step = max(1, _CHUNK_ROWS // max(1, candidates.size))
    tops = []
    for first in range(0, user_idx.size, step):
        chunk = user_idx[first : first + step]
        aff = truth.affinity_matrix(chunk, candidates)
        part = (
            np.argpartition(-aff, k - 1, axis=1)[:, :k]
            if k < candidates.size
            else np.broadcast_to(np.arange(candidates.size), aff.shape)
        )
        part_aff = np.take_along_axis(aff, part, axis=1)
        best = np.take_along_axis(part, np.lexsort((part, -part_aff), axis=1), axis=1)
        tops.append(candidates[best])
    items = np.concatenate(tops) if tops else np.empty((0, k), np.int64)
    return pd.DataFrame(
        {
            "user_id": pd.array(np.repeat(truth.user_ids[user_idx], k), dtype="string"),
            "rank": np.tile(np.arange(1, k + 1), user_idx.size),
            "item_id": pd.array(truth.item_ids[items.ravel()], dtype="string"),
        }
    )


def popularity_list(
    truth: Truth,
    k: int = 10,
    *,
    user_id: str = DEFAULT_USER,
    available_only: bool = True,
    as_of: dt.date | dt.datetime | str | None = None,
) -> pd.DataFrame:
    """The ``k`` truly most popular items as one list for ``user_id`` (``__default__``)."""
    candidates = _candidates(truth, available_only, as_of)
    best = candidates[np.lexsort((candidates, -truth.popularity[candidates]))][:k]
    return pd.DataFrame(
        {
            "user_id": pd.array([user_id] * best.size, dtype="string"),
            "rank": np.arange(1, best.size + 1),
            "item_id": pd.array(truth.item_ids[best], dtype="string"),
        }
    )


# ---- empirical truth -----------------------------------------------------------------------
#: Category of items without one (blank, missing, or named ``unknown`` in the items table, as
#: MovieLens' genre-less films are): a catch-all that is never a preferred category.
UNKNOWN_CATEGORY = "unknown"
#: A second or third preferred category needs at least this share of the user's events.
EMPIRICAL_MIN_SHARE = 0.15
#: ``popularity = rank ** -EMPIRICAL_ZIPF`` (rank 1: the item with the most distinct users), the
#: Zipf law of :func:`~pipeline.lake.demo.synthetic.generate_world`'s default exponent.
EMPIRICAL_ZIPF = 0.9
#: What an empirical truth's user whose log names no device uses.
FALLBACK_DEVICE = "desktop"
#: Event types an empirical truth leaves out by default: being shown an item is not a taste.
NOT_A_TASTE: tuple[str, ...] = ("impression",)
#: The ``variant`` of served rows without one when others have one (``__default__``'s).
NO_VARIANT = "none"


def empirical_truth(
    events: pd.DataFrame,
    items: pd.DataFrame | None = None,
    *,
    seed: int = 0,
    exclude_event_types: Iterable[str] = NOT_A_TASTE,
) -> Truth:
    """A :class:`Truth` estimated from an event log, for data without a latent truth
    (the MovieLens-100k demo data): a *stand-in*, a genre-taste truth of what each user did,
    not what real users would do. Only the demo's simulated CMS and the tests use it; no
    model ever sees it.

    ``events`` follow the event contract (``user_id``, ``item_id``, ``event_type``,
    ``timestamp``, optionally ``device`` and ``session_id``; events of
    ``exclude_event_types`` and rows without a user, item or timestamp are left out); ``items``
    is the items side table (``item_id``, optionally ``category``, ``price``, ``published_at``,
    ``available``; text as :func:`~pipeline.lake.readers.read_side_file` returns it, or typed).
    Every event counts the same (a view, a purchase, a 1-star rating alike). With ``n_u`` a
    user's events and ``n_uc`` those in category ``c``:

    * ``prefs``: the categories of largest share ``n_uc / n_u``, ties broken by the category's
      share of all events, then by a draw seeded with ``seed``: the first always, the second
      and third when their share is at least :data:`EMPIRICAL_MIN_SHARE`; never the catch-all
      :data:`UNKNOWN_CATEGORY` (a user with only uncategorised events has no preference);
    * ``strength``: the share of the user's events in those categories, ``sum_c n_uc / n_u``;
    * ``styles``: 0 for every preferred category, and every item has style 0: the log has no
      styles, so a category match is the whole match (``affinity`` of a preferred-category item
      is ``base + (1 - base) * strength``);
    * ``activity``: ``n_u / mean(n)`` (mean 1, as in the generator); ``sessions_per_day``:
      ``n_u / events_per_session / span_days``, with ``events_per_session`` the log's events
      per distinct (user, session_id) (1 when the log has no sessions: each event a visit) and
      ``span_days`` the whole UTC days from the log's first event to its last;
    * ``primary_device``: the user's most frequent device (ties in :data:`DEVICES` order),
      :data:`FALLBACK_DEVICE` when their events name none;

    and per item (the items table's ids and the log's):

    * ``category``: the table's, the catch-all when blank, missing or the item is not listed;
    * ``popularity``: ``rank ** -EMPIRICAL_ZIPF`` with ``rank`` by distinct users (ties share
      the best rank; items without events come last), so the most popular item has 1;
    * ``price``: the table's, 0 when missing or unreadable (no price: the simulated
      ``add_to_cart`` / ``purchase`` of such an item carry no value in
      :func:`simulate_served`); ``published_at``: the table's, else the item's first event,
      else the log's start; ``available``: the table's, True when missing.

    :meth:`Truth.affinity` then applies its usual formula. ``window_start`` / ``window_end``
    are the log's first day and the day after its last. Same arguments -> the same truth.
    """
    log = _taste_log(events, exclude_event_types)
    if log.empty:
        raise ValueError("no events to build an empirical truth from")
    user_code, user_ids = pd.factorize(log["user_id"], sort=True)
    user_ids = np.asarray(user_ids, dtype=object)
    n_users = user_ids.size
    catalog = _empirical_items(items, log["item_id"])
    item_ids, category, names = catalog["item_id"], catalog["category"], catalog["names"]
    item_code = pd.Index(item_ids).get_indexer(log["item_id"])

    start = log["timestamp"].min().floor("D")
    end = log["timestamp"].max().floor("D") + pd.Timedelta(days=1)
    span_days = (end - start) / pd.Timedelta(days=1)
    n_events = np.bincount(user_code, minlength=n_users).astype(np.float64)
    prefs, strength = _empirical_prefs(
        user_code, category[item_code], n_events, len(names) - 1, seed
    )

    sessions = log["session_id"].notna().to_numpy(bool)
    per_session = 1.0
    if sessions.any():
        keyed = pd.DataFrame(
            {"u": user_code[sessions], "s": log["session_id"].to_numpy(object)[sessions]}
        )
        per_session = sessions.sum() / len(keyed.drop_duplicates())

    distinct = pd.DataFrame({"u": user_code, "i": item_code}).drop_duplicates()
    item_users = np.bincount(distinct["i"].to_numpy(), minlength=item_ids.size)
    rank = pd.Series(-item_users).rank(method="min").to_numpy()
    first_seen = log["timestamp"].groupby(item_code).min().reindex(np.arange(item_ids.size))
    published = catalog["published_at"].fillna(first_seen).fillna(start)
    return Truth(
        user_ids=user_ids,
        prefs=prefs,
        styles=np.where(prefs >= 0, 0, -1).astype(np.int64),
        strength=strength,
        activity=n_events / n_events.mean(),
        sessions_per_day=n_events / per_session / span_days,
        primary_device=_primary_devices(user_code, log["device"], n_users),
        item_ids=item_ids,
        category=category,
        style=np.zeros(item_ids.size, np.int64),
        popularity=rank**-EMPIRICAL_ZIPF,
        price=catalog["price"],
        published_at=published.dt.tz_convert(None).to_numpy().astype("datetime64[s]"),
        available=catalog["available"],
        category_names=names,
        window_start=start,
        window_end=end,
    )


def _taste_log(events: pd.DataFrame, exclude: Iterable[str]) -> pd.DataFrame:
    """user_id, item_id, timestamp (UTC), device, session_id of the events that show taste."""
    missing = [
        c for c in ("user_id", "item_id", "event_type", "timestamp") if c not in events.columns
    ]
    if missing:
        raise ValueError(f"events lack the columns {missing}")
    blank = pd.Series(pd.NA, index=events.index, dtype="string")
    log = pd.DataFrame(
        {
            "user_id": events["user_id"].astype("string"),
            "item_id": events["item_id"].astype("string"),
            "event_type": events["event_type"].astype("string").str.lower(),
            "timestamp": parse_timestamps(events["timestamp"]),
            "device": events["device"].astype("string") if "device" in events else blank,
            "session_id": (
                events["session_id"].astype("string") if "session_id" in events else blank
            ),
        }
    )
    keep = log[["user_id", "item_id", "event_type", "timestamp"]].notna().all(axis=1) & ~log[
        "event_type"
    ].isin([str(t).lower() for t in exclude])
    return log[keep.to_numpy(bool)].reset_index(drop=True)


def _empirical_items(items: pd.DataFrame | None, logged: pd.Series) -> dict:
    """Item ids (sorted: the table's and the log's), category codes and names, price,
    published_at (UTC, NaT when unknown) and availability."""
    table = (
        pd.DataFrame({"item_id": pd.Series(dtype="string")})
        if items is None
        else items.assign(item_id=items["item_id"].astype("string"))
    )
    table = table[table["item_id"].notna()].drop_duplicates("item_id")
    item_ids = np.asarray(sorted(set(table["item_id"]) | set(logged.unique())), dtype=object)
    table = table.set_index("item_id").reindex(pd.Index(item_ids))

    def column(name: str) -> pd.Series:
        return table[name] if name in table else pd.Series(pd.NA, index=table.index, dtype="object")

    text = column("category").astype("string").str.strip()
    text = text.mask(text.isna() | (text == "") | (text == UNKNOWN_CATEGORY), UNKNOWN_CATEGORY)
    names = (*sorted(set(text) - {UNKNOWN_CATEGORY}), UNKNOWN_CATEGORY)
    price = pd.to_numeric(column("price"), errors="coerce").to_numpy(np.float64, na_value=np.nan)
    available = parse_bool(column("available")).fillna(True).to_numpy(bool)
    return {
        "item_id": item_ids,
        "names": names,
        "category": pd.Index(names).get_indexer(text).astype(np.int64),
        "price": np.where(np.isfinite(price) & (price >= 0), price, 0.0),
        "published_at": parse_timestamps(column("published_at")).reset_index(drop=True),
        "available": available,
    }


def _empirical_prefs(
    user: np.ndarray, category: np.ndarray, n_events: np.ndarray, unknown: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(prefs, strength) from each event's user and category (see :func:`empirical_truth`)."""
    known = category != unknown
    counts = pd.DataFrame({"u": user[known], "c": category[known]}).value_counts().sort_index()
    u = counts.index.get_level_values("u").to_numpy(np.int64)
    c = counts.index.get_level_values("c").to_numpy(np.int64)
    n = counts.to_numpy(np.float64)
    overall = np.bincount(c, weights=n, minlength=unknown)
    tie = np.random.default_rng(seed).random(n.size)  # pairs in (user, category) order
    order = np.lexsort((tie, -overall[c], -n, u))
    u, c, share = u[order], c[order], n[order] / n_events[u[order]]
    slot = np.arange(u.size) - np.searchsorted(u, u)  # 0 = the user's largest share
    keep = (slot == 0) | ((slot < 3) & (share >= EMPIRICAL_MIN_SHARE))
    prefs = np.full((n_events.size, 3), -1, np.int64)
    prefs[u[keep], slot[keep]] = c[keep]
    strength = np.bincount(u[keep], weights=share[keep], minlength=n_events.size)
    return prefs, strength


def _primary_devices(user: np.ndarray, device: pd.Series, n_users: int) -> np.ndarray:
    """Each user's most frequent device (ties in DEVICES order, then by name)."""
    out = np.full(n_users, FALLBACK_DEVICE, dtype=object)
    named = device.notna().to_numpy(bool)
    if not named.any():
        return out
    frame = pd.DataFrame(
        {"u": user[named], "d": device[named].str.strip().str.lower().to_numpy(object)}
    )
    counts = frame.value_counts().rename("n").reset_index()
    known = {name: k for k, name in enumerate(DEVICES)}
    counts["order"] = counts["d"].map(known).fillna(len(DEVICES))
    counts = counts.sort_values(["u", "n", "order", "d"], ascending=[True, False, True, True])
    first = counts.drop_duplicates("u")
    out[first["u"].to_numpy(np.int64)] = first["d"].to_numpy(object)
    return out


# ---- served history ------------------------------------------------------------------------
@dataclass(frozen=True)
class ServedSimulation:
    """What :func:`simulate_served` played: the events and what it had to leave out."""

    events: pd.DataFrame  # simulate_day's frames of every day, in time order
    users: int  # truth users served a list (their own or ``__default__``) on some day
    skipped_users: int  # listed users unknown to the truth (no events), never simulated
    skipped_rows: int  # list rows left out: their user or item unknown to the truth
    cutoffs: tuple[pd.Timestamp | None, ...]  # per day: the live set's cutoff (None: no set)


def simulate_served(
    truth: Truth,
    served: pd.DataFrame,
    start: dt.date | dt.datetime | str,
    days: int = 1,
    *,
    seed: int = 0,
    click_model: ClickModel = ClickModel(),
    visit_rate: float | None = None,
    placement: str = PLACEMENT,
) -> ServedSimulation:
    """:func:`simulate_day` for ``days`` days from ``start`` against a served history.

    ``served`` is what :func:`~pipeline.lake.served.read_served` returns (``user_id``,
    ``rank``, ``item_id``, optionally ``variant`` and ``cutoff``), or plain lists. Each day
    plays the set live at the day's start: the newest ``cutoff`` at or before it (the day's
    first set when none is; no ``cutoff`` column: one set for every day). Rows of users or
    items unknown to ``truth`` (a user without events before the day, a variant's
    ``__default__:<variant>`` fallback, an item outside the catalogue) are left out and
    counted once per set; a ``variant`` column with no value is dropped, else its blanks
    become :data:`NO_VARIANT` (as do the events of days whose set has none).
    ``add_to_cart`` and ``purchase`` of an item without a price (0 in the truth) get no value
    (missing, not a sale of 0). Day ``d`` draws from ``simulate_day(truth, lists, d,
    seed=seed)``, so one day of a longer simulation equals that day simulated alone.
    """
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    first = _as_date(start)
    served = served.reset_index(drop=True)
    shown = np.zeros(truth.n_users, bool)
    skipped_users: set[str] = set()
    frames, cutoffs, skipped_rows = [], [], 0
    usable: dict[pd.Timestamp | None, pd.DataFrame] = {}  # per served set, checked once
    for offset in range(days):
        day = first + dt.timedelta(days=offset)
        lists, cutoff = _live_lists(served, day)
        cutoffs.append(cutoff)
        if cutoff not in usable:
            usable[cutoff], unknown_users, dropped = _known_lists(truth, lists)
            skipped_users |= unknown_users
            skipped_rows += dropped
        lists = usable[cutoff]
        if (lists["user_id"] == DEFAULT_USER).any():
            shown[:] = True
        else:
            shown[truth.user_index(lists["user_id"].unique())] = True
        frames.append(
            simulate_day(
                truth,
                lists,
                day,
                click_model=click_model,
                visit_rate=visit_rate,
                seed=seed,
                placement=placement,
            )
        )
    events = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    if "variant" in events.columns:  # days of a set without variants
        events["variant"] = events["variant"].fillna(NO_VARIANT)
    if len(events):
        priced = truth.price[truth.item_index(events["item_id"])] > 0
        sale = events["event_type"].isin(["add_to_cart", "purchase"]).to_numpy(bool)
        events.loc[sale & ~priced, "value"] = np.nan
    return ServedSimulation(
        events=events,
        users=int(shown.sum()),
        skipped_users=len(skipped_users),
        skipped_rows=skipped_rows,
        cutoffs=tuple(cutoffs),
    )


def write_simulated_events(events: pd.DataFrame, path: Path) -> Path:
    """Write simulated events as a landing file: CSV (gzipped when ``path`` ends in ``.gz``)
    with :data:`SIM_COLUMNS` (``variant`` is not written: the served history has it),
    timestamps as ISO-8601 UTC (``Z``), a missing value as an empty field. Written to a
    dotfile that is fsynced and renamed into place, so ingest never reads half a file."""
    path = Path(path)
    frame = events[list(SIM_COLUMNS)].copy()
    frame["timestamp"] = format_iso_utc(frame["timestamp"])
    table = pa.Table.from_pandas(frame, preserve_index=False)
    header = (",".join(SIM_COLUMNS) + "\n").encode()
    options = pa_csv.WriteOptions(include_header=False, quoting_style="needed")

    def write(fh) -> None:
        if path.suffix == ".gz":
            with gzip.GzipFile(fileobj=fh, mode="wb", mtime=0, compresslevel=6) as packed:
                packed.write(header)
                pa_csv.write_csv(table, packed, options)
        else:
            fh.write(header)
            pa_csv.write_csv(table, fh, options)

    durable_write(path, write)
    return path


def _live_lists(served: pd.DataFrame, day: dt.date) -> tuple[pd.DataFrame, pd.Timestamp | None]:
    """The rows of the set live at ``day``'s start (see :func:`simulate_served`)."""
    if "cutoff" not in served.columns:
        return served, None
    cutoff = pd.to_datetime(served["cutoff"], utc=True)
    day_start = pd.Timestamp(day, tz="UTC")
    before = cutoff[cutoff <= day_start]
    within = cutoff[(cutoff > day_start) & (cutoff < day_start + pd.Timedelta(days=1))]
    chosen = before.max() if len(before) else (within.min() if len(within) else None)
    if chosen is None:
        return served.iloc[:0], None
    return served[(cutoff == chosen).to_numpy(bool)], chosen


def _known_lists(truth: Truth, lists: pd.DataFrame) -> tuple[pd.DataFrame, set[str], int]:
    """``lists`` (user_id, rank, item_id, variant) without the rows whose user or item
    ``truth`` does not know, the unknown users' ids and the number of rows left out."""
    columns = ["user_id", "rank", "item_id"]
    variant = None
    if "variant" in lists.columns and lists["variant"].notna().any():
        variant = lists["variant"].astype("string").fillna(NO_VARIANT).astype(object)
    frame = lists[columns].astype({"user_id": object, "item_id": object})
    if variant is not None:
        frame = frame.assign(variant=variant.to_numpy())
    user = frame["user_id"].astype(str)
    known_user = (user == DEFAULT_USER) | user.isin(truth.user_ids)
    known_item = frame["item_id"].astype(str).isin(truth.item_ids)
    keep = (known_user & known_item).to_numpy(bool)
    unknown = set(user[~known_user.to_numpy(bool)])
    return frame[keep].reset_index(drop=True), unknown, int((~keep).sum())


# ---- served lists --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Served:
    """Served lists sorted by (user, rank), with each truth user's block of rows."""

    item: np.ndarray  # per row: item position
    rank: np.ndarray  # per row
    start: np.ndarray  # per truth user: first row of the list they see
    length: np.ndarray  # per truth user: its length (0: nothing to see)
    user_variant: np.ndarray  # per truth user: variant code (-1: none)
    variants: pd.Index | None  # variant values, by code; None without a variant column

    @classmethod
    def build(cls, truth: Truth, lists: pd.DataFrame) -> _Served:
        missing = [c for c in ("user_id", "rank", "item_id") if c not in lists.columns]
        if missing:
            raise ValueError(f"lists lack the columns {missing}")
        if lists["user_id"].isna().any() or lists["item_id"].isna().any():
            raise ValueError("lists have missing user_id or item_id values")
        rank = pd.to_numeric(lists["rank"], errors="coerce").to_numpy(np.float64)
        if not (np.isfinite(rank).all() and (rank >= 1).all() and (rank % 1 == 0).all()):
            raise ValueError("column 'rank' must hold integers >= 1")
        rank = rank.astype(np.int64)
        is_default = (lists["user_id"] == DEFAULT_USER).to_numpy(bool)
        user = np.full(len(lists), truth.n_users, np.int64)  # n_users: the default list
        user[~is_default] = truth.user_index(lists["user_id"][~is_default])
        item = truth.item_index(lists["item_id"])
        if pd.Series(user * (int(rank.max(initial=0)) + 1) + rank).duplicated().any():
            raise ValueError("lists have a duplicated (user_id, rank)")

        order = np.lexsort((rank, user))
        user, rank, item = user[order], rank[order], item[order]
        counts = np.bincount(user, minlength=truth.n_users + 1)
        starts = np.cumsum(counts) - counts
        start, length = starts[:-1].copy(), counts[:-1].copy()
        absent = length == 0
        start[absent], length[absent] = starts[-1], counts[-1]

        user_variant = np.full(truth.n_users, -1, np.int64)
        variants = None
        if "variant" in lists.columns:
            if lists["variant"].isna().any():
                raise ValueError("lists have missing variant values")
            codes, variants = pd.factorize(lists["variant"], sort=True)
            codes = codes[order]
            first = np.repeat(codes[starts[counts > 0]], counts[counts > 0])
            if (codes != first).any():
                raise ValueError("a user's list spans several variants")
            block_variant = np.full(truth.n_users + 1, -1, np.int64)
            block_variant[counts > 0] = codes[starts[counts > 0]]
            user_variant = np.where(absent, block_variant[-1], block_variant[:-1])
            variants = pd.Index(variants)
        return cls(
            item=item,
            rank=rank,
            start=start,
            length=length,
            user_variant=user_variant,
            variants=variants,
        )

    def expand(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(user, list row, index into ``users``) of every item shown to ``users``, grouped by
        user in the order given, rows in rank order."""
        n_shown = self.length[users]
        owner = np.repeat(np.arange(users.size), n_shown)
        first = np.cumsum(n_shown) - n_shown
        rows = self.start[users][owner] + np.arange(owner.size) - first[owner]
        return users[owner], rows, owner


def _chunks(users: np.ndarray, length: np.ndarray):
    """``users`` in consecutive pieces of about ``_CHUNK_ROWS`` shown items."""
    if users.size == 0:
        return
    per_user = max(1, int(length[users].max()))
    step = max(1, _CHUNK_ROWS // per_user)
    for first in range(0, users.size, step):
        yield users[first : first + step]


# ---- helpers -------------------------------------------------------------------------------
def _as_date(day: dt.date | dt.datetime | str) -> dt.date:
    """The UTC calendar day of ``day`` (a date, a datetime or an ISO string)."""
    stamp = pd.Timestamp(day)
    if stamp.tzinfo is not None:
        stamp = stamp.tz_convert("UTC")
    return stamp.date()


def _visit_probability(truth: Truth, visit_rate: float | None) -> np.ndarray:
    if visit_rate is None:
        return truth.visit_probability
    if not 0 <= visit_rate <= 1:
        raise ValueError(f"visit_rate must be within 0..1, got {visit_rate}")
    return np.full(truth.n_users, float(visit_rate))


def _delay(rng: np.random.Generator, median: float, cap: int, n: int) -> np.ndarray:
    """Whole seconds >= 1, lognormal around ``median``, at most ``cap``."""
    return np.minimum(np.ceil(rng.lognormal(np.log(median), 0.8, n)), cap).astype(np.int64)


def _candidates(
    truth: Truth, available_only: bool, as_of: dt.date | dt.datetime | str | None
) -> np.ndarray:
    """Positions of the items a list may hold."""
    keep = truth.available.copy() if available_only else np.ones(truth.n_items, bool)
    if as_of is not None:
        stamp = pd.Timestamp(as_of)
        stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
        keep &= truth.published_at <= np.datetime64(stamp.tz_convert(None), "s")
    return np.flatnonzero(keep)


def _build_frame(
    truth: Truth,
    served: _Served,
    day: dt.date,
    placement: str,
    users: np.ndarray,
    position: np.ndarray,
    items: np.ndarray,
    stage: np.ndarray,
    ts: np.ndarray,
    value: np.ndarray,
) -> pd.DataFrame:
    """The contract-typed event frame (plus position, placement and maybe variant)."""
    prefix = f"sim-{day.isoformat()}-"
    user_id = pa.array(truth.user_ids, pa.string()).take(pa.array(users))
    event_type = pa.array(SIM_EVENT_TYPES).take(pa.array(stage))
    session_id = pc.binary_join_element_wise(prefix, user_id, "")
    event_id = pc.binary_join_element_wise(
        session_id, "-r", pa.array(position).cast(pa.string()), "-", event_type, ""
    )
    frame = pd.DataFrame(
        {
            "event_id": _strings(event_id),
            "user_id": _strings(user_id),
            "item_id": _strings(pa.array(truth.item_ids, pa.string()).take(pa.array(items))),
            "event_type": _strings(event_type),
            "timestamp": pd.Series((ts * 1_000_000).astype("datetime64[us]")).dt.tz_localize("UTC"),
            "value": value,
            "device": _strings(pa.array(truth.primary_device, pa.string()).take(pa.array(users))),
            "session_id": _strings(session_id),
            "position": position.astype(np.int64),
            "placement": _strings(pa.array([placement]).take(np.zeros(users.size, np.int64))),
        },
        columns=list(SIM_COLUMNS),
    ).astype(EVENT_DTYPES)
    if served.variants is not None:
        frame["variant"] = served.variants.take(served.user_variant[users]).to_numpy()
    return frame


def _strings(values: pa.Array | pa.ChunkedArray) -> pd.arrays.ArrowStringArray:
    """Arrow strings as a pandas ``string`` extension array."""
    return pd.arrays.ArrowStringArray(values)
