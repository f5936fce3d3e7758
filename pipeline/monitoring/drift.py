"""Drift: the Population Stability Index (PSI) of a feature between a reference sample (the
window the serving champion was trained on) and a current one, on bins fixed by the reference.

The maths. Both samples are cut into the same bins, fixed on the reference; ``r_i`` and ``c_i``
are the shares of the reference and of the current sample in bin ``i`` (each sums to 1 over the
bins, the bin of missing values included). Then

    PSI = sum_i (c_i' - r_i') * ln(c_i' / r_i'),    r_i' = max(r_i, eps),  c_i' = max(c_i, eps)

A share below ``eps`` (:data:`EPSILON`, an empty bin) is *floored* at ``eps`` and the shares
are **not** renormalised afterwards, so an empty bin costs a large but finite term and a bin
empty on both sides costs exactly 0. Every term is >= 0 (``c - r`` and ``ln(c / r)`` have the
same sign), identical shares give exactly 0, and without the floor PSI is the symmetric
Kullback-Leibler divergence KL(c || r) + KL(r || c). Merging bins never raises it.

Reading (the usual rule of thumb, :func:`status`): below :data:`PSI_WARN` (0.1) the
distribution is stable ("ok"), from 0.1 to :data:`PSI_ALERT` (0.25) it moved ("warn"), from
0.25 it changed ("alert"); an undefined PSI (an empty sample) is "unknown".

Bins, fixed on the reference and saved with it (``to_dict``/``from_dict``, JSON):
- :class:`QuantileBins` for numbers: equal-frequency edges of the reference, the outer bins
  open-ended, ties merged (so discrete counts work), plus a bin of missing values;
- :class:`CategoryBins` for labels: the reference's levels, one bin for levels the reference
  never saw, plus a bin of missing values.

:class:`DriftProfile` bins a whole window of events (user features, item features, the event
mix) and compares a later window to it, one row per feature.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from pipeline.features.tables import before, build_item_features, build_user_features

logger = logging.getLogger(__name__)

#: PSI at or above which a feature "moved" (status "warn").
PSI_WARN = 0.1
#: PSI at or above which a feature "changed" (status "alert").
PSI_ALERT = 0.25
#: The floor of a bin's share (an empty bin counts as this share, see :func:`psi`).
EPSILON = 1e-4
#: Equal-frequency bins of a numeric feature (before ties merge them).
N_BINS = 10

#: The bin labels of values outside a categorical reference, and of missing values.
OTHER = "<other>"
MISSING = "<missing>"
#: The groups of the features :meth:`DriftProfile.from_events` computes from events.
EVENT_GROUPS = ("user", "item", "event")
#: The columns of :meth:`DriftProfile.compare`.
COMPARE_COLUMNS = ("feature", "group", "psi", "status", "reference_n", "current_n")
PROFILE_VERSION = 1


def psi(
    reference_share: npt.ArrayLike, current_share: npt.ArrayLike, eps: float = EPSILON
) -> float:
    """Population Stability Index of two share vectors over the same bins.

    ``sum_i (c_i' - r_i') * ln(c_i' / r_i')`` with ``r_i' = max(r_i, eps)`` and
    ``c_i' = max(c_i, eps)``: shares are floored at ``eps``, not renormalised. NaN when a
    share is NaN (the shares of an empty sample). Always >= 0; 0 for identical shares.
    """
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    ref = np.asarray(reference_share, dtype=np.float64)
    cur = np.asarray(current_share, dtype=np.float64)
    if ref.ndim != 1 or ref.shape != cur.shape:
        raise ValueError(
            f"share vectors must be 1-d and of one length, got {ref.shape} and {cur.shape}"
        )
    if np.isnan(ref).any() or np.isnan(cur).any():
        return math.nan
    ref, cur = np.maximum(ref, eps), np.maximum(cur, eps)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def status(value: float, warn: float = PSI_WARN, alert: float = PSI_ALERT) -> str:
    """ "alert" when ``value >= alert``, "warn" when ``value >= warn``, "ok" below, and
    "unknown" when the PSI is NaN (nothing to compare)."""
    if value is None or math.isnan(value):
        return "unknown"
    if value >= alert:
        return "alert"
    if value >= warn:
        return "warn"
    return "ok"


def _as_float(values: npt.ArrayLike) -> np.ndarray:
    """1-d float64 values; missing (None, NaN, pd.NA) as NaN."""
    if isinstance(values, (pd.Series, pd.Index, pd.api.extensions.ExtensionArray)):
        return pd.Series(values).to_numpy(dtype=np.float64, na_value=np.nan)
    return np.asarray(values, dtype=np.float64).ravel()


def _shares(counts: np.ndarray) -> np.ndarray:
    """Counts over their total; all NaN when there is nothing to share out."""
    total = counts.sum()
    if total == 0:
        return np.full(counts.shape, np.nan)
    return counts / total


class _Binned:
    """Counting and shares over a subclass's ``index`` (the bin of each value) and ``size``."""

    size: int

    def index(self, values: npt.ArrayLike) -> np.ndarray:
        raise NotImplementedError

    def counts(self, values: npt.ArrayLike) -> np.ndarray:
        """How many values fall in each bin (int64, length :attr:`size`)."""
        return np.bincount(self.index(values), minlength=self.size).astype(np.int64)

    def shares(self, values: npt.ArrayLike) -> np.ndarray:
        """The share of the values in each bin (sums to 1; all NaN for no values)."""
        return _shares(self.counts(values))


