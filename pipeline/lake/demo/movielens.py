"""MovieLens-100k, read from the RecBole 1.2.1 wheel (its ``dataset_example`` copy).

The wheel is the only allowed source: :func:`fetch_recbole_wheel` downloads it once with pip
into a cache folder, :func:`read_movielens_wheel` reads the three atomic files straight from
the zip, and the ``parse_*`` functions turn each file's text into contract-shaped frames.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd

from pipeline.core.errors import DataError
from pipeline.core.schema import EVENT_COLUMNS, EVENT_DTYPES, ITEM_COLUMNS
from pipeline.lake.demo import AGE_BANDS, USER_COLUMNS, DemoData, write_landing

logger = logging.getLogger(__name__)

RECBOLE_VERSION = "1.2.1"
WHEEL_GLOB = f"recbole-{RECBOLE_VERSION}-*.whl"
ML100K_PREFIX = "recbole/dataset_example/ml-100k/ml-100k"
DEMO_NAME = "ml-100k"

Source = str | bytes | IO[str] | IO[bytes]


# ---- download ------------------------------------------------------------------------------
def fetch_recbole_wheel(cache_dir: Path) -> Path:
    """Return the cached RecBole wheel, downloading it with pip (no deps) on first use."""
    cache_dir = Path(cache_dir)
    cached = sorted(cache_dir.glob(WHEEL_GLOB))
    if cached:
        logger.debug("using cached wheel %s", cached[0])
        return cached[0]
    cache_dir.mkdir(parents=True, exist_ok=True)
    # A temp dir inside cache_dir keeps the final rename on one filesystem (atomic).
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".pip-download-") as tmpdir:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            f"recbole=={RECBOLE_VERSION}",
            "-d",
            tmpdir,
        ]
        logger.info("downloading recbole==%s wheel into %s", RECBOLE_VERSION, cache_dir)
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as exc:
            tail = (exc.stderr or "").strip()[-2000:]
            raise RuntimeError(
                f"pip download of recbole=={RECBOLE_VERSION} failed (exit {exc.returncode}): {tail}"
            ) from exc
        downloaded = sorted(Path(tmpdir).glob(WHEEL_GLOB))
        if not downloaded:
            found = sorted(p.name for p in Path(tmpdir).iterdir())
            raise RuntimeError(f"pip download produced no {WHEEL_GLOB} file (got {found})")
        target = cache_dir / downloaded[0].name
        os.replace(downloaded[0], target)
    logger.info("cached %s", target)
    return target


# ---- loading -------------------------------------------------------------------------------
def load_movielens_100k(cache_dir: Path) -> DemoData:
    """Fetch (or reuse) the RecBole wheel in ``cache_dir`` and return MovieLens-100k."""
    return read_movielens_wheel(fetch_recbole_wheel(cache_dir))


def read_movielens_wheel(wheel_path: Path) -> DemoData:
    """Read MovieLens-100k (events, items, users) from the RecBole wheel without extracting."""
    with zipfile.ZipFile(wheel_path) as wheel:

        def _read(kind: str) -> str:
            member = f"{ML100K_PREFIX}.{kind}"
            try:
                return decode_text(wheel.read(member))
            except KeyError as exc:
                raise DataError(f"{member} not found in the wheel", file=str(wheel_path)) from exc

        events = parse_interactions(_read("inter"))
        items = clamp_published_at(parse_items(_read("item")), events)
        data = DemoData(events=events, items=items, users=parse_users(_read("user")))
    logger.info(
        "MovieLens-100k: %d events, %d items, %d users",
        len(data.events),
        len(data.items),
        len(data.users),
    )
    return data


def write_demo_landing(cache_dir: Path, landing_dir: Path) -> DemoData:
    """Load MovieLens-100k and write it to ``landing_dir`` as ``events/ml-100k.csv.gz``."""
    data = load_movielens_100k(cache_dir)
    write_landing(data, landing_dir, name=DEMO_NAME, fmt="csv", gzip=True)
    return data


def decode_text(raw: bytes) -> str:
    """Decode file bytes as UTF-8, falling back to latin-1 (which never fails)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


# ---- parsing (pure) ------------------------------------------------------------------------
def parse_interactions(source: Source) -> pd.DataFrame:
    """Parse ``ml-100k.inter`` into contract events (``rating`` events, value = stars)."""
    raw = _read_atomic(
        source, "ml-100k.inter", ["user_id", "item_id", "rating", "timestamp"], unique_id=False
    )
    rating = _to_number(raw, "rating", "ml-100k.inter")
    seconds = _to_number(raw, "timestamp", "ml-100k.inter")
    _raise_at_first(rating < 0, "negative rating", "ml-100k.inter", "rating")
    seconds_int = seconds.round().astype("int64")
    user = raw["user_id"].astype("string")
    item = raw["item_id"].astype("string")
    event_id = "ml100k-" + user + "-" + item + "-" + seconds_int.astype("string")
    timestamp = (
        pd.Series(seconds_int.to_numpy() * 1_000_000, dtype="int64")
        .astype("datetime64[us]")
        .dt.tz_localize("UTC")
    )
    events = pd.DataFrame(
        {
            "event_id": event_id,
            "user_id": user,
            "item_id": item,
            "event_type": "rating",
            "timestamp": timestamp,
            "value": rating.astype("float64"),
            "device": pd.NA,
            "session_id": pd.NA,
        },
        columns=list(EVENT_COLUMNS),
    )
    events = events.astype(EVENT_DTYPES)
    events = events.sort_values(["timestamp", "user_id", "item_id"], kind="stable")
    return events.reset_index(drop=True)


