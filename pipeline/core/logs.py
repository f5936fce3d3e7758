"""Route what libraries print to stderr into the logging system, at the level it deserves.

MLflow's registry prints "Successfully registered model ..." and "Created version ..." straight
to ``sys.stderr``; Airflow's task logs show raw stderr at error level, so routine progress
looked like failures. :func:`stderr_to_log` turns such lines into records of a module logger.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator


class _LineLogger(io.TextIOBase):
    """A text stream that logs each complete line it is given."""

    def __init__(self, logger: logging.Logger, level: int) -> None:
        self._logger, self._level, self._pending = logger, level, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        lines = (self._pending + text).split("\n")
        self._pending = lines.pop()
        for line in lines:
            self._emit(line)
        return len(text)

    def flush(self) -> None:
        if self._pending:
            self._emit(self._pending)
            self._pending = ""

    def _emit(self, line: str) -> None:
        if line.strip():
            self._logger.log(self._level, "%s", line.rstrip())


@contextlib.contextmanager
def stderr_to_log(logger: logging.Logger, level: int = logging.INFO) -> Iterator[None]:
    """Within the block, lines written to ``sys.stderr`` become ``logger`` records at
    ``level`` (warnings and logging handlers bound to the real stderr are unaffected)."""
    stream = _LineLogger(logger, level)
    try:
        with contextlib.redirect_stderr(stream):
            yield
    finally:
        stream.flush()
