"""``publish``'s lists from worker processes (``publish_workers``): the same rows, in the same
order, with the same rule stats, as from one process; each worker loads the model once from
its bundle (``SavedLists``, a few hundred bytes through the pipe instead of the model)."""

from __future__ import annotations

import datetime as dt
import logging
import pickle

import pandas as pd
import pytest

from pipeline.core.config import DEFAULT_USER
from pipeline.lake.demo.synthetic import generate_clickstream
from pipeline.models.bundle import SavedLists, load_recommender
from pipeline.models.twostage import TwoStageRecommender
from pipeline.nightly import _served_lists
from pipeline.serving import rules
from pipeline.serving.rules import build_consumed, recommend_with_rules

CUTOFF = dt.datetime(2024, 2, 1, tzinfo=dt.timezone.utc)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    data = generate_clickstream(n_users=150, n_items=80, n_days=40, start="2024-01-01", seed=9)
    fitted = TwoStageRecommender(
        factors=8,
        iterations=3,
        label_days=7,
        label_windows=2,
        n_estimators=20,
        n_als=20,
        n_knn=20,
        n_popular=10,
        random_state=9,
    ).fit(data.events, CUTOFF, items=data.items, users=data.users)
    assert SavedLists.of(fitted) is None  # fitted here: no bundle to load in a worker
    model = load_recommender(fitted.save(tmp_path_factory.mktemp("bundle")))
    before = data.events[data.events["timestamp"] < CUTOFF]
    users = [*before["user_id"].unique(), "never-seen-1", "never-seen-2"]
    rule_args = {
        "candidate_multiplier": 3,
        "consumed": build_consumed(before),
        "items": data.items,
        "n": 5,
        "max_per_category": 2,
        "item_ttl_days": None,
        "cutoff": CUTOFF,
    }
    return model, users, rule_args


def test_two_workers_give_the_lists_and_stats_of_one(world, monkeypatch, caplog):
    model, users, rule_args = world
    monkeypatch.setattr(rules, "MIN_PARALLEL_USERS", 10)  # workers for a few users,
    monkeypatch.setattr(rules, "MIN_BLOCK_USERS", 5)  # in small blocks: many of them
    common = {"fallback": model.popular_, "default_user": DEFAULT_USER, **rule_args}
    one, one_stats = recommend_with_rules(model.recommend, users, **common)
    saved = SavedLists.of(model, threads=1)
    assert saved is not None and len(pickle.dumps(saved)) < 1_000
    with caplog.at_level(logging.INFO, logger="pipeline.serving.rules"):
        two, two_stats = recommend_with_rules(saved, users, workers=2, **common)
    pd.testing.assert_frame_equal(one, two)
    assert one_stats == two_stats and one_stats.users == len(users) + 1
    assert set(one["user_id"]) == {*users, DEFAULT_USER}
    messages = [record.getMessage() for record in caplog.records]
    assert sum("model loaded in" in m for m in messages) == 2  # once per worker
    assert any(f"lists for {len(users)} of {len(users)} users" in m for m in messages)


def test_publish_serves_the_same_lists_from_two_workers(world, monkeypatch):
    model, users, rule_args = world
    monkeypatch.setattr(rules, "MIN_PARALLEL_USERS", 10)
    monkeypatch.setattr(rules, "MIN_BLOCK_USERS", 5)
    one = _served_lists(model, "3", users, rule_args, None, load_recommender=None, workers=1)
    two = _served_lists(model, "3", users, rule_args, None, load_recommender=None, workers=2)
    pd.testing.assert_frame_equal(one.lists, two.lists)
    assert one.stats == two.stats


class _FailingLists:
    """A picklable recommend that fails in the worker."""

    def __call__(self, users, n):
        raise RuntimeError("no lists today")


def test_a_block_that_fails_in_a_worker_fails_the_lists(world, monkeypatch):
    model, users, rule_args = world
    monkeypatch.setattr(rules, "MIN_PARALLEL_USERS", 10)
    monkeypatch.setattr(rules, "MIN_BLOCK_USERS", 5)
    with pytest.raises(RuntimeError, match="no lists today"):
        recommend_with_rules(
            _FailingLists(), users, fallback=model.popular_, workers=2, **rule_args
        )


def test_workers_must_be_positive(world):
    model, users, rule_args = world
    with pytest.raises(ValueError, match="workers"):
        recommend_with_rules(
            model.recommend, users, fallback=model.popular_, workers=0, **rule_args
        )


def test_workers_start_when_main_cannot_be_rerun(world, monkeypatch, tmp_path):
    """In an Airflow 3 task ``__main__`` is the ``airflow`` command, whose import fails in a
    fresh process (the task blanks the metadata DB URL); ``spawn`` would re-run it in every
    worker, which then dies before it starts. Here ``__main__`` is a script that raises."""
    import sys

    script = tmp_path / "airflow_like_main.py"
    script.write_text("raise RuntimeError('the airflow command cannot start here')\n")
    main = sys.modules["__main__"]
    monkeypatch.setattr(main, "__file__", str(script), raising=False)
    monkeypatch.setattr(main, "__spec__", None, raising=False)
    model, users, rule_args = world
    monkeypatch.setattr(rules, "MIN_PARALLEL_USERS", 10)
    monkeypatch.setattr(rules, "MIN_BLOCK_USERS", 5)
    common = {"fallback": model.popular_, "default_user": DEFAULT_USER, **rule_args}
    one, _ = recommend_with_rules(model.recommend, users, **common)
    two, _ = recommend_with_rules(SavedLists.of(model, threads=1), users, workers=2, **common)
    pd.testing.assert_frame_equal(one, two)
    assert main.__file__ == str(script)  # put back
