"""Load a saved recommender bundle of either kind, as the registered pyfunc model does."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.models.als import AlsRecommender
from pipeline.models.twostage import TwoStageRecommender


def load_recommender(folder: Path):
    """Load a saved bundle of either kind: two-stage (``meta.json`` kind) or plain ALS."""
    meta = json.loads((Path(folder) / "meta.json").read_text())
    if meta.get("kind") == "twostage":
        return TwoStageRecommender.load(Path(folder))
    return AlsRecommender.load(Path(folder))
