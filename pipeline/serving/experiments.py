"""A/B experiments on what ``publish`` serves: a small versioned config, a deterministic and
stateless assignment of users to variants, and the rules that keep users where they were when
an experiment changes. The audit trail (the ``experiments`` table of the serving DB) is written
by :func:`pipeline.serving.store.record_experiment`, which re-checks these rules.

Config
------
JSON, a file such as ``$RECS_DATA_DIR/experiments/<name>.json`` (:func:`experiment_path`,
:meth:`Experiment.load` / :meth:`Experiment.save`) or a dict from a DAG Param
(:meth:`Experiment.from_dict`)::

    {"name": "ranker-vs-popular", "salt": "2024-05-ranker", "version": 1,
     "status": "running", "planned_users_per_variant": 12000, "planned_days": 14,
     "variants": [
        {"name": "control", "kind": "popularity", "share": 0.3},
        {"name": "model",   "kind": "model", "model": "champion", "share": 0.3},
        {"name": "holdout", "kind": "holdout", "share": 0.1}]}

``kind`` is ``popularity`` (the popularity list), ``model`` (the lists of ``model``: an alias
such as ``champion`` or a registered version number as text) or ``holdout`` (no
recommendations). Shares are fractions of all users in steps of one bucket (0.0001); they may
sum to less than 1: the rest is outside the experiment and gets the default (the champion's
lists, variant null). ``control`` (optional) names the variant the others are compared with;
by default the variant named ``control``.

Assignment
----------
``bucket = int.from_bytes(sha256(f"{salt}:{user_id}")[:8], "big") % BUCKETS`` (never Python's
``hash()``, which is randomised per process). When the experiment starts
(:meth:`Experiment.start` / :meth:`Experiment.allocate`), each variant gets an explicit set of
buckets, stored in the config as ``[start, end)`` ranges (``buckets``), so :meth:`assign` is a
table lookup and new users are assigned like everyone else. A stopped experiment assigns nobody
(everyone gets the default) unless asked for the assignment it had.

Changes (each returns a new :class:`Experiment` with ``version + 1``)
----------------------------------------------------------------------
* A variant grows only from the *free* buckets (in no variant, never released): users outside
  the experiment join it, nobody changes variant. Growing beyond the free pool is refused.
* A variant never shrinks silently: that would move its users to the default. Refused unless
  ``force=True``; then the variant's last buckets are *released*: their users get the default
  from now on and are never given to another variant (no user ever sees two treatments). The
  config records it (``last_change.forced``).
* A variant is added from the free pool; removing one is refused (stop the experiment instead).
* Name, salt, control, a variant's kind and model, and the planned horizon are fixed at start.
* :meth:`Experiment.stop` sets ``stopped``; stopped experiments do not change.

:func:`check_change` states the same rules per bucket (a bucket keeps its owner; a free bucket
may join a variant; a variant's bucket may be released only by a forced change).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.errors import ConfigError
from pipeline.lake.storage import durable_write

logger = logging.getLogger(__name__)

__all__ = [
    "ACTIONS",
    "BUCKETS",
    "KINDS",
    "STATUSES",
    "AnotherExperimentRunning",
    "ChangeRefused",
    "Experiment",
    "ExperimentError",
    "Variant",
    "bucket",
    "bucket_array",
    "check_change",
    "experiment_path",
]

#: Buckets of the assignment: a share is a whole number of buckets (steps of 0.01%).
BUCKETS = 10_000
KINDS = ("popularity", "model", "holdout")
STATUSES = ("running", "stopped")
#: What a row of the ``experiments`` table records.
ACTIONS = ("start", "change", "stop")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_EXPERIMENT_KEYS = (
    "name",
    "salt",
    "version",
    "status",
    "control",
    "description",
    "planned_users_per_variant",
    "planned_days",
    "variants",
    "released_buckets",
    "last_change",
)
_VARIANT_KEYS = ("name", "kind", "model", "share", "buckets", "description")
_FREE = -1
_RELEASED = -2
_PAIR_RE = re.compile(r"\[\s+(-?\d+),\s+(-?\d+)\s+\]")
_HASH_CHUNK = 1 << 18  # users hashed per chunk: bounded memory for the joined digests

Ranges = tuple[tuple[int, int], ...]


class ExperimentError(ConfigError):
    """An experiment config is invalid, or an experiment is used in a way it cannot be."""


class ChangeRefused(ExperimentError):
    """A change would move users between groups (or change what is fixed at start)."""


class AnotherExperimentRunning(ExperimentError):
    """At most one experiment runs at a time: another one is running."""


# =================================================================================================
# Buckets
# =================================================================================================


def bucket(salt: str, user_id: str | int) -> int:
    """The bucket of one user: ``sha256(f"{salt}:{user_id}")``, first 8 bytes big-endian,
    mod :data:`BUCKETS`. Stable across processes, machines and Python versions."""
    salt = _check_salt(salt)
    text = _user_id_text(user_id)
    digest = hashlib.sha256(f"{salt}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def bucket_array(salt: str, user_ids: Iterable[Any]) -> np.ndarray:
    """:func:`bucket` of every user, as an int64 array (one sha256 per user, in chunks)."""
    salt = _check_salt(salt)
    texts = _user_id_texts(user_ids)
    prefix = f"{salt}:"
    sha256 = hashlib.sha256
    out = np.empty(len(texts), dtype=np.int64)
    for start in range(0, len(texts), _HASH_CHUNK):
        chunk = texts[start : start + _HASH_CHUNK]
        digests = b"".join([sha256((prefix + text).encode()).digest() for text in chunk])
        # 32-byte digests back to back: every 4th big-endian uint64 is a digest's first 8 bytes.
        first = np.frombuffer(digests, dtype=">u8")[::4]
        out[start : start + len(chunk)] = first % np.uint64(BUCKETS)
    return out


def _check_salt(salt: Any) -> str:
    if not isinstance(salt, str) or not salt.strip():
        raise ExperimentError(f"the salt must be a non-empty string, got {salt!r}")
    return salt


def _user_id_text(user_id: Any) -> str:
    if isinstance(user_id, str):
        return user_id
    if isinstance(user_id, (int, np.integer)) and not isinstance(user_id, bool):
        return str(int(user_id))
    raise ExperimentError(
        f"user ids must be text (or integers), got {user_id!r} ({type(user_id).__name__})"
    )


def _user_id_texts(user_ids: Iterable[Any]) -> list[str]:
    """User ids as a list of str; integers in decimal; nulls, floats and others refused."""
    if isinstance(user_ids, (list, tuple)) and all(type(u) is str for u in user_ids):
        return list(user_ids)  # the common case, without a round trip through numpy
    if isinstance(user_ids, (pd.Series, pd.Index)):
        values = user_ids.to_numpy(dtype=object, na_value=None)
    elif isinstance(user_ids, np.ndarray):
        values = user_ids
    else:
        values = np.asarray(list(user_ids), dtype=object)
    if values.ndim != 1:
        raise ExperimentError(f"user ids must be one-dimensional, got shape {values.shape}")
    if values.dtype.kind == "U":
        return values.tolist()
    if values.dtype.kind in "iu":
        return [str(value) for value in values.tolist()]
    if values.dtype.kind != "O":
        raise ExperimentError(f"user ids must be text (or integers), got dtype {values.dtype}")
    inferred = pd.api.types.infer_dtype(values, skipna=False)
    if inferred in ("string", "empty"):
        return values.tolist()
    if inferred == "integer":
        return [str(int(value)) for value in values.tolist()]
    for position, value in enumerate(values.tolist()):
        if not isinstance(value, str):
            try:
                _user_id_text(value)
            except ExperimentError as exc:
                raise ExperimentError(f"user id at position {position}: {exc}") from None
    return [_user_id_text(value) for value in values.tolist()]


# =================================================================================================
# Config
# =================================================================================================


@dataclass(frozen=True)
class Variant:
    """One group of an experiment. ``buckets`` is None until the experiment starts."""

    name: str
    kind: str
    share: float
    model: str | None = None
    buckets: Ranges | None = None
    description: str | None = None

    def __post_init__(self) -> None:
        problems = _variant_problems(self)
        if problems:
            label = self.name if isinstance(self.name, str) and self.name else "?"
            raise ExperimentError(f"variant {label!r}: {'; '.join(problems)}")

    @property
    def n_buckets(self) -> int:
        """Buckets the share stands for."""
        return _share_buckets(self.share)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind}
        if self.model is not None:
            out["model"] = self.model
        out["share"] = self.share
        if self.buckets is not None:
            out["buckets"] = [list(pair) for pair in self.buckets]
        if self.description is not None:
            out["description"] = self.description
        return out

    @classmethod
    def from_dict(cls, data: Any) -> Variant:
        if not isinstance(data, Mapping):
            raise ExperimentError(f"a variant must be a JSON object, got {data!r}")
        label = data.get("name") if isinstance(data.get("name"), str) else "?"
        unknown = sorted(set(map(str, data)) - set(_VARIANT_KEYS))
        if unknown:
            raise ExperimentError(
                f"variant {label!r}: unknown key(s) {unknown} (allowed: {list(_VARIANT_KEYS)})"
            )
        for key in ("name", "kind", "share"):
            if key not in data:
                raise ExperimentError(f"variant {label!r}: missing {key!r}")
        model = data.get("model")
        if isinstance(model, int) and not isinstance(model, bool):
            model = str(model)  # a registered version number
        buckets = data.get("buckets")
        return cls(
            name=data["name"],
            kind=data["kind"],
            share=_as_share(data["share"], label),
            model=model,
            buckets=None if buckets is None else _parse_ranges(buckets, label),
            description=data.get("description"),
        )


_SCALAR_KEYS = ("name", "salt", "version", "status", "planned_users_per_variant", "planned_days")


def _scalar_problems(values: Mapping[str, Any]) -> list[str]:
    """Problems of an experiment's own fields (not its variants)."""
    problems: list[str] = []
    name, salt, version = values["name"], values["salt"], values["version"]
    if not isinstance(name, str) or not _NAME_RE.match(name):
        problems.append(
            f"name must be 1-100 letters, digits, '_', '.' or '-' (it names the "
            f"config file), got {name!r}"
        )
    if not isinstance(salt, str) or not salt.strip():
        problems.append(
            f"salt must be a non-empty string (it decides who lands where; a new "
            f"experiment takes a new salt), got {salt!r}"
        )
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        problems.append(f"version must be an integer >= 1, got {version!r}")
    if values["status"] not in STATUSES:
        problems.append(f"status must be one of {', '.join(STATUSES)}, got {values['status']!r}")
    for key in ("planned_users_per_variant", "planned_days"):
        value = values[key]
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            problems.append(f"{key} must be an integer >= 1 (or absent), got {value!r}")
    return problems


