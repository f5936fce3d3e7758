"""The user x item confidence matrix with its id maps."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pipeline.core.config import VALUE_SCALED_EVENT_TYPES


@dataclass(frozen=True)
class InteractionMatrix:
    """Confidence matrix in CSR form and the ids its rows and columns stand for.

    Attributes:
        user_ids: row ``u`` is user ``user_ids[u]`` (sorted, unique strings).
        item_ids: column ``i`` is item ``item_ids[i]`` (sorted, unique strings).
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

    def user_index(self, user_ids: pd.Series | np.ndarray) -> np.ndarray:
        """Row numbers of ``user_ids``; -1 for users the matrix has not seen."""
        return lookup(self.user_ids, np.asarray(user_ids, dtype=object))

    def item_index(self, item_ids: pd.Series | np.ndarray) -> np.ndarray:
        """Column numbers of ``item_ids``; -1 for unknown items."""
        return lookup(self.item_ids, np.asarray(item_ids, dtype=object))


def event_weights(events: pd.DataFrame, weights: Mapping[str, float]) -> np.ndarray:
    """Weight of each event: its type's weight, times ``value`` for value-scaled types."""
    base = events["event_type"].map(dict(weights)).astype("float64").fillna(0.0).to_numpy()
    scaled = events["event_type"].isin(VALUE_SCALED_EVENT_TYPES).to_numpy()
    value = events["value"].astype("float64").fillna(1.0).clip(lower=0).to_numpy()
    return np.where(scaled, base * value, base)


def build_matrix(events: pd.DataFrame, weights: Mapping[str, float],
                 user_ids: np.ndarray | None = None, item_ids: np.ndarray | None = None
                 ) -> InteractionMatrix:
    """Sum event weights per (user, item); ``user_ids``/``item_ids`` fix the index if given."""
    w = event_weights(events, weights)
    keep = w > 0
    frame = events.loc[keep, ["user_id", "item_id", "event_type"]].assign(w=w[keep])
    users = _sorted_unique(frame["user_id"]) if user_ids is None else user_ids
    items = _sorted_unique(frame["item_id"]) if item_ids is None else item_ids
    types = tuple(sorted(weights))
    rows = lookup(users, frame["user_id"].to_numpy(dtype=object))
    cols = lookup(items, frame["item_id"].to_numpy(dtype=object))
    known = (rows >= 0) & (cols >= 0)
    frame = frame[known].assign(u=rows[known], i=cols[known])
    pairs = frame.groupby(["u", "i"], sort=True)
    total = pairs["w"].sum()
    top_type = frame.loc[pairs["w"].idxmax(), "event_type"].map({t: k for k, t in enumerate(types)})
    shape = (len(users), len(items))
    u = total.index.get_level_values("u").to_numpy()
    i = total.index.get_level_values("i").to_numpy()
    confidence = sp.csr_matrix((total.to_numpy(np.float32), (u, i)), shape=shape)
    strongest = sp.csr_matrix((top_type.to_numpy(np.float32) + 1, (u, i)), shape=shape)
    strongest.data -= 1  # stored +1 so that code 0 is not dropped as an explicit zero
    return InteractionMatrix(np.asarray(users, dtype=object), np.asarray(items, dtype=object),
                             confidence, strongest, types)


def _sorted_unique(ids: pd.Series) -> np.ndarray:
    """The distinct ids, sorted: hashed first, so only the distinct ones are sorted (sorting
    every event's id string was most of the matrix build on large logs)."""
    return np.sort(pd.unique(ids.to_numpy(dtype=object)))


def lookup(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Position of each of ``ids`` in the distinct ``sorted_ids``; -1 where absent (by hash,
    not by binary search over Python strings)."""
    if len(sorted_ids) == 0:
        return np.full(len(ids), -1, dtype=np.int64)
    return pd.Index(sorted_ids, dtype=object).get_indexer(ids).astype(np.int64)