@dataclass(frozen=True)
class QuantileBins(_Binned):
    """Numeric bins fixed on a reference sample.

    With interior edges ``e_1 < ... < e_k`` the value bins are ``(-inf, e_1]``,
    ``(e_1, e_2]``, ..., ``(e_k, +inf)`` (right-closed, the outer two open-ended: a current
    value outside the reference's range lands in the first or last bin), followed by one bin
    of missing values (NaN): ``k + 2`` bins in all.
    """

    edges: tuple[float, ...]

    KIND = "quantile"

    @classmethod
    def fit(cls, values: npt.ArrayLike, n_bins: int = N_BINS) -> QuantileBins:
        """Equal-frequency edges of ``values``: the reference's ``j / n_bins`` quantiles for
        ``j = 1 .. n_bins - 1``, each the smallest reference value whose empirical CDF reaches
        ``j / n_bins`` (the inverted-CDF quantile, so edges are observed values and each
        right-closed bin holds about ``1 / n_bins`` of the reference). NaN (and +-inf) values
        are left out of the edges; equal edges (ties: a feature that is mostly 0) merge, so a
        discrete feature gets one bin per frequent value rather than empty duplicates."""
        if n_bins < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        finite = _as_float(values)
        finite = finite[np.isfinite(finite)]
        if finite.size == 0 or n_bins == 1:
            return cls(())
        edges = np.quantile(finite, np.arange(1, n_bins) / n_bins, method="inverted_cdf")
        return cls(tuple(float(e) for e in np.unique(edges)))

    @property
    def size(self) -> int:
        """The number of bins, the missing one included."""
        return len(self.edges) + 2

    def labels(self) -> list[str]:
        """A readable name per bin, e.g. ``(-inf, 1]``, ``(1, 3]``, ``(3, inf)``, missing."""
        bounds = [-math.inf, *self.edges, math.inf]
        return [
            f"({lo:g}, {hi:g}{')' if hi == math.inf else ']'}"
            for lo, hi in zip(bounds[:-1], bounds[1:])
        ] + [MISSING]

    def index(self, values: npt.ArrayLike) -> np.ndarray:
        """The bin of each value (0 .. size - 1; NaN in the last bin)."""
        x = _as_float(values)
        out = np.searchsorted(np.asarray(self.edges, dtype=np.float64), x, side="left")
        out[np.isnan(x)] = len(self.edges) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.KIND, "edges": list(self.edges)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantileBins:
        if data.get("kind") != cls.KIND:
            raise ValueError(f"not quantile bins: kind {data.get('kind')!r}")
        return cls(tuple(float(e) for e in data["edges"]))