def _variant_problems(variant: Variant) -> list[str]:
    problems: list[str] = []
    if not isinstance(variant.name, str) or not _NAME_RE.match(variant.name):
        problems.append(
            f"name must be 1-100 letters, digits, '_', '.' or '-', got {variant.name!r}"
        )
    if variant.kind not in KINDS:
        problems.append(f"unknown kind {variant.kind!r} (one of {', '.join(KINDS)})")
    if variant.kind == "model":
        if not isinstance(variant.model, str) or not variant.model.strip():
            problems.append(
                "kind 'model' needs 'model': an alias such as \"champion\" or a "
                "registered version number as text"
            )
    elif variant.model is not None:
        problems.append(f"'model' is only for kind 'model' (this one is {variant.kind!r})")
    problems.extend(_share_problems(variant.share))
    if variant.buckets is not None and not _share_problems(variant.share):
        problems.extend(_ranges_problems(variant.buckets, "buckets"))
        held = sum(end - start for start, end in variant.buckets)
        if held != _share_buckets(variant.share):
            problems.append(
                f"buckets hold {held:,} buckets but share {variant.share:g} is "
                f"{_share_buckets(variant.share):,}"
            )
    if variant.description is not None and not isinstance(variant.description, str):
        problems.append("description must be text")
    return problems


