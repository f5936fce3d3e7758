"""Tuning: expanding folds never reach the cutoff; the Optuna search keeps the best within
its budget, prunes weak trials after a fold, and is seeded."""

from __future__ import annotations

import datetime as dt
import logging

import optuna
import pandas as pd
import pytest

from pipeline.evaluation import tuning
from pipeline.evaluation.tuning import SEARCH_SPACE, expanding_folds, tune_twostage

UTC = dt.timezone.utc
CUTOFF = dt.datetime(2024, 3, 1, tzinfo=UTC)
BASE = {name: values[0] for name, values in SEARCH_SPACE.items()}


def test_expanding_folds_are_consecutive_and_end_at_the_cutoff():
    folds = expanding_folds(CUTOFF, 3, 7)
    assert [(s.date().isoformat(), e.date().isoformat()) for s, e in folds] == [
        ("2024-02-09", "2024-02-16"),
        ("2024-02-16", "2024-02-23"),
        ("2024-02-23", "2024-03-01"),
    ]
    with pytest.raises(ValueError):
        expanding_folds(CUTOFF, 0, 7)


def test_search_keeps_the_best_trial_and_never_sees_the_cutoff(monkeypatch):
    seen = []

    def fake_fold(events, start, end, params, items, users, weights, k=10):
        seen.append(events.frame["timestamp"].max())
        assert end <= CUTOFF
        return params["max_depth"] / 10.0

    monkeypatch.setattr(tuning, "score_fold", fake_fold)
    events = _events(["2024-02-01", "2024-03-05"])
    result = tune_twostage(
        events,
        CUTOFF,
        {"max_depth": 3, "factors": 8},
        budget_minutes=10,
        max_trials=12,
        random_state=1,
    )
    trials = result.trials
    assert len(trials) == 12 and trials.loc[0, "max_depth"] == 3 and trials.loc[0, "factors"] == 8
    finished = trials[~trials["pruned"]]
    assert result.best_params["max_depth"] == max(finished["max_depth"])
    assert result.best_score == pytest.approx(result.best_params["max_depth"] / 10.0)
    assert all(ts < CUTOFF for ts in seen)  # the post-cutoff event was dropped
    assert set(result.best_params) == {"max_depth", "factors"}
    # the base value 8 joined the factors' choices; every other value is a point of the space
    assert set(trials["factors"]) <= {*SEARCH_SPACE["factors"], 8}
    assert set(trials["max_depth"]) <= set(SEARCH_SPACE["max_depth"])
    assert result.to_dict()["trials"] == 12


def test_weak_trials_are_pruned_after_the_first_fold(monkeypatch):
    calls = []

    def fake_fold(events, start, end, params, items, users, weights, k=10):
        calls.append(start)
        return params["max_depth"] / 10.0 + params["alpha"] / 100.0

    monkeypatch.setattr(tuning, "score_fold", fake_fold)
    result = tune_twostage(
        _events(["2024-02-01"]), CUTOFF, BASE, budget_minutes=10, max_trials=20, random_state=3
    )
    trials = result.trials
    pruned = trials[trials["pruned"]]
    assert len(pruned) >= 3 and result.to_dict()["pruned"] == len(pruned)
    # a pruned trial ran its first fold only and has no CV score; the others ran all three
    assert pruned["fold0"].notna().all() and pruned[["fold1", "fold2"]].isna().all().all()
    assert pruned["score"].isna().all() and trials.loc[~trials["pruned"], "score"].notna().all()
    assert len(calls) == 3 * (len(trials) - len(pruned)) + len(pruned)
    # each was below the median of the trials finished before it
    for number, row in pruned.iterrows():
        before = trials.loc[: number - 1]
        finished = before.loc[~before["pruned"], "fold0"]
        assert len(finished) >= tuning.PRUNER_STARTUP_TRIALS
        assert row["fold0"] < finished.median()
    assert result.best_score == trials["score"].max()


def test_the_same_data_and_seed_choose_the_same_params(monkeypatch):
    def fake_fold(events, start, end, params, items, users, weights, k=10):
        return (
            params["factors"] / 128
            + params["learning_rate"]
            - params["regularization"]
            + (0.05 if params["objective"] == "rank:ndcg" else 0.0)
            + (end - CUTOFF).days / 1000.0
        )

    monkeypatch.setattr(tuning, "score_fold", fake_fold)
    events = _events(["2024-02-01", "2024-02-20"])

    def search(seed: int) -> tuple[dict, pd.DataFrame]:
        result = tune_twostage(
            events, CUTOFF, BASE, budget_minutes=10, max_trials=15, random_state=seed
        )
        return result.best_params, result.trials.drop(columns="seconds")

    best, trials = search(7)
    again, trials_again = search(7)
    assert best == again
    pd.testing.assert_frame_equal(trials, trials_again)
    _, other = search(8)
    assert not other[list(SEARCH_SPACE)].equals(trials[list(SEARCH_SPACE)])


def test_best_params_keep_none_values(monkeypatch):
    """``label_halflife_days=None`` (no window weights) must come back as None, not as the
    NaN a table column of None and floats holds."""

    def fake_fold(events, start, end, params, items, users, weights, k=10):
        return 1.0 if params["label_halflife_days"] is None else 0.5

    monkeypatch.setattr(tuning, "score_fold", fake_fold)
    result = tune_twostage(
        _events(["2024-02-01"]),
        CUTOFF,
        {**BASE, "label_halflife_days": 28.0},
        budget_minutes=10,
        max_trials=12,
        random_state=0,
    )
    assert result.trials["label_halflife_days"].isna().any()  # some trial tried None
    assert result.best_params["label_halflife_days"] is None


def test_zero_budget_runs_only_the_base_trial(monkeypatch):
    monkeypatch.setattr(tuning, "score_fold", lambda *a, **k: 0.5)
    events = _events(["2024-02-01"])
    result = tune_twostage(events, CUTOFF, {"max_depth": 3}, budget_minutes=0)
    assert len(result.trials) == 1 and result.best_params == {"max_depth": 3}
    assert not result.trials["pruned"].any()


def test_optuna_logs_go_through_the_module_logger(monkeypatch, caplog, capsys):
    monkeypatch.setattr(tuning, "score_fold", lambda *a, **k: 0.5)
    with caplog.at_level(logging.INFO):
        tune_twostage(
            _events(["2024-02-01"]), CUTOFF, {"max_depth": 3}, budget_minutes=10, max_trials=2
        )
        optuna.logging.get_logger("optuna.study").warning("a warning from optuna")
        optuna.logging.get_logger("optuna.study").info("an info line from optuna")
    messages = [r.getMessage() for r in caplog.records]
    assert "a warning from optuna" in messages and "an info line from optuna" not in messages
    assert any(m.startswith("tuning trial 1") for m in messages)
    assert "optuna" not in capsys.readouterr().err  # Optuna's own stderr handler is off


def _events(times: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": [f"u{k}" for k in range(len(times))],
            "item_id": "i1",
            "event_type": "view",
            "value": float("nan"),
            "timestamp": pd.to_datetime(times, utc=True),
        }
    )
