"""Settings and run-scoped paths.

Everything configurable lives in :class:`Settings`; values come from keyword arguments, then
environment variables, then the defaults below. Nothing here touches Airflow.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
#: The Great Expectations suite of the event contract, reviewed like code.
EVENTS_SUITE = REPO_ROOT / "expectations" / "events.json"

#: Confidence weight of one event of each type (the implicit-feedback "r_ui").
#: A `rating` event's weight is multiplied by its value (1-5 stars). A type weighted 0 is a
#: known type (validation accepts it, the lake keeps it) that never trains anything: its events
#: are left out when a run's events are encoded (:func:`untrained_event_types`). An
#: `impression` (an item the CMS showed) is such a type unless configured otherwise: being
#: shown is not being liked; impressions are what attribution (CTR) counts.
DEFAULT_EVENT_WEIGHTS: dict[str, float] = {
    "impression": 0.0,
    "view": 1.0,
    "click": 2.0,
    "like": 4.0,
    "share": 4.0,
    "add_to_cart": 6.0,
    "purchase": 10.0,
    "rating": 1.0,
}
VALUE_SCALED_EVENT_TYPES: frozenset[str] = frozenset({"rating"})

DEFAULT_USER = "__default__"


def untrained_event_types(weights: Mapping[str, float]) -> frozenset[str]:
    """The event types of ``weights`` whose weight is not positive (0 by default: impressions):
    their events never reach the models, the feature tables, the holdout or the consumed
    filter. Types absent from ``weights`` are not listed (validation quarantines them)."""
    return frozenset(str(t) for t, w in weights.items() if not float(w) > 0)


def _env_path(name: str, default: Path) -> Path:
    value = os.environ.get(name)
    return Path(value).expanduser().resolve() if value else default


KEY_ENV = "RECS_PSEUDONYM_KEY"
KEY_FILE_ENV = "RECS_PSEUDONYM_KEY_FILE"
#: A key shorter than this (in bytes) is refused: an HMAC key should be as strong as its hash.
MIN_KEY_BYTES = 16


def load_pseudonym_key(environ: Mapping[str, str] | None = None) -> bytes | None:
    """The pseudonymisation key from the environment: ``RECS_PSEUDONYM_KEY`` (its text), else
    the file named by ``RECS_PSEUDONYM_KEY_FILE`` (its text, surrounding whitespace
    stripped), else None. Raises ConfigError for a key file that cannot be read or a key
    shorter than :data:`MIN_KEY_BYTES` bytes (a weak key would make the ids guessable)."""
    env = os.environ if environ is None else environ
    text = (env.get(KEY_ENV) or "").strip()
    source = KEY_ENV
    if not text and (env.get(KEY_FILE_ENV) or "").strip():
        path = Path(env[KEY_FILE_ENV].strip()).expanduser()
        source = f"{KEY_FILE_ENV} ({path})"
        try:
            text = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"pseudonymisation key file {path} cannot be read: {type(exc).__name__}"
            ) from None
    if not text:
        return None
    return check_key(text.encode("utf-8"), source)


def check_key(key: bytes, source: str = "the key") -> bytes:
    """``key`` when it is long enough; ConfigError (never echoing it) otherwise."""
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(
            f"pseudonymisation key from {source} is {len(key)} bytes; at least "
            f"{MIN_KEY_BYTES} are needed (e.g. `python -c 'import secrets; "
            "print(secrets.token_hex(32))'`)"
        )
    return key


@dataclass(frozen=True)
class Settings:
    """Pipeline configuration; one instance per run."""

    data_dir: Path = field(default_factory=lambda: _env_path("RECS_DATA_DIR", REPO_ROOT / "data"))
    event_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_EVENT_WEIGHTS))
    top_n: int = 10
    lookback_days: int = 365
    holdout_days: int = 14
    #: The holdout metrics are computed on at most this many of its returning users, a
    #: seeded sample (None: all): a million users' holdout would cost as much as publishing,
    #: and 50,000 users bound nDCG@10's standard error near 0.001.
    eval_max_users: int | None = 50_000
    max_bad_row_share: float = 0.05
    als_factors: int = 64
    als_regularization: float = 0.05
    als_alpha: float = 2.0
    als_iterations: int = 15
    seed: int = 42
    #: Two-stage ranker: label window length (days) and number of label windows.
    label_days: int = 14
    label_windows: int = 6
    #: XGBoost rankers (seeds) averaged in the two-stage model.
    ranker_bags: int = 5
    #: Hyperparameter search in ``train`` (expanding-window CV), and its time budget.
    tune: bool = False
    tune_budget_minutes: float = 10.0
    #: Landing-file column mapping: inline JSON ``{"uid": "user_id", ...}`` or the path of a JSON
    #: file (``RECS_COLUMN_MAPPING``); merged over ``landing/column_mapping.json``.
    column_mapping: str | None = field(
        default_factory=lambda: os.environ.get("RECS_COLUMN_MAPPING") or None
    )
    #: Events older than the lake's newest event minus this many days stay out of the lake.
    allowed_lateness_days: float = field(
        default_factory=lambda: float(os.environ.get("RECS_ALLOWED_LATENESS_DAYS", "3"))
    )
    #: Events may be this much later than the time they are ingested (producer clocks drift).
    clock_skew_seconds: float = 300.0
    #: A young text file without a final newline (or 0 bytes) waits this long before ingest.
    landing_settle_seconds: float = field(
        default_factory=lambda: float(os.environ.get("RECS_LANDING_SETTLE_SECONDS", "60"))
    )
    #: Rows per chunk streamed through ingest and validation (bounds memory).
    chunk_rows: int = 250_000
    #: A run stops at ingest (no retry) when its window holds fewer events than this, or when
    #: its newest event is more than max_staleness_days before the cutoff (None: no limit).
    min_window_events: int = 100
    max_staleness_days: float | None = 3.0
    #: A run whose cutoff is older than production's (the live lists' or the champion's)
    #: records its results but serves nothing and promotes nothing, unless this is set.
    serve_backfill: bool = False
    # Promotion gate (pipeline.evaluation.gate), nDCG@10:
    # challenger >= champion * (1 + gain) - tolerance.
    gate_min_relative_gain: float = 0.0
    gate_tolerance: float = 0.001
    #: Promote a different recipe only when the paired bootstrap interval of challenger minus
    #: champion (over holdout users) lies above zero.
    gate_require_significance: bool = False
    #: Online gate: a different recipe that passes the offline gate waits as ``online-test``
    #: and becomes champion only when an experiment shows it significantly better than the
    #: champion online (decided by the impact run, :func:`pipeline.impact.online_gate`).
    gate_online: bool = False
    force_promote: bool = False
    # Publish: business rules (pipeline.serving.rules) and serving versions (pipeline.serving).
    #: Event types that count as "consumed" (never recommended again); None: every type.
    consumed_event_types: tuple[str, ...] | None = None
    #: At most this many items of one category per list (None: no cap); uncategorised exempt.
    max_per_category: int | None = 3
    #: Items published more than this many days before the cutoff are not shown (None: no TTL).
    item_ttl_days: int | None = None
    #: The model proposes candidate_multiplier x top_n candidates per user for the rules.
    candidate_multiplier: int = 3
    #: Worker processes that make the lists in ``publish`` (each loads the model once);
    #: None: the CPUs this process may use, at most 2. The lists are the same for any number.
    publish_workers: int | None = None
    #: Version tables kept in the serving DB (the live one included).
    keep_versions: int = 3
    #: The key of the user-id pseudonyms (:mod:`pipeline.core.privacy`): ``RECS_PSEUDONYM_KEY``
    #: or the file ``RECS_PSEUDONYM_KEY_FILE`` (the DAGs pass an Airflow Variable's or
    #: connection's first); None: ids are stored as the CMS sends them. Never printed.
    pseudonym_key: bytes | None = field(
        default_factory=lambda: load_pseudonym_key(), repr=False, compare=False
    )

    # ---- folders -------------------------------------------------------------------------
    @property
    def landing_dir(self) -> Path:
        return self.data_dir / "landing"

    @property
    def landing_events_dir(self) -> Path:
        return self.landing_dir / "events"

    @property
    def lake_events_dir(self) -> Path:
        return self.data_dir / "lake" / "events"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    @property
    def serving_sqlite_path(self) -> Path:
        return self.data_dir / "serving.sqlite"

    def run_dir(self, cutoff: dt.datetime) -> Path:
        """Run-scoped folder for the run whose cutoff (logical date) is ``cutoff``."""
        return self.data_dir / "runs" / cutoff.strftime("%Y-%m-%dT%H%M%S")


def mlflow_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` or a SQLite store in the repo root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO_ROOT / 'mlflow.db'}"


def mlflow_artifact_root() -> str:
    """Where new MLflow experiments keep artifacts (``MLFLOW_ARTIFACT_ROOT`` overrides)."""
    return os.environ.get("MLFLOW_ARTIFACT_ROOT") or (REPO_ROOT / "mlartifacts").as_uri()


def as_utc(value: dt.datetime | dt.date | str) -> dt.datetime:
    """Normalise a cutoff given as date, datetime or ISO string to an aware UTC datetime."""
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if not isinstance(value, dt.datetime):
        value = dt.datetime(value.year, value.month, value.day)
    elif type(value) is not dt.datetime:  # a subclass (pendulum's, pandas'): plain datetime
        value = dt.datetime.fromisoformat(value.isoformat())
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc)
