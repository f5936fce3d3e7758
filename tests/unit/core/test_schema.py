"""Contract booleans read the same way everywhere (consent at ingest, available in rules)."""

from __future__ import annotations

import pandas as pd

from pipeline.core.schema import parse_bool


def test_parse_bool_known_words_missing_and_unreadable():
    values = pd.Series([" TRUE", "f", "1", "no", None, "maybe", True, 0], dtype=object)
    got = parse_bool(values)
    assert got.dtype == "boolean"
    assert got.tolist() == [True, False, True, False, pd.NA, pd.NA, True, False]
