"""Stage two: XGBoost re-ranks the (user, candidate) pairs.

:func:`pair_features` turns candidate pairs into the feature matrix (stage-one scores, item
popularity/recency, user RFM/context, category affinity, segment popularity, demographics);
:class:`Ranker` wraps ``XGBClassifier`` (``binary:logistic``) or ``XGBRanker``
(``rank:ndcg`` / ``rank:pairwise``, one query per user), with early stopping on a held-out
share of users, then a refit on all users with the best number of trees. With ``n_bags > 1``
that is repeated with ``n_bags`` seeds (each its own held-out users, row and column samples)
and the scores are averaged: the training sets are small (a few hundred queries), so one
model's ranking moves with its seed; the average moves much less. Bags only pay while the
training set is small: on a 20k-user log one model on twice the users beat five bags, so with
``bag_budget_pairs`` set, only as many bags are trained as fit in that many pairs (at least one).

XGBoost's ``hist`` trees do not depend on the thread count (same model with 1, 2 or 4
threads, checked), so ``n_jobs=0`` gives each booster its share of the CPUs.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.features.tables import FeatureTables
from pipeline.models.candidates import SOURCES, CandidateGenerator, gather

logger = logging.getLogger(__name__)

STAGE_ONE = tuple(f"from_{s}" for s in SOURCES) + (
    "als_rank",
    "knn_rank",
    "als_score",
    "knn_recent",
    "knn_all",
)
PAIR = ("category_affinity", "global_popularity", "popularity_gap", "age_gap")
OBJECTIVES = ("binary:logistic", "rank:ndcg", "rank:pairwise")


def feature_names(tables: FeatureTables) -> list[str]:
    """Column order of :func:`pair_features`."""
    return [
        *STAGE_ONE,
        *PAIR,
        *(f"segment_popularity_{n}" for n in tables.segment_names),
        *(f"item_{n}" for n in tables.item_names),
        *(f"user_{n}" for n in tables.user_names),
    ]


def pair_features(pairs: pd.DataFrame, tables: FeatureTables) -> np.ndarray:
    """Feature matrix (pairs x :func:`feature_names`) for candidate ``pairs`` (row, item)."""
    rows = pairs["row"].to_numpy()
    items = pairs["item"].to_numpy()
    category = tables.item_category[items]
    affinity = np.where(category >= 0, tables.affinity[rows, np.maximum(category, 0)], 0.0)
    glob_pop = tables.segment_popularity[-1, items]
    # Target-encoded demographics: the item's popularity within each of the user's segments.
    seg_pop = [
        tables.segment_popularity[np.where(seg[rows] >= 0, seg[rows], -1), items]
        for seg in tables.user_segment.T
    ]
    log_pop = np.log1p(tables.item_log_basis[items])
    gaps = [
        log_pop - tables.user_taste[rows, 0],
        tables.item[items, tables.item_names.index("age_days")] - tables.user_taste[rows, 1],
    ]
    blocks = [
        pairs[list(STAGE_ONE)].to_numpy(np.float32),
        np.column_stack([affinity, glob_pop, *gaps, *seg_pop]),
        tables.item[items],
        tables.user[rows],
    ]
    # one float32 matrix, each block cast as it is copied in (no wider intermediate)
    out = np.empty((len(pairs), sum(block.shape[1] for block in blocks)), np.float32)
    first = 0
    for block in blocks:
        out[:, first : first + block.shape[1]] = block
        first += block.shape[1]
    return out


def label_pairs(pairs: pd.DataFrame, truth) -> np.ndarray:
    """1 where the user engaged with the candidate in the label window (``truth`` CSR)."""
    return (gather(truth, pairs["row"].to_numpy(), pairs["item"].to_numpy()) > 0).astype(np.float32)


def generate_scored_pairs(
    generator: CandidateGenerator, tables: FeatureTables, rows: np.ndarray, chunk_users: int = 2_000
) -> tuple[pd.DataFrame, np.ndarray]:
    """Candidates and their feature matrix for ``rows``, built chunk by chunk."""
    frames, blocks = [], []
    for start in range(0, len(rows), chunk_users):
        pairs = generator.generate(rows[start : start + chunk_users])
        frames.append(pairs)
        blocks.append(pair_features(pairs, tables))
    if not frames:
        width = len(feature_names(tables))
        return pd.DataFrame(columns=["row", "item"]), np.empty((0, width), np.float32)
    return pd.concat(frames, ignore_index=True), np.vstack(blocks)


class Ranker:
    """XGBoost on pair features; ``predict`` gives a score where higher means rank higher."""

    def __init__(
        self,
        objective: str = "binary:logistic",
        max_depth: int = 6,
        learning_rate: float = 0.1,
        min_child_weight: float = 1.0,
        subsample: float = 0.8,
        colsample_bytree: float = 0.8,
        n_estimators: int = 300,
        early_stopping_rounds: int = 30,
        validation_share: float = 0.2,
        prior: str | None = "global_popularity",
        n_bags: int = 1,
        bag_budget_pairs: int | None = None,
        random_state: int = 42,
        n_jobs: int = 0,
        bag_workers: int = 0,
    ) -> None:
        self.objective = objective
        self.max_depth = max_depth
        self.learning_rate = learning_rate
        self.min_child_weight = min_child_weight
        self.subsample = subsample
        self.colsample_bytree = colsample_bytree
        self.n_estimators = n_estimators
        self.early_stopping_rounds = early_stopping_rounds
        self.validation_share = validation_share
        self.prior = prior
        self.n_bags = n_bags
        self.bag_budget_pairs = bag_budget_pairs
        self.random_state = random_state
        self.n_jobs = n_jobs  # threads per booster; 0: the CPUs shared among the bags at work
        self.bag_workers = bag_workers  # 0: one thread per bag, up to the CPU count

    def get_params(self) -> dict:
        return {
            "objective": self.objective,
            "max_depth": self.max_depth,
            "learning_rate": self.learning_rate,
            "min_child_weight": self.min_child_weight,
            "subsample": self.subsample,
            "colsample_bytree": self.colsample_bytree,
            "n_estimators": self.n_estimators,
            "early_stopping_rounds": self.early_stopping_rounds,
            "prior": self.prior,
            "n_bags": self.n_bags,
            "bag_budget_pairs": self.bag_budget_pairs,
            "random_state": self.random_state,
        }

    def fit(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        groups: np.ndarray,
        names: list[str] | None = None,
        split_keys: np.ndarray | None = None,
        weights: np.ndarray | None = None,
    ) -> Ranker:
        """Early-stop on a held-out share of users, then refit on all of them.

        ``groups`` are the ranking queries (user x label window); ``split_keys`` (the user id
        of each pair, default ``groups``) decide the held-out share, so that a user's
        overlapping windows never sit on both sides of the split. ``weights`` (per pair, the
        same within a query; default all 1) weigh the queries in training; the held-out
        early-stopping score is unweighted.
        """
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if labels.sum() == 0:
            raise ValueError("no positive labels to learn from")
        groups = np.unique(groups, return_inverse=True)[1].astype(np.int64)  # dense, uint32-safe
        # split keys as codes of their sorted distinct values (hashing: np.isin over object ids
        # was 40% of a 2M-pair fit)
        keys = pd.factorize(groups if split_keys is None else np.asarray(split_keys), sort=True)[0]
        if weights is not None:
            weights = np.asarray(weights, np.float32)
            if weights.shape != labels.shape or not (weights > 0).all():
                raise ValueError("weights must be positive, one per pair")
        if (np.diff(groups) < 0).any():  # XGBRanker needs sorted query ids
            order = np.argsort(groups, kind="stable")  # (a copy of the features: skip if sorted)
            features, labels, groups, keys = (
                features[order],
                labels[order],
                groups[order],
                keys[order],
            )
            weights = weights[order] if weights is not None else None
        if weights is not None and (np.diff(weights)[np.diff(groups) == 0] != 0).any():
            raise ValueError("weights must be the same within a query")
        self.feature_names_ = list(names) if names is not None else None
        margin = self._margin(features)
        bags = self.bags_for(len(labels))
        seeds = [self.random_state + bag for bag in range(bags)]
        workers = max(1, min(bags, self.bag_workers or os.cpu_count() or 1))
        self._threads = self.n_jobs or max(1, (os.cpu_count() or 1) // workers)
        # Bags are independent and XGBoost releases the GIL while it trains, so they run in
        # threads; hist trees do not depend on the thread count, so the models, and the
        # lists, do not depend on how many bags ran at once or on the machine's CPUs.
        with ThreadPoolExecutor(max_workers=workers) as pool:
            fitted = list(
                pool.map(
                    lambda seed: self._fit_bag(
                        seed, features, labels, groups, keys, margin, weights
                    ),
                    seeds,
                )
            )
        self.models_ = [model for model, _, _ in fitted]
        self.n_trees_ = [trees for _, trees, _ in fitted]
        scores = [validation for _, _, validation in fitted]
        self.validation_ = {k: float(np.mean([v[k] for v in scores])) for k in scores[0]}
        logger.info(
            "ranker fitted (%s): %d pairs, %d positives, %d groups, %d bag(s) of %s "
            "trees (%d thread(s) each), held-out AUC %.4f PR-AUC %.4f",
            self.objective,
            len(labels),
            int(labels.sum()),
            len(np.unique(groups)),
            bags,
            self.n_trees_,
            self._threads,
            self.validation_["auc"],
            self.validation_["pr_auc"],
        )
        return self

    def bags_for(self, pairs: int) -> int:
        """How many bags a training set of ``pairs`` gets: ``n_bags``, fewer when
        ``bag_budget_pairs`` would be exceeded, never fewer than one."""
        if self.n_bags < 1:
            raise ValueError(f"n_bags must be >= 1, got {self.n_bags}")
        if not self.bag_budget_pairs:
            return self.n_bags
        return max(1, min(self.n_bags, self.bag_budget_pairs // max(pairs, 1)))

    def _fit_bag(self, seed, features, labels, groups, keys, margin, weights=None):
        """One bag: early stopping on the users ``seed`` holds out, then a refit on all.
        Returns (model, trees, held-out scores)."""
        held = self._held_out(keys, seed)
        trees = self.n_estimators
        validation = {"auc": float("nan"), "pr_auc": float("nan")}
        if held.any() and (~held).any() and labels[held].sum() > 0:
            probe = self._model(self.n_estimators, seed, early_stopping=True)
            self._fit_model(
                probe,
                features[~held],
                labels[~held],
                groups[~held],
                margin[~held],
                (features[held], labels[held], groups[held], margin[held]),
                None if weights is None else weights[~held],
            )
            trees = int(probe.best_iteration) + 1
            validation = held_out_scores(
                labels[held],
                self._predict_one(probe, features[held], margin[held], iteration_range=(0, trees)),
            )
        model = self._fit_model(
            self._model(trees, seed, early_stopping=False),
            features,
            labels,
            groups,
            margin,
            None,
            weights,
        )
        return model, trees, validation

    _threads = 0  # set by fit; 0 until then (predict then uses every CPU)

    @property
    def model_(self):
        """The first bag's XGBoost model."""
        return self.models_[0]

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Ranking scores (probabilities for ``binary:logistic``), prior margin included;
        the mean over the bags."""
        margin = self._margin(features)
        threads = self.n_jobs or os.cpu_count() or 1  # predictions do not depend on it
        total = np.zeros(len(features), np.float64)
        for model in self.models_:
            if model.get_params()["n_jobs"] != threads:
                model.set_params(n_jobs=threads)
            total += self._predict_one(model, features, margin)
        return (total / len(self.models_)).astype(np.float32)

    def _predict_one(self, model, features, margin, iteration_range=None) -> np.ndarray:
        kwargs = {"base_margin": margin}
        if iteration_range is not None:
            kwargs["iteration_range"] = iteration_range
        if self._is_ranker:
            return model.predict(features, **kwargs).astype(np.float32)
        return model.predict_proba(features, **kwargs)[:, 1].astype(np.float32)

    def _margin(self, features: np.ndarray) -> np.ndarray:
        """Starting margin: log of the ``prior`` feature (recent popularity), so the trees
        learn corrections to a popularity ranking and early stopping falls back to it."""
        if self.prior is None or not self.feature_names_ or self.prior not in self.feature_names_:
            return np.zeros(len(features), np.float32)
        column = features[:, self.feature_names_.index(self.prior)]
        return np.log(np.nan_to_num(column, nan=0.0) + 1e-4).astype(np.float32)

    def importances(self) -> pd.Series:
        """Gain importance per feature (mean over the bags), largest first."""
        names = self.feature_names_ or [f"f{k}" for k in range(self.model_.n_features_in_)]
        values = np.zeros(len(names))
        for model in self.models_:
            gain = model.get_booster().get_score(importance_type="gain")
            values += [gain.get(f"f{k}", 0.0) for k in range(len(names))]
        return pd.Series(values / len(self.models_), index=names).sort_values(ascending=False)

    def boosters_raw(self) -> list[bytes]:
        """Each bag's booster as JSON bytes (for fingerprints)."""
        return [bytes(m.get_booster().save_raw("json")) for m in self.models_]

    def save(self, folder: Path, stem: str = "ranker") -> list[str]:
        """Write each bag to ``folder/<stem>[_<bag>].ubj``; returns the file names."""
        names = [
            f"{stem}.ubj" if bag == 0 else f"{stem}_{bag}.ubj" for bag in range(len(self.models_))
        ]
        for model, name in zip(self.models_, names, strict=True):
            model.save_model(str(Path(folder) / name))
        return names

    def load_model(self, folder: Path, n_trees: int | list[int], stem: str = "ranker") -> Ranker:
        """Restore the bags written by :meth:`save` into this (unfitted) instance."""
        trees = [n_trees] if isinstance(n_trees, int) else list(n_trees)
        self.models_ = []
        for bag, count in enumerate(trees):
            name = f"{stem}.ubj" if bag == 0 else f"{stem}_{bag}.ubj"
            model = self._model(count, self.random_state + bag, early_stopping=False)
            model.load_model(str(Path(folder) / name))
            self.models_.append(model)
        self.n_trees_ = trees
        return self

    @property
    def _is_ranker(self) -> bool:
        return self.objective.startswith("rank:")

    def _held_out(self, keys: np.ndarray, seed: int) -> np.ndarray:
        """Rows of a seeded ``validation_share`` of the keys (codes 0..n-1 of the sorted
        distinct split keys)."""
        n_keys = int(keys.max()) + 1 if len(keys) else 0
        chosen = np.zeros(n_keys, bool)
        chosen[
            np.random.default_rng(seed).permutation(n_keys)[
                : int(round(n_keys * self.validation_share))
            ]
        ] = True
        return chosen[keys]

    def _model(self, trees: int, seed: int, early_stopping: bool):
        from xgboost import XGBClassifier, XGBRanker

        common = dict(
            n_estimators=trees,
            max_depth=self.max_depth,
            learning_rate=self.learning_rate,
            min_child_weight=self.min_child_weight,
            subsample=self.subsample,
            colsample_bytree=self.colsample_bytree,
            tree_method="hist",
            random_state=seed,
            n_jobs=self._threads or self.n_jobs or os.cpu_count() or 1,
            early_stopping_rounds=self.early_stopping_rounds if early_stopping else None,
        )
        if self._is_ranker:
            return XGBRanker(
                objective=self.objective,
                eval_metric="ndcg@10",
                lambdarank_pair_method="topk",
                lambdarank_num_pair_per_sample=10,
                **common,
            )
        return XGBClassifier(objective=self.objective, eval_metric="aucpr", **common)

    def _fit_model(self, model, features, labels, groups, margin, evaluation, weights=None):
        kwargs = {"verbose": False, "base_margin": margin}
        if weights is not None:  # XGBoost ranking weighs queries: one weight per group
            kwargs["sample_weight"] = (
                weights[np.r_[0, np.flatnonzero(np.diff(groups)) + 1]]
                if self._is_ranker
                else weights
            )
        if evaluation is not None:
            kwargs.update(eval_set=[evaluation[:2]], base_margin_eval_set=[evaluation[3]])
        if self._is_ranker:
            kwargs["qid"] = groups
            if evaluation is not None:
                kwargs["eval_qid"] = [evaluation[2]]
        model.fit(features, labels, **kwargs)
        return model


def held_out_scores(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """AUC-ROC and PR-AUC (average precision) of pair scores; NaN with one class only."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    if len(np.unique(labels)) < 2:
        return {"auc": float("nan"), "pr_auc": float("nan")}
    return {
        "auc": float(roc_auc_score(labels, scores)),
        "pr_auc": float(average_precision_score(labels, scores)),
    }
