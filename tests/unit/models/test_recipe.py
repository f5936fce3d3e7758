"""The two-stage recipe: defaults (the saved/logged parameter dict), replace, from_dict, and
how the model and its components are built from it."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from pipeline.models.candidates import CandidateGenerator
from pipeline.models.ranker import Ranker
from pipeline.models.recipe import LEGACY_PARAMS, TwoStageRecipe
from pipeline.models.twostage import TwoStageRecommender

#: get_params() of a default TwoStageRecommender before the recipe existed: keys, order and
#: values are logged to MLflow, stored in bundles and hashed into fingerprints.
DEFAULTS = {
    "factors": 64,
    "regularization": 0.05,
    "alpha": 2.0,
    "iterations": 15,
    "n_als": 100,
    "n_knn": 100,
    "n_popular": 50,
    "knn_k": 100,
    "knn_method": "cosine",
    "n_recent": 20,
    "warm_iterations": 5,
    "knn_max_users": None,
    "label_days": 14,
    "label_windows": 6,
    "label_stride_days": 7,
    "label_halflife_days": None,
    "max_label_users": 2_000,
    "min_history": 1,
    "objective": "rank:ndcg",
    "max_depth": 6,
    "learning_rate": 0.1,
    "min_child_weight": 1.0,
    "subsample": 0.8,
    "colsample_bytree": 0.8,
    "n_estimators": 300,
    "n_bags": 5,
    "bag_budget_pairs": 2_000_000,
    "popular_days": 30,
    "cold_segment": "auto",
    "cold_shrinkage": 50.0,
    "random_state": 42,
}
RUNTIME = ("num_threads", "n_jobs", "bag_workers")
#: recipe fields the two-stage model reads itself (not passed to a component by name)
OWN_FIELDS = {
    "n_recent",
    "label_days",
    "label_windows",
    "label_stride_days",
    "label_halflife_days",
    "max_label_users",
    "min_history",
    "popular_days",
    "cold_segment",
    "cold_shrinkage",
}


def test_defaults_are_the_models_params_in_order():
    assert list(TwoStageRecipe().to_dict().items()) == list(DEFAULTS.items())
    assert list(TwoStageRecommender().get_params().items()) == list(DEFAULTS.items())
    assert TwoStageRecommender().recipe == TwoStageRecipe()


def test_the_recipe_is_frozen_and_replace_returns_a_copy():
    recipe = TwoStageRecipe()
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.factors = 8  # type: ignore[misc]
    changed = recipe.replace(factors=8, cold_segment="age_band")
    assert (changed.factors, changed.cold_segment) == (8, "age_band")
    assert recipe.factors == 64
    assert list(changed.to_dict()) == list(DEFAULTS)


def test_replace_rejects_unknown_names():
    with pytest.raises(ValueError, match="'factor'"):
        TwoStageRecipe().replace(factor=8)
    with pytest.raises(ValueError, match="'num_threads'"):  # a runtime knob, not the recipe
        TwoStageRecipe().replace(num_threads=2)


def test_from_dict_fills_legacy_params_and_rejects_unknown_names():
    old = {k: v for k, v in DEFAULTS.items() if k not in LEGACY_PARAMS}
    old["factors"] = 8
    recipe = TwoStageRecipe.from_dict(old)
    assert recipe.to_dict() == {**DEFAULTS, **LEGACY_PARAMS, "factors": 8}
    assert recipe.n_bags == 1 and recipe.bag_budget_pairs is None
    assert recipe.max_label_users == 2**62 and recipe.label_halflife_days is None
    assert TwoStageRecipe.from_dict(DEFAULTS) == TwoStageRecipe()  # present keys win
    with pytest.raises(ValueError, match="'colour'"):
        TwoStageRecipe.from_dict({**DEFAULTS, "colour": "red"})


def test_keywords_override_the_recipe_and_runtime_knobs_stay_outside():
    model = TwoStageRecommender(
        TwoStageRecipe(factors=8, n_bags=2), n_bags=3, num_threads=2, n_jobs=4, bag_workers=1
    )
    assert model.recipe == TwoStageRecipe(factors=8, n_bags=3)
    assert model.get_params() == {**DEFAULTS, "factors": 8, "n_bags": 3}
    assert (model.num_threads, model.n_jobs, model.bag_workers) == (2, 4, 1)
    assert not set(RUNTIME) & set(model.get_params())
    assert TwoStageRecommender(factors=8).recipe == TwoStageRecipe(factors=8)
    with pytest.raises(ValueError, match="'factor'"):
        TwoStageRecommender(factor=8)
    with pytest.raises(TypeError, match="TwoStageRecipe"):
        TwoStageRecommender(DEFAULTS)  # type: ignore[arg-type]


def test_set_params_replaces_the_recipe_and_sets_runtime_knobs():
    model = TwoStageRecommender()
    before = model.recipe
    assert model.set_params(factors=8, num_threads=3) is model
    assert model.recipe == before.replace(factors=8) and model.num_threads == 3
    with pytest.raises(ValueError, match="'nope'"):
        model.set_params(factors=16, nope=1)
    assert model.recipe.factors == 8  # nothing applied from a rejected call


def test_components_get_every_recipe_field_they_name():
    recipe = TwoStageRecipe(
        factors=8, knn_method="bm25", n_bags=2, objective="rank:pairwise", random_state=7
    )
    model = TwoStageRecommender(recipe, num_threads=2, n_jobs=3, bag_workers=1)
    generator, ranker = model._generator(), model._ranker()
    for component in (generator, ranker):
        for name, value in recipe.kwargs_for(type(component)).items():
            assert getattr(component, name) == value, name
    assert generator.num_threads == 2 and (ranker.n_jobs, ranker.bag_workers) == (3, 1)
    assert (generator.factors, generator.knn_method, generator.random_state) == (8, "bm25", 7)
    assert (ranker.n_bags, ranker.objective, ranker.random_state) == (2, "rank:pairwise", 7)


def test_every_recipe_field_reaches_a_component_or_the_model():
    """A renamed component parameter would silently stop receiving its recipe field."""

    def params(cls):
        return set(inspect.signature(cls).parameters)

    fields = set(TwoStageRecipe.names())
    assert fields == (params(CandidateGenerator) | params(Ranker) | OWN_FIELDS) & fields
    assert params(CandidateGenerator) - fields == {"num_threads"}
    assert params(Ranker) - fields == {
        "early_stopping_rounds",
        "validation_share",
        "prior",
        "n_jobs",
        "bag_workers",
    }
