"""Business rules applied to candidate lists at write time: pure, vectorised, chunked by user.

The model proposes more candidates than a list holds (``Settings.candidate_multiplier`` x N);
:func:`apply_business_rules` turns them into the lists that get published. Rules:

1. **Consumed.** Never an item the user already consumed: the ``consumed`` pairs, built by
   :func:`build_consumed` from the run's events of the types in
   ``Settings.consumed_event_types`` (None: every type).
2. **Eligibility.** Never an item whose ``available`` is false, nor (with ``item_ttl_days``) one
   whose ``published_at`` is before ``cutoff - item_ttl_days``. Items missing from ``items``, or
   with an unknown availability / publication date, are eligible. An ``available`` value that
   cannot be read as a boolean counts as unavailable (fail safe, logged).
3. **No repeats.** An item appears at most once in a list.
4. **Diversity.** At most ``max_per_category`` items of one category in a list (None: no cap).
   Items without a category are exempt (each counts as its own bucket): with no item metadata
   at all, lists must still fill, and "unknown" is not a category a reader would notice repeated.
5. **Exactly N.** Personal candidates in model order, then the ``fallback`` list in its order
   (source ``popular``), both under rules 1-4. When that still leaves a list short, the best
   remaining fallback items fill it *without* the category cap (rules 1-3 still hold). A list
   that is still short stays short (ranks 1..k; the serving check only needs contiguous ranks)
   and the number of short lists is logged.

Ranks are renumbered 1..N in the order chosen. Every row keeps a human-readable reason (a
missing or empty one becomes :data:`GENERIC_REASON`) and a source. The ``__default__`` list is
built the same way from the fallback list (after any candidates given for it), under rules 2-5.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Collection
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pipeline.core.arrays import run_starts
from pipeline.core.config import DEFAULT_USER, as_utc
from pipeline.core.ids import EncodedEvents
from pipeline.core.schema import parse_bool

logger = logging.getLogger(__name__)

__all__ = [
    "CANDIDATE_COLUMNS",
    "GENERIC_REASON",
    "RuleStats",
    "apply_business_rules",
    "build_consumed",
    "recommend_with_rules",
]

CANDIDATE_COLUMNS: tuple[str, ...] = ("user_id", "rank", "item_id", "score", "reason", "source")
FILL_SOURCE = "popular"
GENERIC_REASON = "recommended for you"
DEFAULT_CHUNK_USERS = 50_000
_FALLBACK_PRIORITY = 1 << 40  # fallback rows sort after every personal candidate


@dataclass
class RuleStats:
    """What the rules did in one call (summed over chunks)."""

    users: int = 0
    rows: int = 0
    dropped_consumed: int = 0
    dropped_ineligible: int = 0
    filled_lists: int = 0
    relaxed_lists: int = 0
    short_lists: int = 0
    short_examples: list[str] = field(default_factory=list)

    def add(self, other: RuleStats) -> None:
        for name in (
            "users",
            "rows",
            "dropped_consumed",
            "dropped_ineligible",
            "filled_lists",
            "relaxed_lists",
            "short_lists",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.short_examples = (self.short_examples + other.short_examples)[:5]

    def to_dict(self) -> dict:
        return {
            "users": self.users,
            "rows": self.rows,
            "dropped_consumed": self.dropped_consumed,
            "dropped_ineligible": self.dropped_ineligible,
            "filled_lists": self.filled_lists,
            "relaxed_lists": self.relaxed_lists,
            "short_lists": self.short_lists,
        }


@dataclass(frozen=True)
class _Consumed:
    """Consumed (user, item) pairs as sorted int64 keys over their own id vocabularies."""

    users: pd.Index
    items: pd.Index
    keys: np.ndarray

    def contains(self, user_codes: np.ndarray, item_codes: np.ndarray) -> np.ndarray:
        """Membership of (user code, item code) pairs; -1 codes are never consumed."""
        known = (user_codes >= 0) & (item_codes >= 0)
        out = np.zeros(len(user_codes), bool)
        if known.any() and len(self.keys):
            keys = user_codes[known].astype(np.int64) * len(self.items) + item_codes[known]
            pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
            out[known] = self.keys[pos] == keys
        return out


@dataclass(frozen=True)
class _Rules:
    """Everything prepared once per publish; chunks only look things up."""

    n: int
    cap: int | None
    default_user: str
    consumed: _Consumed
    item_index: pd.Index  # items with metadata
    item_ok: np.ndarray  # per item_index entry: eligible
    item_cat: np.ndarray  # per item_index entry: category code, -1 none
    fallback: pd.DataFrame  # eligible fallback rows: item_id, score, reason (best first)


# =================================================================================================
# Public API
# =================================================================================================


def build_consumed(
    events: EncodedEvents | pd.DataFrame, event_types: Collection[str] | None = None
) -> pd.DataFrame:
    """Distinct (user_id, item_id) pairs the users consumed: events of ``event_types`` (None:
    every type). On encoded events the pairs are deduplicated on codes, then named by id."""
    frame = events.frame if isinstance(events, EncodedEvents) else events
    if event_types is not None:
        frame = frame[frame["event_type"].isin(list(event_types)).to_numpy()]
    if isinstance(events, EncodedEvents):
        pairs = frame[["user_id", "item_id"]].drop_duplicates()
        return pd.DataFrame(
            {
                "user_id": events.users.decode(pairs["user_id"]),
                "item_id": events.items.decode(pairs["item_id"]),
            }
        )
    pairs = frame[["user_id", "item_id"]].astype(str).drop_duplicates()
    return pairs.reset_index(drop=True)


def apply_business_rules(
    candidates: pd.DataFrame,
    *,
    consumed: pd.DataFrame,
    items: pd.DataFrame | None,
    fallback: pd.DataFrame,
    n: int,
    max_per_category: int | None = None,
    item_ttl_days: int | None = None,
    cutoff: dt.datetime,
    default_user: str = DEFAULT_USER,
    include_default: bool = True,
    chunk_users: int = DEFAULT_CHUNK_USERS,
) -> pd.DataFrame:
    """Final lists (:data:`CANDIDATE_COLUMNS`) from ranked candidates, under the module's rules.

    ``candidates`` rows are ranked per user (lower ``rank`` first); ``consumed`` holds user_id,
    item_id; ``items`` (optional) item_id plus any of category, available, published_at;
    ``fallback`` item_id, score, reason, best first. With ``include_default`` the
    ``default_user`` list is always part of the result. Users are processed ``chunk_users`` at a
    time, so memory follows the chunk, not the whole candidate set.
    """
    rules = _prepare_rules(
        consumed=consumed,
        items=items,
        fallback=fallback,
        n=n,
        max_per_category=max_per_category,
        item_ttl_days=item_ttl_days,
        cutoff=cutoff,
        default_user=default_user,
    )
    stats = RuleStats()
    lists = _apply_in_chunks(candidates, rules, chunk_users, stats, include_default=include_default)
    _log_stats(stats, rules)
    return lists


def recommend_with_rules(
    recommend: Callable[[np.ndarray, int], pd.DataFrame],
    user_ids: np.ndarray | pd.Series,
    *,
    candidate_multiplier: int,
    consumed: pd.DataFrame,
    items: pd.DataFrame | None,
    fallback: pd.DataFrame,
    n: int,
    max_per_category: int | None = None,
    item_ttl_days: int | None = None,
    cutoff: dt.datetime,
    default_user: str = DEFAULT_USER,
    chunk_users: int = DEFAULT_CHUNK_USERS,
    workers: int = 1,
) -> tuple[pd.DataFrame, RuleStats]:
    """Ask ``recommend(user_ids, k)`` for ``candidate_multiplier * n`` candidates per user, one
    chunk of users at a time, and apply the rules; returns the lists (``default_user``
    included) and what the rules did. Only one chunk of candidates is in memory at a time.

    ``workers`` > 1: blocks of users are listed (candidates and rules) in that many worker
    processes, started fresh (``spawn``: no copy of this process's OpenMP or BLAS threads,
    which a forked child can hang on), each loading the model once; ``recommend`` must then
    be picklable and cheap to pickle, such as :class:`pipeline.models.bundle.SavedLists`
    (whose ``load`` runs as the worker starts). The lists, their order and the stats are the
    same for any number of workers: each user's list depends on that user alone, and the
    blocks are put together in order."""
    if candidate_multiplier < 1:
        raise ValueError(f"candidate_multiplier must be >= 1, got {candidate_multiplier}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    rules = _prepare_rules(
        consumed=consumed,
        items=items,
        fallback=fallback,
        n=n,
        max_per_category=max_per_category,
        item_ttl_days=item_ttl_days,
        cutoff=cutoff,
        default_user=default_user,
    )
    users = pd.unique(pd.Series(np.asarray(user_ids, dtype=object)).astype(str))
    users = users[users != default_user]
    stats = RuleStats()
    parts: list[pd.DataFrame] = []
    k = n * candidate_multiplier
    if workers > 1 and len(users) > MIN_PARALLEL_USERS:
        parts = _in_workers(recommend, users, k, rules, stats, workers, chunk_users)
    else:
        for start in range(0, len(users), chunk_users):
            parts.append(
                _block_lists(recommend, users[start : start + chunk_users], k, rules, stats)
            )
    parts.append(
        _apply_chunk(
            None, np.array([default_user], dtype=object), None, rules, stats, check_consumed=False
        )
    )
    _log_stats(stats, rules)
    return _concat(parts), stats


# =================================================================================================
# Worker processes
# =================================================================================================

#: Up to this many users are listed in this process: a worker's start (a fresh interpreter's
#: imports and the model load, ~3 s) costs more than it saves (10k users: 1.6k users/s in one
#: process, 1.4k with two workers).
MIN_PARALLEL_USERS = 20_000
MIN_BLOCK_USERS = 1_000  # users per block at least (and at most ``chunk_users``)
BLOCKS_PER_WORKER = 8  # blocks per worker: even loads at the end, steady progress lines
PROGRESS_SECONDS = 10.0
_WORKER: dict = {}  # in a worker process: its recommend, rules and model load seconds


def _block_lists(
    recommend: Callable[[np.ndarray, int], pd.DataFrame],
    users: np.ndarray,
    k: int,
    rules: _Rules,
    stats: RuleStats,
) -> pd.DataFrame:
    """Candidates for one block of distinct ``users`` and the rules over them."""
    return _apply_chunk(recommend(users, k), users, None, rules, stats)


def _worker_start(recommend, rules: _Rules, k: int) -> None:
    """A worker's initializer: keep what every block needs, load the model (timed)."""
    started = time.perf_counter()
    load = getattr(recommend, "load", None)
    if load is not None:
        load()
    _WORKER.update(recommend=recommend, rules=rules, k=k, load_s=time.perf_counter() - started)