def parse_items(source: Source) -> pd.DataFrame:
    """Parse ``ml-100k.item`` into the items side table (category = first genre)."""
    raw = _read_atomic(
        source, "ml-100k.item", ["item_id", "movie_title", "release_year", "class"], unique_id=True
    )
    genres = raw["class"].str.strip().str.split(n=1).str[0]
    category = genres.where(genres.notna() & (genres != ""), "unknown")
    year = pd.to_numeric(raw["release_year"].str.strip(), errors="coerce")
    year = year.where((year >= 1000) & (year <= 9999))
    published = pd.to_datetime(
        year.astype("Int64").astype("string") + "-01-01",
        format="%Y-%m-%d",
        errors="coerce",
        utc=True,
    ).astype("datetime64[us, UTC]")
    items = pd.DataFrame(
        {
            "item_id": raw["item_id"].astype("string"),
            "title": raw["movie_title"].str.strip().astype("string"),
            "category": category.astype("string"),
            "published_at": published,
            "available": True,
            "price": np.nan,
        },
        columns=list(ITEM_COLUMNS),
    )
    return items.astype({"available": "bool", "price": "float64"})


def parse_users(source: Source) -> pd.DataFrame:
    """Parse ``ml-100k.user`` into the users side table (age band, region = zip's 1st digit)."""
    raw = _read_atomic(
        source,
        "ml-100k.user",
        ["user_id", "age", "gender", "occupation", "zip_code"],
        unique_id=True,
    )
    first = raw["zip_code"].str.strip().str[:1]
    region = first.where(first.str.isdigit().fillna(False).astype(bool), "unknown")
    users = pd.DataFrame(
        {
            "user_id": raw["user_id"],
            "age_band": band_ages(pd.to_numeric(raw["age"].str.strip(), errors="coerce")),
            "gender": _or_unknown(raw["gender"]),
            "occupation": _or_unknown(raw["occupation"]),
            "region": region,
        },
        columns=list(USER_COLUMNS),
    )
    return users.astype("string")


def clamp_published_at(items: pd.DataFrame, events: pd.DataFrame) -> pd.DataFrame:
    """Move ``published_at`` back to the day of the item's first event where that is earlier.

    ML-100k has a few dozen ratings of 1998 films made in late 1997 (release year -> Jan 1 is
    only a proxy); clamping keeps "no event before its item's published_at" true.
    """
    first = events.groupby("item_id", observed=True)["timestamp"].min().dt.floor("D")
    first_for_item = items["item_id"].map(first)
    early = (first_for_item < items["published_at"]).to_numpy(dtype=bool)  # NaT compares False
    if early.any():
        logger.info("moved published_at back to the first event for %d items", int(early.sum()))
        items = items.copy()
        items.loc[early, "published_at"] = first_for_item[early].astype("datetime64[us, UTC]")
    return items


def band_ages(age: pd.Series) -> pd.Series:
    """Map ages in years to :data:`AGE_BANDS` labels (``unknown`` when missing)."""
    edges = [-np.inf, 18, 25, 35, 45, 50, 56, np.inf]
    bands = pd.cut(age, bins=edges, right=False, labels=list(AGE_BANDS))
    return bands.astype("string").fillna("unknown")


# ---- helpers -------------------------------------------------------------------------------
def _read_atomic(source: Source, file: str, columns: list[str], *, unique_id: bool) -> pd.DataFrame:
    """Read one RecBole atomic file (tab-separated, ``name:type`` header) as text columns.

    The id column(s) must be non-blank; with ``unique_id`` the first column must be unique.
    """
    if not isinstance(source, str | bytes):
        source = source.read()
    text = decode_text(source) if isinstance(source, bytes) else source
    frame = pd.read_csv(
        io.StringIO(text), sep="\t", dtype="string", keep_default_na=False, quoting=csv.QUOTE_NONE
    )
    frame.columns = [str(c).split(":", 1)[0].strip() for c in frame.columns]
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"missing columns {missing}; header has {list(frame.columns)}", file=file)
    frame = frame[columns].fillna("")
    id_columns = columns[:1] if unique_id else columns[:2]
    for key in id_columns:
        frame[key] = frame[key].str.strip()
        _raise_at_first(frame[key] == "", "empty id", file, key)
    if unique_id:
        _raise_at_first(frame[columns[0]].duplicated(), "duplicate id", file, columns[0])
    return frame


def _raise_at_first(bad: pd.Series, message: str, file: str, column: str) -> None:
    """Raise :class:`DataError` at the first True row of ``bad`` (1-based, header = row 1)."""
    hits = np.flatnonzero(bad.to_numpy(dtype=bool))
    if hits.size:
        raise DataError(message, file=file, row=int(hits[0]) + 2, column=column)


def _to_number(frame: pd.DataFrame, column: str, file: str) -> pd.Series:
    """Column as float; a value that is not a number raises :class:`DataError` naming its row."""
    values = pd.to_numeric(frame[column].str.strip(), errors="coerce").astype("float64")
    bad = ~np.isfinite(values.to_numpy())
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"not a number: {frame[column].iloc[row]!r}", file=file, row=row + 2, column=column
        )
    return values


def _or_unknown(values: pd.Series) -> pd.Series:
    """Stripped text with blanks replaced by ``unknown``."""
    stripped = values.str.strip()
    return stripped.where(stripped != "", "unknown")
