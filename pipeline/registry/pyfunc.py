"""MLflow pyfunc wrapper: ``models:/recommender@champion`` alone produces ranked lists.

Input: a DataFrame with a ``user_id`` column. Params: ``n`` (list length, default 10).
Output: user_id, rank, item_id, score, reason, source (``ranker`` for re-ranked items,
``popular`` for the cold-start/fallback list). The bundle is a :class:`TwoStageRecommender`
(older bundles holding an ``AlsRecommender`` still load).
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import pandas as pd

from pipeline.models.bundle import load_recommender

BUNDLE_ARTIFACT = "bundle"


class RecommenderModel(mlflow.pyfunc.PythonModel):
    """Loads the saved recommender folder and serves batch predictions."""

    def load_context(self, context) -> None:
        self.recommender = load_recommender(Path(context.artifacts[BUNDLE_ARTIFACT]))

    def predict(
        self, context, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        n = int((params or {}).get("n", 10))
        return self.recommender.recommend(model_input["user_id"].astype(str), n)
