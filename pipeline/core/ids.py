"""Ids encoded once: dense int32 codes for users and items, and the run's encoded events.

Every stage after ``validate`` works on codes. A run's :class:`IdMap` of users and of items is
built from its snapshot: the distinct ids, sorted (so a re-run of the same date gives the same
codes), and append-only from then on (:meth:`IdMap.extend` adds ids after the existing ones and
never renumbers). A code is a row (users) or column (items) of every matrix of the run:
training, label-window, truth and serving matrices share one id space and one shape, so a
window is a timestamp mask and never a re-indexing. Strings come back only where people or the
CMS read them: reasons, serving rows, reports.

:class:`EncodedEvents` is the run's events on those codes (``events_encoded.parquet``):

============  ================================  =========================================
column        dtype                             notes
============  ================================  =========================================
user_id       int32                             code in the user :class:`IdMap`
item_id       int32                             code in the item :class:`IdMap`
event_type    category (int8 codes)             the event-type names are the categories
weight        float32                           the event's confidence weight (config)
timestamp     datetime64[us, UTC] (int64)       UTC
value         float64                           dwell, rating or order value; NaN if absent
device        category (int8 codes)             :data:`pipeline.core.schema.DEVICES`
session_id    Int32 (nullable)                  per-run code of the session id; NA if absent
============  ================================  =========================================

**Only what trains.** Events of a type whose weight is not positive
(:func:`pipeline.core.config.untrained_event_types`: ``impression`` by default) are left out
here, once, before the id maps are built: nothing downstream of the encoding (matrices,
feature tables, label windows, holdout truth, the consumed filter in publish) ever sees them,
and a user or item known only from them gets no code. They stay in the lake and the run's
snapshot (attribution reads them there). Configure a positive weight and they are encoded
like any other type.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.config import VALUE_SCALED_EVENT_TYPES, untrained_event_types
from pipeline.core.schema import DEVICES

logger = logging.getLogger(__name__)

EVENTS_FILE = "events_encoded.parquet"
USER_IDS_FILE = "user_ids.parquet"
ITEM_IDS_FILE = "item_ids.parquet"


class IdMap:
    """Append-only map between external string ids and dense int32 codes (0, 1, ...)."""

    def __init__(self, ids: np.ndarray | list | tuple = ()) -> None:
        """``ids`` in code order: code ``c`` stands for ``ids[c]``; they must be distinct."""
        self._ids = np.array(ids, dtype=object)  # a copy: the caller's array stays writable
        self._ids.flags.writeable = False
        if len(self._ids) >= 2**31 - 1:
            raise ValueError(f"{len(self._ids):,} ids do not fit int32 codes")

    @classmethod
    def from_values(cls, values) -> IdMap:
        """The distinct ``values``, sorted (hashed first, so only the distinct ones are
        sorted): the codes a run gets for its snapshot."""
        return cls(np.sort(pd.unique(np.asarray(values, dtype=object))))

    @property
    def ids(self) -> np.ndarray:
        """The id of each code (read-only object array)."""
        return self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IdMap) and np.array_equal(self._ids, other._ids)

    __hash__ = None  # compared by content, so not hashable

    def __repr__(self) -> str:
        return f"IdMap({len(self):,} ids)"

    @cached_property
    def _index(self) -> pd.Index:
        """Hash index of the ids, built once per map (not once per lookup)."""
        index = pd.Index(self._ids, dtype=object)
        if not index.is_unique:
            raise ValueError("IdMap ids must be distinct")
        return index

    def encode(self, values) -> np.ndarray:
        """int32 code of each of ``values``; -1 where the id is not in the map."""
        values = np.asarray(values, dtype=object)
        if len(self._ids) == 0 or len(values) == 0:
            return np.full(len(values), -1, dtype=np.int32)
        return self._index.get_indexer(values).astype(np.int32)

    def decode(self, codes) -> np.ndarray:
        """The id of each code (object array); codes must be valid."""
        return self._ids[np.asarray(codes, dtype=np.int64)]

    def extend(self, values) -> IdMap:
        """A map with the ``values`` not yet known appended (sorted among themselves); every
        existing code keeps its id."""
        values = pd.unique(np.asarray(values, dtype=object))
        new = values[self.encode(values) < 0]
        if len(new) == 0:
            return self
        return IdMap(np.concatenate([self._ids, np.sort(new)]))

    def rekey(self, frame: pd.DataFrame | None, column: str) -> pd.DataFrame | None:
        """A side table (``items.csv``, ``users.csv``) keyed by codes: ``column`` encoded,
        rows of ids the map does not hold dropped (nothing of the run can refer to them)."""
        if frame is None:
            return None
        codes = self.encode(frame[column].astype(object).to_numpy())
        return frame.assign(**{column: codes})[codes >= 0].reset_index(drop=True)

    def save(self, path: Path, column: str) -> Path:
        """Write the ids in code order as a one-column Parquet file (atomically)."""
        table = pa.table({column: pa.array(list(self._ids), type=pa.string())})
        return _write_table(table, Path(path))

    @classmethod
    def load(cls, path: Path, column: str) -> IdMap:
        return cls(
            pq.read_table(path, columns=[column])
            .column(column)
            .to_numpy(zero_copy_only=False)
            .astype(object)
        )


def event_weights(events: pd.DataFrame, weights: Mapping[str, float]) -> np.ndarray:
    """Weight of each event (float64): its type's weight, times ``value`` for value-scaled
    types; 0 for types without a weight."""
    types = events["event_type"]
    if isinstance(types.dtype, pd.CategoricalDtype):  # one lookup per type, not per event
        names = types.cat.categories.astype(object)
        base = np.array([float(weights.get(t, 0.0)) for t in names] + [0.0])
        scaled_type = np.array([t in VALUE_SCALED_EVENT_TYPES for t in names] + [False])
        codes = types.cat.codes.to_numpy()  # -1 (missing) reads the trailing zero
        base, scaled = base[codes], scaled_type[codes]
    else:
        base = types.map(dict(weights)).astype("float64").fillna(0.0).to_numpy()
        scaled = types.isin(VALUE_SCALED_EVENT_TYPES).to_numpy()
    value = events["value"].astype("float64").fillna(1.0).clip(lower=0).to_numpy()
    return np.where(scaled, base * value, base)


@dataclass(frozen=True)
class EncodedEvents:
    """A run's events on int32 codes, with the user and item :class:`IdMap` they index."""

    frame: pd.DataFrame
    users: IdMap
    items: IdMap
    #: Events left out at encoding, per event type (weight not positive: impressions); not
    #: saved by :meth:`write`, not carried by :meth:`where` / :meth:`before`.
    left_out: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)

    COLUMNS = (
        "user_id",
        "item_id",
        "event_type",
        "weight",
        "timestamp",
        "value",
        "device",
        "session_id",
    )

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def shape(self) -> tuple[int, int]:
        """(users, items): the shape of every matrix of the run."""
        return len(self.users), len(self.items)

    def before(self, cutoff: dt.datetime) -> EncodedEvents:
        """The events strictly before ``cutoff``, on the same id maps."""
        return self.where((self.frame["timestamp"] < _as_timestamp(cutoff)).to_numpy())

    def where(self, mask: np.ndarray) -> EncodedEvents:
        """The events where ``mask`` holds, on the same id maps."""
        mask = np.asarray(mask, bool)
        if mask.all():
            return self
        return EncodedEvents(self.frame[mask], self.users, self.items)

    def decoded(
        self, columns: tuple[str, ...] = ("user_id", "item_id", "event_type", "timestamp")
    ) -> pd.DataFrame:
        """The events with string ids (and event types) again, for outputs people read."""
        out = {}
        for column in columns:
            series = self.frame[column]
            if column == "user_id":
                out[column] = self.users.decode(series.to_numpy())
            elif column == "item_id":
                out[column] = self.items.decode(series.to_numpy())
            elif isinstance(series.dtype, pd.CategoricalDtype):
                out[column] = series.astype(object).to_numpy()
            else:
                out[column] = series.to_numpy()
        return pd.DataFrame(out, index=self.frame.index)

    @classmethod
    def from_frame(
        cls,
        events: pd.DataFrame,
        weights: Mapping[str, float],
        users: IdMap | None = None,
        items: IdMap | None = None,
    ) -> EncodedEvents:
        """Encode a frame of clean string-id events (the validated lake columns). The id
        maps are the frame's sorted distinct ids unless given (then they are extended with
        the ids they lack, keeping their codes). Events of a type weighted 0 (impressions)
        are left out first (see the module docstring)."""
        untrained = untrained_event_types(weights)
        types = events["event_type"]
        dropped = (
            types.isin(sorted(untrained)).fillna(False).to_numpy(bool)
            if untrained
            else np.zeros(len(events), bool)
        )
        left_out = _log_left_out(
            {str(t): int(c) for t, c in types[dropped].astype(str).value_counts().items()}
        )
        if dropped.any():
            events = events[~dropped]
        users = (
            IdMap.from_values(events["user_id"])
            if users is None
            else users.extend(events["user_id"])
        )
        items = (
            IdMap.from_values(events["item_id"])
            if items is None
            else items.extend(events["item_id"])
        )
        frame = _encode_columns(events, weights)
        frame.insert(0, "user_id", users.encode(events["user_id"]))
        frame.insert(1, "item_id", items.encode(events["item_id"]))
        return cls(frame, users, items, left_out)

    def write(self, folder: Path) -> Path:
        """``events_encoded.parquet`` plus the two id maps into ``folder``; returns the events
        file."""
        folder = Path(folder)
        self.users.save(folder / USER_IDS_FILE, "user_id")
        self.items.save(folder / ITEM_IDS_FILE, "item_id")
        table = pa.Table.from_pandas(self.frame, preserve_index=False)
        return _write_table(table, folder / EVENTS_FILE)

    @classmethod
    def read(cls, folder: Path, columns: tuple[str, ...] | None = None) -> EncodedEvents:
        """Inverse of :meth:`write` (``columns``: a subset of :attr:`COLUMNS`)."""
        folder = Path(folder)
        frame = pd.read_parquet(
            folder / EVENTS_FILE, columns=list(columns) if columns is not None else None
        )
        return cls(
            frame,
            IdMap.load(folder / USER_IDS_FILE, "user_id"),
            IdMap.load(folder / ITEM_IDS_FILE, "item_id"),
        )


