"""Cold start: the best non-personal list, recent popularity by user segment.

For a segment ``s`` (e.g. an age band from ``users.csv``) an item's score is its share of the
segment's active users in the window, shrunk towards the global share with ``shrinkage``
pseudo-users: ``(users_s(i) + m * users(i) / users) / (users_s + m)``. Small segments thus fall
back smoothly to the global list; users whose segment is unknown get the global list.
"""

from __future__ import annotations

import datetime as dt
import logging

import numpy as np
import pandas as pd

from pipeline.core.metrics import user_metrics
from pipeline.features.tables import segment_labels

logger = logging.getLogger(__name__)

_WINDOW_PHRASES = ((1, "today"), (7, "this week"), (31, "this month"))


class SegmentPopularity:
    """Top items per segment over the last ``days`` before the cutoff."""

    def __init__(
        self,
        days: int = 30,
        segment: tuple[str, ...] = ("age_band",),
        shrinkage: float = 20.0,
        n_keep: int = 100,
    ) -> None:
        self.days = days
        self.segment = tuple(segment)
        self.shrinkage = shrinkage
        self.n_keep = n_keep

    def get_params(self) -> dict:
        return {"days": self.days, "segment": list(self.segment), "shrinkage": self.shrinkage}

    def fit(
        self,
        events: pd.DataFrame,
        cutoff: dt.datetime,
        users: pd.DataFrame | None = None,
        items: pd.DataFrame | None = None,
    ) -> SegmentPopularity:
        """Learn ``global_`` (item_id, score, reason) and ``segments_`` (segment + same)."""
        return self.fit_pairs(window_pairs(events, cutoff, self.days), users, items)

    def fit_pairs(
        self,
        pairs: pd.DataFrame,
        users: pd.DataFrame | None = None,
        items: pd.DataFrame | None = None,
    ) -> SegmentPopularity:
        """:meth:`fit` from the window's distinct (user_id, item_id) pairs
        (:func:`window_pairs` of this ``days``), which options of one window share."""
        glob = pairs.groupby("item_id", observed=True).size()
        item_ids = glob.index
        counts = glob.to_numpy(np.float64)
        # each distinct user is labelled once (not once per pair: the labels are strings)
        user_codes, distinct = pd.factorize(pairs["user_id"])
        n_users = max(len(distinct), 1)
        self.global_ = self._ranked((counts / n_users)[None, :], item_ids, items)
        labels = segment_labels(users, np.asarray(distinct, dtype=object), self.segment)
        known = pd.notna(labels)
        names = np.array(sorted(set(labels[known])), dtype=object)
        if len(names):
            # segments x items: distinct users of each item within each segment, then shrunk.
            user_segment = np.full(len(distinct), -1, np.int64)
            user_segment[known] = np.searchsorted(names, labels[known])
            rows = user_segment[user_codes]
            labelled = rows >= 0
            cols = item_ids.get_indexer(pairs["item_id"])
            cells = rows[labelled] * len(item_ids) + cols[labelled]
            in_segment = np.bincount(cells, minlength=len(names) * len(item_ids))
            in_segment = in_segment.reshape(len(names), len(item_ids)).astype(np.float64)
            seg_users = np.bincount(user_segment[known], minlength=len(names)).astype(np.float64)
            m = self.shrinkage
            share = (in_segment + m * counts / n_users) / (seg_users[:, None] + m)
            self.segments_ = self._ranked(share, item_ids, items, names)
        else:
            self.segments_ = self.global_.head(0).assign(segment=pd.Series(dtype=object))
        self.users_ = (
            users.drop_duplicates("user_id").reset_index(drop=True) if users is not None else None
        )
        logger.info(
            "cold-start popularity: %d items in %d days, %d segments (%s)",
            len(glob),
            self.days,
            self.segments_["segment"].nunique(),
            "|".join(self.segment),
        )
        return self

    def relabel(self, item_ids: np.ndarray, users: pd.DataFrame | None) -> SegmentPopularity:
        """After a fit on encoded events (codes for ids, side tables re-keyed to codes): the
        lists name items by ``item_ids[code]``, and segments are looked up in ``users``
        (string-keyed), so that users the codes never held get their segment's list too."""
        item_ids = np.asarray(item_ids, dtype=object)
        for name in ("global_", "segments_"):
            table = getattr(self, name)
            setattr(
                self,
                name,
                table.assign(
                    item_id=item_ids[table["item_id"].to_numpy(np.int64)]
                    if len(table)
                    else table["item_id"].astype(object)
                ),
            )
        self.users_ = (
            users.drop_duplicates("user_id").reset_index(drop=True) if users is not None else None
        )
        return self

    def lists_for(self, user_ids: np.ndarray) -> pd.DataFrame:
        """Candidate rows (user_id, order, item_id, score, reason) for each user."""
        user_ids = np.asarray(user_ids, dtype=object)
        seg = segment_labels(self.users_, user_ids, self.segment)
        frame = pd.DataFrame({"user_id": user_ids, "segment": seg})
        listed = frame["segment"].isin(pd.unique(self.segments_["segment"])).to_numpy()
        known = frame[listed].merge(self.segments_, on="segment")
        unknown = frame.loc[~listed, ["user_id"]].merge(self.global_, how="cross")
        out = pd.concat([known.drop(columns="segment"), unknown], ignore_index=True)
        return out[["user_id", "order", "item_id", "score", "reason"]]

    def _ranked(
        self,
        share: np.ndarray,
        item_ids: pd.Index,
        items: pd.DataFrame | None,
        segments: np.ndarray | None = None,
    ) -> pd.DataFrame:
        """The top ``n_keep`` items of each row of ``share`` (rows x items), best first, ties
        by item id: (order, item_id, score, reason), plus ``segment`` when given."""
        tie = np.argsort(item_ids.argsort(kind="stable"), kind="stable")  # rank in id order
        frames = []
        for row in range(share.shape[0]):
            top = np.lexsort((tie, -share[row]))[: self.n_keep]
            frames.append(
                pd.DataFrame(
                    {
                        "order": np.arange(len(top)),
                        "item_id": item_ids[top].array,
                        "score": share[row, top].astype(np.float32),
                    }
                )
            )
        frame = pd.concat(frames, ignore_index=True)
        frame["reason"] = popular_reasons(frame["item_id"], items, self.days)
        if segments is not None:
            frame["segment"] = np.repeat(segments, [len(f) for f in frames])
        return frame