def _level(value: Any) -> str:
    """A category level as text; an integral float reads as the integer (3.0 is "3")."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _level_order(level: str) -> tuple[int, float, str]:
    """Numbers in numeric order ("2" before "10"), then text in alphabetical order."""
    try:
        number = float(level)
    except ValueError:
        return 1, 0.0, level
    return (0, number, level) if math.isfinite(number) else (1, 0.0, level)


def _factorize(values: npt.ArrayLike) -> tuple[np.ndarray, list[str]]:
    """Per value, a code into the distinct levels (-1 for missing), and those levels as text;
    values that read as the same text share a level."""
    if not isinstance(values, (pd.Series, pd.Index, np.ndarray, pd.api.extensions.ExtensionArray)):
        values = pd.Series(list(values), dtype=object)
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    text = [_level(u) for u in uniques]
    distinct, first = (
        np.unique(np.asarray(text, dtype=object), return_inverse=True)
        if text
        else (np.array([], dtype=object), np.array([], dtype=np.int64))
    )
    codes = np.asarray(codes, dtype=np.int64)
    ok = codes >= 0
    codes[ok] = first.ravel()[codes[ok]]
    return codes, [str(d) for d in distinct]


@dataclass(frozen=True)
class CategoryBins(_Binned):
    """Categorical bins fixed on a reference sample: one bin per reference level (compared as
    text, see :func:`_level`), then one for levels the reference never saw (``<other>``), then
    one for missing values: ``len(levels) + 2`` bins in all."""

    levels: tuple[str, ...]

    KIND = "category"

    @classmethod
    def fit(cls, values: npt.ArrayLike, max_levels: int | None = None) -> CategoryBins:
        """The distinct non-missing levels of ``values``, numbers first in numeric order, then
        text; with ``max_levels``, only the most frequent ones (the rest count as other)."""
        codes, text = _factorize(values)
        if max_levels is not None and len(text) > max_levels:
            counts = np.bincount(codes[codes >= 0], minlength=len(text))
            keep = np.argsort(-counts, kind="stable")[:max_levels]
            text = [text[k] for k in keep]
        return cls(tuple(sorted(text, key=_level_order)))

    @property
    def size(self) -> int:
        """The number of bins, the other and missing ones included."""
        return len(self.levels) + 2

    def labels(self) -> list[str]:
        return [*self.levels, OTHER, MISSING]

    def index(self, values: npt.ArrayLike) -> np.ndarray:
        """The bin of each value: its level's position, ``len(levels)`` for an unseen level,
        ``len(levels) + 1`` for a missing value."""
        codes, text = _factorize(values)
        where = pd.Index(list(self.levels), dtype=object).get_indexer(pd.Index(text, dtype=object))
        where = np.where(where < 0, len(self.levels), where).astype(np.int64)
        out = np.full(len(codes), len(self.levels) + 1, dtype=np.int64)
        ok = codes >= 0
        out[ok] = where[codes[ok]]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.KIND, "levels": list(self.levels)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CategoryBins:
        if data.get("kind") != cls.KIND:
            raise ValueError(f"not category bins: kind {data.get('kind')!r}")
        return cls(tuple(str(level) for level in data["levels"]))


Bins = QuantileBins | CategoryBins


def bins_from_dict(data: Mapping[str, Any]) -> Bins:
    """:class:`QuantileBins` or :class:`CategoryBins` from their ``to_dict``."""
    kinds = {QuantileBins.KIND: QuantileBins, CategoryBins.KIND: CategoryBins}
    if data.get("kind") not in kinds:
        raise ValueError(f"unknown bins kind {data.get('kind')!r}")
    return kinds[data["kind"]].from_dict(data)


def numeric_psi(
    reference: npt.ArrayLike, current: npt.ArrayLike, n_bins: int = N_BINS, eps: float = EPSILON
) -> float:
    """PSI of ``current`` against ``reference`` on the reference's :class:`QuantileBins`."""
    bins = QuantileBins.fit(reference, n_bins)
    return psi(bins.shares(reference), bins.shares(current), eps)


def categorical_psi(
    reference: npt.ArrayLike, current: npt.ArrayLike, eps: float = EPSILON
) -> float:
    """PSI of ``current`` against ``reference`` on the reference's :class:`CategoryBins`."""
    bins = CategoryBins.fit(reference)
    return psi(bins.shares(reference), bins.shares(current), eps)