def encode_events_file(
    clean_path: Path, folder: Path, weights: Mapping[str, float]
) -> EncodedEvents:
    """Encode the validated events at ``clean_path`` into ``folder`` (see :meth:`write`).

    One column at a time, in Arrow: a string column's distinct values are hashed and sorted
    (distinct values only) and each event gets its value's position. No Python string object
    is made per event, and memory is the encoded columns (~34 bytes per event) plus one
    source column, not the whole file's strings at once. Events of a type weighted 0
    (impressions) are left out first (see the module docstring)."""
    source = pq.ParquetFile(clean_path)
    present = set(source.schema_arrow.names)
    missing = [c for c in ("user_id", "item_id", "event_type", "timestamp") if c not in present]
    if missing:
        raise ValueError(f"{clean_path}: no column(s) {missing}")
    keep, left_out = _trained_rows(
        pq.read_table(clean_path, columns=["event_type"]).column("event_type"), weights
    )
    n = source.metadata.num_rows if keep is None else int(pc.sum(keep).as_py() or 0)

    def read(name: str) -> pa.ChunkedArray:
        column = pq.read_table(clean_path, columns=[name]).column(name)
        return column if keep is None else column.filter(keep)

    maps = {}
    for name in ("user_id", "item_id"):
        column = read(name)
        if column.null_count:
            raise ValueError(f"{clean_path}: {column.null_count} validated events have no {name}")
        maps[name] = _sorted_distinct(column)
        maps[name + "_codes"] = _index_in(column, maps[name]).astype(np.int32)
        del column
    column = read("event_type")
    types = sorted(set(weights) | set(_sorted_distinct(column).to_pylist()))
    type_codes = _index_in(column, pa.array(types, pa.large_string())).astype(np.int8)
    device_codes = np.full(n, -1, np.int8)
    if "device" in present:  # a device outside DEVICES is "other"
        column = read("device")
        device_codes = _index_in(column, pa.array(DEVICES, pa.large_string())).astype(np.int8)
        device_codes[(device_codes < 0) & pc.is_valid(column).to_numpy(zero_copy_only=False)] = (
            DEVICES.index("other")
        )
    session_codes = np.full(n, -1, np.int32)
    if "session_id" in present:
        column = read("session_id")
        session_codes = _index_in(column, _sorted_distinct(column)).astype(np.int32)
    del column
    frame = pd.DataFrame(
        {
            "user_id": maps.pop("user_id_codes"),
            "item_id": maps.pop("item_id_codes"),
            "event_type": pd.Categorical.from_codes(type_codes, types),
            "weight": np.zeros(n, np.float32),
            "timestamp": pd.DatetimeIndex(_micros(read("timestamp")).view("datetime64[us]"))
            .tz_localize("UTC")
            .array,
            "value": (
                pc.cast(read("value"), pa.float64()).to_numpy(zero_copy_only=False)
                if "value" in present
                else np.full(n, np.nan)
            ),
            "device": pd.Categorical.from_codes(device_codes, list(DEVICES)),
            "session_id": pd.arrays.IntegerArray(np.maximum(session_codes, 0), session_codes < 0),
        }
    )
    frame["weight"] = event_weights(frame, weights).astype(np.float32)
    out = EncodedEvents(
        frame,
        *(
            IdMap(maps[name].to_numpy(zero_copy_only=False).astype(object))
            for name in ("user_id", "item_id")
        ),
        left_out,
    )
    out.write(folder)
    logger.info(
        "encoded %d events: %d users, %d items, %d event types",
        len(frame),
        len(out.users),
        len(out.items),
        len(types),
    )
    return out


