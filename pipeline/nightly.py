"""The nightly run, stage by stage, as plain functions the DAG (or a test) calls.

Each stage reads its inputs from the run folder (``Settings.run_dir(cutoff)``), writes its
outputs there as Parquet/JSON, and returns a small JSON-able dict (what XCom carries). The run
folder is keyed on the cutoff, so re-running a date overwrites the same files: every stage is
idempotent, and the same inputs give the same outputs.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from pipeline.config import DEFAULT_USER, REPO_ROOT, Settings

logger = logging.getLogger(__name__)

SUITE_PATH = REPO_ROOT / "expectations" / "events.json"
STAGES = ("ingest", "validate", "build_features", "train", "evaluate", "register", "publish")


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


def ingest(settings: Settings, cutoff: dt.datetime) -> dict:
    """Landing files -> lake; then the run's point-in-time snapshot -> ``events_raw.parquet``."""
    from pipeline.ingest import ingest_landing, load_snapshot

    with _stage(settings, cutoff, "ingest") as result:
        report = ingest_landing(settings.landing_events_dir, settings.lake_events_dir)
        snapshot = load_snapshot(settings.lake_events_dir, cutoff, settings.lookback_days)
        path = _write_parquet(snapshot, settings.run_dir(cutoff) / "events_raw.parquet")
        result.update(report.to_dict(), snapshot_rows=len(snapshot), snapshot_path=str(path))
    return result


def validate(settings: Settings, cutoff: dt.datetime) -> dict:
    """Run the expectation suite; bad rows go to quarantine; clean rows -> ``events.parquet``."""
    from pipeline.validate import validate_events

    run = settings.run_dir(cutoff)
    with _stage(settings, cutoff, "validate") as result:
        raw = pd.read_parquet(run / "events_raw.parquet")
        clean, report = validate_events(
            raw, suite_path=SUITE_PATH, cutoff=cutoff,
            allowed_event_types=sorted(settings.event_weights),
            max_bad_row_share=settings.max_bad_row_share,
            quarantine_path=run / "quarantine.parquet", data_docs_dir=run / "data_docs")
        _write_parquet(clean, run / "events.parquet")
        result.update(report.to_dict())
    return result


def build_features(settings: Settings, cutoff: dt.datetime) -> dict:
    """RFM/context features per user and popularity/age features per item."""
    from pipeline.features import build_item_features, build_user_features
    from pipeline.ingest import read_side_file

    run = settings.run_dir(cutoff)
    with _stage(settings, cutoff, "build_features") as result:
        events = pd.read_parquet(run / "events.parquet")
        items = read_side_file(settings.landing_dir / "items.csv")
        users = build_user_features(events, cutoff)
        item_features = build_item_features(events, cutoff, items)
        _write_parquet(users, run / "user_features.parquet")
        _write_parquet(item_features, run / "item_features.parquet")
        result.update(users=len(users), items=len(item_features),
                      user_feature_columns=len(users.columns) - 1,
                      item_feature_columns=len(item_features.columns) - 1)
    return result


def train(settings: Settings, cutoff: dt.datetime) -> dict:
    """Fit ALS on every event before the cutoff; save the bundle to ``<run>/model``."""
    from pipeline.ingest import read_side_file
    from pipeline.matrix import build_matrix
    from pipeline.popularity import popular_items

    run = settings.run_dir(cutoff)
    with _stage(settings, cutoff, "train") as result:
        events = pd.read_parquet(run / "events.parquet")
        items = read_side_file(settings.landing_dir / "items.csv")
        matrix = build_matrix(events, settings.event_weights)
        popular = popular_items(events, cutoff, max(settings.top_n * 5, 50), items)
        model = _als(settings).fit(matrix, popular, items)
        bundle = run / "model"
        shutil.rmtree(bundle, ignore_errors=True)
        model.save(bundle)
        result.update(users=matrix.shape[0], items=matrix.shape[1],
                      pairs=int(matrix.confidence.nnz), bundle_path=str(bundle),
                      params=model.get_params())
    return result


