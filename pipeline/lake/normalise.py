"""Normalising: raw landing columns -> contract-typed event rows, and the rows rejected.

Timestamps in epoch seconds, milliseconds or microseconds or ISO-8601 with any offset become
UTC; ``event_type`` and ``device`` are lower-cased; a missing ``event_id`` is derived
deterministically from the other fields. ``consent=false`` events are dropped before anything
is stored (a blank or unreadable consent quarantines the row). Every column
outside the contract is dropped (its name is reported).

The CMS feedback columns are optional: ``position`` becomes a nullable integer (a whole
number >= 1 in any form: ``3``, ``"3"``, ``3.0``), ``placement`` text (stripped; empty ->
null). Both take part in a derived ``event_id`` only where present, so rows without them keep
the ids they always had.

Rows that cannot be stored are rejected with a ``reason`` each: invalid UTF-8 in a contract
column (a U+FFFD from a replaced byte), unreadable timestamp, missing ``user_id`` / ``item_id``
/ ``event_type``, unreadable value, a ``position`` that is not an integer >= 1, a control
character or more than 512 characters in an id or ``placement``, timestamp after the
ingestion time (plus the clock skew).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.schema import (
    CONTRACT_INPUT_COLUMNS,
    LAKE_EVENT_COLUMNS,
    LAKE_EVENT_DTYPES,
    parse_bool,
)
from pipeline.lake.readers import REPLACEMENT_CHAR

_MISSING_TEXT = ["", "nan", "NaN", "None", "null", "NULL"]
#: Id columns checked for what no serving database stores: a NUL or other control character
#: (PostgreSQL text rejects NUL), or more characters than an index entry holds (a btree
#: entry is at most ~2.7 kB; ids beyond MAX_ID_CHARS are never real ids).
ID_COLUMNS = ("event_id", "user_id", "item_id", "session_id")
MAX_ID_CHARS = 512
#: Text columns held to the ids' limits (no control character, at most MAX_ID_CHARS).
_LIMITED_TEXT_COLUMNS = (*ID_COLUMNS, "placement")
#: ``position`` is a rank: a whole number from 1 to this (a 32-bit integer's maximum).
MAX_POSITION = 2**31 - 1
POSITION_REASON = "position is not an integer >= 1"
_CONTROL_CHARS = r"[\x00-\x1f\x7f]"
_NUMBER = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")


def normalise_events(
    raw: pd.DataFrame,
    *,
    source: str,
    rows: np.ndarray | None = None,
    check_replacement: bool = False,
    latest_valid: pd.Timestamp | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, int, list[str]]:
    """Contract-typed events, rejected rows (with ``reason``), no-consent count, dropped columns.

    ``rows`` are the source row numbers (default 1..n); ``check_replacement`` quarantines rows
    with U+FFFD (undecodable bytes) in a text column; ``latest_valid`` quarantines later events.
    """
    frame = raw.reset_index(drop=True)
    dropped = [c for c in frame.columns if c not in CONTRACT_INPUT_COLUMNS]
    consent = parse_bool(frame["consent"]) if "consent" in frame else None
    # where a file has a consent column, a row whose consent is neither a true nor a false
    # word (blank included) is quarantined, never stored: consent is not assumed
    consent_unreadable = (
        consent.isna().to_numpy(bool) if consent is not None else np.zeros(len(frame), bool)
    )
    out = pd.DataFrame(index=frame.index)
    value_unreadable = pd.Series(False, index=frame.index)
    position_bad = pd.Series(False, index=frame.index)
    not_scalar: dict[str, np.ndarray] = {}  # id cells holding a JSON object or array
    for column in LAKE_EVENT_COLUMNS:
        if column == "timestamp":
            out[column] = parse_timestamps(frame[column])
        elif column == "value":
            if column in frame:
                out[column], value_unreadable = _parse_values(frame[column])
            else:
                out[column] = np.nan
        elif column == "position":
            if column in frame:
                out[column], position_bad = parse_positions(frame[column])
            else:
                out[column] = pd.array([pd.NA] * len(frame), dtype="Int64")
        else:
            values = frame[column] if column in frame else pd.Series(pd.NA, index=frame.index)
            if column in _LIMITED_TEXT_COLUMNS:
                values, structured = _canonical_ids(values)
                not_scalar[column] = structured
            out[column] = _clean_text(values)
    out["event_type"] = out["event_type"].str.lower()
    out["device"] = out["device"].str.lower()
    out["source_file"] = pd.Series(source, index=frame.index, dtype="string")
    out["source_row"] = (
        np.asarray(rows, dtype=np.int64)
        if rows is not None
        else np.arange(1, len(frame) + 1, dtype="int64")
    )

    no_consent = (
        consent.eq(False).fillna(False).to_numpy(bool)
        if consent is not None
        else np.zeros(len(out), bool)
    )
    keep = ~no_consent
    out, value_unreadable, position_bad = out[keep], value_unreadable[keep], position_bad[keep]
    reason = pd.Series("", index=out.index, dtype="string")
    reason = reason.mask(
        pd.Series(consent_unreadable[keep], index=out.index),
        "consent blank or unreadable (neither true nor false)",
    )
    if check_replacement:
        for column in (
            "event_id",
            "user_id",
            "item_id",
            "event_type",
            "device",
            "session_id",
            "placement",
        ):
            bad = out[column].str.contains(REPLACEMENT_CHAR, regex=False).fillna(False)
            reason = reason.mask(bad & (reason == ""), f"invalid UTF-8 in {column}")
    for column in _LIMITED_TEXT_COLUMNS:  # what PostgreSQL (text, btree index) never stores
        if column in not_scalar:
            structured = pd.Series(not_scalar[column][keep], index=out.index)
            kind = "text" if column == "placement" else "an id"
            reason = reason.mask(
                structured & (reason == ""), f"{column} is a JSON object or array, not {kind}"
            )
        text = out[column]
        control = text.str.contains(_CONTROL_CHARS, regex=True).fillna(False)
        reason = reason.mask(control & (reason == ""), f"{column} contains a control character")
        long = (text.str.len() > MAX_ID_CHARS).fillna(False)
        reason = reason.mask(
            long & (reason == ""), f"{column} longer than {MAX_ID_CHARS} characters"
        )
    reason = reason.mask(out["timestamp"].isna() & (reason == ""), "timestamp unreadable")
    for column in ("user_id", "item_id", "event_type"):
        reason = reason.mask(out[column].isna() & (reason == ""), f"{column} missing")
    reason = reason.mask(value_unreadable & (reason == ""), "value unreadable")
    reason = reason.mask(position_bad & (reason == ""), POSITION_REASON)
    if latest_valid is not None:
        future = (out["timestamp"] > latest_valid).fillna(False)
        reason = reason.mask(future & (reason == ""), "timestamp after ingestion time")
    bad = (reason != "").to_numpy()
    rejected = out[bad].assign(reason=reason[bad]).astype(LAKE_EVENT_DTYPES)
    events = out[~bad].copy()
    missing_id = events["event_id"].isna()
    if missing_id.any():
        events.loc[missing_id, "event_id"] = derive_event_ids(events[missing_id])
    return events.astype(LAKE_EVENT_DTYPES), rejected, int(no_consent.sum()), dropped


def parse_timestamps(values: pd.Series) -> pd.Series:
    """ISO-8601 (any offset) or epoch seconds/milliseconds/microseconds -> UTC, to the
    microsecond; unreadable -> NaT."""
    if pd.api.types.is_datetime64_any_dtype(values):
        parsed = values if values.dt.tz is not None else values.dt.tz_localize("UTC")
        return parsed.dt.tz_convert("UTC").astype("datetime64[us, UTC]")
    if pd.api.types.is_numeric_dtype(values):
        numeric, is_num = values.astype("float64"), values.notna()
    else:
        numeric, is_num = _parse_numbers(values.astype("string").str.strip(), r"^[-+]?\d+(\.\d*)?$")
    result = pd.Series(pd.NaT, index=values.index, dtype="datetime64[us, UTC]")
    if is_num.any():
        epoch = numeric[is_num].to_numpy(dtype="float64", na_value=np.nan)
        # seconds reach 1e11, and milliseconds 1e14, only in the year 5138: beyond are ms, us
        magnitude = np.abs(epoch)
        scale = np.where(magnitude >= 1e14, 1.0, np.where(magnitude > 1e11, 1e3, 1e6))
        # to whole microseconds (a millisecond or fractional-second part is kept, finer
        # parts are rounded away); beyond datetime64's range -> NaT
        micros = np.round(epoch * scale)
        ok = np.isfinite(micros) & (np.abs(micros) < 9.2e18)
        stamps = np.full(len(epoch), np.datetime64("NaT"), "datetime64[us]")
        stamps[ok] = micros[ok].astype(np.int64).astype("datetime64[us]")
        result[is_num] = pd.DatetimeIndex(stamps).tz_localize("UTC")
    is_text = ~is_num & values.notna()
    if is_text.any():
        parsed = pd.to_datetime(
            values[is_text].astype(str), utc=True, format="ISO8601", errors="coerce"
        )
        result[is_text] = parsed.dt.floor("us").dt.as_unit("us")  # nanoseconds: floored
    return result


def _parse_values(values: pd.Series) -> tuple[pd.Series, pd.Series]:
    """``value`` as float64, and where a non-empty value was not a number."""
    if pd.api.types.is_numeric_dtype(values):
        return values.astype("float64"), pd.Series(False, index=values.index)
    text = _clean_text(values)
    numbers, is_number = _parse_numbers(text, _NUMBER.pattern)
    return numbers, (text.notna() & ~is_number).fillna(False).astype(bool)


def parse_positions(values: pd.Series) -> tuple[pd.Series, pd.Series]:
    """``position`` as nullable Int64, and where a non-empty value is not a whole number
    from 1 to MAX_POSITION (text that is no number, a fraction, 0, a negative, a boolean)."""
    if pd.api.types.is_bool_dtype(values):
        present = values.notna()
        return (
            pd.Series(pd.NA, index=values.index, dtype="Int64"),
            present.fillna(False).astype(bool),
        )
    if pd.api.types.is_numeric_dtype(values):
        numbers = values.astype("float64")
        present = numbers.notna()
    else:
        text = _clean_text(values)
        numbers, _ = _parse_numbers(text, _NUMBER.pattern)
        present = text.notna()
    number = numbers.to_numpy(dtype="float64", na_value=np.nan)
    with np.errstate(invalid="ignore"):
        ok = (
            np.isfinite(number)
            & (number == np.trunc(number))
            & (number >= 1)
            & (number <= MAX_POSITION)
        )
    positions = pd.array(np.where(ok, number, 0).astype(np.int64), dtype="Int64")
    positions[~ok] = pd.NA
    bad = present.to_numpy(bool) & ~ok
    return (pd.Series(positions, index=values.index), pd.Series(bad, index=values.index))


def _parse_numbers(text: pd.Series, pattern: str) -> tuple[pd.Series, pd.Series]:
    """Vectorised (Arrow) float parsing of the strings matching ``pattern``; others -> NaN."""
    arrow = pa.array(text.array, type=pa.large_string())
    is_number = pc.fill_null(pc.match_substring_regex(arrow, pattern), False)
    numbers = pc.cast(pc.if_else(is_number, pc.utf8_trim_whitespace(arrow), None), pa.float64())
    return (
        pd.Series(numbers.to_numpy(zero_copy_only=False), index=text.index, dtype="float64"),
        pd.Series(is_number.to_numpy(zero_copy_only=False), index=text.index),
    )


def derive_event_ids(events: pd.DataFrame) -> pd.Series:
    """Deterministic id from the other fields, for files that carry no ``event_id``.

    ``position`` and ``placement`` take part only in rows that have one of them (two
    impressions of one item in the same second at two positions are two events); a row
    with neither gets the id it got before these columns existed."""
    parts = [
        events[c].astype("string").fillna("")
        for c in ("user_id", "item_id", "event_type", "value", "session_id")
    ]
    parts.insert(3, events["timestamp"].astype("int64").astype("string"))
    key = parts[0].str.cat(parts[1:], sep="\x1f")
    feedback = [
        events[c].astype("string")
        if c in events
        else pd.Series(pd.NA, index=events.index, dtype="string")
        for c in ("position", "placement")
    ]
    shown = feedback[0].notna() | feedback[1].notna()
    if shown.any():
        extra = feedback[0].fillna("").str.cat(feedback[1].fillna(""), sep="\x1f")
        key = key.where(~shown, key + "\x1f" + extra)
    return key.map(lambda k: "h" + hashlib.sha1(k.encode()).hexdigest()[:20]).astype("string")


def _canonical_ids(values: pd.Series) -> tuple[pd.Series, np.ndarray]:
    """Ids in one text form whatever their type in the file: integers, and floats with no
    fractional part, print as integers (JSON 196 and 196.0, a Parquet float 0.0 -> "196",
    "196", "0"); text stays as written. Also which cells hold a JSON object or array."""
    structured = np.zeros(len(values), bool)
    if pd.api.types.is_bool_dtype(values) or not (
        pd.api.types.is_numeric_dtype(values) or values.dtype == object
    ):
        text = values.astype("string")  # JSON-lines objects arrive as their JSON text
        maybe = text.str.match(r"\s*[\[{]").fillna(False).to_numpy(bool)
        for position in np.flatnonzero(maybe):
            with contextlib.suppress(ValueError):  # "[abc]", not JSON: an ordinary id
                structured[position] = isinstance(json.loads(text.iloc[position]), dict | list)
        return values, structured
    if pd.api.types.is_integer_dtype(values):  # Parquet integer ids: exact, vectorised
        return values.astype("string"), structured
    if pd.api.types.is_float_dtype(values):  # Parquet float ids: vectorised
        number = values.to_numpy(dtype="float64", na_value=np.nan)
        whole = np.isfinite(number) & (number == np.trunc(number)) & (np.abs(number) < 2**63)
        text = values.astype("string")
        text[whole] = number[whole].astype(np.int64).astype(str)
        return text, structured
    out = np.empty(len(values), dtype=object)  # mixed Python objects (JSON-like): per cell
    for position, cell in enumerate(values.to_numpy(dtype=object)):
        if isinstance(cell, dict | list | tuple):
            structured[position], out[position] = True, None
        elif cell is None or (pd.api.types.is_scalar(cell) and pd.isna(cell)):
            out[position] = None
        elif isinstance(cell, float) and np.isfinite(cell) and cell == int(cell):
            out[position] = str(int(cell))
        else:
            out[position] = str(cell)
    return pd.Series(out, index=values.index, dtype="string"), structured


def _clean_text(values: pd.Series) -> pd.Series:
    text = values.astype("string").str.strip()
    return text.mask(text.isin(_MISSING_TEXT))
