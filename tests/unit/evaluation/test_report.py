"""The plots render to real PNG files (headless)."""

from __future__ import annotations

import pandas as pd

from pipeline.evaluation.report import (
    plot_feature_importance,
    plot_metrics_comparison,
    plot_score_distribution,
)

PNG = b"\x89PNG\r\n\x1a\n"


def test_plots_are_written_as_png(tmp_path):
    table = pd.DataFrame({"ndcg": [0.2, 0.1], "recall": [0.3, 0.2]}, index=["model", "popularity"])
    paths = [
        plot_metrics_comparison(table, tmp_path / "m.png", champion={"ndcg": 0.19, "recall": 0.25}),
        plot_score_distribution(
            pd.Series([0.1, 0.5, 0.9, 0.2]),
            tmp_path / "s.png",
            by=pd.Series(["als", "als", "popular", "popular"]),
        ),
        plot_feature_importance(pd.Series({"recency": 3.0, "als_score": 5.0}), tmp_path / "f.png"),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == PNG and path.stat().st_size > 1000
