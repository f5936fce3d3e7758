"""The two-stage recommender's training recipe: one typed, immutable object.

:class:`TwoStageRecipe` holds every parameter that decides what
:class:`pipeline.models.twostage.TwoStageRecommender` learns (not how fast: the thread and
worker counts are runtime knobs of the model, not part of the recipe). Its :meth:`to_dict` is
the flat parameter dict the model reports as ``get_params()``, logs to MLflow as
``model.<name>``, stores in a bundle's ``meta.json`` and in the ``model_params`` tag, and
hashes into its fingerprint, so the field names, their order and the defaults are part of
the saved format: add fields at the end of their group only with a :data:`LEGACY_PARAMS`
value that reproduces models saved without them.

The components take their settings from the recipe by name (:meth:`TwoStageRecipe.kwargs_for`):
a recipe field is passed to every component whose constructor has a parameter of that name.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from dataclasses import dataclass

#: Parameters added after models were first saved, with the value that reproduces a model
#: saved without them: bundles and logged recipes from before ranker bagging had one ranker
#: and every label-window user; those from before the bag budget trained all ``n_bags``.
LEGACY_PARAMS = {
    "n_bags": 1,
    "max_label_users": 2**62,
    "bag_budget_pairs": None,
    "label_halflife_days": None,
    "warm_iterations": 0,
    "knn_max_users": None,
}


@dataclass(frozen=True)
class TwoStageRecipe:
    """Everything that decides what the two-stage recommender learns (see the module doc)."""

    #: candidates: ALS (factors .. iterations), item-kNN (knn_k, knn_method), how many of
    #: each source (n_als, n_knn, n_popular), the recent items a user's features read, and
    #: the ALS sweeps of a fit that starts from the previous label window's factors (0: every
    #: fit starts at random and runs ``iterations``), and the most users the item-kNN
    #: similarity is learnt from (a seeded sample of the active ones; None: all, the
    #: default: a 20% sample cost 0.0013-0.0022 nDCG@10 at 50k users, seed noise 0.0002)
    factors: int = 64
    regularization: float = 0.05
    alpha: float = 2.0
    iterations: int = 15
    n_als: int = 100
    n_knn: int = 100
    n_popular: int = 50
    knn_k: int = 100
    knn_method: str = "cosine"
    n_recent: int = 20
    warm_iterations: int = 5
    knn_max_users: int | None = None
    #: label windows: length, count, spacing, age half-life of the query weights (None: all
    #: alike), seeded sample of users per window; users with fewer items are cold
    label_days: int = 14
    label_windows: int = 6
    label_stride_days: int = 7
    label_halflife_days: float | None = None
    max_label_users: int = 2_000
    min_history: int = 1
    #: ranker: XGBoost settings, and a bag of n_bags models while n_bags x pairs stays
    #: within bag_budget_pairs (None: no budget)
    objective: str = "rank:ndcg"
    max_depth: int = 6
    learning_rate: float = 0.1
    min_child_weight: float = 1.0
    subsample: float = 0.8
    colsample_bytree: float = 0.8
    n_estimators: int = 300
    n_bags: int = 5
    bag_budget_pairs: int | None = 2_000_000
    #: cold start: popularity window (also the popular candidates' and segment features'),
    #: segment attributes ("auto": chosen by time-series CV; "a|b": these), shrinkage
    popular_days: int = 30
    cold_segment: str = "auto"
    cold_shrinkage: float = 50.0
    #: seed of every random choice (ALS, label-user samples, XGBoost bags)
    random_state: int = 42

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The parameter names, in :meth:`to_dict` order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes) -> TwoStageRecipe:
        """A copy with ``changes``; a ValueError names any unknown parameter."""
        unknown = sorted(set(changes) - set(self.names()))
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {', '.join(map(repr, unknown))}; "
                f"a TwoStageRecipe has {', '.join(self.names())}"
            )
        return dataclasses.replace(self, **changes) if changes else self

    def to_dict(self) -> dict:
        """The flat parameter dict (``get_params()``): field order, values as given."""
        return {name: getattr(self, name) for name in self.names()}

    @classmethod
    def from_dict(cls, params: Mapping[str, object]) -> TwoStageRecipe:
        """The recipe of a saved bundle or logged ``params``: absent :data:`LEGACY_PARAMS`
        take their legacy value, other absent ones the default; unknown names are rejected."""
        return cls().replace(**with_legacy_params(params))

    def kwargs_for(self, component: type) -> dict:
        """The recipe fields named like parameters of ``component``'s constructor."""
        accepted = inspect.signature(component).parameters
        return {name: value for name, value in self.to_dict().items() if name in accepted}


def with_legacy_params(params: Mapping[str, object]) -> dict:
    """``params`` of a saved model or logged recipe, completed with :data:`LEGACY_PARAMS`."""
    return {**LEGACY_PARAMS, **params}
