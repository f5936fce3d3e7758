"""The nightly stages around tuning: ``tune`` picks the params, ``train`` and ``evaluate`` both
read them from the run folder, so the DAG can run those two side by side."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os

import pandas as pd
import pytest

from pipeline import nightly
from pipeline.core.config import Settings
from pipeline.lake.demo import write_landing
from pipeline.lake.demo.synthetic import generate_clickstream

CUTOFF = dt.datetime(2024, 2, 10, tzinfo=dt.timezone.utc)


def test_train_and_evaluate_use_the_params_tune_chose(tmp_path, monkeypatch):
    data = generate_clickstream(n_users=120, n_items=60, n_days=40, start="2024-01-01", seed=5)
    write_landing(data, tmp_path / "landing", name="clicks", fmt="csv")
    settings = Settings(
        data_dir=tmp_path,
        landing_settle_seconds=0.0,
        als_factors=8,
        als_iterations=2,
        ranker_bags=1,
        holdout_days=7,
        tune=True,
        tune_budget_minutes=0.0,
    )  # one trial: the settings' own params
    nightly.ingest(settings, CUTOFF)
    checked = nightly.validate(settings, CUTOFF)
    run = settings.run_dir(CUTOFF)
    # ingest validated every landing row: validate re-checks nothing and links the snapshot
    assert checked["passed"] and checked["data_docs_path"] is None
    assert os.path.samefile(run / "events_raw.parquet", run / "events.parquet")
    built = nightly.build_features(settings, CUTOFF)
    assert (run / "events_encoded.parquet").exists() and built["events"] == checked["rows"]
    tuned = nightly.tune(settings, CUTOFF)
    trials = pd.read_csv(run / "tuning.csv")
    assert tuned["tuned"] is True and len(trials) == 1
    assert tuned["params"]["factors"] == 8 and tuned["tuning"]

    # As if the search had picked 12 factors: both stages must follow tune.json.
    chosen = {**tuned["params"], "factors": 12}
    (run / "tune.json").write_text(json.dumps({**tuned, "params": chosen}))
    built = []
    real = nightly._twostage
    monkeypatch.setattr(
        nightly,
        "_twostage",
        lambda s, params=None: built.append(dict(params or {})) or real(s, params),
    )
    trained = nightly.train(settings, CUTOFF)
    assert trained["params"]["factors"] == 12
    nightly.evaluate(settings, CUTOFF)
    assert built and all(p.get("factors") == 12 for p in built), built

    # Without tune, the settings' own params.
    untuned = nightly.tune(dataclasses.replace(settings, tune=False), CUTOFF)
    assert untuned["tuned"] is False and untuned["params"]["factors"] == 8


def test_a_bad_serving_configuration_stops_the_run_at_its_first_stage(tmp_path, monkeypatch):
    """A hostile schema name or an unparseable DSN fails ``ingest`` before anything is read
    (no retries: ConfigError), rather than ``register`` after the night's training."""
    import pytest

    from pipeline.core.errors import ConfigError
    from pipeline.serving.store import check_config

    data = generate_clickstream(n_users=30, n_items=20, n_days=10, start="2024-02-01", seed=2)
    write_landing(data, tmp_path / "landing", name="clicks", fmt="csv")
    settings = Settings(data_dir=tmp_path, landing_settle_seconds=0.0)
    monkeypatch.setenv("RECS_SERVING_SCHEMA", 'recs"; drop table x; --')
    with pytest.raises(ConfigError, match="invalid serving schema name"):
        nightly.ingest(settings, CUTOFF, dsn="postgresql://u:secret@127.0.0.1/test")
    assert not (tmp_path / "lake").exists()  # nothing ingested
    monkeypatch.delenv("RECS_SERVING_SCHEMA")
    with pytest.raises(ConfigError) as caught:
        check_config("postgresql://u:secret@127.0.0.1:notaport/test")
    assert "secret" not in str(caught.value)
    with pytest.raises(ConfigError, match="unsupported serving DSN scheme"):
        check_config("mysql://u:secret@127.0.0.1/test")
    assert check_config(None) == "the embedded SQLite file"
    assert check_config("postgresql://u:secret@127.0.0.1/test").endswith("schema recs")


