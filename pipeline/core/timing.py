"""Seconds per named stage of a long piece of work, for logs and benchmarks."""

from __future__ import annotations

import time


class StageClock:
    """``lap(name)`` records the seconds since the previous lap (or since creation)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> float:
        now = time.perf_counter()
        self.laps[name] = round(now - self._last, 3)
        self._last = now
        return self.laps[name]
