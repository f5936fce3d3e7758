"""Small NumPy helpers over sorted arrays, shared by every layer."""

from __future__ import annotations

import numpy as np


def run_starts(sorted_values: np.ndarray) -> np.ndarray:
    """Where each run of equal values starts in an array sorted by those values (the first
    position of each group); empty for an empty array."""
    if len(sorted_values) == 0:
        return np.zeros(0, np.intp)
    return np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
