"""run_starts: the first position of each run of equal values in a sorted array."""

from __future__ import annotations

import numpy as np

from pipeline.core.arrays import run_starts


def test_run_starts_known_answers():
    assert run_starts(np.array([3, 3, 5, 7, 7, 7])).tolist() == [0, 2, 3]
    assert run_starts(np.array([4])).tolist() == [0]
    assert run_starts(np.array(["a", "a", "b"], dtype=object)).tolist() == [0, 2]


def test_run_starts_of_nothing_is_empty():
    assert run_starts(np.zeros(0, np.int64)).tolist() == []
