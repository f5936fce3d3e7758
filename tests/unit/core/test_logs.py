"""Library output on stderr becomes log records at the right level."""

from __future__ import annotations

import logging
import sys

from pipeline.core.logs import stderr_to_log


def test_lines_printed_to_stderr_become_records_of_the_given_logger(caplog, capsys):
    log = logging.getLogger("pipeline.test_logs")
    with caplog.at_level(logging.INFO, logger="pipeline.test_logs"), stderr_to_log(log):
        print("Successfully registered model 'recommender'.", file=sys.stderr)
        sys.stderr.write("Created version '1' ")
        sys.stderr.write("of model 'recommender'.\n\n")
        sys.stderr.write("no newline at the end")
    records = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == log.name]
    assert records == [
        (logging.INFO, "Successfully registered model 'recommender'."),
        (logging.INFO, "Created version '1' of model 'recommender'."),
        (logging.INFO, "no newline at the end"),
    ]
    assert capsys.readouterr().err == ""  # nothing reached the real stderr
