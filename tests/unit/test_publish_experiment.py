"""``publish``'s lists per A/B variant (``pipeline.nightly._served_lists``) with stand-in
models: each user gets the lists of the variant ``Experiment.assign`` says, under the same
business rules; a model variant of the served version reuses its lists (no list computed twice),
another version is loaded once; popularity is the served model's fallback list; holdout users
get no rows but an assignment; every recommending variant gets its ``__default__:<variant>``."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import DEFAULT_USER
from pipeline.nightly import _served_lists
from pipeline.serving.experiments import Experiment

CUTOFF = dt.datetime(2024, 2, 1, tzinfo=dt.timezone.utc)
USERS = np.array([f"user-{index}" for index in range(400)], dtype=object)
ITEMS = [f"item-{index:02d}" for index in range(40)]


class FakeModel:
    """Candidates: a per-model rotation of the catalogue; ``popular_``: items in order."""

    def __init__(self, shift: int) -> None:
        self.shift = shift
        self.asked: list[str] = []
        self.popular_ = pd.DataFrame(
            {
                "item_id": ITEMS,
                "score": np.linspace(1, 0.1, len(ITEMS)),
                "reason": "popular this week",
            }
        )

    def recommend(self, users, k: int) -> pd.DataFrame:
        self.asked.extend(users)
        rows = [
            (
                user,
                rank + 1,
                ITEMS[(self.shift + hash_(user) + rank) % len(ITEMS)],
                1.0 / (rank + 1),
                f"model {self.shift}",
                "ranker",
            )
            for user in users
            for rank in range(k)
        ]
        return pd.DataFrame(
            rows, columns=["user_id", "rank", "item_id", "score", "reason", "source"]
        )


def hash_(user: str) -> int:
    return int(user.split("-")[1])


RULES = {
    "candidate_multiplier": 2,
    "n": 5,
    "max_per_category": None,
    "item_ttl_days": None,
    "cutoff": CUTOFF,
    "items": None,
    "consumed": pd.DataFrame({"user_id": USERS[:50], "item_id": ITEMS[0]}),
}


def _experiment() -> Experiment:
    return Experiment.from_dict(
        {
            "name": "ab-test",
            "salt": "salt-1",
            "variants": [
                {"name": "control", "kind": "popularity", "share": 0.3},
                {"name": "model", "kind": "model", "model": "5", "share": 0.2},
                {"name": "other", "kind": "model", "model": "7", "share": 0.2},
                {"name": "holdout", "kind": "holdout", "share": 0.1},
            ],
        }
    ).start()


def test_without_an_experiment_the_lists_are_the_models():
    served = _served_lists(FakeModel(0), "5", USERS, RULES, None, load_recommender=None)
    assert served.assignments is None and served.summary is None
    assert "variant" not in served.lists and set(served.lists["user_id"]) == {*USERS, DEFAULT_USER}


def test_each_user_gets_the_lists_of_their_variant():
    experiment = _experiment()
    model, other = FakeModel(0), FakeModel(11)
    loaded: list[str] = []

    def load(version: str) -> FakeModel:
        loaded.append(version)
        return other

    served = _served_lists(model, "5", USERS, RULES, experiment, load_recommender=load)
    baseline = _served_lists(FakeModel(0), "5", USERS, RULES, None, load_recommender=None).lists
    lists = served.lists

    assert loaded == ["7"]  # the other version once; "5" is the served model: reused
    assert sorted(model.asked) == sorted(set(model.asked))  # nobody's list computed twice
    assignment = dict(zip(USERS, experiment.assign(USERS), strict=True))
    by_user = lists.groupby("user_id")
    for user, variant in assignment.items():
        if variant == "holdout":
            assert user not in by_user.groups
            continue
        rows = by_user.get_group(user).sort_values("rank")
        assert set(rows["variant"].map(str)) == {str(variant)}
        expected = baseline[baseline["user_id"] == user].sort_values("rank")
        if variant in (None, "model"):  # the served model, the same rules
            assert list(rows["item_id"]) == list(expected["item_id"])
            assert set(rows["model_version"]) == {"5"}
        elif variant == "control":  # the served model's fallback, minus what was consumed
            consumed = set(RULES["consumed"].loc[RULES["consumed"]["user_id"] == user, "item_id"])
            assert list(rows["item_id"]) == [i for i in ITEMS if i not in consumed][:5]
            assert set(rows["source"]) == {"popular"} and set(rows["model_version"]) == {"5"}
        else:
            assert set(rows["model_version"]) == {"7"} and set(rows["reason"]) == {"model 11"}
        assert set(rows["experiment"]) == ({None} if variant is None else {"ab-test"})

    defaults = lists[lists["user_id"].str.startswith(DEFAULT_USER)]
    assert set(defaults["user_id"]) == {
        DEFAULT_USER,
        "__default__:control",
        "__default__:model",
        "__default__:other",
    }
    assert defaults.loc[defaults["user_id"] == DEFAULT_USER, "variant"].isna().all()
    assert set(defaults.loc[defaults["user_id"] == "__default__:other", "model_version"]) == {"7"}

    assignments = served.assignments
    in_experiment = {user: v for user, v in assignment.items() if v is not None}
    assert dict(zip(assignments["user_id"], assignments["variant"], strict=True)) == in_experiment
    assert set(assignments["experiment"]) == {"ab-test"}
    assert served.summary["variants"]["holdout"]["users"] == sum(
        v == "holdout" for v in assignment.values()
    )
    assert served.summary["variants"]["other"]["model_version"] == "7"
    # list_stats sees the models' own lists only (not the control, not the fallbacks)
    personal = lists[served.personal]
    assert set(personal["variant"].map(str)) == {"None", "model", "other"}
    assert not personal["user_id"].str.startswith(DEFAULT_USER).any()


def test_a_missing_alias_fails_the_publish(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    from mlflow import MlflowClient

    from pipeline.registry.versions import MODEL_NAME, configure_mlflow

    configure_mlflow()
    MlflowClient().create_registered_model(MODEL_NAME)
    experiment = Experiment.from_dict(
        {
            "name": "ab",
            "salt": "s",
            "variants": [
                {"name": "control", "kind": "popularity", "share": 0.5},
                {"name": "model", "kind": "model", "model": "challenger", "share": 0.5},
            ],
        }
    ).start()
    with pytest.raises(LookupError, match="no alias 'challenger'"):
        _served_lists(FakeModel(0), "5", USERS, RULES, experiment, load_recommender=None)