def window_pairs(events: pd.DataFrame, cutoff: dt.datetime, days: int) -> pd.DataFrame:
    """Distinct (user_id, item_id) of the ``days`` before ``cutoff`` (all history before it
    when those days are empty)."""
    window = events[
        (events["timestamp"] < cutoff) & (events["timestamp"] >= cutoff - dt.timedelta(days=days))
    ]
    if window.empty:  # nothing recent: fall back to all history before the cutoff
        window = events[events["timestamp"] < cutoff]
    return window[["user_id", "item_id"]].drop_duplicates()


def popular_reasons(item_ids: pd.Series, items: pd.DataFrame | None, days: int) -> np.ndarray:
    """ "popular in <category> this week" (or "popular this month" without a category)."""
    phrase = next((p for d, p in _WINDOW_PHRASES if days <= d), "lately")
    category = pd.Series(pd.NA, index=item_ids.index, dtype="string")
    if items is not None and "category" in items:
        lookup = items.drop_duplicates("item_id").set_index("item_id")["category"]
        category = item_ids.map(lookup).astype("string")
    specific = "popular in " + category.fillna("") + " " + phrase
    has = category.notna() & (category != "")
    return specific.where(has, f"popular {phrase}").astype(object).to_numpy()


#: Options :func:`select_cold_start` compares (window days x segment attributes). The first,
#: plain 30-day popularity by distinct users, is the default: the strongest simple list.
#: Windows shorter than the 30-day label horizon lost to it on every development cutoff.
COLD_OPTIONS: tuple[tuple[int, str], ...] = tuple(
    (days, segment)
    for days in (30, 60)
    for segment in ("", "age_band", "gender", "occupation", "age_band|gender")
)

#: New users are scored on what they do in this many days (the benchmark's horizon).
COLD_HORIZON_DAYS = 30
#: A non-default option must beat the default in every CV fold and by this much nDCG on average.
COLD_MIN_GAIN = 0.01


def select_cold_start(
    events: pd.DataFrame,
    cutoff: dt.datetime,
    users: pd.DataFrame | None,
    items: pd.DataFrame | None = None,
    n_folds: int = 3,
    horizon_days: int = COLD_HORIZON_DAYS,
    shrinkage: float = 50.0,
    k: int = 10,
    options: tuple[tuple[int, str], ...] = COLD_OPTIONS,
    min_gain: float = COLD_MIN_GAIN,
) -> dict:
    """Pick the cold-start window and segment by nDCG@k on the new users of ``n_folds``
    windows of ``horizon_days`` before ``cutoff`` (time-series CV). The first option is the
    default; another replaces it only if it beats it in every scored fold and by at least
    ``min_gain`` on average (then the best mean wins, ties keeping the earlier option).
    Returns ``SegmentPopularity`` keyword arguments."""
    events = events[events["timestamp"] < cutoff]
    first = events.groupby("user_id", observed=True)["timestamp"].min()
    usable = [
        (d, s)
        for d, s in options
        if not s or (users is not None and set(s.split("|")) <= set(users))
    ]
    folds = []  # one row of option scores per scored fold
    for fold in range(1, n_folds + 1):
        end = cutoff - dt.timedelta(days=horizon_days * (fold - 1))
        start = end - dt.timedelta(days=horizon_days)
        new = first[(first >= start) & (first < end)].index
        truth = events[
            (events["timestamp"] >= start)
            & (events["timestamp"] < end)
            & events["user_id"].isin(new)
        ][["user_id", "item_id"]]
        if truth.empty or (events["timestamp"] < start).sum() == 0:
            continue
        row = np.zeros(len(usable))
        pairs = {days: window_pairs(events, start, days) for days in {d for d, _ in usable}}
        for n, (days, segment) in enumerate(usable):
            model = SegmentPopularity(
                days=days,
                segment=tuple(filter(None, segment.split("|"))),
                shrinkage=shrinkage,
                n_keep=k,
            ).fit_pairs(pairs[days], users)
            lists = model.lists_for(truth["user_id"].unique()).assign(rank=lambda f: f["order"] + 1)
            row[n] = user_metrics(lists, truth, k)["ndcg"].mean()
        folds.append(row)
    choice = 0
    if folds:
        scores = np.vstack(folds)
        gain = scores - scores[:, :1]
        eligible = (gain > 0).all(axis=0) & (gain.mean(axis=0) >= min_gain)
        if eligible.any():
            choice = int(np.argmax(np.where(eligible, scores.mean(axis=0), -np.inf)))
    days, segment = usable[choice]
    logger.info(
        "cold start selected: %d days, segment %r (cv ndcg per fold %s)",
        days,
        segment,
        np.round(np.vstack(folds), 4).tolist() if folds else [],
    )
    return {
        "days": days,
        "segment": tuple(filter(None, segment.split("|"))),
        "shrinkage": shrinkage,
    }
