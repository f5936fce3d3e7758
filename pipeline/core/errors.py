"""Errors that name the bad input precisely, so an operator can fix it without a debugger."""

from __future__ import annotations


class PipelineError(Exception):
    """Base class for errors the pipeline raises on purpose."""


class DataError(PipelineError):
    """Bad input data: names the file and, where known, the row and column."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        row: int | None = None,
        column: str | None = None,
    ) -> None:
        self.file, self.row, self.column = file, row, column
        where = [
            f"file {file}" if file else "",
            f"row {row}" if row is not None else "",
            f"column {column!r}" if column else "",
        ]
        location = ", ".join(part for part in where if part)
        super().__init__(f"{location}: {message}" if location else message)


class ValidationFailed(PipelineError):
    """The validation suite failed beyond what quarantine may absorb."""


class ServingError(PipelineError):
    """The serving database is unreachable, or a publish or read against it failed."""


class IngestFailed(DataError):
    """Some landing files could not be ingested; carries the ingest report (other files went in)."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        row: int | None = None,
        column: str | None = None,
        report: object = None,
    ) -> None:
        super().__init__(message, file=file, row=row, column=column)
        self.report = report


class WindowError(PipelineError):
    """The run's window holds too few events, or only stale ones: no retry can fix it.

    The message names the cutoff, the lake's newest event and a logical date that would work.
    """


class ConfigError(PipelineError):
    """The run's configuration (serving schema, connection, column mapping) is unusable:
    found when a run starts, before anything is ingested or trained; no retry can fix it."""