@dataclass(frozen=True, eq=False)
class FeatureProfile:
    """One feature of a :class:`DriftProfile`: its bins and the reference's count per bin.

    Attributes:
        name: ``user.recency_days``, ``event.device``, ``score``...
        group: "user", "item", "event" (computed from events) or the caller's (``model``).
        bins: fixed on the reference.
        counts: the reference's count per bin (missing values included).
    """

    name: str
    group: str
    bins: Bins
    counts: np.ndarray

    @property
    def reference_n(self) -> int:
        """Values in the reference (users, items or events), missing ones included."""
        return int(self.counts.sum())

    def compare(self, values: npt.ArrayLike, eps: float = EPSILON) -> dict[str, Any]:
        """A :meth:`DriftProfile.compare` row for ``values`` on this feature's bins."""
        current = self.bins.counts(values)
        value = psi(_shares(self.counts), _shares(current), eps)
        return {
            "feature": self.name,
            "group": self.group,
            "psi": value,
            "status": status(value),
            "reference_n": self.reference_n,
            "current_n": int(current.sum()),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "group": self.group,
            "bins": self.bins.to_dict(),
            "counts": [int(c) for c in self.counts],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureProfile:
        bins = bins_from_dict(data["bins"])
        counts = np.asarray(data["counts"], dtype=np.int64)
        if counts.shape != (bins.size,):
            raise ValueError(f"{data['name']}: {counts.size} counts for {bins.size} bins")
        return cls(str(data["name"]), str(data["group"]), bins, counts)


def _window(events: pd.DataFrame, as_of: dt.datetime, window: dt.timedelta | None) -> pd.DataFrame:
    """The events strictly before ``as_of`` (and, with ``window``, at or after
    ``as_of - window``), with the optional contract columns the feature tables read."""
    events = before(events, as_of)
    if window is not None:
        events = events[events["timestamp"] >= as_of - window]
    missing = {
        "value": pd.Series(np.nan, index=events.index, dtype="float64"),
        "device": pd.Series(pd.NA, index=events.index, dtype="string"),
        "session_id": pd.Series(pd.NA, index=events.index, dtype="string"),
    }
    missing = {k: v for k, v in missing.items() if k not in events}
    return events.assign(**missing) if missing else events


def _numeric_columns(frame: pd.DataFrame, skip: tuple[str, ...]) -> list[str]:
    return [c for c in frame.columns if c not in skip and pd.api.types.is_numeric_dtype(frame[c])]


def _feature_values(
    events: pd.DataFrame, as_of: dt.datetime, window: dt.timedelta | None
) -> dict[str, tuple[str, str, Any]]:
    """name -> (group, "numeric" | "categorical", values) of every feature of a window:
    user features (one value per user), item features (one per item), the event mix (one per
    event)."""
    events = _window(events, as_of, window)
    out: dict[str, tuple[str, str, Any]] = {}
    users = build_user_features(events, as_of)
    for column in _numeric_columns(users, ("user_id",)):
        out[f"user.{column}"] = ("user", "numeric", users[column])
    items = build_item_features(events, as_of)
    for column in _numeric_columns(items, ("item_id", "category")):
        out[f"item.{column}"] = ("item", "numeric", items[column])
    stamp = events["timestamp"]
    if getattr(stamp.dt, "tz", None) is not None:
        stamp = stamp.dt.tz_convert("UTC")
    out["event.event_type"] = ("event", "categorical", events["event_type"])
    out["event.device"] = ("event", "categorical", events["device"])
    out["event.hour"] = ("event", "categorical", stamp.dt.hour.to_numpy())
    out["event.weekday"] = ("event", "categorical", stamp.dt.day_of_week.to_numpy())
    return out


@dataclass
class DriftProfile:
    """The binned reference of a window of events (and of extra values such as the champion's
    scores), to compare later windows against with the reference's bins.

    Attributes:
        as_of: the reference window's end (exclusive), e.g. the champion's training cutoff.
        features: name -> :class:`FeatureProfile`, in the order added.
        window: the reference window's length (``None``: all events before ``as_of``);
            :meth:`compare` cuts the current window to the same length.
        n_bins: the equal-frequency bins of numeric features.
    """

    as_of: dt.datetime
    features: dict[str, FeatureProfile] = field(default_factory=dict)
    window: dt.timedelta | None = None
    n_bins: int = N_BINS

    @classmethod
    def from_events(
        cls,
        events: pd.DataFrame,
        as_of: dt.datetime,
        *,
        window: dt.timedelta | None = None,
        n_bins: int = N_BINS,
    ) -> DriftProfile:
        """Profile the events before ``as_of`` (within ``window``, if given): every numeric
        column of :func:`build_user_features` (``user.<column>``, one value per user) and of
        :func:`build_item_features` (``item.<column>``, one per item), and the event mix
        ``event.event_type``, ``event.device``, ``event.hour`` (UTC, 0-23) and
        ``event.weekday`` (0 = Monday), one value per event."""
        profile = cls(as_of, {}, window, n_bins)
        values = _feature_values(events, as_of, window)
        for name, (group, kind, column) in values.items():
            if kind == "numeric":
                profile.add_numeric(name, column, group=group)
            else:
                profile.add_categorical(name, column, group=group)
        n_events = profile.features["event.event_type"].reference_n
        logger.info(
            "drift profile as of %s: %d features from %d events",
            as_of,
            len(profile.features),
            n_events,
        )
        return profile

    def add_numeric(
        self, name: str, values: npt.ArrayLike, group: str = "model", n_bins: int | None = None
    ) -> FeatureProfile:
        """Add (or replace) a numeric feature binned on ``values`` (e.g. ``score``: the
        champion's scores of its training users)."""
        bins = QuantileBins.fit(values, self.n_bins if n_bins is None else n_bins)
        self.features[name] = FeatureProfile(name, group, bins, bins.counts(values))
        return self.features[name]

    def add_categorical(
        self, name: str, values: npt.ArrayLike, group: str = "model", max_levels: int | None = None
    ) -> FeatureProfile:
        """Add (or replace) a categorical feature whose levels are those of ``values``."""
        bins = CategoryBins.fit(values, max_levels)
        self.features[name] = FeatureProfile(name, group, bins, bins.counts(values))
        return self.features[name]

    def compare_values(
        self, name: str, values: npt.ArrayLike, eps: float = EPSILON
    ) -> dict[str, Any]:
        """PSI of one feature's current ``values`` against its reference: a dict with the
        columns of :meth:`compare` (feature, group, psi, status, reference_n, current_n)."""
        if name not in self.features:
            raise KeyError(
                f"no feature {name!r} in the drift profile (known: {', '.join(self.features)})"
            )
        return self.features[name].compare(values, eps)

    def compare(
        self,
        current_events: pd.DataFrame,
        current_as_of: dt.datetime,
        *,
        extra: Mapping[str, npt.ArrayLike] | None = None,
        eps: float = EPSILON,
    ) -> pd.DataFrame:
        """One row per feature: ``feature``, ``group``, ``psi``, ``status``, ``reference_n``,
        ``current_n``, by PSI descending (then name; NaN last).

        The features are recomputed on the events before ``current_as_of`` (within the
        profile's window) and binned with the reference's bins. Features added with
        :meth:`add_numeric`/:meth:`add_categorical` are compared when their current values are
        in ``extra`` (name -> values) and left out otherwise. A feature the current window
        cannot produce gets PSI NaN, status "unknown".
        """
        extra = dict(extra or {})
        unknown = sorted(set(extra) - set(self.features))
        if unknown:
            raise KeyError(f"extra values for features not in the drift profile: {unknown}")
        values = _feature_values(current_events, current_as_of, self.window)
        rows = []
        for name, feature in self.features.items():
            if name in extra:
                rows.append(feature.compare(extra[name], eps))
            elif name in values:
                rows.append(feature.compare(values[name][2], eps))
            elif feature.group in EVENT_GROUPS:
                rows.append(
                    {
                        "feature": name,
                        "group": feature.group,
                        "psi": math.nan,
                        "status": "unknown",
                        "reference_n": feature.reference_n,
                        "current_n": 0,
                    }
                )
        frame = pd.DataFrame(rows, columns=list(COMPARE_COLUMNS)).astype(
            {"psi": "float64", "reference_n": "int64", "current_n": "int64"}
        )
        frame = frame.sort_values(
            ["psi", "feature"], ascending=[False, True], na_position="last", kind="mergesort"
        ).reset_index(drop=True)
        counts = frame["status"].value_counts()
        logger.info(
            "drift as of %s against %s: %d features, %d warn, %d alert%s",
            current_as_of,
            self.as_of,
            len(frame),
            counts.get("warn", 0),
            counts.get("alert", 0),
            f"; top {frame['feature'].iat[0]} (PSI {frame['psi'].iat[0]:.3f})"
            if len(frame) and not np.isnan(frame["psi"].iat[0])
            else "",
        )
        return frame

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: the window, the bins and the reference counts of every feature."""
        return {
            "version": PROFILE_VERSION,
            "as_of": self.as_of.isoformat(),
            "window_seconds": None if self.window is None else self.window.total_seconds(),
            "n_bins": self.n_bins,
            "features": [f.to_dict() for f in self.features.values()],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DriftProfile:
        if data.get("version") != PROFILE_VERSION:
            raise ValueError(
                f"drift profile version {data.get('version')!r}, expected {PROFILE_VERSION}"
            )
        window = data.get("window_seconds")
        features = [FeatureProfile.from_dict(f) for f in data["features"]]
        return cls(
            as_of=dt.datetime.fromisoformat(data["as_of"]),
            features={f.name: f for f in features},
            window=None if window is None else dt.timedelta(seconds=window),
            n_bins=int(data["n_bins"]),
        )
