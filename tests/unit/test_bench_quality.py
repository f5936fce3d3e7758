"""The quality benchmark's own pieces: the popularity baseline and the win check."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd

from benchmarks import bench_quality as bq

UTC = dt.timezone.utc
CUTOFF = dt.datetime(2024, 3, 1, tzinfo=UTC)


def _events(rows):
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    frame["timestamp"] = pd.to_datetime(frame["timestamp"], utc=True)
    return frame


def test_popular_lists_rank_by_distinct_recent_users_and_skip_seen_items(monkeypatch):
    monkeypatch.setattr(bq, "K", 2)
    train = _events(
        [
            ("u1", "old", "2023-01-01"),
            ("u2", "old", "2023-01-02"),
            ("u3", "old", "2023-01-03"),  # popular, but not lately
            ("u1", "a", "2024-02-20"),
            ("u1", "a", "2024-02-21"),  # one user twice
            ("u2", "b", "2024-02-20"),
            ("u3", "b", "2024-02-22"),
            ("u3", "c", "2024-02-25"),
        ]
    )
    lists = bq._popular_lists(train, CUTOFF, np.array(["u3", "new"], object), 30)
    assert lists[lists["user_id"] == "new"]["item_id"].tolist() == ["b", "a"]
    assert lists[lists["user_id"] == "u3"]["item_id"].tolist() == ["a"]  # b, c, old seen
    all_time = bq._popular_lists(train, CUTOFF, np.array(["new"], object), None)
    assert all_time["item_id"].tolist() == ["old", "b"]


def test_table_counts_a_win_only_when_ahead_of_every_baseline(capsys):
    rows = []
    for cutoff, (pop, knn, model) in zip(
        bq.CUTOFFS, [(0.3, 0.2, 0.35), (0.4, 0.1, 0.39), (0.2, 0.25, 0.25)], strict=True
    ):
        rows += [
            {"method": "popularity (30 days)", "cutoff": cutoff, "all": pop},
            {"method": "item-kNN cosine", "cutoff": cutoff, "all": knn},
            {"method": bq.PUBLISHED, "cutoff": cutoff, "all": model},
        ]
    bq._print_table(pd.DataFrame(rows), "all")
    out = capsys.readouterr().out
    assert f"two-stage beats every baseline at: {bq.CUTOFFS[0]} (of 3)" in out  # tie is no win
