"""Load a saved recommender bundle of either kind, as the registered pyfunc model does; and
:class:`SavedLists`, a bundle's ``recommend`` that worker processes can be handed."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.models.als import AlsRecommender
from pipeline.models.twostage import TwoStageRecommender

_LOADED: dict[tuple[str, int], tuple[AlsRecommender | TwoStageRecommender, float]] = {}


def load_recommender(folder: Path):
    """Load a saved bundle of either kind: two-stage (``meta.json`` kind) or plain ALS. The
    recommender remembers its folder (``bundle_dir_``), for :meth:`SavedLists.of`."""
    meta = json.loads((Path(folder) / "meta.json").read_text())
    recommender: AlsRecommender | TwoStageRecommender
    if meta.get("kind") == "twostage":
        recommender = TwoStageRecommender.load(Path(folder))
    else:
        recommender = AlsRecommender.load(Path(folder))
    recommender.bundle_dir_ = Path(folder)
    return recommender


@dataclass(frozen=True)
class SavedLists:
    """``recommend(user_ids, n)`` of the bundle saved in ``folder``, loaded once per process
    on first use with ``threads`` threads for its compiled loops (0: every CPU): a picklable
    stand-in for a loaded model's ``recommend``, for worker processes (pickling the model
    itself would copy all of it through a pipe to each of them)."""

    folder: str
    threads: int = 0

    @classmethod
    def of(cls, recommender, threads: int = 0) -> SavedLists | None:
        """The saved lists of a recommender loaded from a bundle that is still on disk;
        None for a model fitted in this process (or whose folder is gone)."""
        folder = getattr(recommender, "bundle_dir_", None)
        if folder is None or not (Path(folder) / "meta.json").exists():
            return None
        return cls(str(folder), threads)

    def load(self) -> float:
        """Load the bundle in this process unless loaded; returns the seconds it took."""
        key = (self.folder, self.threads)
        if key not in _LOADED:
            started = time.perf_counter()
            recommender = load_recommender(Path(self.folder))
            recommender.use_threads(self.threads)
            _LOADED[key] = (recommender, time.perf_counter() - started)
        return _LOADED[key][1]

    def __call__(self, user_ids: pd.Series | np.ndarray | list, n: int) -> pd.DataFrame:
        self.load()
        return _LOADED[(self.folder, self.threads)][0].recommend(user_ids, n)
