"""The deployable two-stage recommender: candidates (ALS, item-kNN, recent popularity) re-ranked
by XGBoost, with a segment-popularity cold start; saved as one folder.

Training mimics serving. At serve time the features come from every event before the cutoff
and the model predicts the next period; so for training, ``label_windows`` windows of
``label_days`` ending at the cutoff, ``label_stride_days`` apart (they may overlap), are label
windows: candidates and features come from the events before the window, and the label is
whether the user engaged with the candidate inside it (one ranking query per user and
window; at most ``max_label_users`` users per window, a seeded sample, which bounds the
training pairs at about users x windows x candidates). With ``label_halflife_days`` a
window's queries weigh 0.5 ** (days its window ends before the cutoff / half-life), so the
newest counts most; the default (None) weighs all alike: 28 days scored +0.005 warm nDCG@10
on the three development cutoffs (6 seeds) but -0.001 on four more, so it is left to tuning.
A window's sample is seeded by its start, so fits at different cutoffs that share a window
label the same users in it; :meth:`TwoStageRecommender.label_chain` fits the windows once
(a :class:`LabelChain`, saved to a folder) for several fits of one recipe on the same events
to read (the nightly's train at the cutoff and evaluate at the holdout start).
The stage-one models are then refitted on everything before the cutoff for serving. ALS
starts at random once, at the oldest label window; each later window, and the serving fit,
start from the previous fit's factors and run ``warm_iterations`` sweeps (a week more data
moves the factors little): 45 sweeps per fit instead of 105, with warm nDCG@10 on the
development cutoffs 0.1462 against 0.1451 for cold fits (3 seeds, seed range ~0.014).
The ranker is a bag of ``n_bags`` XGBoost models with different seeds, scores averaged: with a
few hundred training queries one model's lists move with its seed (by up to 0.03 nDCG@10);
five bags scored 0.016 higher than one on the development cutoffs. On large logs more users
beat more bags (20k synthetic users: one model on 2,000 users per window 0.102 nDCG@10, five
bags on 1,000 users 0.099, in less time), so bags are trained only while ``n_bags`` x pairs
stays within ``bag_budget_pairs``, and the sample is 2,000 users per window.

Users with fewer than ``min_history`` items, and users never seen, get the cold-start list:
recent popularity in their segment (``cold_segment`` attributes of ``users.csv``, ``"auto"``:
plain 30-day popularity unless another window and attributes win clearly in time-series CV on
the new users of 30-day windows before the cutoff), or the global list when the segment is
unknown. Same interface as
:class:`pipeline.models.als.AlsRecommender`: ``recommend``, ``default_list``,
``save``/``load``, ``fingerprint``, ``get_params`` (plus ``popular_``, ``matrix_``). Its
training parameters are one :class:`pipeline.models.recipe.TwoStageRecipe` (``recipe``);
``get_params()`` is the recipe's flat dict.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pipeline.core.config import DEFAULT_EVENT_WEIGHTS
from pipeline.core.ids import EncodedEvents
from pipeline.core.runtime import check_numerics
from pipeline.core.timing import StageClock
from pipeline.features.matrix import InteractionMatrix, PairOrder, build_matrix, with_history
from pipeline.features.popularity import count_distinct
from pipeline.features.tables import (
    FeatureFrames,
    FeatureTables,
    before,
    build_feature_tables,
    recent_history,
)
from pipeline.models.base import (
    HISTORY_FOR_REASONS,
    VERBS,
    ListRecommender,
    empty_lists,
    item_labels,
    normalise_rows,
    ranked_within,
    row_dots,
)
from pipeline.models.candidates import CandidateGenerator, candidate_recall, gather
from pipeline.models.coldstart import SegmentPopularity, popular_reasons, select_cold_start
from pipeline.models.ranker import Ranker, feature_names, generate_scored_pairs, label_pairs
from pipeline.models.recipe import TwoStageRecipe

logger = logging.getLogger(__name__)

_TABLE_FIELDS = FeatureTables.ARRAY_FIELDS


@dataclass(frozen=True)
class Snapshot:
    """Everything stage one and the ranker read at one cutoff (events strictly before it)."""

    cutoff: dt.datetime
    matrix: InteractionMatrix
    recent: sp.csr_matrix
    tables: FeatureTables
    popular_cols: np.ndarray


@dataclass(frozen=True)
class LabelledWindow:
    """The training pairs of one label window: the candidates of its sampled users from
    the events before ``start``, with their features and labels (engaged with inside the
    window)."""

    start: dt.datetime
    features: np.ndarray  # float32, one row per pair
    labels: np.ndarray  # one per pair
    rows: np.ndarray  # the pair's user (its code), int64
    recall: dict[str, float]  # candidate recall of the window's sampled users
    feature_names: list[str]


@dataclass
class LabelChain:
    """Label windows fitted oldest first on one warm ALS chain
    (:meth:`TwoStageRecommender.label_chain`), and the stage-one generators kept at some of
    their starts: what fits of one recipe on the same events can share instead of refitting.
    Saved to a folder, so that two tasks (train, evaluate) read what a third fitted."""

    params: dict  # the recipe's
    weights: dict[str, float]
    starts: list[dt.datetime] = field(default_factory=list)  # every start tried, oldest first
    windows: dict[dt.datetime, LabelledWindow] = field(default_factory=dict)
    generators: dict[dt.datetime, CandidateGenerator] = field(default_factory=dict)

    def covers(self, start: dt.datetime) -> bool:
        """Whether the chain tried the window starting at ``start`` (it may have had no
        user to label)."""
        return start in self.starts

    def check(self, params: Mapping, weights: Mapping[str, float]) -> None:
        """ValueError unless the chain was fitted with this recipe and these weights."""
        if dict(params) != self.params or dict(weights) != self.weights:
            raise ValueError(
                "the label chain was fitted with another recipe or other event weights "
                f"({self.params}, {self.weights}) than this fit ({dict(params)}, {dict(weights)})"
            )

    def save(self, folder: Path) -> Path:
        """Write the chain to ``folder`` (replaced): ``chain.json``, one ``.npz`` per window
        and one folder per kept generator."""
        folder = Path(folder)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for start, window in self.windows.items():
            np.savez(
                folder / f"window-{_stamp(start)}.npz",
                features=window.features,
                labels=window.labels,
                rows=window.rows,
            )
        for start, generator in self.generators.items():
            generator.save_models(folder / f"generator-{_stamp(start)}")
        meta = {
            "params": self.params,
            "weights": self.weights,
            "starts": [start.isoformat() for start in self.starts],
            "windows": {
                start.isoformat(): {"recall": w.recall, "feature_names": w.feature_names}
                for start, w in self.windows.items()
            },
            "generators": [start.isoformat() for start in self.generators],
            "generator_params": next(iter(self.generators.values())).get_params()
            if self.generators
            else None,
        }
        (folder / "chain.json").write_text(json.dumps(meta, indent=2, default=str))
        return folder

    @classmethod
    def load(cls, folder: Path) -> LabelChain:
        """Inverse of :meth:`save` (the generators without their matrix: a fit attaches it)."""
        folder = Path(folder)
        meta = json.loads((folder / "chain.json").read_text())
        chain = cls(meta["params"], meta["weights"])
        chain.starts = [dt.datetime.fromisoformat(s) for s in meta["starts"]]
        for text, info in meta["windows"].items():
            start = dt.datetime.fromisoformat(text)
            with np.load(folder / f"window-{_stamp(start)}.npz", allow_pickle=False) as arrays:
                chain.windows[start] = LabelledWindow(
                    start,
                    arrays["features"],
                    arrays["labels"],
                    arrays["rows"],
                    info["recall"],
                    info["feature_names"],
                )
        for text in meta["generators"]:
            start = dt.datetime.fromisoformat(text)
            generator = CandidateGenerator(**meta["generator_params"])
            chain.generators[start] = generator.load_models(folder / f"generator-{_stamp(start)}")
        return chain


def _stamp(moment: dt.datetime) -> str:
    return moment.strftime("%Y%m%dT%H%M%S")


def _seed_of(start: dt.datetime) -> int:
    """A label window's part of its sample's seed: its start in whole seconds (so that fits
    at different cutoffs sample a shared window alike)."""
    return int(start.timestamp())


class TwoStageRecommender(ListRecommender):
    """ALS + item-kNN + popularity candidates, XGBoost ranker, segment-popularity cold start."""

    chunk_users = 2_000  # candidate features are wide: smaller chunks than plain ALS

    #: How fast, not what: thread and worker counts, settable but not part of the recipe.
    RUNTIME_PARAMS = ("num_threads", "n_jobs", "bag_workers")

    def __init__(
        self,
        recipe: TwoStageRecipe | None = None,
        *,
        num_threads: int = 0,
        n_jobs: int = 0,
        bag_workers: int = 0,
        **params,
    ) -> None:
        """``recipe`` (default: :class:`TwoStageRecipe`'s defaults) with the keyword
        ``params`` replacing its fields; the runtime knobs are ALS threads, XGBoost threads
        and parallel bags (0: automatic)."""
        if recipe is None:
            recipe = TwoStageRecipe()
        elif not isinstance(recipe, TwoStageRecipe):
            raise TypeError(f"recipe must be a TwoStageRecipe, not {type(recipe).__name__}")
        self.recipe = recipe.replace(**params)
        self.num_threads = num_threads
        self.n_jobs = n_jobs
        self.bag_workers = bag_workers

    def get_params(self) -> dict:
        return self.recipe.to_dict()

    def set_params(self, **params) -> TwoStageRecommender:
        """Replace recipe fields and/or runtime knobs; unknown names raise ValueError."""
        runtime = {k: params.pop(k) for k in self.RUNTIME_PARAMS if k in params}
        self.recipe = self.recipe.replace(**params)
        for name, value in runtime.items():
            setattr(self, name, value)
        return self

    @property
    def popular_(self) -> pd.DataFrame:
        """The fallback list (item_id, score, reason), best first: global recent popularity."""
        return self.cold_.global_[["item_id", "score", "reason"]].reset_index(drop=True)

    def feature_importance(self) -> pd.Series:
        """The ranker's gain importance per feature (empty without a ranker)."""
        return self.ranker_.importances() if self.ranker_ is not None else pd.Series(dtype=float)

    @property
    def matrix_(self) -> InteractionMatrix:
        """The serving interaction matrix (its ``user_ids`` are the warm users)."""
        return self.snapshot_.matrix

    # ---- training ----------------------------------------------------------------------
    def fit(
        self,
        events: EncodedEvents | pd.DataFrame,
        cutoff: dt.datetime,
        weights: Mapping[str, float] = DEFAULT_EVENT_WEIGHTS,
        items: pd.DataFrame | None = None,
        users: pd.DataFrame | None = None,
        features: FeatureFrames | None = None,
        chain: LabelChain | None = None,
    ) -> TwoStageRecommender:
        """Train the ranker on label windows before ``cutoff``, then refit stage one on all
        events before ``cutoff`` for serving.

        ``events``: the run's :class:`EncodedEvents` (a frame of string ids is encoded
        first). Training works on codes only: every matrix has the id maps' shape, and the
        side tables are re-keyed to codes; the fitted model names users and items by their
        ids again (``matrix_.user_ids``), for serving. ``features``: the user and item
        feature tables as of ``cutoff`` on the same codes (``build_features``' output), read
        instead of recomputed. ``chain``: label windows this recipe already fitted on the
        same events (:meth:`label_chain`), read where they are this fit's; when it kept a
        stage-one generator at ``cutoff`` itself, that is the serving stage one."""
        clock = StageClock()
        if chain is not None:
            chain.check(self.get_params(), weights)
        encoded = (
            events
            if isinstance(events, EncodedEvents)
            else EncodedEvents.from_frame(before(events, cutoff), weights)
        ).before(cutoff)
        if len(encoded) == 0:
            raise ValueError("cannot train on an empty interaction matrix")
        events, coded_items, coded_users = self._on_codes(encoded, weights, items, users)
        clock.lap("encode")
        pairs, labels, groups, keys, recall = self._training_pairs(
            events, cutoff, coded_items, coded_users, chain
        )
        clock.lap("training pairs")
        self.training_ = {
            "pairs": int(len(labels)),
            "positives": int(labels.sum()),
            "users": int(len(np.unique(groups))),
            "candidate_recall": recall,
            "numerics": check_numerics(),
        }
        self.ranker_ = None
        if len(labels) and labels.sum() > 0:
            self.ranker_ = self._ranker().fit(
                pairs,
                labels,
                groups,
                self.feature_names_,
                split_keys=keys,
                weights=self._window_weights(groups),
            )
        else:
            logger.warning(
                "no labelled pairs before %s: ranking candidates by ALS rank", cutoff.isoformat()
            )
        del pairs
        clock.lap("ranker")
        fitted = chain.generators.get(cutoff) if chain is not None else None
        snap, self.generator_ = self._fit_stage_one(
            events,
            cutoff,
            coded_items,
            coded_users,
            matrix=None if self._pairs is None else self._pairs.before(cutoff),
            frames=features,
            warm_from=self._warm,
            fitted=fitted,
        )
        del self._warm, self._pairs
        clock.lap("stage one")
        self.cold_ = (
            SegmentPopularity(**self._cold_params(events, cutoff, coded_users))
            .fit(events, cutoff, coded_users, coded_items)
            .relabel(encoded.items.ids, users)
        )
        # from here on the model serves: rows and columns are named by the ids again
        matrix = snap.matrix.relabel(encoded.users.ids, encoded.items.ids)
        self.snapshot_ = dataclasses.replace(snap, matrix=matrix)
        self.generator_.matrix_ = matrix
        self.items_ = item_labels(matrix.item_ids, items)
        del self._space
        clock.lap("cold start")
        self.timings_ = clock.laps
        logger.info(
            "two-stage fitted in %.1fs (%s): %s",
            sum(clock.laps.values()),
            ", ".join(f"{k} {v:.1f}s" for k, v in clock.laps.items()),
            self.training_,
        )
        return self

    def label_starts(self, cutoff: dt.datetime) -> list[tuple[int, dt.datetime]]:
        """(window number, start) of the label windows of a fit at ``cutoff``, oldest first
        (window 1 ends at the cutoff)."""
        stride, days = self.recipe.label_stride_days, self.recipe.label_days
        return [
            (window, cutoff - dt.timedelta(days=stride * (window - 1) + days))
            for window in range(self.recipe.label_windows, 0, -1)
        ]

    def label_chain(
        self,
        events: EncodedEvents,
        cutoff: dt.datetime,
        weights: Mapping[str, float] = DEFAULT_EVENT_WEIGHTS,
        items: pd.DataFrame | None = None,
        users: pd.DataFrame | None = None,
        keep: tuple[dt.datetime, ...] = (),
    ) -> LabelChain:
        """The label windows of a fit at ``cutoff`` (exactly those :meth:`fit` computes,
        one warm ALS chain from the oldest), for fits of this recipe on the same events to
        share: ``fit(..., chain=...)`` at ``cutoff`` reads them instead of refitting, and so
        does a fit at an earlier cutoff for the windows both have (the nightly's evaluate,
        at the holdout start, shares all but two of train's). The stage-one generators at
        ``keep`` starts and at the newest window are kept (the next fit's warm start, or its
        serving stage one when its cutoff is one of the starts)."""
        frame, coded_items, coded_users = self._on_codes(
            events.before(cutoff), weights, items, users
        )
        chain = LabelChain(self.get_params(), dict(weights))
        warm = None
        starts = self.label_starts(cutoff)
        for _, start in starts:
            labelled, generator = self._labelled_window(
                frame, start, coded_items, coded_users, warm
            )
            chain.starts.append(start)
            if labelled is None:
                continue
            warm = generator
            chain.windows[start] = labelled
            if start in keep or start == starts[-1][1]:
                chain.generators[start] = generator
        del self._space, self._pairs
        return chain

    def _on_codes(self, encoded: EncodedEvents, weights, items, users):
        """Train on ``encoded``'s codes: the weights and id space every matrix of the fit
        uses; returns the events frame and the side tables re-keyed to codes."""
        self.weights_ = dict(weights)
        self._space = (np.arange(len(encoded.users)), np.arange(len(encoded.items)))
        self._pairs: PairOrder | None = None  # sorted once, when a label window needs it
        return (
            encoded.frame,
            encoded.items.rekey(items, "item_id"),
            encoded.users.rekey(users, "user_id"),
        )

    def _labelled_window(self, events, start, items, users, warm):
        """The labelled candidate pairs of the label window starting at ``start`` and the
        stage-one generator fitted on the events before it (warm from ``warm``); (None,
        None) when the window has no events before it or no user to label."""
        end = start + dt.timedelta(days=self.recipe.label_days)
        if not (events["timestamp"] < start).any():
            return None, None
        if self._pairs is None:
            self._pairs = PairOrder(events, self.weights_, *self._space)
        matrix = self._pairs.before(start)
        truth = window_truth(events, start, end, matrix, self.weights_)
        rows = np.flatnonzero((np.diff(truth.indptr) > 0) & self._enough_history(matrix))
        cap = self.recipe.max_label_users
        if len(rows) > cap:  # bound the pairs: a sample seeded by the window's start
            rng = np.random.default_rng([self.recipe.random_state, _seed_of(start)])
            rows = np.sort(rng.choice(rows, cap, replace=False))
        if len(rows) == 0:
            return None, None
        # user features only for the sampled users: the others are never read here
        snap, generator = self._fit_stage_one(
            events, start, items, users, matrix=matrix, feature_rows=rows, warm_from=warm
        )
        pairs, features = generate_scored_pairs(generator, snap.tables, rows)
        truth_rows = sp.csr_matrix(truth.multiply(_row_mask(rows, truth.shape[0])[:, None]))
        truth_rows.eliminate_zeros()  # or the users left out count as having no candidates
        labelled = LabelledWindow(
            start=start,
            features=features,
            labels=label_pairs(pairs, truth),
            rows=pairs["row"].to_numpy(np.int64),
            recall=candidate_recall(pairs, truth_rows),
            feature_names=list(feature_names(snap.tables)),
        )
        logger.info(
            "label window %s..%s: %d users, %d pairs, %d positives, recall %s",
            start.date(),
            end.date(),
            len(rows),
            len(pairs),
            int(labelled.labels.sum()),
            {k: round(v, 3) for k, v in labelled.recall.items()},
        )
        return labelled, generator

    def _training_pairs(self, events, cutoff, items, users, chain=None):
        """Labelled candidate pairs of every label window (window 1, ending at the cutoff,
        first). The windows are fitted oldest first, each window's ALS starting from the
        previous one's factors (``warm_iterations``); the newest window's generator is kept
        in ``_warm`` for the serving fit to start from. Windows the ``chain`` holds are read
        from it (with its generators as warm starts) instead of fitted."""
        blocks, labels, groups, keys, recalls = [], [], [], [], []
        self._warm = None
        for window, start in self.label_starts(cutoff):
            if chain is not None and chain.covers(start):
                labelled = chain.windows.get(start)
                self._warm = chain.generators.get(start, self._warm if labelled is None else None)
            else:
                labelled, generator = self._labelled_window(events, start, items, users, self._warm)
                if generator is not None:
                    self._warm = generator
            if labelled is None:
                continue
            recalls.append(labelled.recall)
            blocks.append(labelled.features)
            labels.append(labelled.labels)
            groups.append(_query_ids(window, labelled.rows))
            keys.append(labelled.rows)
            self.feature_names_ = labelled.feature_names
        if not blocks:
            return (
                np.empty((0, 0), np.float32),
                np.zeros(0),
                np.zeros(0, np.int64),
                np.zeros(0, np.int64),
                {},
            )
        recall = {k: float(np.mean([r[k] for r in recalls])) for k in recalls[0]}
        blocks, labels, groups, keys = (part[::-1] for part in (blocks, labels, groups, keys))
        return (
            np.vstack(blocks),
            np.concatenate(labels),
            np.concatenate(groups),
            np.concatenate(keys),
            recall,
        )

    def _window_weights(self, groups: np.ndarray) -> np.ndarray | None:
        """Query weights that halve every ``label_halflife_days`` a label window ends before
        the cutoff (the newest window weighs 1); None (all equal) without a half-life."""
        halflife, stride = self.recipe.label_halflife_days, self.recipe.label_stride_days
        if not halflife:
            return None
        ends_before = stride * (_window_of(groups) - 1)  # days, per pair
        return np.power(0.5, ends_before / float(halflife)).astype(np.float32)

    def _fit_stage_one(
        self,
        events,
        cutoff,
        items,
        users,
        matrix=None,
        feature_rows=None,
        frames=None,
        warm_from=None,
        fitted=None,
    ) -> tuple[Snapshot, CandidateGenerator]:
        """The snapshot at ``cutoff`` and stage one fitted on it (warm from ``warm_from``),
        or ``fitted`` (a generator already fitted on the same events) put on it."""
        snap = build_snapshot(
            events,
            cutoff,
            self.weights_,
            items,
            users,
            n_recent=self.recipe.n_recent,
            space=self._space,
            popular_days=self.recipe.popular_days,
            matrix=matrix,
            feature_rows=feature_rows,
            frames=frames,
        )
        self.feature_names_ = feature_names(snap.tables)
        if fitted is not None:
            return snap, fitted.attach(snap.matrix, snap.recent, snap.popular_cols)
        return snap, self._generator().fit(
            snap.matrix, snap.recent, snap.popular_cols, warm_from=warm_from
        )

    def _generator(self) -> CandidateGenerator:
        """Stage one: the recipe fields named like CandidateGenerator's parameters."""
        return CandidateGenerator(
            **self.recipe.kwargs_for(CandidateGenerator), num_threads=self.num_threads
        )

    def _ranker(self) -> Ranker:
        """Stage two: the recipe fields named like Ranker's parameters (its validation
        split, early stopping and prior keep Ranker's defaults)."""
        return Ranker(
            **self.recipe.kwargs_for(Ranker), n_jobs=self.n_jobs, bag_workers=self.bag_workers
        )

    def _cold_params(self, events, cutoff, users) -> dict:
        """Cold-start list settings: given, or selected by time-series CV when "auto"."""
        if self.recipe.cold_segment == "auto":
            return select_cold_start(events, cutoff, users, shrinkage=self.recipe.cold_shrinkage)
        return {
            "days": self.recipe.popular_days,
            "shrinkage": self.recipe.cold_shrinkage,
            "segment": tuple(s for s in str(self.recipe.cold_segment or "").split("|") if s),
        }

    def _enough_history(self, matrix: InteractionMatrix) -> np.ndarray:
        return np.diff(matrix.confidence.indptr) >= self.recipe.min_history

    # ---- scoring -----------------------------------------------------------------------
    def rank_candidates(self, rows: np.ndarray, chunk_users: int = 2_000) -> pd.DataFrame:
        """Serving candidates of warm user ``rows`` with the ranker's ``score``."""
        parts = []
        for start in range(0, len(rows), chunk_users):
            pairs, features = generate_scored_pairs(
                self.generator_, self.snapshot_.tables, rows[start : start + chunk_users]
            )
            if self.ranker_ is not None:
                pairs["score"] = self.ranker_.predict(features)
            else:
                pairs["score"] = (-pairs["als_rank"]).astype(np.float32)
            parts.append(pairs)
        return (
            pd.concat(parts, ignore_index=True)
            if parts
            else pd.DataFrame(columns=["row", "item", "score"])
        )

    def _recommend_chunk(self, users: np.ndarray, n: int) -> pd.DataFrame:
        matrix = self.snapshot_.matrix
        rows = matrix.user_index(users)
        warm = rows >= 0
        warm[warm] = np.diff(matrix.confidence.indptr)[rows[warm]] >= self.recipe.min_history
        personal = self._personal(users[warm], rows[warm], n)
        return self._fill_from_fallback(personal, users, n)

    def recommend_observed(self, user_ids, n: int, observe) -> pd.DataFrame:
        """:meth:`recommend`, also handing each chunk's ranked candidates to ``observe(rows,
        pairs)`` (``pairs``: ``row``, ``item``, the stage-one columns and ``score``): one
        candidate pass for the lists and for metrics over every candidate (evaluate's ranker
        AUC and candidate recall) instead of two."""
        self._observe = observe
        try:
            return self.recommend(user_ids, n)
        finally:
            self._observe = None

    def _personal(self, users: np.ndarray, rows: np.ndarray, n: int) -> pd.DataFrame:
        if len(rows) == 0:
            return empty_lists()
        pairs = self.rank_candidates(rows)
        observe = getattr(self, "_observe", None)
        if observe is not None:
            observe(rows, pairs)
        order, rank = ranked_within(
            pairs["row"].to_numpy(), pairs["score"].to_numpy(), pairs["item"].to_numpy()
        )
        pairs = pairs.iloc[order[rank <= n]].reset_index(drop=True)
        pairs["rank"] = rank[rank <= n]
        user_of_row = pd.Series(users, index=rows)
        return pd.DataFrame(
            {
                "user_id": user_of_row.loc[pairs["row"].to_numpy()].to_numpy(dtype=object),
                "rank": pairs["rank"].to_numpy(np.int16),
                "item_id": self.snapshot_.matrix.item_ids[pairs["item"].to_numpy()],
                "score": pairs["score"].to_numpy(np.float32),
                "reason": self._explain(pairs),
                "source": "ranker",
            }
        )

    def _fallback_candidates(self, users: np.ndarray, n: int) -> pd.DataFrame:
        """The cold-start list (by segment where known) for each of ``users``."""
        return self.cold_.lists_for(users).assign(source="popular")

    def _seen(self, user_ids: pd.Series, item_ids: pd.Series) -> np.ndarray:
        matrix = self.snapshot_.matrix
        rows = matrix.user_index(user_ids.to_numpy(object))
        cols = matrix.item_index(item_ids.to_numpy(object))
        ok = (rows >= 0) & (cols >= 0)
        seen = np.zeros(len(rows), bool)
        seen[ok] = gather(matrix.confidence, rows[ok], cols[ok]) > 0
        return seen

    def _explain(self, picks: pd.DataFrame) -> np.ndarray:
        """ "because you <verb> <title>" naming the history item closest to each pick (by kNN
        similarity when the pick has a kNN link, else in ALS factor space; ties go to the
        lower item column); picks with neither a link nor an ALS origin are explained by
        their popularity.

        Each pick is paired with its user's strongest history items (a run of rows per pick,
        in pick order) and the closest one is found by a maximum per run, without sorting."""
        matrix = self.snapshot_.matrix
        rows, items = picks["row"].to_numpy(), picks["item"].to_numpy()
        knn_all, from_als = picks["knn_all"].to_numpy(), picks["from_als"].to_numpy()
        out = self._popular_reason(items)
        hist = _strongest_history(matrix, np.unique(rows))  # sorted by row
        hist_row = hist["row"].to_numpy()
        first = np.searchsorted(hist_row, rows, side="left")
        counts = np.searchsorted(hist_row, rows, side="right") - first
        pick = np.repeat(np.arange(len(rows)), counts)  # each pick's history run
        runs = np.r_[0, np.cumsum(counts)]
        at = first[pick] + np.arange(len(pick)) - runs[:-1][pick]
        hist_col = hist["hist"].to_numpy()[at]
        item_col = items[pick]
        # each similarity only where it is used: kNN for picks with a kNN link, else ALS
        use_knn = knn_all[pick] > 0
        sim = np.empty(len(pick), np.float32)
        sim[use_knn] = gather(
            self.generator_.knn_.similarity_, hist_col[use_knn], item_col[use_knn]
        )
        factors = self._unit_item_factors()
        sim[~use_knn] = row_dots(factors, hist_col[~use_knn], factors, item_col[~use_knn])
        explained = np.flatnonzero(counts > 0)
        if len(pick) and not np.isnan(sim).any():
            best = np.maximum.reduceat(sim, runs[explained])  # the highest similarity
            top = sim == np.repeat(best, counts[explained])
            lowest = np.minimum.reduceat(
                np.where(top, hist_col, hist_col.max() + 1), runs[explained]
            )
            chosen = np.flatnonzero(top & (hist_col == np.repeat(lowest, counts[explained])))
        else:  # NaN similarities: the order ranked_within gives them (last)
            order, rank = ranked_within(pick, sim, hist_col)
            chosen = np.sort(order[rank == 1])
        titles = self.items_["title"].astype(object).to_numpy()
        verbs = np.array([VERBS.get(t, "engaged with") for t in matrix.event_types], dtype=object)
        codes = hist["code"].to_numpy()[at[chosen]]
        text = "because you " + verbs[codes] + " " + titles[hist_col[chosen]]
        target = pick[chosen]
        linked = (knn_all[target] > 0) | (from_als[target] > 0)
        out[target[linked]] = text[linked]
        return out

    def _unit_item_factors(self) -> np.ndarray:
        """The ALS item factors scaled to unit length (cosine in factor space), computed once
        per model rather than once per chunk of users."""
        factors = getattr(self, "_unit_factors", None)
        if factors is None:
            factors = normalise_rows(np.asarray(self.generator_.als_.item_factors, np.float32))
            self._unit_factors = factors
        return factors

    def _popular_reason(self, cols: np.ndarray) -> np.ndarray:
        """The popularity reason of each item column (a new array; the reasons of every
        item are worded once per model)."""
        reasons = getattr(self, "_popular_reasons", None)
        if reasons is None:
            reasons = popular_reasons(
                pd.Series(self.snapshot_.matrix.item_ids), self.items_, self.recipe.popular_days
            )
            self._popular_reasons = reasons
        return reasons[np.asarray(cols, np.int64)]

    def use_threads(self, threads: int) -> None:
        """ALS top-N and XGBoost threads while listing (0: every CPU); the lists do not
        depend on it (each user's top-N and each row's prediction are computed alone)."""
        self.num_threads = self.n_jobs = threads
        self.generator_.num_threads = self.generator_.als_.num_threads = threads
        if self.ranker_ is not None:
            self.ranker_.n_jobs = threads

    # ---- identity and persistence ------------------------------------------------------
    def fingerprint(self) -> str:
        """SHA-256 of everything the model serves from: equal fingerprints, equal lists."""
        digest = hashlib.sha256()
        digest.update(json.dumps(self.get_params(), sort_keys=True).encode())
        for array in self._arrays().values():
            digest.update(np.ascontiguousarray(np.asarray(array)).tobytes())
        for ids in (self.matrix_.user_ids, self.matrix_.item_ids):
            digest.update("\x1f".join(map(str, ids)).encode())
        for frame in (self.items_, self.cold_.global_, self.cold_.segments_):
            digest.update(frame.to_csv(index=False).encode())
        if self.ranker_ is not None:
            for raw in self.ranker_.boosters_raw():
                digest.update(raw)
        return digest.hexdigest()

    def _arrays(self) -> dict[str, np.ndarray]:
        snap, gen = self.snapshot_, self.generator_
        arrays = {f"table_{k}": v for k, v in snap.tables.arrays().items()}
        for name, matrix in (
            ("confidence", snap.matrix.confidence),
            ("strongest", snap.matrix.strongest),
            ("recent", snap.recent),
            ("similarity", gen.knn_.similarity_),
        ):
            arrays.update(
                {
                    f"{name}_data": matrix.data,
                    f"{name}_indices": matrix.indices,
                    f"{name}_indptr": matrix.indptr,
                }
            )
        arrays.update(
            user_factors=np.asarray(gen.als_.user_factors),
            item_factors=np.asarray(gen.als_.item_factors),
            popular_cols=snap.popular_cols,
        )
        return arrays

    def save(self, folder: Path) -> Path:
        """Write the fitted model to ``folder`` (created); returns the folder. The sparse
        matrices are stored uncompressed: zlib cost train ~20 s at 200k users, for files
        about a third smaller."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        snap = self.snapshot_
        self.generator_.save_models(folder)
        for name, matrix in (
            ("confidence", snap.matrix.confidence),
            ("strongest", snap.matrix.strongest),
            ("recent", snap.recent),
        ):
            sp.save_npz(folder / f"{name}.npz", matrix, compressed=False)
        np.savez(
            folder / "tables.npz",
            popular_cols=snap.popular_cols,
            **{f: getattr(snap.tables, f) for f in _TABLE_FIELDS},
        )
        pd.DataFrame({"user_id": snap.matrix.user_ids}).to_parquet(
            folder / "users.parquet", index=False
        )
        self.items_.to_parquet(folder / "items.parquet", index=False)
        self.cold_.global_.to_parquet(folder / "cold_global.parquet", index=False)
        self.cold_.segments_.to_parquet(folder / "cold_segments.parquet", index=False)
        if self.cold_.users_ is not None:
            self.cold_.users_.to_parquet(folder / "side_users.parquet", index=False)
        if self.ranker_ is not None:
            self.ranker_.save(folder)
        meta = {
            "kind": "twostage",
            "params": self.get_params(),
            "event_types": list(snap.matrix.event_types),
            "cutoff": snap.cutoff.isoformat(),
            "weights": self.weights_,
            "feature_names": self.feature_names_,
            "names": {
                "user": snap.tables.user_names,
                "item": snap.tables.item_names,
                "segments": snap.tables.segment_names,
            },
            "ranker": None
            if self.ranker_ is None
            else {
                **self.ranker_.get_params(),
                "n_trees": self.ranker_.n_trees_,
                "validation": self.ranker_.validation_,
            },
            "training": self.training_,
            "cold": self.cold_.get_params(),
        }
        (folder / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        return folder

    @classmethod
    def load(cls, folder: Path) -> TwoStageRecommender:
        """Inverse of :meth:`save`."""
        folder = Path(folder)
        meta = json.loads((folder / "meta.json").read_text())
        self = cls(TwoStageRecipe.from_dict(meta["params"]))
        self.weights_, self.feature_names_ = meta["weights"], meta["feature_names"]
        self.training_ = meta["training"]
        items = pd.read_parquet(folder / "items.parquet")
        user_ids = pd.read_parquet(folder / "users.parquet")["user_id"].to_numpy(object)
        matrix = InteractionMatrix(
            user_ids,
            items["item_id"].to_numpy(object),
            sp.load_npz(folder / "confidence.npz").tocsr(),
            sp.load_npz(folder / "strongest.npz").tocsr(),
            tuple(meta["event_types"]),
        )
        with np.load(folder / "tables.npz", allow_pickle=False) as arrays:
            stored = {k: arrays[k] for k in arrays.files}
        names = meta["names"]
        tables = FeatureTables(
            **{f: stored[f] for f in _TABLE_FIELDS},
            user_names=tuple(names["user"]),
            item_names=tuple(names["item"]),
            segment_names=tuple(names["segments"]),
        )
        recent = sp.load_npz(folder / "recent.npz").tocsr()
        self.snapshot_ = Snapshot(
            dt.datetime.fromisoformat(meta["cutoff"]),
            matrix,
            recent,
            tables,
            stored["popular_cols"],
        )
        self.generator_ = (
            self._generator().load_models(folder).attach(matrix, recent, stored["popular_cols"])
        )
        self.ranker_ = None
        if meta["ranker"] is not None:
            self.ranker_ = self._ranker().load_model(folder, meta["ranker"]["n_trees"])
            self.ranker_.validation_ = meta["ranker"]["validation"]
            self.ranker_.feature_names_ = self.feature_names_
        side = folder / "side_users.parquet"
        cold_params = meta["cold"]
        cold = SegmentPopularity(
            days=cold_params["days"],
            segment=tuple(cold_params["segment"]),
            shrinkage=cold_params["shrinkage"],
        )
        cold.global_ = pd.read_parquet(folder / "cold_global.parquet")
        cold.segments_ = pd.read_parquet(folder / "cold_segments.parquet")
        cold.users_ = pd.read_parquet(side) if side.exists() else None
        self.cold_ = cold
        self.items_ = items
        return self


def build_snapshot(
    events: pd.DataFrame,
    cutoff: dt.datetime,
    weights: Mapping[str, float],
    items: pd.DataFrame | None,
    users: pd.DataFrame | None,
    n_recent: int = 20,
    popular_days: int = 30,
    matrix: InteractionMatrix | None = None,
    feature_rows: np.ndarray | None = None,
    space: tuple[np.ndarray, np.ndarray] | None = None,
    frames: FeatureFrames | None = None,
) -> Snapshot:
    """Matrix (``build_matrix`` of the events before ``cutoff`` on the id ``space``, the
    row and column labels of encoded events, unless given), recent items and feature tables
    (both only for ``feature_rows`` when given) and popular columns."""
    events = before(events, cutoff)
    if matrix is None:
        matrix = build_matrix(events, weights, *(space or (None, None)))
    recent = recent_history(
        events, cutoff, matrix.user_ids, matrix.item_ids, n_recent, rows_only=feature_rows
    )
    tables = build_feature_tables(
        events,
        cutoff,
        matrix.user_ids,
        matrix.item_ids,
        matrix.confidence,
        items,
        users,
        segment_days=popular_days,
        feature_rows=feature_rows,
        frames=frames,
    )
    recent_top = _popular_columns(
        events[events["timestamp"] >= cutoff - dt.timedelta(days=popular_days)], matrix.item_ids
    )
    overall_top = _popular_columns(events, matrix.item_ids)
    # Interleave recent and all-time popularity so both are among the first candidates.
    order = np.full(2 * len(matrix.item_ids), -1, np.int64)
    order[0 : 2 * len(recent_top) : 2] = recent_top
    order[1 : 2 * len(overall_top) : 2] = overall_top
    order = order[order >= 0]
    _, first = np.unique(order, return_index=True)
    return Snapshot(cutoff, matrix, recent, tables, order[np.sort(first)])


def _popular_columns(events: pd.DataFrame, item_ids: np.ndarray) -> np.ndarray:
    """Item columns with any distinct users in ``events``, most users first (ties by column)."""
    counts = count_distinct(events).reindex(item_ids).fillna(0).to_numpy(np.float64)
    popular = np.lexsort((np.arange(len(counts)), -counts))
    return popular[counts[popular] > 0]


def window_truth(
    events: pd.DataFrame,
    start: dt.datetime,
    end: dt.datetime,
    matrix: InteractionMatrix,
    weights: Mapping[str, float],
) -> sp.csr_matrix:
    """users x items (``matrix``'s ids), 1 for pairs first engaged with in ``[start, end)``."""
    window = events[(events["timestamp"] >= start) & (events["timestamp"] < end)]
    test = build_matrix(window, weights, user_ids=matrix.user_ids, item_ids=matrix.item_ids)
    truth = (test.confidence > 0).astype(np.float32).tocsr()
    truth = (truth - truth.multiply(matrix.confidence > 0)).tocsr()
    truth.eliminate_zeros()
    return with_history(truth, matrix)


def _query_ids(window: int, rows: np.ndarray) -> np.ndarray:
    """Ranking query id of each (label window, user row) pair: sorted by window, then row."""
    return np.asarray(rows, np.int64) + (np.int64(window) << 32)


def _window_of(query_ids: np.ndarray) -> np.ndarray:
    """The label window (1 = ending at the cutoff) of each :func:`_query_ids` id."""
    return np.asarray(query_ids, np.int64) >> 32


def _row_mask(rows: np.ndarray, n: int) -> np.ndarray:
    mask = np.zeros(n, np.float32)
    mask[rows] = 1.0
    return mask


def _strongest_history(matrix: InteractionMatrix, rows: np.ndarray) -> pd.DataFrame:
    """(row, hist item, event code) of each user's strongest items, for reasons."""
    conf = matrix.confidence[rows].tocoo()
    code = matrix.strongest[rows].tocoo()
    frame = pd.DataFrame(
        {
            "row": rows[conf.row],
            "hist": conf.col,
            "c": conf.data,
            "code": code.data.astype(np.int64),
        }
    )
    order, rank = ranked_within(
        frame["row"].to_numpy(), frame["c"].to_numpy(), frame["hist"].to_numpy()
    )
    return frame.iloc[order[rank <= HISTORY_FOR_REASONS]][["row", "hist", "code"]]