def _trained_rows(
    types: pa.ChunkedArray, weights: Mapping[str, float]
) -> tuple[pa.Array | None, dict[str, int]]:
    """Which events to encode (None: all) and the count left out per type (weight <= 0)."""
    untrained = untrained_event_types(weights)
    if not untrained:
        return None, {}
    dropped = pc.fill_null(
        pc.is_in(_as_string(types), value_set=pa.array(sorted(untrained), pa.large_string())), False
    ).combine_chunks()
    if not pc.any(dropped).as_py():
        return None, {}
    counts = pc.value_counts(_as_string(types).filter(dropped))
    left_out = _log_left_out({str(row["values"]): int(row["counts"]) for row in counts.to_pylist()})
    return pc.invert(dropped), left_out


def _log_left_out(left_out: dict[str, int]) -> dict[str, int]:
    """Log the events left out at encoding (types weighted 0); returns ``left_out``."""
    if left_out:
        logger.info(
            "encode: %d events of types weighted 0 left out (never a training signal; "
            "they stay in the lake): %s",
            sum(left_out.values()),
            ", ".join(f"{t} {c}" for t, c in sorted(left_out.items())),
        )
    return left_out


def _as_string(column: pa.ChunkedArray) -> pa.ChunkedArray:
    return column if pa.types.is_large_string(column.type) else pc.cast(column, pa.large_string())