def _as_share(value: Any, label: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ExperimentError(f"variant {label!r}: share must be a number in (0, 1], got {value!r}")
    return float(value)


def _share_problems(share: Any) -> list[str]:
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not math.isfinite(share):
        return [f"share must be a number in (0, 1], got {share!r}"]
    if not 0 < share <= 1:
        return [f"share {share:g} is out of range: it must be in (0, 1] (a fraction of users)"]
    if abs(share * BUCKETS - round(share * BUCKETS)) > 1e-6:
        return [f"share {share!r} is not a whole number of buckets (steps of {1 / BUCKETS:g})"]
    return []


def _share_buckets(share: float) -> int:
    return int(round(share * BUCKETS))


def _parse_ranges(value: Any, label: str) -> Ranges:
    if not isinstance(value, (list, tuple)):
        raise ExperimentError(f"{label!r}: buckets must be a list of [start, end) pairs")
    pairs = []
    for pair in value:
        if (
            not isinstance(pair, (list, tuple))
            or len(pair) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair)
        ):
            raise ExperimentError(
                f"{label!r}: bucket range {pair!r} is not a [start, end) pair of integers"
            )
        pairs.append((int(pair[0]), int(pair[1])))
    return tuple(pairs)


def _ranges_problems(ranges: Ranges, what: str) -> list[str]:
    problems = [
        f"{what} range [{start}, {end}) is not within [0, {BUCKETS}) with start < end"
        for start, end in ranges
        if not 0 <= start < end <= BUCKETS
    ]
    if not problems:
        ordered = sorted(ranges)
        for (_, end), (start, _) in zip(ordered, ordered[1:]):
            if start < end:
                problems.append(f"{what} ranges overlap at bucket {start}")
    return problems


def _pct(n_buckets: int) -> str:
    """Buckets as a percentage of all users: 3000 -> '30%', 125 -> '1.25%'."""
    return f"{round(n_buckets * 100 / BUCKETS, 2):g}%"


