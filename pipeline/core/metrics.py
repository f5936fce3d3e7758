"""Ranking metrics: what counts as a hit, and the scores, in one place.

Pure functions of lists and truth, used by model selection inside a fit (the cold-start list's
cross-validation, tuning), by the holdout evaluation, the promotion gate and the benchmarks.
They sit in ``core`` because models (which select among cold-start lists while fitting) and
evaluation both build on them.

* on matrix columns: :func:`ranking_metrics` / :func:`ranking_metrics_per_user` over a users x
  k array of item columns and a truth matrix on the same rows;
* on id frames: :func:`user_metrics` over published-shape lists (user_id, rank, item_id) and
  truth pairs, for warm and cold users alike: the ids are encoded and scored by the matrix
  version, so there is one implementation; :func:`window_truth_frame` builds that truth;
* :func:`paired_bootstrap`: how sure a difference between two models over the same users is.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import scipy.sparse as sp


def ranking_metrics(top: np.ndarray, truth: sp.csr_matrix, k: int = 10) -> dict[str, float]:
    """Mean precision, recall, nDCG, MAP and hit rate at ``k``.

    ``top`` is users x >=k item columns (-1 = no item); ``truth`` is users x items on the
    same rows. Users with an empty truth row are skipped.
    """
    per_user = ranking_metrics_per_user(top, truth, k)
    if len(per_user["ndcg"]) == 0:
        return {m: float("nan") for m in per_user}
    return {m: float(values.mean()) for m, values in per_user.items()}


def ranking_metrics_per_user(
    top: np.ndarray, truth: sp.csr_matrix, k: int = 10
) -> dict[str, np.ndarray]:
    """Precision, recall, nDCG, AP and hit (0/1) at ``k`` of each user with a non-empty truth
    row, in row order: what :func:`ranking_metrics` averages, and what a paired comparison of
    two models over the same users needs."""
    top = top[:, :k]
    relevant = np.diff(truth.indptr)
    users = np.flatnonzero(relevant > 0)
    if len(users) == 0:
        return {m: np.zeros(0) for m in ("precision", "recall", "ndcg", "map", "hit_rate")}
    top, relevant = top[users], relevant[users]
    truth = truth[users]
    rows = np.repeat(np.arange(len(users)), top.shape[1])
    cols = top.ravel()
    hit = np.zeros(len(cols), bool)
    ok = cols >= 0
    hit[ok] = np.asarray(truth[rows[ok], cols[ok]]).ravel() > 0
    hits = hit.reshape(top.shape).astype(np.float64)
    discounts = 1.0 / np.log2(np.arange(2, top.shape[1] + 2))
    dcg = hits @ discounts
    ideal = np.cumsum(discounts)[np.minimum(relevant, top.shape[1]) - 1]
    precision_at = np.cumsum(hits, axis=1) / np.arange(1, top.shape[1] + 1)
    ap = (precision_at * hits).sum(axis=1) / np.minimum(relevant, top.shape[1])
    return {
        "precision": hits.sum(axis=1) / k,
        "recall": hits.sum(axis=1) / relevant,
        "ndcg": dcg / ideal,
        "map": ap,
        "hit_rate": (hits.sum(axis=1) > 0).astype(np.float64),
    }


def paired_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    n: int = 2_000,
    seed: int = 0,
    level: float = 0.95,
    block: int = 100,
) -> tuple[float, float]:
    """Percentile interval (``level``) of mean(a - b) over users resampled with replacement,
    paired: ``a[i]`` and ``b[i]`` are the same user's scores under two models. Seeded, so the
    same inputs give the same interval; ``block`` resamples at a time bound the memory."""
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if len(diff) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.concatenate(
        [
            diff[rng.integers(0, len(diff), size=(min(block, n - start), len(diff)))].mean(axis=1)
            for start in range(0, n, block)
        ]
    )
    tail = (1.0 - level) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def window_truth_frame(
    events: pd.DataFrame, start: dt.datetime, end: dt.datetime, exclude_seen: bool = True
) -> pd.DataFrame:
    """(user_id, item_id) engaged with in ``[start, end)``; minus pairs seen before ``start``.
    Integer codes stay integers (compared as objects, by ``np.isin`` say, they cost evaluate
    50 s at 200k users); other ids become objects."""
    window = events[(events["timestamp"] >= start) & (events["timestamp"] < end)]
    truth = window[["user_id", "item_id"]].drop_duplicates()
    if exclude_seen:
        seen = events[events["timestamp"] < start][["user_id", "item_id"]].drop_duplicates()
        truth = truth.merge(seen, how="left", indicator=True)
        truth = truth[truth["_merge"] == "left_only"].drop(columns="_merge")
    as_object = {c: object for c in ("user_id", "item_id") if truth[c].dtype.kind not in "iu"}
    return truth.astype(as_object).reset_index(drop=True)


def user_metrics(lists: pd.DataFrame, truth: pd.DataFrame, k: int = 10) -> pd.DataFrame:
    """Per user of ``truth``: precision, recall, nDCG, MAP and hit rate at ``k`` of ``lists``.

    ``lists`` has user_id, rank (1 = best), item_id; ``truth`` user_id, item_id. A user with
    truth but no list scores 0 everywhere. The ids are encoded (truth's users and items, in
    sorted order) and scored by :func:`ranking_metrics_per_user`: one implementation.
    """
    truth = truth[["user_id", "item_id"]].drop_duplicates()
    user_codes, users = pd.factorize(truth["user_id"].astype(object), sort=True)
    item_codes, items = pd.factorize(truth["item_id"].astype(object), sort=True)
    relevant = sp.csr_matrix(
        (np.ones(len(truth), np.float32), (user_codes, item_codes)),
        shape=(len(users), max(len(items), 1)),
    )
    top = top_from_lists(lists, users, items, k)
    per_user = ranking_metrics_per_user(top, relevant, k)
    out = pd.DataFrame(per_user, index=pd.Index(users, name="user_id"))
    return out[["precision", "recall", "ndcg", "map", "hit_rate"]]


def top_from_lists(lists: pd.DataFrame, user_ids, item_ids, k: int) -> np.ndarray:
    """Ranked id lists (user_id, rank, item_id) -> ``len(user_ids)`` x ``k`` positions in
    ``item_ids`` (-1: empty, or an item not in ``item_ids``); users not in ``user_ids`` are
    left out."""
    top = np.full((len(user_ids), k), -1, np.int64)
    lists = lists[lists["rank"] <= k]
    rows = pd.Index(user_ids).get_indexer(lists["user_id"].astype(object))
    cols = pd.Index(item_ids).get_indexer(lists["item_id"].astype(object))
    ok = rows >= 0
    top[rows[ok], lists["rank"].to_numpy(np.int64)[ok] - 1] = cols[ok]
    return top


def summarise_lists(
    lists: pd.DataFrame, truth: pd.DataFrame, k: int = 10, catalog: pd.Series | None = None
) -> dict[str, float]:
    """Mean :func:`user_metrics` plus catalog coverage and popularity bias of the top ``k``.

    ``catalog`` is the training popularity per item id (events or users per item): coverage
    is the share of it recommended to the evaluated users, and ``popularity_bias`` is the mean
    log(1 + popularity) of the recommended items minus that of the catalog.
    """
    per_user = user_metrics(lists, truth, k)
    out = {
        m: float(per_user[m].mean()) if len(per_user) else float("nan") for m in per_user.columns
    }
    out["users"] = float(len(per_user))
    if catalog is not None:
        out.update(list_diversity(lists[lists["user_id"].isin(per_user.index)], catalog, k))
    return out


def list_diversity(lists: pd.DataFrame, catalog: pd.Series, k: int = 10) -> dict[str, float]:
    """Catalog coverage and popularity bias (see :func:`summarise_lists`)."""
    top = lists[lists["rank"] <= k]
    log_pop = np.log1p(catalog.astype(np.float64))
    recommended = top["item_id"].map(log_pop).fillna(0.0)
    return {
        "coverage": float(top["item_id"].nunique() / max(len(catalog), 1)),
        "popularity_bias": float(recommended.mean() - log_pop.mean()) if len(top) else float("nan"),
    }


def top_diversity(top: np.ndarray, catalog: np.ndarray, k: int = 10) -> dict[str, float]:
    """Coverage and popularity bias of top-``k`` column lists (-1 = empty).

    ``catalog`` is the training popularity per item column (users per item). Coverage is the
    share of the catalog recommended at least once; popularity bias is the mean
    log(1 + popularity) of the recommended items minus the catalog's mean (0 = no bias).
    """
    cols = top[:, :k].ravel()
    cols = cols[cols >= 0]
    log_pop = np.log1p(np.asarray(catalog, np.float64))
    if len(cols) == 0 or len(log_pop) == 0:
        return {"coverage": float("nan"), "popularity_bias": float("nan")}
    return {
        "coverage": float(len(np.unique(cols)) / len(log_pop)),
        "popularity_bias": float(log_pop[cols].mean() - log_pop.mean()),
    }
