"""Plain implicit ALS as a deployable recommender (a baseline, and the bundles of older
versions): factors, id maps, reasons from the nearest history item, the popularity fallback.

It follows scikit-learn's estimator rules: hyperparameters are constructor arguments stored
unchanged, ``fit`` returns ``self`` and learned state ends in ``_``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pipeline.features.matrix import InteractionMatrix
from pipeline.models.base import (
    HISTORY_FOR_REASONS,
    PAIRS_PER_CHUNK,
    VERBS,
    ListRecommender,
    empty_columns,
    fit_als,
    item_labels,
    normalise_rows,
)

logger = logging.getLogger(__name__)


class AlsRecommender(ListRecommender):
    """Implicit ALS on event-weighted confidences, with reasons and a popularity fallback."""

    def __init__(
        self,
        factors: int = 64,
        regularization: float = 0.05,
        alpha: float = 2.0,
        iterations: int = 15,
        random_state: int = 42,
        num_threads: int = 0,
    ) -> None:
        self.factors = factors
        self.regularization = regularization
        self.alpha = alpha
        self.iterations = iterations
        self.random_state = random_state
        self.num_threads = num_threads

    def get_params(self) -> dict:
        return {
            "factors": self.factors,
            "regularization": self.regularization,
            "alpha": self.alpha,
            "iterations": self.iterations,
            "random_state": self.random_state,
        }

    # ---- training ----------------------------------------------------------------------
    def fit(
        self, matrix: InteractionMatrix, popular: pd.DataFrame, items: pd.DataFrame | None = None
    ) -> AlsRecommender:
        """Fit factors on ``matrix``; ``popular`` (item_id, score, reason) is the fallback."""
        model = fit_als(
            matrix.confidence,
            factors=self.factors,
            regularization=self.regularization,
            alpha=self.alpha,
            iterations=self.iterations,
            random_state=self.random_state,
            num_threads=self.num_threads,
        )
        self._serve(model, matrix, popular, items)
        logger.info(
            "ALS fitted: %d users x %d items, %d pairs, %s",
            *matrix.shape,
            matrix.confidence.nnz,
            self.get_params(),
        )
        return self

    @classmethod
    def from_fitted(
        cls,
        model,
        matrix: InteractionMatrix,
        popular: pd.DataFrame,
        items: pd.DataFrame | None = None,
    ) -> AlsRecommender:
        """An ALS recommender around an implicit ALS ``model`` already fitted on ``matrix``
        (a two-stage model's stage one, say), without fitting again."""
        return cls(
            factors=model.factors,
            regularization=model.regularization,
            alpha=model.alpha,
            iterations=model.iterations,
            random_state=model.random_state,
        )._serve(model, matrix, popular, items)

    def _serve(self, model, matrix, popular, items) -> AlsRecommender:
        """Serve from the fitted implicit ``model`` of ``matrix``, with its fallback list."""
        self.model_ = model
        self.matrix_ = matrix
        self._empty = empty_columns(matrix.confidence)
        self.popular_ = popular.reset_index(drop=True)
        self.items_ = item_labels(matrix.item_ids, items)
        return self

    # ---- scoring -----------------------------------------------------------------------
    def score_top(self, user_rows: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``n`` unseen item columns and scores for known user rows (-1 pads short rows)."""
        if len(user_rows) == 0:
            return np.empty((0, n), np.int64), np.empty((0, n), np.float32)
        n_eff = min(n, self.matrix_.shape[1])
        ids, scores = self.model_.recommend(
            user_rows,
            self.matrix_.confidence[user_rows],
            N=n_eff,
            filter_already_liked_items=True,
            filter_items=self._empty_items(),
        )
        ids = np.asarray(ids, np.int64).reshape(len(user_rows), -1)
        scores = np.asarray(scores, np.float32).reshape(len(user_rows), -1)
        if ids.shape[1] < n:
            pad = n - ids.shape[1]
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        scores = np.where(ids < 0, -np.inf, scores)  # implicit pads with -1 / very low scores
        return ids, scores

    def _empty_items(self) -> np.ndarray | None:
        if not hasattr(self, "_empty"):
            self._empty = empty_columns(self.matrix_.confidence)
        return self._empty

    def _recommend_chunk(self, users: np.ndarray, n: int) -> pd.DataFrame:
        rows = self.matrix_.user_index(users)
        known = rows >= 0
        ids = np.full((len(users), n), -1, np.int64)
        scores = np.full((len(users), n), -np.inf, np.float32)
        ids[known], scores[known] = self.score_top(rows[known], n)
        reasons = np.full(ids.shape, None, dtype=object)
        reasons[known] = self._explain(rows[known], ids[known])
        personal = pd.DataFrame(
            {
                "user_id": np.repeat(users, n),
                "rank": np.tile(np.arange(1, n + 1), len(users)),
                "col": ids.ravel(),
                "score": scores.ravel(),
                "reason": reasons.ravel(),
            }
        )
        personal = personal[personal["col"] >= 0]
        personal["item_id"] = self.matrix_.item_ids[personal["col"].to_numpy()]
        personal["source"] = "als"
        return self._fill_from_fallback(personal.drop(columns="col"), users, n)

    def _fallback_candidates(self, users: np.ndarray, n: int) -> pd.DataFrame:
        """The popular list, best first, for each of ``users`` (``order`` = position)."""
        pop = self.popular_.head(n * 3)
        return pd.DataFrame(
            {
                "user_id": np.repeat(users, len(pop)),
                "item_id": np.tile(pop["item_id"].to_numpy(object), len(users)),
                "score": np.tile(pop["score"].to_numpy(np.float32), len(users)),
                "reason": np.tile(pop["reason"].to_numpy(object), len(users)),
                "source": "popular",
                "order": np.tile(np.arange(len(pop)), len(users)),
            }
        )

    def _seen(self, user_ids: pd.Series, item_ids: pd.Series) -> np.ndarray:
        rows = self.matrix_.user_index(user_ids.to_numpy(object))
        cols = self.matrix_.item_index(item_ids.to_numpy(object))
        ok = (rows >= 0) & (cols >= 0)
        seen = np.zeros(len(rows), bool)
        if ok.any():
            seen[ok] = np.asarray(self.matrix_.confidence[rows[ok], cols[ok]]).ravel() > 0
        return seen

    def _explain(self, rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """For each pick, "because you <verb> <title>" naming the closest history item."""
        out = np.full(ids.shape, None, dtype=object)
        if len(rows) == 0:
            return out
        factors = normalise_rows(np.asarray(self.model_.item_factors, np.float32))
        titles = self.items_["title"].astype(object).to_numpy()
        verbs = np.array(
            [VERBS.get(t, "engaged with") for t in self.matrix_.event_types], dtype=object
        )
        block = max(1, PAIRS_PER_CHUNK // HISTORY_FOR_REASONS)
        for lo in range(0, len(rows), block):
            hi = min(lo + block, len(rows))
            hist_u, hist_i, hist_code = self._history(rows[lo:hi])
            if len(hist_u) == 0:
                continue
            recs = ids[lo:hi][hist_u]  # pairs x n
            sims = np.einsum("pf,pnf->pn", factors[hist_i], factors[np.maximum(recs, 0)])
            for k in range(ids.shape[1]):
                order = np.lexsort((-sims[:, k], hist_u))  # best pair first
                first = order[np.r_[True, hist_u[order][1:] != hist_u[order][:-1]]]
                users = hist_u[first]
                text = "because you " + verbs[hist_code[first]] + " " + titles[hist_i[first]]
                valid = ids[lo:hi][users, k] >= 0
                out[lo + users[valid], k] = text[valid]
        return out

    def _history(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(chunk-local user, item column, strongest event code) of each user's top items."""
        conf = self.matrix_.confidence[rows].tocoo()
        code = self.matrix_.strongest[rows].tocoo()
        frame = pd.DataFrame(
            {"u": conf.row, "i": conf.col, "c": conf.data, "code": code.data.astype(np.int64)}
        )
        frame = frame.sort_values(["u", "c", "i"], ascending=[True, False, True], kind="stable")
        frame = frame[frame.groupby("u").cumcount() < HISTORY_FOR_REASONS]
        return frame["u"].to_numpy(), frame["i"].to_numpy(), frame["code"].to_numpy()

    def use_threads(self, threads: int) -> None:
        """ALS top-N threads (0: every CPU); the lists do not depend on it."""
        self.num_threads = self.model_.num_threads = threads

    def fingerprint(self) -> str:
        """SHA-256 of everything the model serves from: equal fingerprints, equal lists."""
        digest = hashlib.sha256()
        digest.update(json.dumps(self.get_params(), sort_keys=True).encode())
        for array in (
            self.model_.user_factors,
            self.model_.item_factors,
            self.matrix_.confidence.indptr,
            self.matrix_.confidence.indices,
            self.matrix_.confidence.data,
            self.matrix_.strongest.data,
        ):
            digest.update(np.ascontiguousarray(np.asarray(array)).tobytes())
        for ids in (self.matrix_.user_ids, self.matrix_.item_ids):
            digest.update("\x1f".join(map(str, ids)).encode())
        for frame in (self.popular_, self.items_):
            digest.update(frame.to_csv(index=False).encode())
        return digest.hexdigest()

    # ---- persistence -------------------------------------------------------------------
    def save(self, folder: Path) -> Path:
        """Write the fitted model to ``folder`` (created); returns the folder."""
        folder.mkdir(parents=True, exist_ok=True)
        self.model_.save(str(folder / "als.npz"))
        m = self.matrix_
        sp.save_npz(folder / "confidence.npz", m.confidence, compressed=False)
        sp.save_npz(folder / "strongest.npz", m.strongest, compressed=False)
        pd.DataFrame({"user_id": m.user_ids}).to_parquet(folder / "users.parquet", index=False)
        self.items_.to_parquet(folder / "items.parquet", index=False)
        self.popular_.to_parquet(folder / "popular.parquet", index=False)
        meta = {"params": self.get_params(), "event_types": list(m.event_types)}
        (folder / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        return folder

    @classmethod
    def load(cls, folder: Path) -> AlsRecommender:
        """Inverse of :meth:`save`."""
        from implicit.cpu.als import AlternatingLeastSquares

        meta = json.loads((Path(folder) / "meta.json").read_text())
        self = cls(**meta["params"])
        self.model_ = AlternatingLeastSquares.load(str(Path(folder) / "als.npz"))
        items = pd.read_parquet(Path(folder) / "items.parquet")
        users = pd.read_parquet(Path(folder) / "users.parquet")
        self.matrix_ = InteractionMatrix(
            users["user_id"].to_numpy(object),
            items["item_id"].to_numpy(object),
            sp.load_npz(Path(folder) / "confidence.npz").tocsr(),
            sp.load_npz(Path(folder) / "strongest.npz").tocsr(),
            tuple(meta["event_types"]),
        )
        self.items_ = items
        self.popular_ = pd.read_parquet(Path(folder) / "popular.parquet")
        return self