@dataclass(frozen=True)
class Experiment:
    """A versioned experiment config (validated on construction; immutable: changes return a
    new one). See the module docstring for the format and the rules."""

    name: str
    salt: str
    variants: tuple[Variant, ...]
    version: int = 1
    status: str = "running"
    control: str | None = None
    planned_users_per_variant: int | None = None
    planned_days: int | None = None
    description: str | None = None
    released_buckets: Ranges = ()
    last_change: Mapping[str, Any] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "variants", tuple(self.variants))
        object.__setattr__(
            self, "released_buckets", tuple(tuple(pair) for pair in self.released_buckets)
        )
        problems = self._problems()
        if problems:
            label = self.name if isinstance(self.name, str) and self.name else "?"
            raise ExperimentError(_problem_message(f"experiment {label!r}", problems))

    # --------------------------------------------------------------------------- validation

    def _problems(self) -> list[str]:
        problems = _scalar_problems({key: getattr(self, key) for key in _SCALAR_KEYS})
        if not all(isinstance(v, Variant) for v in self.variants):
            return problems + ["variants must be Variant objects"]
        if len(self.variants) < 2:
            problems.append(f"an experiment needs at least 2 variants, got {len(self.variants)}")
        names = [v.name for v in self.variants]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            problems.append(f"duplicate variant name(s) {duplicates}")
        total = sum(v.n_buckets for v in self.variants)
        if total > BUCKETS:
            problems.append(
                f"shares sum to {total / BUCKETS:g}, above 1 ("
                + ", ".join(f"{v.name} {v.share:g}" for v in self.variants)
                + ")"
            )
        if self.control is not None and self.control not in names:
            problems.append(f"control {self.control!r} is not one of the variants {names}")
        allocated = [v.buckets is not None for v in self.variants]
        if any(allocated) and not all(allocated):
            problems.append(
                "either every variant has 'buckets' (a started experiment) or none "
                "(allocated at start)"
            )
        problems.extend(_ranges_problems(self.released_buckets, "released_buckets"))
        if self.released_buckets and not all(allocated):
            problems.append(
                "released_buckets without variant buckets (only a started "
                "experiment releases buckets)"
            )
        if all(allocated) and total <= BUCKETS and not problems:
            coverage = np.zeros(BUCKETS, dtype=np.int32)
            for ranges in [v.buckets for v in self.variants] + [self.released_buckets]:
                for start, end in ranges or ():
                    coverage[start:end] += 1
            if (coverage > 1).any():
                problems.append(
                    f"bucket {int(np.argmax(coverage > 1))} belongs to two variants "
                    "(or to a variant and released_buckets)"
                )
        if self.last_change is not None and not isinstance(self.last_change, Mapping):
            problems.append("last_change must be an object")
        return problems

    # --------------------------------------------------------------------------- views

    @property
    def allocated(self) -> bool:
        """True once the variants own their buckets (the experiment started)."""
        return all(v.buckets is not None for v in self.variants)

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def control_variant(self) -> str | None:
        """``control``, else the variant named ``control``, else None."""
        if self.control is not None:
            return self.control
        return "control" if any(v.name == "control" for v in self.variants) else None

    @property
    def shares(self) -> dict[str, float]:
        """Variant name -> share of all users (for the sample-ratio check)."""
        return {v.name: v.share for v in self.variants}

    @property
    def free_buckets(self) -> int:
        """Buckets a variant may still grow into: in no variant and never released."""
        held = sum(v.n_buckets for v in self.variants)
        released = sum(end - start for start, end in self.released_buckets)
        return BUCKETS - held - released

    @property
    def free_share(self) -> float:
        return self.free_buckets / BUCKETS

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise ExperimentError(
            f"experiment {self.name!r} has no variant {name!r} (variants: "
            f"{[v.name for v in self.variants]})"
        )

    def warnings(self) -> list[str]:
        """Advice that does not make the config invalid."""
        out = []
        if self.control_variant is None:
            out.append(
                f"experiment {self.name!r} has no control (a variant named 'control' or "
                "a 'control' key): every variant is compared with one control"
            )
        return out

    def owners(self) -> np.ndarray:
        """Per bucket: the index of its variant, -1 free, -2 released (ExperimentError before
        the start)."""
        self._require_allocated("an owner table")
        owner = np.full(BUCKETS, _FREE, dtype=np.int16)
        for start, end in self.released_buckets:
            owner[start:end] = _RELEASED
        for index, v in enumerate(self.variants):
            for start, end in v.buckets or ():
                owner[start:end] = index
        return owner

    # --------------------------------------------------------------------------- assignment

    def assign(self, user_ids: Iterable[Any], *, ignore_status: bool = False) -> np.ndarray:
        """The variant name of every user (an object array; None outside the experiment).
        A stopped experiment assigns nobody unless ``ignore_status`` (for analysis)."""
        self._require_allocated("an assignment")
        buckets = bucket_array(self.salt, user_ids)
        if not self.running and not ignore_status:
            return np.full(len(buckets), None, dtype=object)
        names = np.array([v.name for v in self.variants] + [None], dtype=object)
        owner = self.owners().astype(np.int64)
        owner[owner < 0] = len(self.variants)  # free and released: outside (None)
        return names[owner[buckets]]

    def assignments(self, user_ids: Iterable[Any], *, ignore_status: bool = False) -> pd.DataFrame:
        """``user_id``, ``experiment``, ``variant``, ``kind``, ``model`` per user (variant,
        kind and model null outside the experiment)."""
        texts = _user_id_texts(user_ids)
        variant = self.assign(texts, ignore_status=ignore_status)
        by_name = {v.name: v for v in self.variants}
        group = [by_name.get(name) for name in variant.tolist()]
        return pd.DataFrame(
            {
                "user_id": pd.Series(texts, dtype=object),
                "experiment": pd.Series(
                    [None if v is None else self.name for v in group], dtype=object
                ),
                "variant": pd.Series(variant, dtype=object),
                "kind": pd.Series([None if v is None else v.kind for v in group], dtype=object),
                "model": pd.Series([None if v is None else v.model for v in group], dtype=object),
            }
        )

    # --------------------------------------------------------------------------- lifecycle

    def allocate(self) -> Experiment:
        """The experiment with every variant owning ``round(share * BUCKETS)`` buckets, taken
        in variant order from bucket 0 on (free buckets stay after them). Already allocated:
        returned as is."""
        if self.allocated:
            return self
        cursor = 0
        variants = []
        for v in self.variants:
            n = v.n_buckets
            variants.append(replace(v, buckets=((cursor, cursor + n),)))
            cursor += n
        return replace(self, variants=tuple(variants))

    def start(self) -> Experiment:
        """Allocate the buckets and mark the experiment running (its version unchanged: the
        first recorded version). A retry on a started experiment returns it unchanged."""
        if self.status == "stopped":
            raise ChangeRefused(
                f"experiment {self.name!r} is stopped: a stopped experiment "
                "does not restart; start a new one with a new name and salt"
            )
        if self.allocated and self.last_change is not None:
            return self
        for warning in self.warnings():
            logger.warning("%s", warning)
        started = self.allocate()
        summary = "started: " + ", ".join(f"{v.name} {_pct(v.n_buckets)}" for v in started.variants)
        summary += f"; {_pct(started.free_buckets)} outside"
        return replace(
            started,
            status="running",
            last_change={"action": "start", "summary": summary, "forced": False},
        )

    def stop(self) -> Experiment:
        """Status ``stopped`` (version + 1): publish serves the default to everyone. The
        buckets stay in the config (who was where). Already stopped: returned as is."""
        if not self.running:
            return self
        self._require_allocated("a stop")
        return replace(
            self,
            status="stopped",
            version=self.version + 1,
            last_change={"action": "stop", "summary": "stopped", "forced": False},
        )

    def change_shares(self, shares: Mapping[str, float], *, force: bool = False) -> Experiment:
        """New shares for some variants (version + 1). Growth comes from the free buckets;
        a shrink is refused unless ``force`` (its users move to the default, recorded as
        forced); share 0 (removal) is refused. No effective change: returned as is."""
        return self._change(dict(shares), (), force=force)

    def add_variant(self, variant: Variant | Mapping[str, Any]) -> Experiment:
        """A new variant (version + 1) whose buckets come from the free pool."""
        new = variant if isinstance(variant, Variant) else Variant.from_dict(variant)
        if new.buckets is not None:
            raise ChangeRefused(
                f"variant {new.name!r}: buckets are allocated by the experiment, leave them out"
            )
        return self._change({}, (new,), force=False)

    def apply_config(
        self, proposed: Experiment | Mapping[str, Any], *, force: bool = False
    ) -> Experiment:
        """The change an edited config asks for, under the rules, as one new version: new
        shares, new variants, or ``status: stopped``. Refused when it names another salt or
        experiment, removes a variant, changes a variant's kind or model, the control or the
        planned horizon, edits buckets, or is older than this version. No difference: returned
        as is."""
        if isinstance(proposed, Experiment):
            new = proposed
            edited = {v.name: v.buckets for v in new.variants}
        else:
            # Buckets belong to the experiment: a proposal (often the saved config with new
            # shares) is read without them, and refused below where it edits them alone.
            data = {
                k: v
                for k, v in dict(proposed).items()
                if k not in ("released_buckets", "last_change")
            }
            raw = data.get("variants")
            if isinstance(raw, list):
                data["variants"] = [
                    {k: v for k, v in item.items() if k != "buckets"}
                    if isinstance(item, Mapping)
                    else item
                    for item in raw
                ]
            new = Experiment.from_dict(data)
            edited = {item["name"]: item.get("buckets") for item in raw}
        fixed = []
        if new.name != self.name:
            raise ChangeRefused(f"the config names experiment {new.name!r}, not {self.name!r}")
        if new.version < self.version:
            raise ChangeRefused(
                f"the config is version {new.version} of {self.name!r} but "
                f"version {self.version} is current: edit the current config"
            )
        if new.salt != self.salt:
            fixed.append("salt (a new salt reshuffles every user: that is a new experiment)")
        for key in ("control", "planned_users_per_variant", "planned_days"):
            if getattr(new, key) != getattr(self, key):
                fixed.append(
                    f"{key} ({getattr(self, key)!r} -> {getattr(new, key)!r}; the "
                    "horizon and the comparison are fixed at start)"
                )
        old = {v.name: v for v in self.variants}
        proposed_names = {v.name for v in new.variants}
        removed = [name for name in old if name not in proposed_names]
        if removed:
            fixed.append(
                f"variants {removed} removed (their users would move; stop the experiment instead)"
            )
        for v in new.variants:
            before = old.get(v.name)
            if before is not None and (before.kind, before.model) != (v.kind, v.model):
                fixed.append(
                    f"variant {v.name!r} changes from {_serves(before)} to "
                    f"{_serves(v)} (one group would mix two treatments)"
                )
            buckets = edited.get(v.name)
            if buckets is not None and (
                before is None
                or (v.share == before.share and not _same_ranges(buckets, before.buckets))
            ):
                fixed.append(
                    f"variant {v.name!r} edits its buckets (the experiment allocates them)"
                )
        if fixed:
            raise ChangeRefused(
                _problem_message(f"experiment {self.name!r} cannot change", fixed)
                + "; stop it and start a new experiment with a new salt instead"
            )
        if new.status == "stopped":
            return self.stop()
        if not self.running:
            raise ChangeRefused(
                f"experiment {self.name!r} is stopped: stopped experiments do "
                "not change (start a new one with a new salt)"
            )
        shares = {v.name: v.share for v in new.variants if v.name in old}
        added = tuple(replace(v, buckets=None) for v in new.variants if v.name not in old)
        return self._change(shares, added, force=force)

    def _change(
        self, shares: dict[str, float], added: Sequence[Variant], *, force: bool
    ) -> Experiment:
        if not self.running:
            raise ChangeRefused(
                f"experiment {self.name!r} is stopped: stopped experiments do "
                "not change (start a new one with a new salt)"
            )
        self._require_allocated("a change (start it first)")
        names = [v.name for v in self.variants]
        unknown = [name for name in shares if name not in names]
        if unknown:
            raise ChangeRefused(
                f"experiment {self.name!r} has no variant(s) {unknown} "
                f"(variants: {names}); add one with add_variant"
            )
        for name in [v.name for v in added]:
            if name in names:
                raise ChangeRefused(f"experiment {self.name!r} already has a variant {name!r}")
        if len({v.name for v in added}) != len(added):
            raise ChangeRefused("the added variants repeat a name")
        current = {v.name: v.n_buckets for v in self.variants}
        target = {}
        for name, share in shares.items():
            if isinstance(share, (int, float)) and not isinstance(share, bool) and share == 0:
                raise ChangeRefused(
                    f"removing variant {name!r} (share 0) would move all its users out of it; "
                    "stop the experiment instead"
                )
            problems = _share_problems(share)
            if problems:
                raise ChangeRefused(f"variant {name!r}: {problems[0]}")
            target[name] = _share_buckets(float(share))
        shrinks = [(name, current[name], n) for name, n in target.items() if n < current[name]]
        if shrinks and not force:
            raise ChangeRefused(
                "; ".join(
                    f"shrinking variant {name!r} from {_pct(old)} to {_pct(new)} would move "
                    f"{old - new:,} buckets' users out of it"
                    for name, old, new in shrinks
                )
                + "; stop the experiment and start a new one with a new salt instead (or "
                "force=True moves them to the default, recorded as forced)"
            )
        grows = [(name, current[name], n) for name, n in target.items() if n > current[name]]
        needed = sum(new - old for _, old, new in grows) + sum(v.n_buckets for v in added)
        if needed > self.free_buckets:
            wanted = [f"{name!r} from {_pct(old)} to {_pct(new)}" for name, old, new in grows]
            wanted += [f"new variant {v.name!r} to {_pct(v.n_buckets)}" for v in added]
            raise ChangeRefused(
                f"growing {', '.join(wanted)} needs {_pct(needed)} of the users but the free "
                f"share is only {_pct(self.free_buckets)} (users in no variant"
                + (", released buckets excluded" if self.released_buckets else "")
                + "): shares stay as they are"
            )
        if not shrinks and not grows and not added:
            return self

        owner = self.owners()
        for name, old, new in shrinks:  # release the variant's last buckets
            index = names.index(name)
            owner[np.flatnonzero(owner == index)[new - old :]] = _RELEASED
        all_variants = list(self.variants) + list(added)
        for name, old, new in grows:
            index = names.index(name)
            owner[np.flatnonzero(owner == _FREE)[: new - old]] = index
        for offset, v in enumerate(added):
            owner[np.flatnonzero(owner == _FREE)[: v.n_buckets]] = len(self.variants) + offset
        variants = tuple(
            replace(v, share=int((owner == index).sum()) / BUCKETS, buckets=_ranges(owner == index))
            for index, v in enumerate(all_variants)
        )
        parts = [f"{name} {_pct(old)} -> {_pct(new)}" for name, old, new in shrinks + grows]
        parts += [f"added {v.name} ({_serves(v)}) {_pct(v.n_buckets)}" for v in added]
        moved = sum(old - new for _, old, new in shrinks)
        summary = "; ".join(parts)
        if moved:
            summary += (
                f" (forced: {moved:,} buckets' users moved out of their variant to the default)"
            )
        change: dict[str, Any] = {"action": "change", "summary": summary, "forced": bool(moved)}
        if moved:
            change["moved_buckets"] = moved
        return replace(
            self,
            variants=variants,
            released_buckets=_ranges(owner == _RELEASED),
            version=self.version + 1,
            last_change=change,
        )

    def _require_allocated(self, what: str) -> None:
        if not self.allocated:
            raise ExperimentError(
                f"experiment {self.name!r} has no buckets yet, so it cannot give {what}: start "
                "it (Experiment.start or allocate) so that its buckets are fixed in its config"
            )

    # --------------------------------------------------------------------------- JSON

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values; ``from_dict(to_dict(x)) == x``."""
        out: dict[str, Any] = {
            "name": self.name,
            "salt": self.salt,
            "version": self.version,
            "status": self.status,
        }
        for key in ("control", "description", "planned_users_per_variant", "planned_days"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out["variants"] = [v.to_dict() for v in self.variants]
        if self.released_buckets:
            out["released_buckets"] = [list(pair) for pair in self.released_buckets]
        if self.last_change is not None:
            out["last_change"] = dict(self.last_change)
        return out

    @classmethod
    def from_dict(cls, data: Any) -> Experiment:
        """Validate a config (a JSON object); ExperimentError lists every problem found."""
        if not isinstance(data, Mapping):
            raise ExperimentError(
                f"an experiment config must be a JSON object, got {type(data).__name__}"
            )
        label = data.get("name") if isinstance(data.get("name"), str) else "?"
        problems: list[str] = []
        unknown = sorted(set(map(str, data)) - set(_EXPERIMENT_KEYS))
        if unknown:
            problems.append(f"unknown key(s) {unknown} (allowed: {list(_EXPERIMENT_KEYS)})")
        for key in ("name", "salt", "variants"):
            if key not in data:
                problems.append(f"missing {key!r}")
        raw_variants = data.get("variants", [])
        variants: list[Variant] = []
        if not isinstance(raw_variants, list):
            problems.append("variants must be a list of objects")
            raw_variants = []
        for raw in raw_variants:
            try:
                variants.append(Variant.from_dict(raw))
            except ExperimentError as exc:
                problems.append(str(exc))
        names = [raw.get("name") for raw in raw_variants if isinstance(raw, Mapping)]
        duplicates = sorted({str(n) for n in names if names.count(n) > 1})
        if duplicates and problems:  # else the constructor reports them
            problems.append(f"duplicate variant name(s) {duplicates}")
        released: Ranges = ()
        try:
            released = _parse_ranges(data.get("released_buckets", []), "released_buckets")
        except ExperimentError as exc:
            problems.append(str(exc))
        if problems:
            if all(key in data for key in ("name", "salt")):
                problems = _scalar_problems(_scalar_values(data)) + problems
            raise ExperimentError(_problem_message(f"experiment {label!r}", problems))
        return cls(
            variants=tuple(variants),
            control=data.get("control"),
            description=data.get("description"),
            released_buckets=released,
            last_change=data.get("last_change"),
            **_scalar_values(data),
        )

    def to_json(self) -> str:
        """The config as indented JSON, one ``[start, end]`` pair per line."""
        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False)
        return _PAIR_RE.sub(r"[\1, \2]", text) + "\n"

    @classmethod
    def load(cls, path: Path | str) -> Experiment:
        """Read and validate a config file; errors name the file (and line for bad JSON)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ExperimentError(f"cannot read experiment config {path}: {exc}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ExperimentError(
                f"experiment config {path}: invalid JSON at line {exc.lineno} "
                f"column {exc.colno}: {exc.msg}"
            ) from None
        try:
            return cls.from_dict(data)
        except ExperimentError as exc:
            raise type(exc)(f"{path}: {exc}") from None

    def save(self, path: Path | str) -> Path:
        """Write the config atomically (temp file, fsync, rename); returns the path."""
        path = Path(path)
        payload = self.to_json().encode("utf-8")
        durable_write(path, lambda handle: handle.write(payload))
        return path