def evaluate(settings: Settings, cutoff: dt.datetime, k: int = 10) -> dict:
    """Holdout metrics at ``k`` for ALS (same params, fitted before the holdout) and baselines."""
    from pipeline.evaluate import evaluate_models, popularity_top, split_holdout
    from pipeline.popularity import popular_items

    run = settings.run_dir(cutoff)
    with _stage(settings, cutoff, "evaluate") as result:
        events = pd.read_parquet(run / "events.parquet")
        split = split_holdout(events, cutoff, settings.holdout_days, settings.event_weights)
        popular = popular_items(split.train_events, split.holdout_start, k)
        als = _als(settings).fit(split.train, popular)
        table = evaluate_models(split, {
            "als": lambda rows, n: als.score_top(rows, n)[0],
            "popularity": lambda rows, n: popularity_top(split, rows, n, None),
            "popularity_30d": lambda rows, n: popularity_top(split, rows, n, 30),
        }, k=k)
        table.to_csv(run / "metrics.csv")
        best_baseline = table.drop(index="als")["ndcg"].max()
        als_ndcg = table.loc["als", "ndcg"]
        gate = bool(als_ndcg >= best_baseline)
        result.update(
            k=k, holdout_days=settings.holdout_days, users=int(table["users"].iloc[0]),
            metrics={f"{m}_{c}_at_{k}": round(float(table.loc[m, c]), 6)
                     for m in table.index for c in table.columns if c != "users"},
            gate_passed=gate,
            gate_reason=(f"ndcg@{k} {als_ndcg:.4f} {'>=' if gate else '<'} best baseline "
                         f"{best_baseline:.4f}"))
    return result


def register(settings: Settings, cutoff: dt.datetime) -> dict:
    """Log the run to MLflow and register the bundle as ``recommender``."""
    from pipeline.registry import register_model

    run = settings.run_dir(cutoff)
    with _stage(settings, cutoff, "register") as result:
        trained = _read_json(run / "train.json")
        evaluated = _read_json(run / "evaluate.json")
        validated = _read_json(run / "validate.json")
        ingested = _read_json(run / "ingest.json")
        registration = register_model(
            Path(trained["bundle_path"]), run_name=f"nightly-{cutoff:%Y-%m-%d}",
            params={**trained["params"], "top_n": settings.top_n,
                    "lookback_days": settings.lookback_days,
                    "holdout_days": settings.holdout_days},
            metrics=evaluated["metrics"],
            tags={"logical_date": cutoff.isoformat(),
                  "rows_snapshot": str(ingested["snapshot_rows"]),
                  "rows_clean": str(validated.get("rows", 0) - validated.get("bad_rows", 0)),
                  "validation_passed": str(validated.get("passed")),
                  "lake_path": str(settings.lake_events_dir)},
            gate_passed=evaluated["gate_passed"], gate_reason=evaluated["gate_reason"])
        result.update(registration.to_dict())
    return result


def publish(settings: Settings, cutoff: dt.datetime, dsn: str | None = None) -> dict:
    """Top-N for every user seen before the cutoff from the champion, plus ``__default__``."""
    from pipeline.registry import load_champion
    from pipeline.serving import publish_lists

    run = settings.run_dir(cutoff)
    with _stage(settings, cutoff, "publish") as result:
        model, version = load_champion()
        users = pd.read_parquet(run / "events.parquet", columns=["user_id"])["user_id"].unique()
        lists = model.predict(pd.DataFrame({"user_id": users.astype(str)}),
                              params={"n": settings.top_n})
        default = model.unwrap_python_model().recommender.default_list(settings.top_n)
        lists = pd.concat([lists, default.assign(user_id=DEFAULT_USER)], ignore_index=True)
        lists["generated_at"] = pd.Timestamp(cutoff)
        published = publish_lists(lists, dsn=dsn, sqlite_path=settings.serving_sqlite_path,
                                  model_version=str(version), logical_date=cutoff)
        result.update(model_version=str(version), rows=published.rows, users=published.users,
                      serving_version=published.version, table=published.table,
                      target="postgres" if dsn else str(settings.serving_sqlite_path))
    return result


def _als(settings: Settings):
    from pipeline.recommender import AlsRecommender

    return AlsRecommender(factors=settings.als_factors, regularization=settings.als_regularization,
                          alpha=settings.als_alpha, iterations=settings.als_iterations,
                          random_state=settings.seed)


def _write_parquet(frame: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())