def _worker_block(users: np.ndarray) -> tuple[pd.DataFrame, RuleStats, int, float]:
    """One block in a worker: its lists, its rule stats, the worker's pid and load time."""
    stats = RuleStats()
    lists = _block_lists(_WORKER["recommend"], users, _WORKER["k"], _WORKER["rules"], stats)
    return lists, stats, os.getpid(), _WORKER["load_s"]


def _in_workers(
    recommend: Callable[[np.ndarray, int], pd.DataFrame],
    users: np.ndarray,
    k: int,
    rules: _Rules,
    stats: RuleStats,
    workers: int,
    chunk_users: int,
) -> list[pd.DataFrame]:
    """The lists of ``users`` from ``workers`` processes, block by block, in block order."""
    block = min(chunk_users, max(MIN_BLOCK_USERS, -(-len(users) // (workers * BLOCKS_PER_WORKER))))
    blocks = [users[start : start + block] for start in range(0, len(users), block)]
    workers = min(workers, len(blocks))
    logger.info(
        "lists of %d users in %d blocks by %d worker processes", len(users), len(blocks), workers
    )
    with _main_not_rerun():
        return _run_blocks(recommend, blocks, len(users), k, rules, stats, workers)


@contextlib.contextmanager
def _main_not_rerun():
    """Keep spawned workers from re-running this process's ``__main__``.

    ``spawn`` runs the parent's main script (by path or module name) in every child before
    anything else. In an Airflow 3 task that is the ``airflow`` command, and importing
    Airflow there initialises its metadata DB settings, which a task process blanks: the child
    dies before it starts and the pool waits for it. The workers need nothing from
    ``__main__``, so while they start it has neither ``__file__`` nor ``__spec__``."""
    main = sys.modules.get("__main__")
    saved = {name: getattr(main, name) for name in ("__file__", "__spec__") if hasattr(main, name)}
    try:
        if main is not None:
            main.__spec__ = None
            if "__file__" in saved:
                del main.__file__
        yield
    finally:
        for name, value in saved.items():
            setattr(main, name, value)


def _run_blocks(
    recommend: Callable[[np.ndarray, int], pd.DataFrame],
    blocks: list[np.ndarray],
    n_users: int,
    k: int,
    rules: _Rules,
    stats: RuleStats,
    workers: int,
) -> list[pd.DataFrame]:
    """:func:`_in_workers`' pool: submits every block, collects them in order, logs progress."""
    started = reported = time.perf_counter()
    parts: list[pd.DataFrame] = []
    done, loads = 0, {}
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_worker_start,
        initargs=(recommend, rules, k),
    )
    try:
        for future in [pool.submit(_worker_block, users_block) for users_block in blocks]:
            lists, block_stats, pid, load_s = future.result()
            if pid not in loads:
                loads[pid] = load_s
                logger.info("worker %d: model loaded in %.1fs", pid, load_s)
            parts.append(lists)
            stats.add(block_stats)
            done += block_stats.users
            now = time.perf_counter()
            if now - reported >= PROGRESS_SECONDS or done == n_users:
                reported = now
                logger.info(
                    "lists for %d of %d users (%.0f users/s, %d workers)",
                    done,
                    n_users,
                    done / max(now - started, 1e-9),
                    workers,
                )
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)  # a failed block: the rest never start
        raise
    pool.shutdown(wait=True)
    return parts


# =================================================================================================
# Preparation (once per call)
# =================================================================================================


def _prepare_rules(
    *,
    consumed: pd.DataFrame,
    items: pd.DataFrame | None,
    fallback: pd.DataFrame,
    n: int,
    max_per_category: int | None,
    item_ttl_days: int | None,
    cutoff: dt.datetime,
    default_user: str,
) -> _Rules:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if max_per_category is not None and max_per_category < 1:
        raise ValueError(f"max_per_category must be >= 1 or None, got {max_per_category}")
    if item_ttl_days is not None and item_ttl_days < 0:
        raise ValueError(f"item_ttl_days must be >= 0 or None, got {item_ttl_days}")
    missing = [c for c in ("item_id", "score", "reason") if c not in fallback.columns]
    if missing:
        raise ValueError(f"fallback lacks the columns {missing}")
    item_index, item_ok, item_cat = _item_facts(items, item_ttl_days, as_utc(cutoff))
    fb = fallback[["item_id", "score", "reason"]].copy()
    fb["item_id"] = fb["item_id"].astype(str).astype(object)
    fb = fb.drop_duplicates("item_id").reset_index(drop=True)
    eligible, _ = _lookup_items(item_index, item_ok, item_cat, fb["item_id"].to_numpy(object))
    fb = fb[eligible].reset_index(drop=True)
    return _Rules(
        n=int(n),
        cap=max_per_category,
        default_user=default_user,
        consumed=_index_consumed(consumed),
        item_index=item_index,
        item_ok=item_ok,
        item_cat=item_cat,
        fallback=fb,
    )


def _index_consumed(consumed: pd.DataFrame) -> _Consumed:
    user_codes, users = _factorize(consumed["user_id"])
    item_codes, items = _factorize(consumed["item_id"])
    keys = np.sort(user_codes.astype(np.int64) * max(len(items), 1) + item_codes)
    keys = keys[np.r_[True, keys[1:] != keys[:-1]]] if len(keys) else keys  # np.unique hashes
    return _Consumed(users=users, items=items, keys=keys)


def _factorize(values: pd.Series) -> tuple[np.ndarray, pd.Index]:
    """Codes and distinct values (as an object Index of str) of an id column of any dtype."""
    if not pd.api.types.is_string_dtype(values.dtype):
        values = values.astype(str)
    codes, uniques = pd.factorize(values)
    return np.asarray(codes, np.int64), pd.Index(np.asarray(uniques, dtype=object), dtype=object)


def _item_facts(
    items: pd.DataFrame | None, ttl_days: int | None, cutoff: dt.datetime
) -> tuple[pd.Index, np.ndarray, np.ndarray]:
    """(item ids, eligible, category code) for the items with metadata."""
    if items is None or items.empty or "item_id" not in items:
        return pd.Index([], dtype=object), np.ones(0, bool), np.full(0, -1, np.int64)
    side = items.drop_duplicates("item_id", keep="last").reset_index(drop=True)
    ok = np.ones(len(side), bool)
    if "available" in side:
        ok &= _parse_available(side["available"])
    if ttl_days is not None and "published_at" in side:
        published = pd.to_datetime(
            side["published_at"], utc=True, errors="coerce", format="ISO8601"
        )
        oldest = pd.Timestamp(cutoff) - pd.Timedelta(days=ttl_days)
        ok &= ~(published < oldest).to_numpy(dtype=bool)  # NaT compares False: eligible
    cat = np.full(len(side), -1, np.int64)
    if "category" in side:
        text = side["category"].astype("string").str.strip()
        codes, _ = pd.factorize(text.where(text != "", None), use_na_sentinel=True)
        cat = codes.astype(np.int64)
    return pd.Index(side["item_id"].astype(str).to_numpy(object), dtype=object), ok, cat


def _lookup_items(
    index: pd.Index, ok: np.ndarray, cat: np.ndarray, item_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(eligible, category code) of ``item_ids``; items without metadata: eligible, no category."""
    if len(index) == 0:
        return np.ones(len(item_ids), bool), np.full(len(item_ids), -1, np.int64)
    pos = index.get_indexer(item_ids)
    found = pos >= 0
    safe = np.where(found, pos, 0)
    return np.where(found, ok[safe], True), np.where(found, cat[safe], -1).astype(np.int64)


def _parse_available(values: pd.Series) -> np.ndarray:
    """Booleans from bool/number/text; unknown (NA) is available, unreadable is unavailable."""
    if pd.api.types.is_bool_dtype(values.dtype) and not values.isna().any():
        return values.to_numpy(dtype=bool)
    parsed = parse_bool(values)
    known_true = parsed.eq(True).fillna(False).to_numpy(dtype=bool)
    unknown = values.isna().to_numpy(dtype=bool)
    unreadable = parsed.isna().to_numpy(dtype=bool) & ~unknown
    if unreadable.any():
        logger.warning(
            "%d item(s) have an unreadable 'available' value (e.g. %r): treated as unavailable",
            int(unreadable.sum()),
            values[unreadable].iloc[0],
        )
    return known_true | unknown


# =================================================================================================
# Per chunk
# =================================================================================================


def _apply_in_chunks(
    candidates: pd.DataFrame,
    rules: _Rules,
    chunk_users: int,
    stats: RuleStats,
    *,
    include_default: bool,
) -> pd.DataFrame:
    """All users of ``candidates``, ``chunk_users`` at a time; the default list last."""
    missing = [c for c in CANDIDATE_COLUMNS if c not in candidates.columns]
    if missing:
        raise ValueError(f"candidates lack the columns {missing}")
    if chunk_users < 1:
        raise ValueError(f"chunk_users must be >= 1, got {chunk_users}")
    codes, users = _factorize(candidates["user_id"])
    user_ids = users.to_numpy(object)
    personal = user_ids != rules.default_user
    order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    parts: list[pd.DataFrame] = []
    for lo in range(0, len(users), chunk_users):
        hi = min(lo + chunk_users, len(users))
        rows = order[np.searchsorted(sorted_codes, lo) : np.searchsorted(sorted_codes, hi)]
        rows = rows[personal[codes[rows]]]
        local = np.cumsum(personal[lo:hi]) - 1  # chunk position of each personal user
        parts.append(
            _apply_chunk(
                candidates.iloc[rows],
                user_ids[lo:hi][personal[lo:hi]],
                local[codes[rows] - lo],
                rules,
                stats,
            )
        )
    if include_default:
        own = np.flatnonzero(~personal)
        rows = (
            order[np.searchsorted(sorted_codes, own[0]) : np.searchsorted(sorted_codes, own[0] + 1)]
            if len(own)
            else order[:0]
        )
        parts.append(
            _apply_chunk(
                candidates.iloc[rows],
                np.array([rules.default_user], dtype=object),
                np.zeros(len(rows), np.int64),
                rules,
                stats,
                check_consumed=False,
            )
        )
    return _concat(parts)


def _apply_chunk(
    candidates: pd.DataFrame | None,
    users: np.ndarray,
    user_pos: np.ndarray | None,
    rules: _Rules,
    stats: RuleStats,
    *,
    check_consumed: bool = True,
) -> pd.DataFrame:
    """The rules for one chunk: ``users`` (distinct) and their candidates; ``user_pos`` (if
    known) is each candidate's position in ``users``.

    Works on a numeric pool (user, priority, item code, ``ref``): ``ref`` >= 0 is a candidate
    row, ``ref`` < 0 the fallback row ``-1 - ref``; text is gathered once, in :func:`_finish`.
    """
    users = np.asarray(users, dtype=object)
    n, fb = rules.n, rules.fallback
    if candidates is None:
        candidates = pd.DataFrame({c: pd.Series(dtype=object) for c in CANDIDATE_COLUMNS})
    if user_pos is None:
        codes, distinct = _factorize(candidates["user_id"])
        user_pos = pd.Index(users, dtype=object).get_indexer(distinct)[codes]
    cand = candidates.iloc[np.flatnonzero(user_pos >= 0)]
    u_all = np.asarray(user_pos[user_pos >= 0], np.int64)
    rank = pd.to_numeric(cand["rank"], errors="coerce").to_numpy(np.float64, na_value=np.inf)
    order = np.lexsort((np.arange(len(cand)), rank, u_all))
    u_personal = u_all[order]

    # One item vocabulary for the chunk: personal candidates' items, then new fallback items.
    item_codes, vocab_index = _factorize(cand["item_id"])
    fb_items = fb["item_id"].to_numpy(object)
    f_items = vocab_index.get_indexer(fb_items)
    new = f_items < 0
    f_items[new] = len(vocab_index) + np.arange(int(new.sum()))
    vocab = np.concatenate([vocab_index.to_numpy(object), fb_items[new]])
    p_items = item_codes[order]
    v_ok, v_cat = _lookup_items(rules.item_index, rules.item_ok, rules.item_cat, vocab)
    v_consumed_item = rules.consumed.items.get_indexer(vocab)
    u_consumed = (
        rules.consumed.users.get_indexer(users) if check_consumed else np.full(len(users), -1)
    )

    # Stage A: personal candidates under rules 1-4.
    eligible = v_ok[p_items]
    consumed = rules.consumed.contains(u_consumed[u_personal], v_consumed_item[p_items])
    stats.dropped_ineligible += int((~eligible).sum())
    stats.dropped_consumed += int((consumed & eligible).sum())
    keep = np.flatnonzero(eligible & ~consumed)
    pool = _pool(u_personal[keep], keep, p_items[keep], order[keep])
    chosen = _take(pool, _select(pool, v_cat, n, rules.cap))
    have = np.bincount(chosen["u"], minlength=len(users))

    # Stage B: short lists continue with the fallback list, still under the category cap.
    short = np.flatnonzero(have < n)
    if len(short):
        stats.filled_lists += len(short)
        is_short = np.isin(chosen["u"], short)
        pool_b = _sorted(
            _stack(
                _take(chosen, is_short),
                _fallback_pool(short, f_items, rules, u_consumed, v_consumed_item),
            )
        )
        chosen = _stack(
            _take(chosen, ~is_short), _take(pool_b, _select(pool_b, v_cat, n, rules.cap))
        )
        have = np.bincount(chosen["u"], minlength=len(users))

        # Stage C: still short: the best remaining fallback items, category cap lifted.
        still = np.flatnonzero(have < n)
        if len(still):
            stats.relaxed_lists += len(still)
            extra = _fallback_pool(still, f_items, rules, u_consumed, v_consumed_item)
            extra["prio"] += _FALLBACK_PRIORITY  # after every capped pick: the top stays diverse
            taken = _pair_keys(chosen["u"], chosen["item"], len(vocab))
            extra = _take(extra, ~np.isin(_pair_keys(extra["u"], extra["item"], len(vocab)), taken))
            room = (n - have)[extra["u"]]
            extra = _take(extra, _cumcount(extra["u"]) < room)
            chosen = _stack(chosen, extra)
            have = np.bincount(chosen["u"], minlength=len(users))
            short_users = np.flatnonzero(have < n)
            stats.short_lists += len(short_users)
            stats.short_examples = (
                stats.short_examples + [str(users[i]) for i in short_users[:5]]
            )[:5]

    stats.users += len(users)
    stats.rows += len(chosen["u"])
    return _finish(_sorted(chosen), users, vocab, cand, fb)


_Pool = dict  # column name -> equally long numpy array: u, prio, item, ref


def _pool(u: np.ndarray, prio: np.ndarray, item: np.ndarray, ref: np.ndarray) -> _Pool:
    return {
        "u": np.asarray(u, np.int64),
        "prio": np.asarray(prio, np.int64),
        "item": np.asarray(item, np.int64),
        "ref": np.asarray(ref, np.int64),
    }


def _take(pool: _Pool, index: np.ndarray) -> _Pool:
    return {key: values[index] for key, values in pool.items()}


def _stack(a: _Pool, b: _Pool) -> _Pool:
    return {key: np.concatenate([a[key], b[key]]) for key in a}


def _sorted(pool: _Pool) -> _Pool:
    return _take(pool, np.lexsort((pool["prio"], pool["u"])))


def _fallback_pool(
    users: np.ndarray,
    f_items: np.ndarray,
    rules: _Rules,
    u_consumed: np.ndarray,
    v_consumed_item: np.ndarray,
) -> _Pool:
    """The (eligible) fallback list for each of ``users``, minus what each consumed."""
    k = len(f_items)
    u = np.repeat(users.astype(np.int64), k)
    item = np.tile(f_items, len(users))
    position = np.tile(np.arange(k, dtype=np.int64), len(users))
    keep = ~rules.consumed.contains(u_consumed[u], v_consumed_item[item])
    return _pool(u[keep], _FALLBACK_PRIORITY + position[keep], item[keep], -1 - position[keep])


def _select(pool: _Pool, v_cat: np.ndarray, n: int, cap: int | None) -> np.ndarray:
    """Mask of the rows kept from ``pool`` (sorted by user, priority): no repeated item, at most
    ``cap`` per category (uncategorised exempt), the first ``n`` per user."""
    u, item = pool["u"], pool["item"]
    keep = ~pd.Series(_pair_keys(u, item, int(item.max(initial=0)) + 1)).duplicated().to_numpy()
    if cap is not None:
        cat = v_cat[item]
        key = _pair_keys(u, cat + 1, int(v_cat.max(initial=-1)) + 2)
        within = np.zeros(len(u), np.int64)
        within[keep] = pd.Series(key[keep]).groupby(key[keep], sort=False).cumcount().to_numpy()
        keep &= (cat < 0) | (within < cap)
    position = np.zeros(len(u), np.int64)
    position[keep] = _cumcount(u[keep])
    return keep & (position < n)


def _cumcount(sorted_keys: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... within runs of equal values of an array sorted by those values."""
    if len(sorted_keys) == 0:
        return np.zeros(0, np.int64)
    starts = run_starts(sorted_keys)
    lengths = np.diff(np.r_[starts, len(sorted_keys)])
    return np.arange(len(sorted_keys), dtype=np.int64) - np.repeat(starts, lengths)


def _pair_keys(a: np.ndarray, b: np.ndarray, width: int) -> np.ndarray:
    return a.astype(np.int64) * max(int(width), 1) + b.astype(np.int64)


def _finish(
    chosen: _Pool, users: np.ndarray, vocab: np.ndarray, cand: pd.DataFrame, fb: pd.DataFrame
) -> pd.DataFrame:
    """Chosen rows (sorted by user, priority) in output form: ranks 1..k per user."""
    ref = chosen["ref"]
    personal = ref >= 0
    cand_row, fb_row = ref[personal], -1 - ref[~personal]

    def gather(
        personal_values: np.ndarray, fallback_values: np.ndarray | object, dtype: type = object
    ) -> np.ndarray:
        out = np.empty(len(ref), dtype=dtype)
        out[personal] = personal_values
        out[~personal] = (
            fallback_values[fb_row] if isinstance(fallback_values, np.ndarray) else fallback_values
        )
        return out

    reason = gather(_object_rows(cand["reason"], cand_row), fb["reason"].to_numpy(object))
    codes, distinct = pd.factorize(reason, use_na_sentinel=True)  # check each text once
    blank = np.array([not str(text).strip() for text in distinct], dtype=bool)
    reason[(codes < 0) | np.append(blank, False)[codes]] = GENERIC_REASON
    source = gather(_object_rows(cand["source"], cand_row), FILL_SOURCE)
    source[pd.isna(source)] = FILL_SOURCE
    score = gather(_numbers(cand["score"].take(cand_row)), _numbers(fb["score"]), np.float32)
    return pd.DataFrame(
        {
            "user_id": pd.Series(users[chosen["u"]], dtype=object),
            "rank": (_cumcount(chosen["u"]) + 1).astype(np.int16),
            "item_id": pd.Series(np.asarray(vocab, dtype=object)[chosen["item"]], dtype=object),
            "score": score,
            "reason": pd.Series(reason, dtype=object),
            "source": pd.Series(source, dtype=object),
        }
    )


def _object_rows(values: pd.Series, rows: np.ndarray) -> np.ndarray:
    """``values`` at positions ``rows`` as an object array (None for missing)."""
    return values.take(rows).to_numpy(object, na_value=None)


def _numbers(values: pd.Series) -> np.ndarray:
    return pd.to_numeric(values, errors="coerce").to_numpy(np.float32, na_value=np.nan)


def _concat(parts: list[pd.DataFrame]) -> pd.DataFrame:
    parts = [part for part in parts if len(part)]
    if not parts:
        return pd.DataFrame(
            {
                "user_id": pd.Series(dtype=object),
                "rank": pd.Series(dtype=np.int16),
                "item_id": pd.Series(dtype=object),
                "score": pd.Series(dtype=np.float32),
                "reason": pd.Series(dtype=object),
                "source": pd.Series(dtype=object),
            }
        )
    return pd.concat(parts, ignore_index=True)


def _log_stats(stats: RuleStats, rules: _Rules) -> None:
    logger.info(
        "business rules: %d lists, %d rows; dropped %d consumed and %d unavailable/"
        "expired candidates; %d lists filled from the fallback, %d with the category "
        "cap lifted",
        stats.users,
        stats.rows,
        stats.dropped_consumed,
        stats.dropped_ineligible,
        stats.filled_lists,
        stats.relaxed_lists,
    )
    if stats.short_lists:
        logger.warning(
            "%d list(s) have fewer than %d items even after the fallback (no more "
            "eligible items), e.g. %s",
            stats.short_lists,
            rules.n,
            stats.short_examples,
        )
