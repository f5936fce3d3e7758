"""Readable run artifacts: plots an operator can look at in the MLflow UI.

Each function writes one PNG and returns its path. Matplotlib runs headless (Agg).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics_comparison(
    table: pd.DataFrame,
    path: Path,
    *,
    champion: dict[str, float] | None = None,
    metrics: tuple[str, ...] = ("precision", "recall", "ndcg", "map", "hit_rate"),
) -> Path:
    """Grouped bars: each model of ``table`` (rows) on each metric, plus the champion if any."""
    plt = _pyplot()
    frame = table[[m for m in metrics if m in table.columns]].copy()
    if champion:
        frame.loc["champion (re-scored)"] = pd.Series(champion)
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(len(frame), 1)
    x = np.arange(len(frame.columns))
    for offset, (model, row) in enumerate(frame.iterrows()):
        ax.bar(x + offset * width, row.to_numpy(dtype=float), width, label=str(model))
    ax.set_xticks(x + width * (len(frame) - 1) / 2, [f"{m}@10" for m in frame.columns])
    ax.set_ylabel("holdout score")
    ax.set_title("Model vs baselines on the time-based holdout")
    ax.legend(fontsize=8)
    return _save(fig, plt, path)


def plot_score_distribution(scores: pd.Series, path: Path, *, by: pd.Series | None = None) -> Path:
    """Histogram of recommendation scores (one series per ``by`` value, e.g. source)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    groups = scores.groupby(by) if by is not None else [("all", scores)]
    for name, values in groups:
        ax.hist(values.to_numpy(dtype=float), bins=40, alpha=0.6, label=str(name))
    ax.set_xlabel("score")
    ax.set_ylabel("recommendations")
    ax.set_title("Score distribution of the recommended items")
    ax.legend(fontsize=8)
    return _save(fig, plt, path)


def plot_feature_importance(importance: pd.Series, path: Path, top: int = 25) -> Path:
    """Horizontal bars of the ``top`` most important features (e.g. XGBoost gain)."""
    plt = _pyplot()
    values = importance.sort_values(ascending=True).tail(top)
    fig, ax = plt.subplots(figsize=(7, max(3, 0.28 * len(values))))
    ax.barh(values.index.astype(str), values.to_numpy(dtype=float))
    ax.set_xlabel("importance (gain)")
    ax.set_title("Ranker feature importance")
    return _save(fig, plt, path)


def plot_trend(
    history: pd.DataFrame,
    current: dict[str, float],
    path: Path,
    *,
    logical_date: pd.Timestamp,
    metric: str = "ndcg@10",
) -> Path:
    """The holdout metric by logical date: the last champions (``history``: columns
    ``logical_date``, ``version`` and one per series, e.g. ``model``, ``popularity_30d``) as
    lines, and this run (``current``: the same series) as highlighted points, so a drop or a
    narrowing lead over the baselines shows at a glance."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    frame = history.sort_values("logical_date")
    series = [c for c in frame.columns if c not in ("logical_date", "version")]
    frame[series] = frame[series].astype("float64")  # a metric a run lacks: a gap
    for name in dict.fromkeys([*series, *current]):
        style = "-o" if name == "model" else "--"
        if name in frame:
            ax.plot(
                frame["logical_date"], frame[name], style, label=f"{name} (champions)", alpha=0.8
            )
        if name in current:
            ax.scatter(
                [logical_date],
                [current[name]],
                s=80,
                zorder=3,
                edgecolor="black",
                label=f"{name} (this run)",
            )
    for row in frame.itertuples():
        if "model" in frame:
            ax.annotate(
                f"v{row.version}",
                (row.logical_date, row.model),
                fontsize=7,
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
            )
    ax.set_xlabel("logical date")
    ax.set_ylabel(f"holdout {metric}")
    ax.set_title(f"Holdout {metric}: this run against the last champions")
    ax.legend(fontsize=7)
    fig.autofmt_xdate()
    return _save(fig, plt, path)


def _save(fig, plt, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    logger.info("wrote %s", path)
    return path
