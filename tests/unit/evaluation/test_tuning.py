"""Tuning: expanding folds never reach the cutoff; the search keeps the best and its budget."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from pipeline.evaluation import tuning
from pipeline.evaluation.tuning import SEARCH_SPACE, expanding_folds, sample_params, tune_twostage

UTC = dt.timezone.utc
CUTOFF = dt.datetime(2024, 3, 1, tzinfo=UTC)


def test_expanding_folds_are_consecutive_and_end_at_the_cutoff():
    folds = expanding_folds(CUTOFF, 3, 7)
    assert [(s.date().isoformat(), e.date().isoformat()) for s, e in folds] == [
        ("2024-02-09", "2024-02-16"), ("2024-02-16", "2024-02-23"), ("2024-02-23", "2024-03-01")]
    with pytest.raises(ValueError):
        expanding_folds(CUTOFF, 0, 7)


def test_sampled_params_stay_inside_the_space():
    rng = np.random.default_rng(0)
    for _ in range(20):
        params = sample_params(rng)
        assert all(params[name] in values for name, values in SEARCH_SPACE.items())


def test_search_keeps_the_best_trial_and_never_sees_the_cutoff(monkeypatch):
    seen = []

    def fake_score(events, folds, params, items, users, weights, k=10):
        seen.append(events.frame["timestamp"].max())
        assert all(end <= CUTOFF for _, end in folds)
        return [params["max_depth"] / 10.0] * len(folds)

    monkeypatch.setattr(tuning, "score_params", fake_score)
    events = _events(["2024-02-01", "2024-03-05"])
    result = tune_twostage(events, CUTOFF, {"max_depth": 3, "factors": 8}, budget_minutes=10,
                           max_trials=12, random_state=1)
    assert len(result.trials) == 12
    assert result.best_params["max_depth"] == max(result.trials["max_depth"])
    assert result.best_score == pytest.approx(result.best_params["max_depth"] / 10.0)
    assert all(ts < CUTOFF for ts in seen)          # the post-cutoff event was dropped
    assert set(result.best_params) == {"max_depth", "factors"}


def test_zero_budget_runs_only_the_base_trial(monkeypatch):
    monkeypatch.setattr(tuning, "score_params", lambda *a, **k: [0.5])
    events = _events(["2024-02-01"])
    result = tune_twostage(events, CUTOFF, {"max_depth": 3}, budget_minutes=0)
    assert len(result.trials) == 1 and result.best_params == {"max_depth": 3}


def _events(times: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"user_id": [f"u{k}" for k in range(len(times))],
                         "item_id": "i1", "event_type": "view", "value": float("nan"),
                         "timestamp": pd.to_datetime(times, utc=True)})