def test_train_and_evaluate_share_the_label_windows_fitted_once(tmp_path, monkeypatch):
    """label_windows fits train's label windows once; train reads them all and saves the
    model it would fit alone; evaluate (at the holdout start) fits only its two older
    windows and takes the chain's stage one at the holdout start as its own."""
    import shutil

    from pipeline.models.twostage import TwoStageRecommender

    data = generate_clickstream(n_users=150, n_items=60, n_days=70, start="2024-01-01", seed=5)
    write_landing(data, tmp_path / "landing", name="clicks", fmt="csv")
    cutoff = dt.datetime(2024, 3, 10, tzinfo=dt.timezone.utc)
    settings = Settings(data_dir=tmp_path, landing_settle_seconds=0.0, als_factors=8, ranker_bags=1)
    for stage in ("ingest", "validate", "build_features", "tune"):
        getattr(nightly, stage)(settings, cutoff)
    shared = nightly.label_windows(settings, cutoff)
    run = settings.run_dir(cutoff)
    assert len(shared["windows"]) == settings.label_windows
    holdout = cutoff - dt.timedelta(days=settings.holdout_days)
    assert shared["stage_one_kept"] == [holdout.isoformat()]  # train's newest window's start

    fitted = []
    real = TwoStageRecommender._labelled_window
    monkeypatch.setattr(
        TwoStageRecommender,
        "_labelled_window",
        lambda self, events, start, *a: fitted.append(start) or real(self, events, start, *a),
    )
    nightly.train(settings, cutoff)
    assert fitted == []  # every window read from the chain
    with_chain = TwoStageRecommender.load(run / "model").fingerprint()
    nightly.evaluate(settings, cutoff)
    assert fitted == [holdout - dt.timedelta(days=d) for d in (49, 42)]  # its two oldest
    assert json.loads((run / "evaluate.json").read_text())["metrics"]["model_ndcg_at_10"] > 0

    shutil.rmtree(run / nightly.LABEL_CHAIN_DIR)  # without it, train fits its own windows
    fitted.clear()
    nightly.train(settings, cutoff)
    assert len(fitted) == settings.label_windows
    assert TwoStageRecommender.load(run / "model").fingerprint() == with_chain


def test_evaluate_scores_the_candidates_of_its_lists_once_and_the_rest_apart():
    """The ranker AUC and candidate recall gathered from the lists' own candidates (and,
    for users the lists do not rank, below ``min_history``, from their own pass) equal
    scoring every evaluated user's candidates at once."""
    import numpy as np

    from pipeline.core.config import DEFAULT_EVENT_WEIGHTS
    from pipeline.core.ids import EncodedEvents
    from pipeline.evaluation.holdout import split_holdout
    from pipeline.models.candidates import candidate_recall
    from pipeline.models.ranker import held_out_scores, label_pairs
    from pipeline.models.twostage import TwoStageRecommender

    data = generate_clickstream(n_users=200, n_items=60, n_days=50, start="2024-01-01", seed=4)
    cutoff = dt.datetime(2024, 2, 19, tzinfo=dt.timezone.utc)
    events = EncodedEvents.from_frame(data.events, DEFAULT_EVENT_WEIGHTS).before(cutoff)
    split = split_holdout(events, cutoff, 7, DEFAULT_EVENT_WEIGHTS)
    model = TwoStageRecommender(
        factors=8, iterations=3, label_days=7, label_windows=2, n_bags=1, min_history=4
    ).fit(split.encoded, split.holdout_start, DEFAULT_EVENT_WEIGHTS, data.items, data.users)
    gathered = nightly._CandidateScores(model, split, events, cutoff)
    model.chunk_users = 16  # several chunks
    model.recommend_observed(split.train.user_ids[split.eval_rows], 10, gathered.add)
    assert gathered.pending.any()  # light users: not ranked by the lists
    got = gathered.finish()

    truth = gathered.truth
    rows = np.intersect1d(np.flatnonzero(np.diff(truth.indptr) > 0), split.eval_rows)
    pairs = model.rank_candidates(rows)
    expected = held_out_scores(label_pairs(pairs, truth), pairs["score"].to_numpy(np.float32))
    local = pairs.assign(row=np.searchsorted(rows, pairs["row"].to_numpy()))
    assert got["auc"] == pytest.approx(expected["auc"], abs=1e-12)
    assert got["pr_auc"] == pytest.approx(expected["pr_auc"], abs=1e-12)
    assert got["recall"] == pytest.approx(candidate_recall(local, truth[rows])["all"], abs=1e-12)
