"""The nightly run, stage by stage, as plain functions the DAG (or a test) calls.

Each stage reads its inputs from the run folder (``Settings.run_dir(cutoff)``), writes its
outputs there as Parquet/JSON, and returns a small JSON-able dict (what XCom carries). The run
folder is keyed on the cutoff, so re-running a date overwrites the same files: every stage is
idempotent, and the same inputs give the same outputs.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.core.config import DEFAULT_USER, EVENTS_SUITE, Settings

logger = logging.getLogger(__name__)

SUITE_PATH = EVENTS_SUITE
STAGES = (
    "ingest",
    "validate",
    "build_features",
    "tune",
    "label_windows",
    "train",
    "evaluate",
    "register",
    "publish",
)

#: ``label_windows``' output in the run folder: the label windows train and evaluate share.
LABEL_CHAIN_DIR = "label_chain"


@contextmanager
def _stage(settings: Settings, cutoff: dt.datetime, name: str) -> Iterator[dict]:
    """Time a stage, log it, and save its result dict as ``<run>/<name>.json``."""
    result: dict = {}
    started = time.perf_counter()
    logger.info("stage %s: start (cutoff %s)", name, cutoff.isoformat())
    yield result
    result["seconds"] = round(time.perf_counter() - started, 3)
    _write_json(settings.run_dir(cutoff) / f"{name}.json", result)
    logger.info("stage %s: done in %.2fs", name, result["seconds"])


def ingest(settings: Settings, cutoff: dt.datetime, dsn: str | None = None) -> dict:
    """Landing files -> lake; then the run's point-in-time snapshot -> ``events_raw.parquet``.

    The run's first stage checks its configuration first (the serving ``dsn`` and schema,
    the column mapping): a ConfigError here, not at ``register`` after hours of training."""
    from pipeline.lake.freshness import WindowCheck, check_window
    from pipeline.lake.ingest import ingest_lake
    from pipeline.lake.snapshot import write_snapshot
    from pipeline.lake.storage import lake_watermark
    from pipeline.serving.pseudonyms import pseudonym_recorder
    from pipeline.serving.store import check_config

    with _stage(settings, cutoff, "ingest") as result:
        result["serving"] = check_config(dsn)
        # with a key, the pseudonym mapping goes to the serving DB (``dsn``, else SQLite)
        report = ingest_lake(
            settings, SUITE_PATH, pseudonym_recorder(dsn, settings.serving_sqlite_path)
        )
        result["pseudonymised"] = settings.pseudonym_key is not None
        path = settings.run_dir(cutoff) / "events_raw.parquet"
        snapshot = write_snapshot(settings.lake_events_dir, cutoff, settings.lookback_days, path)
        window = WindowCheck(
            cutoff,
            snapshot.start,
            snapshot.rows,
            snapshot.newest,
            lake_watermark(settings.lake_events_dir),
        )
        result.update(
            report.to_dict(),
            snapshot_rows=snapshot.rows,
            snapshot_path=str(path),
            **window.to_dict(),
        )
        check_window(
            window,
            min_events=settings.min_window_events,
            max_staleness_days=settings.max_staleness_days,
        )
    return result


def validate(settings: Settings, cutoff: dt.datetime) -> dict:
    """Run the expectation suite; bad rows go to quarantine; clean rows -> ``events.parquet``.

    Rows that passed the same suite (and event types) when they were ingested are not checked
    again: only rows of files ingested before landing validation, or under another suite, are.
    A validation that checked rows is recorded once in the shared Data Docs site
    (``<data_dir>/gx/data_docs``) and the validation log, beside those of the ingests."""
    from pipeline.lake.ingest import read_manifest
    from pipeline.lake.validate import data_docs_dir, suite_digest, validate_events_file

    run = settings.run_dir(cutoff)
    digest = suite_digest(SUITE_PATH, settings.event_weights)
    by_name: dict[str, bool] = {}
    for record in read_manifest(settings.lake_events_dir.parent):
        by_name[record["file"]] = (
            by_name.get(record["file"], True) and record.get("validated") == digest
        )
    with _stage(settings, cutoff, "validate") as result:
        report = validate_events_file(
            run / "events_raw.parquet",
            clean_path=run / "events.parquet",
            suite_path=SUITE_PATH,
            cutoff=cutoff,
            allowed_event_types=sorted(settings.event_weights),
            max_bad_row_share=settings.max_bad_row_share,
            quarantine_path=run / "quarantine.parquet",
            data_docs_dir=data_docs_dir(settings.data_dir),
            clock_skew=dt.timedelta(seconds=settings.clock_skew_seconds),
            chunk_rows=settings.chunk_rows,
            validated_sources=[name for name, ok in by_name.items() if ok],
        )
        result.update(report.to_dict())
        logger.info("validate: data docs at %s", report.data_docs_path)
    return result


def build_features(settings: Settings, cutoff: dt.datetime) -> dict:
    """Encode the validated events once, then build the feature tables the model reads.

    Writes ``events_encoded.parquet`` with the run's user and item id maps
    (:mod:`pipeline.core.ids`), which every later stage reads instead of ``events.parquet``,
    and the RFM/context features per user and popularity/age features per item as of the
    cutoff (``train`` reads them) and as of the holdout start (``evaluate`` reads them), under
    ``<run>/features/as_of=<time>/``.

    Events of a type weighted 0 (``impression`` unless configured) are left out here, at the
    encoding, and only here: no later stage (features, training, holdout, publish's consumed
    filter) sees them; they stay in the lake and ``events.parquet``. ``left_out`` in the
    result counts them per type.
    """
    from pipeline.core.ids import encode_events_file
    from pipeline.features.tables import FeatureFrames
    from pipeline.lake.readers import read_side_file

    run = settings.run_dir(cutoff)
    with _stage(settings, cutoff, "build_features") as result:
        encoded = encode_events_file(run / "events.parquet", run, settings.event_weights)
        items = encoded.items.rekey(read_side_file(settings.landing_dir / "items.csv"), "item_id")
        shutil.rmtree(run / "features", ignore_errors=True)
        for as_of in (cutoff, _holdout_start(settings, cutoff)):
            frames = FeatureFrames.build(encoded.before(as_of).frame, as_of, items)
            frames.write(run / "features")
        result.update(
            events=len(encoded),
            left_out=dict(encoded.left_out),
            users=len(encoded.users),
            items=len(encoded.items),
            user_feature_columns=len(frames.user.columns) - 1,
            item_feature_columns=len(frames.item.columns) - 1,
        )
    return result


def _holdout_start(settings: Settings, cutoff: dt.datetime) -> dt.datetime:
    return cutoff - dt.timedelta(days=settings.holdout_days)


def _encoded(settings: Settings, cutoff: dt.datetime, columns: tuple[str, ...] | None = None):
    """The run's encoded events (``build_features``' output)."""
    from pipeline.core.ids import EncodedEvents

    return EncodedEvents.read(settings.run_dir(cutoff), columns)


def _features(settings: Settings, cutoff: dt.datetime, as_of: dt.datetime):
    """The run's user and item feature tables as of ``as_of`` (``build_features``' output);
    None when they were not built (then the model computes them)."""
    from pipeline.features.tables import FeatureFrames

    root = settings.run_dir(cutoff) / "features"
    try:
        return FeatureFrames.read(root, as_of)
    except FileNotFoundError:
        return None


def tune(settings: Settings, cutoff: dt.datetime) -> dict:
    """The model params this run trains and evaluates with: the settings' own, or (``tune``)
    the best of an expanding-window CV search within ``tune_budget_minutes``, whose trials go
    to ``tuning.csv``. ``train`` and ``evaluate`` both read ``params`` from here, so they can
    run side by side."""
    from pipeline.registry.tracking import stage_run

    run = settings.run_dir(cutoff)
    with (
        _stage(settings, cutoff, "tune") as result,
        stage_run(run, cutoff, "tune", new_night=True) as night,
    ):
        result["mlflow_run_id"] = night
        params = _twostage(settings).get_params()
        if settings.tune:
            from pipeline.evaluation.tuning import tune_twostage
            from pipeline.lake.readers import read_side_file

            tuned = tune_twostage(
                _encoded(settings, cutoff),
                cutoff,
                params,
                settings.tune_budget_minutes,
                read_side_file(settings.landing_dir / "items.csv"),
                _side_users(settings),
                settings.event_weights,
                n_folds=3,
                horizon_days=settings.holdout_days,
                random_state=settings.seed,
            )
            tuned.trials.to_csv(run / "tuning.csv", index=False)
            params = tuned.best_params
            result["tuning"] = tuned.to_dict()
            _write_json(run / "tuning.json", result["tuning"])
            _log_artifacts(night, [run / "tuning.csv", run / "tuning.json"], "tuning")
        result.update(tuned=settings.tune, params=params)
    return result


def _tuned_params(settings: Settings, cutoff: dt.datetime) -> dict:
    """The params ``tune`` chose for this run (the settings' own when it has not run)."""
    path = settings.run_dir(cutoff) / "tune.json"
    return _read_json(path)["params"] if path.exists() else _twostage(settings).get_params()


def label_windows(settings: Settings, cutoff: dt.datetime) -> dict:
    """Fit the label windows of the model ``train`` fits (their stage-one chain, oldest
    first, and the labelled candidate pairs of each) once, for ``train`` and ``evaluate``.

    Both fit the same recipe: train at the cutoff, evaluate at the holdout start. With the
    defaults (14-day label windows a week apart, a 14-day holdout) evaluate's label windows
    are train's but the two oldest, and evaluate's serving stage one is train's newest window
    (events before the holdout start): 9 stage-one fits a night instead of 14. ``train``
    gives exactly the model it would fit alone; evaluate's model differs from one fitted
    alone only in where its ALS chain started (its two older windows start their own). The
    chain goes to ``<run>/label_chain/``."""
    from pipeline.lake.readers import read_side_file

    run = settings.run_dir(cutoff)
    with _stage(settings, cutoff, "label_windows") as result:
        model = _twostage(settings, _tuned_params(settings, cutoff))
        holdout = _holdout_start(settings, cutoff)
        starts = [start for _, start in model.label_starts(cutoff)]
        # evaluate's serving stage one: the chain's own when the holdout starts a window,
        # else fitted warm from evaluate's newest window
        keep = (holdout,) if holdout in starts else (model.label_starts(holdout)[-1][1],)
        chain = model.label_chain(
            _encoded(settings, cutoff),
            cutoff,
            settings.event_weights,
            read_side_file(settings.landing_dir / "items.csv"),
            _side_users(settings),
            keep=keep,
        )
        chain.save(run / LABEL_CHAIN_DIR)
        result.update(
            windows=[start.isoformat() for start in chain.windows],
            pairs=int(sum(len(w.labels) for w in chain.windows.values())),
            stage_one_kept=[start.isoformat() for start in chain.generators],
            path=str(run / LABEL_CHAIN_DIR),
        )
    return result


def _label_chain(settings: Settings, cutoff: dt.datetime, params: dict):
    """``label_windows``' chain when it was fitted with ``params`` and the run's weights;
    None (the fit makes its own windows) when it is missing or for another recipe."""
    from pipeline.models.twostage import LabelChain

    folder = settings.run_dir(cutoff) / LABEL_CHAIN_DIR
    if not (folder / "chain.json").exists():
        logger.info("no label chain in %s: the model fits its own label windows", folder)
        return None
    chain = LabelChain.load(folder)
    try:
        chain.check(params, settings.event_weights)
    except ValueError as exc:
        logger.warning("not using %s: %s", folder, exc)
        return None
    return chain


def train(settings: Settings, cutoff: dt.datetime) -> dict:
    """Fit the two-stage recommender with this run's params (``tune``) on every event before
    the cutoff; save the bundle to ``<run>/model``."""
    from pipeline.lake.readers import read_side_file
    from pipeline.registry.tracking import stage_run

    run = settings.run_dir(cutoff)
    with _stage(settings, cutoff, "train") as result, stage_run(run, cutoff, "train") as night:
        result["mlflow_run_id"] = night
        _log_events_dataset(settings, cutoff, night, "training", {"window_end": cutoff.isoformat()})
        items = read_side_file(settings.landing_dir / "items.csv")
        users = _side_users(settings)
        model = _twostage(settings, _tuned_params(settings, cutoff))
        model.fit(
            _encoded(settings, cutoff),
            cutoff,
            settings.event_weights,
            items,
            users,
            features=_features(settings, cutoff, cutoff),
            chain=_label_chain(settings, cutoff, model.get_params()),
        )
        bundle = run / "model"
        shutil.rmtree(bundle, ignore_errors=True)
        model.save(bundle)
        matrix = model.matrix_
        result.update(
            users=matrix.shape[0],
            items=matrix.shape[1],
            pairs=int(matrix.confidence.nnz),
            bundle_path=str(bundle),
            params=model.get_params(),
            training=model.training_,
            ranker_validation=(model.ranker_.validation_ if model.ranker_ is not None else None),
        )
    return result


def evaluate(settings: Settings, cutoff: dt.datetime, k: int = 10) -> dict:
    """Holdout metrics at ``k`` for the model recipe (fitted before the holdout) and baselines.

    The row ``model`` is the deployable model (the two-stage recommender, with this run's
    params from ``tune``, refitted before the holdout); ``als`` is the model's own stage-one
    ALS alone (what the ranker adds over ALS's ranking), a baseline like the popularity
    rows. Also: the ranker's AUC-ROC / PR-AUC and candidate recall on the holdout,
    cold-start metrics for users first seen in the holdout, and a bias audit per segment
    (``bias_audit.csv``).
    """
    from pipeline.evaluation.holdout import segment_audit
    from pipeline.registry.tracking import stage_run

    run = settings.run_dir(cutoff)
    with (
        _stage(settings, cutoff, "evaluate") as result,
        stage_run(run, cutoff, "evaluate") as night,
    ):
        result["mlflow_run_id"] = night
        _log_events_dataset(
            settings,
            cutoff,
            night,
            "evaluation",
            {
                "train_end": _holdout_start(settings, cutoff).isoformat(),
                "holdout": f"[{_holdout_start(settings, cutoff).isoformat()}, "
                f"{cutoff.isoformat()})",
            },
        )
        holdout = _holdout(
            settings,
            _encoded(settings, cutoff),
            cutoff,
            k,
            _tuned_params(settings, cutoff),
            features=_features(settings, cutoff, _holdout_start(settings, cutoff)),
            shared_windows=True,
        )
        table, extra = holdout.table, holdout.extra
        table.to_csv(run / "metrics.csv")
        holdout.user_ndcg.to_frame().to_parquet(run / USER_NDCG_FILE)
        segment_audit(extra.pop("per_user"), extra.pop("segments")).to_csv(
            run / "bias_audit.csv", index=False
        )
        best_baseline = table.drop(index=["model", "als"])["ndcg"].max()
        model_ndcg = table.loc["model", "ndcg"]
        gate = bool(model_ndcg >= best_baseline)
        metrics = {
            f"{m}_{c}_at_{k}": round(float(table.loc[m, c]), 6)
            for m in table.index
            for c in table.columns
            if c != "users"
        }
        metrics.update({key: round(float(value), 6) for key, value in extra.items()})
        # An undefined metric (no new user in the holdout: no cold-start nDCG) is left out:
        # NaN is no JSON (XCom) and no MLflow metric.
        undefined = sorted(key for key, value in metrics.items() if value != value)
        if undefined:
            logger.info("evaluate: undefined on this holdout: %s", ", ".join(undefined))
        metrics = {key: value for key, value in metrics.items() if value == value}
        result.update(
            k=k,
            holdout_days=settings.holdout_days,
            users=int(table["users"].iloc[0]),
            metrics=metrics,
            gate_passed=gate,
            gate_reason=(
                f"ndcg@{k} {model_ndcg:.4f} {'>=' if gate else '<'} best baseline "
                f"{best_baseline:.4f}"
            ),
        )
    return result


def _log_events_dataset(
    settings: Settings, cutoff: dt.datetime, night: str, context: str, tags: dict
) -> None:
    """The run's encoded events as an input dataset of the night's MLflow run."""
    import pyarrow.parquet as pq

    from pipeline.core.ids import EVENTS_FILE
    from pipeline.registry.tracking import log_dataset

    path = settings.run_dir(cutoff) / EVENTS_FILE
    parquet = pq.ParquetFile(path)
    sample = (
        parquet.read_row_group(0).slice(0, 100).to_pandas()
        if parquet.num_row_groups
        else parquet.schema_arrow.empty_table().to_pandas()
    )
    # one input per (name, digest) in MLflow: the holdout view of the file gets its own name
    name = f"{'events' if context == 'training' else 'holdout'}-{cutoff:%Y-%m-%d}"
    log_dataset(
        night,
        path,
        name=name,
        context=context,
        sample=sample,
        tags={"rows": parquet.metadata.num_rows, **tags},
    )


def _log_artifacts(night: str, paths: list[Path], folder: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    for path in paths:
        if path.exists():
            client.log_artifact(night, str(path), folder)


def holdout_table(settings: Settings, events, cutoff: dt.datetime, k: int = 10) -> pd.DataFrame:
    """Metrics at ``k`` per model on the holdout: the recipe in ``settings`` and the baselines.

    Pure in its inputs, so the promotion gate can re-score the champion's recipe on exactly
    the same split.
    """
    return _holdout(settings, events, cutoff, k, extras=False).table


#: Per-user nDCG@k of the run's model on the holdout's warm users (the gate's paired bootstrap).
USER_NDCG_FILE = "holdout_user_ndcg.parquet"


@dataclass(frozen=True)
class _Holdout:
    table: pd.DataFrame  # metrics per model (rows model, als, popularity, popularity_30d)
    user_ndcg: pd.Series  # the model's nDCG@k per warm user (index user_id)
    extra: dict  # ranker AUC, candidate recall, cold-start metrics, bias-audit inputs


def _holdout(
    settings: Settings,
    events,
    cutoff: dt.datetime,
    k: int = 10,
    params: dict | None = None,
    *,
    extras: bool = True,
    features=None,
    shared_windows: bool = False,
) -> _Holdout:
    """Metrics of the two-stage recipe (row ``model``) and the baselines on the holdout.

    ``events``: the run's :class:`~pipeline.core.ids.EncodedEvents` (a frame of string ids
    is encoded first); ``features``: the feature tables as of the holdout start, when built;
    ``shared_windows``: the model reads the label windows ``label_windows`` fitted, where
    they are its own."""
    from pipeline.core.ids import EncodedEvents
    from pipeline.core.metrics import ranking_metrics_per_user
    from pipeline.evaluation.holdout import (
        evaluate_models,
        lists_to_top,
        popularity_top,
        split_holdout,
    )
    from pipeline.features.popularity import popular_items
    from pipeline.lake.readers import read_side_file
    from pipeline.models.als import AlsRecommender

    items = read_side_file(settings.landing_dir / "items.csv")
    users = _side_users(settings)
    if not isinstance(events, EncodedEvents):
        events = EncodedEvents.from_frame(
            events[events["timestamp"] < cutoff], settings.event_weights
        )
    events = events.before(cutoff)
    split = split_holdout(
        events,
        cutoff,
        settings.holdout_days,
        settings.event_weights,
        max_users=settings.eval_max_users,
        seed=settings.seed,
    )
    start = split.holdout_start
    model = _twostage(settings, params)
    model.fit(
        split.encoded,
        start,
        settings.event_weights,
        items,
        users,
        features=features,
        chain=_label_chain(settings, cutoff, model.get_params()) if shared_windows else None,
    )
    # the ALS row: the model's own stage-one ALS, fitted on the same events (the ranked
    # lists against ALS's alone, without a second ALS fit: 15 sweeps over every user)
    plain = AlsRecommender.from_fitted(
        model.generator_.als_, split.train, popular_items(split.train_events, start, k)
    )
    warm_ids = split.train.user_ids[split.eval_rows]
    if extras:  # the candidates scored for the lists are also the ranker's AUC and recall
        candidates = _CandidateScores(model, split, events, cutoff)
        warm_lists = model.recommend_observed(warm_ids, k, candidates.add)
    else:
        warm_lists = model.recommend(warm_ids, k)
    model_top = lists_to_top(warm_lists, warm_ids, split.train, k)
    table = evaluate_models(
        split,
        {
            "model": lambda rows, n: model_top[:, :n],
            "als": lambda rows, n: plain.score_top(rows, n)[0],
            "popularity": lambda rows, n: popularity_top(split, rows, n, None),
            "popularity_30d": lambda rows, n: popularity_top(split, rows, n, 30),
        },
        k=k,
        diversity=True,
    )
    user_ndcg = pd.Series(
        ranking_metrics_per_user(model_top, split.truth[split.eval_rows], k)["ndcg"],
        index=pd.Index(warm_ids, name="user_id"),
        name="ndcg",
    )
    extra = (
        _holdout_extras(model, split, events, cutoff, k, users, warm_lists, candidates)
        if extras
        else {}
    )
    return _Holdout(table, user_ndcg, extra)


class _CandidateScores:
    """Labels and ranker scores of every candidate of the holdout's evaluated users (those
    with new items in the holdout), and their mean candidate recall, gathered chunk by chunk
    from the candidates the lists are made of (:meth:`add`); :meth:`finish` scores the users
    the lists did not rank (fewer than ``min_history`` items)."""

    def __init__(self, model, split, events, cutoff: dt.datetime) -> None:
        import numpy as np

        from pipeline.models.twostage import window_truth

        self.model = model
        start = split.holdout_start
        self.truth = window_truth(events.frame, start, cutoff, model.matrix_, model.weights_)
        rows = np.intersect1d(np.flatnonzero(np.diff(self.truth.indptr) > 0), split.eval_rows)
        self.pending = np.zeros(self.truth.shape[0], bool)
        self.pending[rows] = True
        self.users = len(rows)
        self.labels: list = []
        self.scores: list = []
        self.recall_sum = 0.0

    def add(self, rows, pairs: pd.DataFrame) -> None:
        import numpy as np

        from pipeline.models.candidates import candidate_recall
        from pipeline.models.ranker import label_pairs

        chunk = np.unique(np.asarray(rows, np.int64))
        chunk = chunk[self.pending[chunk]]
        if len(chunk) == 0:
            return
        self.pending[chunk] = False
        pair_rows = pairs["row"].to_numpy()
        pairs = pairs[np.isin(pair_rows, chunk)]
        # only each pair's label and score are kept: every evaluated user's candidates at
        # once would be ~60 bytes x users x ~200 candidates
        self.labels.append(label_pairs(pairs, self.truth).astype(np.int8))
        self.scores.append(pairs["score"].to_numpy(np.float32))
        local = pairs.assign(row=np.searchsorted(chunk, pairs["row"].to_numpy()))
        self.recall_sum += candidate_recall(local, self.truth[chunk])["all"] * len(chunk)

    def finish(self) -> dict:
        """AUC-ROC, PR-AUC and candidate recall (NaN without labelled pairs)."""
        import numpy as np

        from pipeline.models.ranker import held_out_scores

        rest = np.flatnonzero(self.pending)
        for first in range(0, len(rest), self.model.chunk_users):
            chunk = rest[first : first + self.model.chunk_users]
            self.add(chunk, self.model.rank_candidates(chunk))
        labels = np.concatenate(self.labels) if self.labels else np.zeros(0, np.int8)
        scores = np.concatenate(self.scores) if self.scores else np.zeros(0, np.float32)
        if not len(labels):
            return {"auc": float("nan"), "pr_auc": float("nan"), "recall": float("nan")}
        return {**held_out_scores(labels, scores), "recall": self.recall_sum / self.users}


def _holdout_extras(model, split, events, cutoff, k, users, warm_lists, candidates) -> dict:
    """Ranker AUC/PR-AUC, candidate recall (from ``candidates``), cold-start metrics and
    per-user frames for the bias audit, all on the holdout window."""
    import numpy as np

    from pipeline.core.metrics import user_metrics, window_truth_frame
    from pipeline.evaluation.holdout import popularity_lists

    start = split.holdout_start
    scores = candidates.finish()
    recall = scores["recall"]
    coded = window_truth_frame(events.frame, start, cutoff)  # codes, then ids for the lists
    seen_before = split.train_events["user_id"].unique()
    old = coded["user_id"].isin(seen_before).to_numpy()
    cold_codes = coded.loc[~old, "user_id"].unique()
    warm_codes = coded.loc[old, "user_id"].unique()
    warm_codes = warm_codes[np.isin(warm_codes, split.eval_rows)]  # the sample, when sampled
    baseline = popularity_lists(
        split.train_events, start, np.concatenate([warm_codes, cold_codes]), k, 30
    )
    truth_ids, baseline = (
        frame.assign(
            user_id=events.users.decode(frame["user_id"]),
            item_id=events.items.decode(frame["item_id"]),
        )
        for frame in (coded, baseline)
    )
    cold_ids = events.users.decode(cold_codes)
    warm_truth = truth_ids[truth_ids["user_id"].isin(warm_lists["user_id"])]
    lists = {
        "model": pd.concat([warm_lists, model.recommend(cold_ids, k)]),
        "popularity_30d": baseline,
    }
    scored = pd.concat([warm_truth, truth_ids[truth_ids["user_id"].isin(cold_ids)]])
    per_user = {name: user_metrics(frame, scored, k) for name, frame in lists.items()}
    segments = pd.DataFrame(index=pd.Index(scored["user_id"].unique(), name="user_id"))
    segments["user_type"] = np.where(segments.index.isin(list(cold_ids)), "new", "returning")
    if users is not None and len(users):
        side = users.drop_duplicates("user_id").set_index("user_id")
        for column in ("age_band", "gender", "occupation"):
            if column in side:
                segments[column] = segments.index.map(side[column])
    cold = {
        name: frame.loc[frame.index.isin(list(cold_ids)), "ndcg"].mean()
        for name, frame in per_user.items()
    }
    return {
        "model_auc": scores["auc"],
        "model_pr_auc": scores["pr_auc"],
        "model_candidate_recall": recall,
        f"model_cold_ndcg_at_{k}": cold["model"],
        f"popularity_30d_cold_ndcg_at_{k}": cold["popularity_30d"],
        "model_cold_users": float(len(cold_ids)),
        "per_user": per_user,
        "segments": segments,
    }


def register(
    settings: Settings, cutoff: dt.datetime, dsn: str | None = None, triggered_by: str = "pipeline"
) -> dict:
    """Log and register the bundle, then decide whether it becomes champion.

    A run whose cutoff is older than production's (the live lists' or the champion's logical
    date) is a backfill: its model is logged and registered, but it moves no alias and serves
    nothing, unless ``serve_backfill`` or ``force_promote`` says so. Otherwise the model becomes
    ``challenger`` and the gate (:mod:`pipeline.evaluation.gate`) decides: the champion is
    re-scored on this run's holdout by refitting its recipe (the settings it was trained with,
    logged as run params) on the same split, and the two are compared user by user (paired
    bootstrap).

    Everything from reading the champion to moving the alias happens under the serving DB's
    promotion lock, so two runs never decide at once. The decision goes to MLflow tags and to
    ``model_promotions``; ``serve_version`` in the result is the version ``publish`` must serve
    (None: publish nothing).
    """
    from pipeline.evaluation.gate import GateDecision, decide_promotion
    from pipeline.registry.tracking import finish_night, stage_run
    from pipeline.registry.versions import (
        CHALLENGER,
        champion_version,
        configure_mlflow,
        load_bundle,
        register_model,
        set_champion,
        tag_decision,
        version_details,
    )
    from pipeline.serving.store import promotion_lock, record_promotion

    run = settings.run_dir(cutoff)
    with (
        _stage(settings, cutoff, "register") as result,
        stage_run(run, cutoff, "register") as night,
        promotion_lock(dsn=dsn, sqlite_path=settings.serving_sqlite_path),
    ):
        trained, evaluated = _read_json(run / "train.json"), _read_json(run / "evaluate.json")
        validated, ingested = _read_json(run / "validate.json"), _read_json(run / "ingest.json")
        k, metrics = evaluated["k"], dict(evaluated["metrics"])
        challenger_score = metrics[f"model_ndcg_at_{k}"]
        baseline = max(
            v
            for key, v in metrics.items()  # warm-user popularity rows only
            if re.fullmatch(rf"popularity(_\d+d)?_ndcg_at_{k}", key)
        )
        configure_mlflow()
        champion = champion_version()
        details = version_details(champion) if champion is not None else None
        production = _production_cutoff(settings, dsn, details)
        backfill = production is not None and cutoff < production[0]
        decides = not backfill or settings.serve_backfill or settings.force_promote
        champion_score = interval = None
        same_recipe = False
        if champion is not None and decides:
            own = pd.read_parquet(run / USER_NDCG_FILE)["ndcg"]
            rescored = _recipe_score(settings, cutoff, details, trained["params"], own, k)
            champion_score, same_recipe = rescored.mean, rescored.same_recipe
            interval = _paired_interval(own, rescored.user_ndcg, settings.seed)
            metrics.update(
                {
                    f"champion_ndcg_at_{k}": champion_score,
                    "gate_diff_low": interval[0],
                    "gate_diff_high": interval[1],
                }
            )
        bundle = load_bundle(Path(trained["bundle_path"]))
        report = _write_report(run, bundle, champion_score, k)
        registration = register_model(
            Path(trained["bundle_path"]),
            run_name=f"nightly-{cutoff:%Y-%m-%d}",
            params={
                **recipe_params(settings),
                "top_n": settings.top_n,
                "holdout_days": settings.holdout_days,
                **_prefixed("model", trained["params"]),
            },
            metrics=metrics,
            tags={
                "logical_date": cutoff.isoformat(),
                "triggered_by": triggered_by,
                "backfill": str(backfill),
                "model_params": json.dumps(trained["params"], sort_keys=True),
                "numerics": str((trained.get("training") or {}).get("numerics", "")),
                "rows_snapshot": str(ingested["snapshot_rows"]),
                "rows_clean": str(validated.get("rows", 0) - validated.get("bad_rows", 0)),
                "validation_passed": str(validated.get("passed")),
                "lake_path": str(settings.lake_events_dir),
            },
            artifacts={"report": report},
            recommender=bundle,
            alias=CHALLENGER if decides else None,
            run_id=night,
        )
        _log_trend(run, night, metrics, k, cutoff)
        if champion == registration.version:  # a re-run of the model that already serves
            _heal_promotion_record(settings, dsn, champion, details, cutoff, triggered_by)
            result.update(
                registration.to_dict(),
                promoted=False,
                decision="unchanged",
                reason=f"v{champion} is already champion",
                champion_version=champion,
                serve_version=champion,
            )
            finish_night(night)
            return result
        if decides:
            gate = decide_promotion(
                challenger_score,
                champion_score,
                baseline,
                min_relative_gain=settings.gate_min_relative_gain,
                tolerance=settings.gate_tolerance,
                force=settings.force_promote,
                metric=f"ndcg@{k}",
                same_recipe=same_recipe,
                interval=interval,
                require_significance=settings.gate_require_significance,
                online=settings.gate_online,
            )
        else:
            gate = GateDecision(
                False,
                "backfill",
                f"backfill: cutoff {cutoff:%Y-%m-%d} is older than production's "
                f"{production[0]:%Y-%m-%d} ({production[1]}); the run's results are recorded, "
                f"the champion (v{champion}) and the live lists stay (set serve_backfill or "
                "force_promote to serve it)",
                challenger_score,
                None,
                baseline,
                min_relative_gain=settings.gate_min_relative_gain,
                tolerance=settings.gate_tolerance,
                require_significance=settings.gate_require_significance,
            )
        # recorded before it takes effect: if the alias cannot move, the retry decides again;
        # if it moved and the run died, the audit already holds the decision
        record_promotion(
            dsn=dsn,
            sqlite_path=settings.serving_sqlite_path,
            model_name="recommender",
            model_version=registration.version,
            decision=gate.decision,
            reason=gate.reason,
            metrics={
                **gate.to_dict(),
                "champion_version": champion,
                "logical_date": cutoff.isoformat(),
            },
            triggered_by=triggered_by,
        )
        if gate.promote:
            set_champion(registration.version, decision=gate.decision, reason=gate.reason)
        else:
            tag_decision(registration.version, decision=gate.decision, reason=gate.reason)
        logger.info("register: v%s %s: %s", registration.version, gate.decision, gate.reason)
        serve = registration.version if gate.promote else champion
        result.update(
            registration.to_dict(),
            promoted=gate.promote,
            decision=gate.decision,
            reason=gate.reason,
            backfill=backfill,
            champion_version=registration.version if gate.promote else champion,
            serve_version=serve if decides else None,
        )
        finish_night(night)
    return result


#: Series of the trend plot: name -> the night's metric key (at k).
_TREND_SERIES = ("model", "popularity_30d", "popularity", "als")


def _log_trend(run: Path, night: str, metrics: dict, k: int, cutoff: dt.datetime) -> None:
    """``trend.png``: this run's holdout nDCG@k (model and baselines) against the last
    champions', logged to the night's MLflow run."""
    from pipeline.evaluation.report import plot_trend
    from pipeline.registry.tracking import champion_metrics

    keys = {name: f"{name}_ndcg_at_{k}" for name in _TREND_SERIES}
    current = {name: metrics[key] for name, key in keys.items() if key in metrics}
    path = plot_trend(
        champion_metrics(keys),
        current,
        run / "trend.png",
        logical_date=pd.Timestamp(cutoff),
        metric=f"ndcg@{k}",
    )
    _log_artifacts(night, [path], "report")


def _heal_promotion_record(
    settings: Settings,
    dsn: str | None,
    champion: str,
    details: dict | None,
    cutoff: dt.datetime,
    triggered_by: str,
) -> None:
    """The champion has no row in ``model_promotions`` (its alias moved, then the run failed
    before the decision was recorded: code before decisions were recorded first): record it
    now from the version's own decision tags, marked as recorded late."""
    from pipeline.serving.store import record_promotion, recorded_decision

    if (
        recorded_decision(
            dsn=dsn,
            sqlite_path=settings.serving_sqlite_path,
            model_name="recommender",
            model_version=champion,
        )
        is not None
    ):
        return
    tags = (details or {}).get("tags", {})
    decision = tags.get("promotion_decision") or "promote"
    reason = (
        f"recorded late, by the run for {cutoff:%Y-%m-%d}: v{champion} is champion but "
        f"its decision was never recorded; tagged: {tags.get('promotion_reason', '')}"
    )
    record_promotion(
        dsn=dsn,
        sqlite_path=settings.serving_sqlite_path,
        model_name="recommender",
        model_version=champion,
        decision=decision,
        reason=reason,
        metrics={"logical_date": cutoff.isoformat(), "recorded_late": True},
        triggered_by=triggered_by,
    )
    logger.warning("register: %s", reason)


def _production_cutoff(
    settings: Settings, dsn: str | None, champion: dict | None
) -> tuple[dt.datetime, str] | None:
    """The newest logical date production serves, and what serves it: the live lists' or
    the champion's (``champion``: its :func:`version_details`), whichever is later (None
    before the first publish and promotion)."""
    from pipeline.core.config import as_utc
    from pipeline.serving.store import live_version

    found = []
    live = live_version(dsn=dsn, sqlite_path=settings.serving_sqlite_path)
    if live is not None:
        found.append(
            (
                live["logical_date"],
                f"the live lists: serving version {live['version']}, "
                f"model v{live['model_version']}",
            )
        )
    if champion is not None and champion["tags"].get("logical_date"):
        found.append((as_utc(champion["tags"]["logical_date"]), f"champion v{champion['version']}"))
    return max(found, key=lambda pair: pair[0]) if found else None


def _paired_interval(own: pd.Series, theirs: pd.Series, seed: int) -> tuple[float, float]:
    """95% paired bootstrap interval of own minus theirs over the users both were scored on."""
    from pipeline.core.metrics import paired_bootstrap

    users = own.index.intersection(theirs.index)
    return paired_bootstrap(own.loc[users].to_numpy(), theirs.loc[users].to_numpy(), seed=seed)


def _write_report(run: Path, model, champion_score: float | None, k: int) -> Path:
    """Plots and tables for the MLflow run of ``model`` (the loaded bundle), in
    ``<run>/report/``."""
    from pipeline.evaluation.report import (
        plot_feature_importance,
        plot_metrics_comparison,
        plot_score_distribution,
    )

    folder = run / "report"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    table = pd.read_csv(run / "metrics.csv", index_col=0)
    shutil.copy(run / "metrics.csv", folder / "metrics.csv")
    plot_metrics_comparison(
        table,
        folder / "metrics_vs_baselines.png",
        champion={"ndcg": champion_score} if champion_score else None,
    )
    users = model.matrix_.user_ids[:: max(1, len(model.matrix_.user_ids) // 2000)]
    lists = model.recommend(users, k)
    plot_score_distribution(lists["score"], folder / "score_distribution.png", by=lists["source"])
    importance = getattr(model, "feature_importance", None)
    if callable(importance):
        plot_feature_importance(importance(), folder / "feature_importance.png")
    for table_name in ("bias_audit.csv", "segments.csv"):
        if (run / table_name).exists():
            shutil.copy(run / table_name, folder / table_name)
    return folder


#: Settings that do not change how a model is trained (paths, serving, gate, split).
_NOT_RECIPE = frozenset(
    {
        "data_dir",
        "event_weights",
        "top_n",
        "holdout_days",
        "eval_max_users",
        "max_bad_row_share",
        "force_promote",
        "gate_min_relative_gain",
        "gate_tolerance",
        "gate_require_significance",
        "gate_online",
        "consumed_event_types",
        "max_per_category",
        "item_ttl_days",
        "candidate_multiplier",
        "keep_versions",
        "tune",
        "tune_budget_minutes",
        "min_window_events",
        "max_staleness_days",
        "serve_backfill",
    }
)


def recipe_params(settings: Settings) -> dict:
    """The scalar settings that define how a model is trained: logged with each version and
    re-fitted by the gate to re-score a champion on a new holdout."""
    return {
        f.name: getattr(settings, f.name)
        for f in dataclasses.fields(settings)
        if f.name not in _NOT_RECIPE
        and isinstance(getattr(settings, f.name), (int, float, str, bool))
    }


@dataclass(frozen=True)
class _Rescored:
    mean: float  # nDCG@k of the champion's recipe on this run's holdout
    user_ndcg: pd.Series  # per warm user (index user_id)
    same_recipe: bool  # the champion's recipe is this run's: the refit is this run's model


def _recipe_score(
    settings: Settings,
    cutoff: dt.datetime,
    champion: dict,
    own_params: dict,
    own_users: pd.Series,
    k: int,
) -> _Rescored:
    """nDCG@k of the champion's recipe refitted on this run's holdout split.

    The recipe is the champion's training settings (run params) plus its exact model params
    (the ``model_params`` tag, tuned values included). When both equal this run's, the refit
    would be this run's own model (deterministic fit, same split, same code), so its scores
    ``own_users`` are reused and the two tie by construction.
    """
    mine = {key: str(value) for key, value in recipe_params(settings).items()}
    theirs = {key: champion["params"][key] for key in mine if key in champion["params"]}
    their_params = json.loads(champion["tags"].get("model_params", "null"))
    if their_params is not None:
        from pipeline.models.recipe import with_legacy_params

        their_params = with_legacy_params(their_params)
    if theirs == mine and their_params in (None, own_params):
        return _Rescored(float(own_users.mean()), own_users, True)
    fields = {f.name: f.type for f in dataclasses.fields(Settings)}
    overrides = {
        key: _as_type(value, fields[key]) for key, value in theirs.items() if key in fields
    }
    champion_settings = dataclasses.replace(settings, **overrides)
    holdout = _holdout(
        champion_settings,
        _encoded(settings, cutoff),
        cutoff,
        k,
        their_params,
        extras=False,
        features=_features(settings, cutoff, _holdout_start(settings, cutoff)),
    )
    score = float(holdout.table.loc["model", "ndcg"])
    logger.info(
        "champion v%s re-scored on this holdout: ndcg@%d %.4f", champion["version"], k, score
    )
    return _Rescored(score, holdout.user_ndcg, False)


def _as_type(value: str, annotation: str):
    return {"int": int, "float": float, "bool": lambda v: v == "True"}.get(str(annotation), str)(
        value
    )


def _prefixed(prefix: str, params: dict) -> dict:
    return {f"{prefix}.{key}": value for key, value in params.items()}


def publish(
    settings: Settings,
    cutoff: dt.datetime,
    dsn: str | None = None,
    *,
    decision: dict | None = None,
    version: str | None = None,
) -> dict:
    """Top-N for every user seen before the cutoff, plus ``__default__``, from one model, or,
    while an A/B experiment runs, from each user's variant.

    Which model: ``version`` when given (a rollback republishing what it served; may be an
    older date), else the version this run's ``register`` decided on (``decision``, its result:
    ``serve_version``, None for a backfill, which publishes nothing), else the champion. Lists
    for a date older than the live lists' are refused under the publish lock (production moves
    forward only) unless ``serve_backfill`` or ``force_promote`` is set, or ``version`` is.

    The model proposes ``candidate_multiplier`` x N candidates per user; the business rules
    (:mod:`pipeline.serving.rules`: nothing consumed, unavailable or expired, at most
    ``max_per_category`` per category, exactly N from the fallback list) pick the N published.

    Experiment (the running one in the serving DB's ``experiments`` table, see
    :func:`_served_lists`): users outside its buckets get the model's lists (variant null);
    a ``model`` variant gets the lists of its registered version or alias, a ``popularity``
    variant the model's fallback list, both under the same rules and each with its
    ``__default__:<variant>`` fallback; a ``holdout`` variant gets no rows. Every published
    user's assignment goes live with the lists (``recommendation_assignments``) and to
    ``<run>/assignments.parquet``; the served-list history carries variant and experiment.
    """
    from pipeline.lake.readers import read_side_file
    from pipeline.lake.served import write_served
    from pipeline.monitoring.health import list_stats
    from pipeline.monitoring.prometheus import push_publish
    from pipeline.registry.versions import load_version
    from pipeline.serving.experiments import Experiment
    from pipeline.serving.rules import build_consumed
    from pipeline.serving.store import OlderThanLive, active_experiment, publish_lists

    allow_older = version is not None or settings.serve_backfill or settings.force_promote
    with _stage(settings, cutoff, "publish") as result:
        if version is None and decision is not None:
            version = decision.get("serve_version")
            if version is None:
                logger.info("publish: nothing to serve: %s", decision.get("reason"))
                result.update(published=False, reason=decision.get("reason"))
                return result
        model, version = load_version(version)
        recommender = model.unwrap_python_model().recommender
        running = active_experiment(dsn, settings.serving_sqlite_path)
        experiment = Experiment.from_dict(running["config"]) if running else None
        events = _encoded(settings, cutoff, ("user_id", "item_id", "event_type"))
        rules = {
            "candidate_multiplier": settings.candidate_multiplier,
            "consumed": build_consumed(events, settings.consumed_event_types),
            "items": read_side_file(settings.landing_dir / "items.csv"),
            "n": settings.top_n,
            "max_per_category": settings.max_per_category,
            "item_ttl_days": settings.item_ttl_days,
            "cutoff": cutoff,
        }
        from pipeline.lake.tombstone import served_user_ids  # users forgotten since: out

        user_ids, cms_of, unmapped = _cms_ids(
            settings, dsn, served_user_ids(events.users.ids, settings.lake_events_dir.parent)
        )
        if cms_of is not None:
            result["pseudonymised_users"] = len(cms_of)
            result["unmapped_pseudonyms"] = unmapped
        workers = settings.publish_workers or min(2, len(os.sched_getaffinity(0)))
        result["publish_workers"] = workers
        served = _served_lists(
            recommender,
            str(version),
            user_ids,
            rules,
            experiment,
            load_recommender=lambda v: load_version(v)[0].unwrap_python_model().recommender,
            cms_of=cms_of,
            workers=workers,
        )
        lists = served.lists
        catalogue = len(events.items)
        del events
        lists["generated_at"] = pd.Timestamp(cutoff)
        result["lists"] = list_stats(lists[served.personal], catalogue)
        if served.assignments is not None:
            served.assignments.to_parquet(
                settings.run_dir(cutoff) / "assignments.parquet", index=False
            )
            result["experiment"] = served.summary
        # the serving DB gets the CMS's ids (the view's contract); the run folder and the
        # served-list history keep the stored ids (pseudonyms with a key)
        served_lists, served_assignments = lists, served.assignments
        if cms_of is not None:
            served_lists = lists.assign(user_id=_as_cms(lists["user_id"], cms_of))
            if served_assignments is not None:
                served_assignments = served_assignments.assign(
                    user_id=_as_cms(served_assignments["user_id"], cms_of)
                )
        try:
            published = publish_lists(
                served_lists,
                dsn=dsn,
                sqlite_path=settings.serving_sqlite_path,
                model_version=str(version),
                logical_date=cutoff,
                keep_versions=settings.keep_versions,
                allow_older=allow_older,
                assignments=served_assignments,
            )
        except OlderThanLive as exc:  # another run published newer lists meanwhile
            logger.info(
                "publish: not serving model v%s for %s: %s", version, f"{cutoff:%Y-%m-%d}", exc
            )
            result.update(published=False, model_version=str(version), reason=str(exc))
            return result
        logger.info(
            "publish: model v%s serves %d users (serving version %d)%s",
            version,
            published.users,
            published.version,
            f"; experiment {experiment.name} v{experiment.version} assigns "
            f"{published.assigned} of them"
            if experiment
            else "",
        )
        push_publish(published.rows, published.users, str(version), time.time())
        result["served_history"] = str(
            write_served(
                settings.lake_events_dir.parent,
                lists,
                cutoff=cutoff,
                published_at=dt.datetime.now(dt.timezone.utc),
                model_version=str(version),
            )
        )
        result.update(
            published=True,
            model_version=str(version),
            rows=published.rows,
            users=published.users,
            serving_version=published.version,
            table=published.table,
            rules=served.stats.to_dict(),
            target="postgres" if dsn else str(settings.serving_sqlite_path),
        )
    return result


def _cms_ids(settings: Settings, dsn: str | None, user_ids) -> tuple[object, pd.Series | None, int]:
    """The users to publish, their CMS ids (a Series indexed by stored id; None when no id is
    a pseudonym: nothing to map) and how many pseudonyms have no row in ``user_pseudonyms``.

    Such a pseudonym should not exist (ingest records a pair before its events enter the
    lake); one that does is skipped (no list: the CMS id is unknown) and counted, with a
    warning. When more than ``max_bad_row_share`` of the users have no pair, the lake and
    the serving DB do not belong together (another database, a mapping table restored from
    an older backup): ConfigError, and the live lists stay."""
    import numpy as np

    from pipeline.core.errors import ConfigError
    from pipeline.core.privacy import pseudonym_mask
    from pipeline.serving.pseudonyms import to_cms_ids

    ids = np.asarray(user_ids, dtype=object)
    if not pseudonym_mask(ids).any():
        return ids, None, 0
    cms = to_cms_ids(ids, dsn=dsn, sqlite_path=settings.serving_sqlite_path)
    missing = np.array([c is None for c in cms], dtype=bool)
    unmapped = int(missing.sum())
    if unmapped:
        share = unmapped / len(ids)
        if share > settings.max_bad_row_share:
            raise ConfigError(
                f"publish: {unmapped} of {len(ids)} users ({share:.1%}) have a pseudonym "
                "without a row in the serving DB's user_pseudonyms table: this serving DB "
                "does not hold this lake's mapping (another database or schema, or an old "
                "backup); nothing was published"
            )
        logger.warning(
            "publish: %d user(s) skipped: their pseudonym has no row in "
            "user_pseudonyms (their CMS id is unknown)",
            unmapped,
        )
    kept = ids[~missing]
    return kept, pd.Series(cms[~missing], index=pd.Index(kept), dtype=object), unmapped


def _as_cms(column: pd.Series, cms_of: pd.Series) -> pd.Series:
    """``column`` of stored ids with every mapped id replaced by its CMS id (the fallback
    lists' ``__default__...`` ids are kept)."""
    mapped = column.map(cms_of)
    return mapped.where(mapped.notna(), column).astype(object)


@dataclass
class _Served:
    lists: pd.DataFrame  # LIST_COLUMNS but generated_at (+ model_version, variant, experiment)
    stats: object  # RuleStats, summed over the calls
    assignments: pd.DataFrame | None  # user_id, experiment, variant; None without experiment
    personal: object  # bool array: rows of a model's own lists (for list_stats)
    summary: dict | None  # the experiment, its variants, their users and model versions


def _served_lists(
    recommender,
    version: str,
    user_ids,
    rules: dict,
    experiment,
    load_recommender,
    cms_of: pd.Series | None = None,
    workers: int = 1,
) -> _Served:
    """The lists ``publish`` serves: ``recommender`` (model ``version``) for every user, or,
    with ``experiment`` (a running :class:`~pipeline.serving.experiments.Experiment`), per
    assigned variant. One :func:`~pipeline.serving.rules.recommend_with_rules` call per model
    version (a ``model`` variant of the served version shares the default users' call, so no
    list is computed twice; another version is loaded with ``load_recommender``) and one for
    the ``popularity`` variants (no candidates: the served model's fallback list, the same
    rules); each call's default list becomes ``__default__`` (users outside) or
    ``__default__:<variant>``. Holdout users get no rows but an assignment.

    With ``cms_of`` (stored id -> CMS id, for pseudonymised ids), a user's variant is drawn
    from their CMS id, as without a key (a CMS can compute it); the rows keep stored ids.

    ``workers`` > 1: a model loaded from a bundle makes its lists in that many worker
    processes (each loading the bundle, with its share of the CPUs' threads); the lists are
    the same as from one. A model without a bundle on disk lists in this process."""
    import numpy as np

    from pipeline.models.bundle import SavedLists
    from pipeline.serving.contract import variant_default_user
    from pipeline.serving.rules import CANDIDATE_COLUMNS, RuleStats, recommend_with_rules

    threads = max(1, len(os.sched_getaffinity(0)) // max(workers, 1))

    def lists_of(model, users, recommend=None):
        saved = SavedLists.of(model, threads) if recommend is None and workers > 1 else None
        return recommend_with_rules(
            recommend or saved or model.recommend,
            users,
            fallback=model.popular_,
            default_user=DEFAULT_USER,
            workers=workers if saved is not None else 1,
            **rules,
        )

    if experiment is None:
        lists, stats = lists_of(recommender, user_ids)
        return _Served(lists, stats, None, np.ones(len(lists), dtype=bool), None)

    users = [
        u for u in pd.unique(np.asarray(user_ids, dtype=object).astype(str)) if u != DEFAULT_USER
    ]
    if cms_of is None:
        assigned = experiment.assignments(users)
    else:  # hash the CMS id, keep the stored id
        assigned = experiment.assignments(cms_of.reindex(users).to_numpy(object))
        assigned["user_id"] = np.asarray(users, dtype=object)
    variant_of = assigned.set_index("user_id")["variant"]
    groups: dict[tuple[str, str], list[str | None]] = {("model", version): [None]}
    versions = {}
    for v in experiment.variants:
        if v.kind == "model":
            versions[v.name] = _model_version_of(v.model, experiment.name, v.name)
            groups.setdefault(("model", versions[v.name]), []).append(v.name)
        elif v.kind == "popularity":
            groups.setdefault(("popularity", version), []).append(v.name)

    def no_candidates(users, k):
        return pd.DataFrame({column: pd.Series(dtype=object) for column in CANDIDATE_COLUMNS})

    stats, parts, personal = RuleStats(), [], []
    for (kind, model_version), names in groups.items():
        model = recommender if model_version == version else load_recommender(model_version)
        mine = assigned["variant"].isin([name for name in names if name is not None])
        if None in names:
            mine |= assigned["variant"].isna()
        lists, part_stats = lists_of(
            model,
            assigned.loc[mine, "user_id"].to_numpy(object),
            no_candidates if kind == "popularity" else None,
        )
        stats.add(part_stats)
        default = (lists["user_id"] == DEFAULT_USER).to_numpy()
        own = lists[~default].assign(variant=lambda f: f["user_id"].map(variant_of))
        fallbacks = [
            lists[default].assign(variant=None)
            if name is None
            else lists[default].assign(user_id=variant_default_user(name), variant=name)
            for name in names
        ]
        labelled = pd.concat([own, *fallbacks], ignore_index=True)
        labelled["model_version"] = model_version
        parts.append(labelled)
        personal.append(
            np.r_[
                np.full(len(own), kind == "model"), np.zeros(len(labelled) - len(own), dtype=bool)
            ]
        )
    lists = pd.concat(parts, ignore_index=True)
    lists["variant"] = lists["variant"].astype(object).where(lists["variant"].notna(), None)
    lists["experiment"] = lists["variant"].where(lists["variant"].isna(), experiment.name)
    in_experiment = assigned["variant"].notna()
    counts = assigned.loc[in_experiment, "variant"].value_counts()
    summary = {
        "name": experiment.name,
        "version": experiment.version,
        "users_outside": int((~in_experiment).sum()),
        "variants": {
            v.name: {
                "kind": v.kind,
                "users": int(counts.get(v.name, 0)),
                **(
                    {"model": v.model, "model_version": versions[v.name]}
                    if v.kind == "model"
                    else {}
                ),
            }
            for v in experiment.variants
        },
    }
    logger.info(
        "publish: experiment %s v%d: %s; %d users outside",
        experiment.name,
        experiment.version,
        ", ".join(f"{name} {info['users']}" for name, info in summary["variants"].items()),
        summary["users_outside"],
    )
    return _Served(
        lists,
        stats,
        assigned.loc[in_experiment, ["user_id", "experiment", "variant"]].reset_index(drop=True),
        np.concatenate(personal),
        summary,
    )


def _model_version_of(reference: str, experiment: str, variant: str) -> str:
    """The registered version a ``model`` variant names: a version number as is, an alias
    (``champion``, ``challenger``) resolved now. A missing alias fails the publish."""
    if reference.isdigit():
        return reference
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipeline.registry.versions import MODEL_NAME, configure_mlflow

    configure_mlflow()
    try:
        return str(MlflowClient().get_model_version_by_alias(MODEL_NAME, reference).version)
    except MlflowException as exc:
        raise LookupError(
            f"experiment {experiment!r}, variant {variant!r}: registered model "
            f"{MODEL_NAME!r} has no alias {reference!r} ({exc.message})"
        ) from None


def _twostage(settings: Settings, params: dict | None = None):
    """The deployable two-stage recommender from ``settings`` (``params`` override them)."""
    from pipeline.models.recipe import TwoStageRecipe
    from pipeline.models.twostage import TwoStageRecommender

    # the Settings names of the recipe fields (the rest keep the recipe's defaults)
    recipe = TwoStageRecipe(
        factors=settings.als_factors,
        regularization=settings.als_regularization,
        alpha=settings.als_alpha,
        iterations=settings.als_iterations,
        label_days=settings.label_days,
        label_windows=settings.label_windows,
        n_bags=settings.ranker_bags,
        random_state=settings.seed,
    )
    return TwoStageRecommender(recipe.replace(**params) if params else recipe)


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def _side_users(settings: Settings) -> pd.DataFrame | None:
    """``landing/users.csv`` keyed by the stored ids (pseudonyms with a key, as the lake's
    events are: the CMS's ids never reach a model, a bundle or a report), without the users
    forgotten on request (the CMS's file stays as it is; the erasure tombstone keeps their
    attributes out)."""
    from pipeline.core.privacy import pseudonymiser_for
    from pipeline.lake.readers import read_side_file
    from pipeline.lake.tombstone import without_erased_users

    users = without_erased_users(
        read_side_file(settings.landing_dir / "users.csv"), settings.lake_events_dir.parent
    )  # the tombstone: CMS ids
    pseudonymiser = pseudonymiser_for(settings.pseudonym_key)
    if users is not None and pseudonymiser is not None:
        users, _ = pseudonymiser.frame(users)
    return users


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def rollback(
    settings: Settings,
    version: str | None = None,
    dsn: str | None = None,
    triggered_by: str = "manual",
) -> dict:
    """Move ``champion`` back to ``version`` (default: the previous champion).

    Returns the version, and the cutoff and list length it was published with, so the caller
    can republish exactly the lists that version served (``publish`` for that cutoff).
    """
    from pipeline.core.config import as_utc
    from pipeline.core.ids import EVENTS_FILE
    from pipeline.registry.versions import (
        champion_version,
        configure_mlflow,
        previous_champion,
        set_champion,
        version_details,
    )
    from pipeline.serving.store import record_promotion

    configure_mlflow()
    current = champion_version()
    target = str(version) if version else previous_champion()
    if target is None:
        raise LookupError("no previous champion to roll back to; pass a version explicitly")
    details = version_details(target)
    cutoff = as_utc(details["tags"]["logical_date"])
    if not (settings.run_dir(cutoff) / EVENTS_FILE).exists():
        raise FileNotFoundError(
            f"run folder of v{target} ({settings.run_dir(cutoff)}) is gone: "
            "its lists cannot be rebuilt exactly"
        )
    reason = f"rollback from v{current} to v{target} ({triggered_by})"
    set_champion(target, decision="rollback", reason=reason)
    record_promotion(
        dsn=dsn,
        sqlite_path=settings.serving_sqlite_path,
        model_name="recommender",
        model_version=target,
        decision="rollback",
        reason=reason,
        metrics={"from_version": current, "logical_date": cutoff.isoformat()},
        triggered_by=triggered_by,
    )
    logger.info("%s", reason)
    return {
        "version": target,
        "previous": current,
        "cutoff": cutoff.isoformat(),
        "top_n": int(details["params"].get("top_n", settings.top_n)),
    }