def _sorted_distinct(column: pa.ChunkedArray) -> pa.Array:
    """The sorted distinct non-null values of ``column``, as strings."""
    values = pc.unique(_as_string(column))
    values = values.filter(pc.is_valid(values))
    return values.take(pc.sort_indices(values))


def _index_in(column: pa.ChunkedArray, values: pa.Array) -> np.ndarray:
    """Position of each value in ``values`` (sorted distinct), -1 where null or absent."""
    found = pc.index_in(_as_string(column), value_set=values)
    return pc.fill_null(found, -1).to_numpy(zero_copy_only=False)


def _micros(column: pa.ChunkedArray) -> np.ndarray:
    """Epoch microseconds (UTC; a zone-less timestamp is read as UTC)."""
    if pa.types.is_timestamp(column.type):
        micros = pc.cast(column, pa.timestamp("us", tz=column.type.tz), safe=False)
        return pc.cast(micros, pa.int64()).to_numpy(zero_copy_only=False)
    return _timestamps(column.to_pandas()).to_numpy(dtype="datetime64[us]").view(np.int64)


def _encode_columns(events: pd.DataFrame, weights: Mapping[str, float]) -> pd.DataFrame:
    """Every encoded column but the ids (see the module docstring)."""
    missing = pd.Series(pd.NA, index=events.index, dtype="string")
    types = sorted(set(weights) | set(events["event_type"].dropna().astype(str).unique()))
    frame = pd.DataFrame(
        {"event_type": _categorical(events["event_type"], types)}, index=pd.RangeIndex(len(events))
    )
    frame["weight"] = np.zeros(len(events), np.float32)
    frame["timestamp"] = _timestamps(events["timestamp"]).array
    frame["value"] = (
        events["value"].astype("float64").to_numpy()
        if "value" in events
        else np.full(len(events), np.nan)
    )
    frame["device"] = _categorical(events.get("device", missing), DEVICES, unknown="other")
    frame["session_id"] = _session_codes(events.get("session_id", missing))
    frame["weight"] = event_weights(frame, weights).astype(np.float32)
    return frame


def _categorical(values: pd.Series, categories, unknown: str | None = None) -> pd.Categorical:
    values = values.astype("string")
    if unknown is not None:
        values = values.where(values.isin(list(categories)) | values.isna(), unknown)
    return pd.Categorical(
        values.astype(object).where(values.notna(), None), categories=list(categories)
    )


def _session_codes(values: pd.Series) -> pd.arrays.IntegerArray:
    """Per-run int32 code of each session id (sorted distinct), NA where absent."""
    codes, _ = pd.factorize(values.astype("string"), sort=True)
    return pd.arrays.IntegerArray(np.maximum(codes, 0).astype(np.int32), codes < 0)


def _timestamps(values: pd.Series) -> pd.Series:
    return pd.to_datetime(values, utc=True).dt.as_unit("us")


def _as_timestamp(cutoff: dt.datetime) -> pd.Timestamp:
    stamp = pd.Timestamp(cutoff)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def _write_table(table: pa.Table, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path