def experiment_path(data_dir: Path | str, name: str) -> Path:
    """``<data_dir>/experiments/<name>.json``, where an experiment's config lives."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ExperimentError(f"invalid experiment name {name!r}")
    return Path(data_dir) / "experiments" / f"{name}.json"


def check_change(old: Experiment, new: Experiment) -> None:
    """ChangeRefused unless ``new`` is a legal next version of ``old`` (the rules of the
    module docstring, checked per bucket): same name, salt, control and horizon; a newer
    version; ``old`` running; every old variant kept with the same kind and model; each bucket
    keeps its owner, except that a free bucket may join a variant, and a variant's bucket may
    be released when ``new`` says the change was forced. A stop changes nothing else."""
    if not old.allocated or not new.allocated:
        raise ChangeRefused("both versions must be started (have buckets) to compare them")
    problems: list[str] = []
    for key in ("name", "salt", "control", "planned_users_per_variant", "planned_days"):
        if getattr(old, key) != getattr(new, key):
            problems.append(f"{key} changed ({getattr(old, key)!r} -> {getattr(new, key)!r})")
    if new.version <= old.version:
        problems.append(f"version {new.version} is not newer than {old.version}")
    if not old.running:
        problems.append(f"version {old.version} is stopped: stopped experiments do not change")
    new_by_name = {v.name: index for index, v in enumerate(new.variants)}
    remap = np.full(len(old.variants) + 2, _FREE, dtype=np.int64)
    for index, v in enumerate(old.variants):
        if v.name not in new_by_name:
            problems.append(f"variant {v.name!r} removed")
            continue
        after = new.variants[new_by_name[v.name]]
        if (v.kind, v.model) != (after.kind, after.model):
            problems.append(f"variant {v.name!r} changed from {_serves(v)} to {_serves(after)}")
        remap[index] = new_by_name[v.name]
    if not problems:
        before = old.owners().astype(np.int64)
        after_owner = new.owners().astype(np.int64)
        in_variant = before >= 0
        expected = np.where(in_variant, remap[np.where(in_variant, before, 0)], before)
        moved = expected != after_owner
        joined = moved & (before == _FREE) & (after_owner >= 0)  # growth from the free pool
        released = moved & in_variant & (after_owner == _RELEASED)
        forced = bool((new.last_change or {}).get("forced"))
        illegal = moved & ~(joined | (released if forced else np.zeros_like(moved)))
        if new.status == "stopped" and moved.any():
            problems.append("a stop must not change the buckets")
        elif illegal.any():
            first = int(np.argmax(illegal))
            problems.append(
                f"{int(illegal.sum()):,} buckets' users would change group (first: "
                f"bucket {first}, {_owner_label(old, before[first])} -> "
                f"{_owner_label(new, after_owner[first])}"
                + ("" if forced else "; releasing needs a forced change")
                + ")"
            )
    if problems:
        raise ChangeRefused(
            _problem_message(
                f"version {new.version} of experiment {new.name!r} is not a legal change of "
                f"version {old.version}",
                problems,
            )
        )


# =================================================================================================
# Helpers
# =================================================================================================


def _ranges(mask: np.ndarray) -> Ranges:
    """The [start, end) runs of True in a bucket mask."""
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return tuple(zip(starts.tolist(), ends.tolist()))


def _scalar_values(data: Mapping[str, Any]) -> dict[str, Any]:
    """The experiment's own fields of a config, with the defaults (version 1, running)."""
    return {
        "name": data.get("name"),
        "salt": data.get("salt"),
        "version": data.get("version", 1),
        "status": data.get("status", "running"),
        "planned_users_per_variant": data.get("planned_users_per_variant"),
        "planned_days": data.get("planned_days"),
    }


def _same_ranges(raw: Any, ranges: Ranges | None) -> bool:
    try:
        return [list(pair) for pair in raw] == [list(pair) for pair in ranges or ()]
    except TypeError:
        return False


def _serves(variant: Variant) -> str:
    return f"model {variant.model!r}" if variant.kind == "model" else f"kind {variant.kind!r}"


def _owner_label(experiment: Experiment, owner: int) -> str:
    if owner == _FREE:
        return "free"
    if owner == _RELEASED:
        return "released"
    return f"variant {experiment.variants[owner].name!r}"


def _problem_message(subject: str, problems: list[str]) -> str:
    if len(problems) == 1:
        return f"{subject}: {problems[0]}"
    return f"{subject}: {len(problems)} problems: " + "; ".join(
        f"({number}) {problem}" for number, problem in enumerate(problems, 1)
    )
