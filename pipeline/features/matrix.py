"""The user x item confidence matrix with its id maps."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pipeline.core.arrays import run_starts
from pipeline.core.ids import event_weights

__all__ = ["InteractionMatrix", "PairOrder", "build_matrix", "event_weights", "lookup"]


@dataclass(frozen=True)
class InteractionMatrix:
    """Confidence matrix in CSR form and the ids its rows and columns stand for.

    Attributes:
        user_ids: row ``u`` is user ``user_ids[u]`` (unique): the run's user codes
            (``0..n-1``) while a model trains on encoded events, the id strings (the run's
            :class:`pipeline.core.ids.IdMap`) once it serves.
        item_ids: column ``i`` is item ``item_ids[i]`` (same).
        confidence: ``users x items`` CSR, float32; the summed event weights of each pair.
        strongest: same sparsity as ``confidence``; code (index into ``event_types``) of the
            pair's highest-weight event type, used to phrase reasons ("because you bought X").
        event_types: the event-type names ``strongest`` indexes into.
    """

    user_ids: np.ndarray
    item_ids: np.ndarray
    confidence: sp.csr_matrix
    strongest: sp.csr_matrix
    event_types: tuple[str, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return self.confidence.shape

    @cached_property
    def _user_index(self) -> pd.Index:
        return pd.Index(self.user_ids)

    @cached_property
    def _item_index(self) -> pd.Index:
        return pd.Index(self.item_ids)

    def user_index(self, user_ids: pd.Series | np.ndarray) -> np.ndarray:
        """Row numbers of ``user_ids``; -1 for users the matrix has not seen (by a hash
        index built once per matrix)."""
        return _positions(self._user_index, user_ids)

    def item_index(self, item_ids: pd.Series | np.ndarray) -> np.ndarray:
        """Column numbers of ``item_ids``; -1 for unknown items."""
        return _positions(self._item_index, item_ids)

    def relabel(self, user_ids: np.ndarray, item_ids: np.ndarray) -> InteractionMatrix:
        """The same matrix with rows and columns named by ``user_ids`` / ``item_ids`` (the id
        strings of the codes it was built on)."""
        if (len(user_ids), len(item_ids)) != self.shape:
            raise ValueError(
                f"labels {len(user_ids)} x {len(item_ids)} do not fit a "
                f"{self.shape[0]} x {self.shape[1]} matrix"
            )
        return replace(
            self,
            user_ids=np.asarray(user_ids, dtype=object),
            item_ids=np.asarray(item_ids, dtype=object),
        )


def build_matrix(
    events: pd.DataFrame,
    weights: Mapping[str, float],
    user_ids: np.ndarray | None = None,
    item_ids: np.ndarray | None = None,
) -> InteractionMatrix:
    """Sum event weights per (user, item).

    On encoded events (integer ``user_id``/``item_id`` codes) the codes are the rows and
    columns: pass ``user_ids``/``item_ids`` as ``np.arange`` of the id maps' lengths (or any
    labels of that length), so every matrix of a run has one shape. On string ids the rows
    and columns are the sorted distinct ids with a positive weight, or ``user_ids`` /
    ``item_ids`` when given (events of other ids are dropped).
    """
    w = event_weights(events, weights)
    keep = w > 0
    coded = _is_codes(events["user_id"]) and _is_codes(events["item_id"])
    if coded:
        if user_ids is None or item_ids is None:
            raise ValueError("encoded events need user_ids and item_ids (the id maps' sizes)")
        users, items = np.asarray(user_ids), np.asarray(item_ids)
        rows = events["user_id"].to_numpy()[keep].astype(np.int64)
        cols = events["item_id"].to_numpy()[keep].astype(np.int64)
    else:
        kept = events.loc[keep]
        users = _sorted_unique(kept["user_id"]) if user_ids is None else user_ids
        items = _sorted_unique(kept["item_id"]) if item_ids is None else item_ids
        rows = lookup(users, kept["user_id"].to_numpy(dtype=object))
        cols = lookup(items, kept["item_id"].to_numpy(dtype=object))
    types = tuple(sorted(weights))
    type_code = _type_codes(events["event_type"], types)[keep]
    w = w[keep]
    known = (rows >= 0) & (cols >= 0)
    rows, cols, w, type_code = rows[known], cols[known], w[known], type_code[known]
    shape = (len(users), len(items))
    key = rows * np.int64(max(shape[1], 1)) + cols
    order = np.argsort(key, kind="stable")  # pairs together, events in their original order
    labels = (lambda a: a) if coded else (lambda a: np.asarray(a, dtype=object))
    return _aggregate(key[order], w[order], type_code[order], labels(users), labels(items), types)


def _aggregate(
    key: np.ndarray,
    w: np.ndarray,
    type_code: np.ndarray,
    users: np.ndarray,
    items: np.ndarray,
    types: tuple[str, ...],
) -> InteractionMatrix:
    """The matrix of events given by their pair ``key`` (row x columns + column, sorted; a
    pair's events in their original order), weight and type code."""
    shape = (len(users), len(items))
    starts = run_starts(key)
    total = np.add.reduceat(w, starts) if len(key) else np.zeros(0)
    # strongest type: the first of the pair's events with its largest weight
    best = np.maximum.reduceat(w, starts) if len(key) else np.zeros(0)
    sizes = np.diff(np.r_[starts, len(key)])
    is_best = np.flatnonzero(w == np.repeat(best, sizes))
    pair_of = np.searchsorted(starts, is_best, side="right") - 1  # ascending: first per pair
    first_best = is_best[np.r_[True, pair_of[1:] != pair_of[:-1]]] if len(is_best) else is_best
    u, i = key[starts] // max(shape[1], 1), key[starts] % max(shape[1], 1)
    confidence = sp.csr_matrix((total.astype(np.float32), (u, i)), shape=shape)
    strongest = sp.csr_matrix((type_code[first_best].astype(np.float32) + 1, (u, i)), shape=shape)
    strongest.data -= 1  # stored +1 so that code 0 is not dropped as an explicit zero
    return InteractionMatrix(users, items, confidence, strongest, types)


class PairOrder:
    """Encoded events sorted once by (user, item) pair, for the matrices of many cutoffs.

    ``build_matrix(before(events, t), weights, users, items)`` for any ``t``, without
    filtering the frame, weighing its events and sorting them again each time: a fit's
    label windows build one matrix per window from the same events (at 200k users, ~6 s a
    matrix, ~2.5 s from here). The same matrices, bit for bit (tested)."""

    def __init__(
        self,
        events: pd.DataFrame,
        weights: Mapping[str, float],
        user_ids: np.ndarray,
        item_ids: np.ndarray,
    ) -> None:
        if not (_is_codes(events["user_id"]) and _is_codes(events["item_id"])):
            raise ValueError("PairOrder needs encoded events (integer user_id / item_id)")
        self.user_ids, self.item_ids = np.asarray(user_ids), np.asarray(item_ids)
        self.types = tuple(sorted(weights))
        w = event_weights(events, weights)
        keep = w > 0
        rows = events["user_id"].to_numpy()[keep].astype(np.int64)  # codes: build_matrix's
        cols = events["item_id"].to_numpy()[keep].astype(np.int64)
        key = rows * np.int64(max(len(self.item_ids), 1)) + cols
        order = np.argsort(key, kind="stable")
        self.key = key[order]
        self.weight = w[keep][order]
        self.type_code = _type_codes(events["event_type"], self.types)[keep][order]
        self.when = events["timestamp"].to_numpy(dtype="datetime64[ns]")[keep][order]

    def before(self, cutoff) -> InteractionMatrix:
        """The matrix of the events strictly before ``cutoff`` (tz-aware: UTC)."""
        moment = pd.Timestamp(cutoff)
        if moment.tzinfo is not None:
            moment = moment.tz_convert("UTC").tz_localize(None)
        mask = self.when < np.datetime64(moment.value, "ns")
        return _aggregate(
            self.key[mask],
            self.weight[mask],
            self.type_code[mask],
            self.user_ids,
            self.item_ids,
            self.types,
        )


def with_history(truth: sp.csr_matrix, matrix: InteractionMatrix) -> sp.csr_matrix:
    """``truth`` (same shape as ``matrix``) on the users and items with history in
    ``matrix`` only: in a run's one id space, users and items first seen after the matrix's
    cutoff have rows and columns, but nothing can be learnt or scored for them there."""
    conf = matrix.confidence
    users = (np.diff(conf.indptr) > 0).astype(np.float32)
    items = (np.bincount(conf.indices, minlength=conf.shape[1]) > 0).astype(np.float32)
    kept = sp.diags(users) @ sp.csr_matrix(truth) @ sp.diags(items)
    kept = sp.csr_matrix(kept, dtype=np.float32)
    kept.eliminate_zeros()
    return kept


def _type_codes(types: pd.Series, names: tuple[str, ...]) -> np.ndarray:
    """Index of each event's type in ``names`` (-1 where absent)."""
    if isinstance(types.dtype, pd.CategoricalDtype):
        table = pd.Index(names).get_indexer(types.cat.categories.astype(object))
        return np.append(table, -1)[types.cat.codes.to_numpy()]
    return pd.Index(names).get_indexer(types.astype(object).to_numpy())


def _is_codes(column: pd.Series) -> bool:
    return column.dtype.kind in "iu"


def _sorted_unique(ids: pd.Series) -> np.ndarray:
    """The distinct ids, sorted: hashed first, so only the distinct ones are sorted (sorting
    every event's id string was most of the matrix build on large logs)."""
    return np.sort(pd.unique(ids.to_numpy(dtype=object)))


def _positions(index: pd.Index, ids) -> np.ndarray:
    ids = np.asarray(ids)
    if len(index) == 0 or len(ids) == 0:
        return np.full(len(ids), -1, dtype=np.int64)
    if ids.dtype.kind not in "iu" or index.dtype.kind not in "iu":
        ids = ids.astype(object)
    return index.get_indexer(ids).astype(np.int64)


def lookup(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Position of each of ``ids`` in the distinct ``sorted_ids``; -1 where absent (by hash,
    not by binary search over Python strings). Integer codes against ``np.arange`` labels
    are their own positions."""
    ids = np.asarray(ids)
    if ids.dtype.kind in "iu" and np.asarray(sorted_ids).dtype.kind in "iu":
        n = len(sorted_ids)
        if n and sorted_ids[0] == 0 and sorted_ids[-1] == n - 1:  # np.arange labels
            out = ids.astype(np.int64)
            out[(out < 0) | (out >= n)] = -1
            return out
    return _positions(pd.Index(sorted_ids), ids)
