"""Hostile landing files for the demo: real events in awkward shapes, plus a few bad rows.

A CMS export is rarely clean. ``make run``'s landing folder holds, beside MovieLens-100k, four
files that each mix the defects a real source sends (``README``, "Bad input") with rows that
are valid. The valid rows repeat MovieLens events already in the landing folder (the same
user, item, type, time and value), so the lake stores each event once, however it was
spelled, and the demo's numbers do not move; the bad rows, under 5% of each file (the
per-file threshold), go to quarantine with their reason, and the run goes on.

===========================  ===============================================================
``hostile-epoch.csv``        CRLF; times as epoch milliseconds, fractional epoch seconds and
                             ISO-8601 with nanoseconds; bad: an unreadable time, a blank user
``hostile-cr-only.csv``      CR-only line endings, a UTF-8 BOM before a quoted header, event
                             types in odd case and spacing; bad: an unknown event type
``hostile-consent.jsonl``    a BOM; user ids as JSON numbers (``196`` and ``196.0`` are one
                             user); ``consent`` words; bad: a blank consent, an object where
                             the user id belongs
``hostile-ids.csv``          bad: a NUL byte in an id, a control character, a 3,000-char id
===========================  ===============================================================
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.lake.storage import durable_write

PREFIX = "hostile-"
#: Valid rows per file (each file's bad rows stay under 5% of it).
ROWS = 200
_HEADER = ["user_id", "item_id", "event_type", "timestamp", "value"]


def write_hostile_landing(
    events: pd.DataFrame, landing_events_dir: Path, *, seed: int = 0
) -> dict[str, int]:
    """Write the four files (see the module doc) into ``landing_events_dir`` from ``events``
    (contract columns: the MovieLens events the landing folder already holds); returns the
    number of bad rows each file carries."""
    rng = np.random.default_rng(seed)
    sample = events.iloc[np.sort(rng.choice(len(events), 4 * ROWS, replace=False))]
    parts = [sample.iloc[i * ROWS : (i + 1) * ROWS] for i in range(4)]
    landing_events_dir.mkdir(parents=True, exist_ok=True)
    bad = {}
    bad["hostile-epoch.csv"] = _write_csv(
        landing_events_dir / "hostile-epoch.csv", _epoch_rows(parts[0]), newline="\r\n"
    )
    bad["hostile-cr-only.csv"] = _write_csv(
        landing_events_dir / "hostile-cr-only.csv",
        _cr_only_rows(parts[1]),
        newline="\r",
        bom=True,
        quoted_header=True,
    )
    bad["hostile-consent.jsonl"] = _write_jsonl(
        landing_events_dir / "hostile-consent.jsonl", parts[2]
    )
    bad["hostile-ids.csv"] = _write_csv(
        landing_events_dir / "hostile-ids.csv", _id_rows(parts[3]), newline="\n"
    )
    return bad


def _seconds(frame: pd.DataFrame) -> np.ndarray:
    """Whole epoch seconds of the events' times (MovieLens times are whole seconds)."""
    stamps = pd.to_datetime(frame["timestamp"], utc=True)
    return ((stamps - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy()


def _base(frame: pd.DataFrame) -> list[list[str]]:
    values = frame["value"].astype("float64")
    return [
        [str(u), str(i), str(t), "", "" if v != v else f"{v:g}"]
        for u, i, t, v in zip(
            frame["user_id"], frame["item_id"], frame["event_type"], values, strict=True
        )
    ]


def _epoch_rows(frame: pd.DataFrame) -> tuple[list[list[str]], int]:
    rows = _base(frame)
    for n, (row, whole) in enumerate(zip(rows, _seconds(frame), strict=True)):
        row[3] = (
            str(whole * 1000)
            if n % 3 == 0  # epoch milliseconds
            else f"{whole}.0"
            if n % 3 == 1  # fractional seconds
            else pd.Timestamp(whole, unit="s", tz="UTC").strftime("%Y-%m-%dT%H:%M:%S.000000000Z")
        )  # ISO, nanoseconds
    bad = [["1", "1", "rating", "yesterday-ish", "3"], ["", "1", "rating", rows[0][3], "3"]]
    return rows + bad, len(bad)


def _cr_only_rows(frame: pd.DataFrame) -> tuple[list[list[str]], int]:
    rows = _base(frame)
    for n, (row, whole) in enumerate(zip(rows, _seconds(frame), strict=True)):
        row[2] = f"  {row[2].upper()} " if n % 2 else row[2].title()
        row[3] = pd.Timestamp(whole, unit="s", tz="UTC").isoformat()
    bad = [["1", "1", "teleport", rows[0][3], "3"]]
    return rows + bad, len(bad)


def _id_rows(frame: pd.DataFrame) -> tuple[list[list[str]], int]:
    rows = _base(frame)
    for row, whole in zip(rows, _seconds(frame), strict=True):
        row[3] = str(whole)
    when = rows[0][3]
    bad = [
        ["u\x00196", "1", "rating", when, "3"],
        ["u\x07bell", "1", "rating", when, "3"],
        ["u" * 3000, "1", "rating", when, "3"],
    ]
    return rows + bad, len(bad)


def _write_csv(
    path: Path,
    made: tuple[list[list[str]], int],
    *,
    newline: str,
    bom: bool = False,
    quoted_header: bool = False,
) -> int:
    rows, n_bad = made
    header = [f'"{c}"' if quoted_header else c for c in _HEADER]
    text = newline.join(",".join(r) for r in [header, *rows]) + newline
    payload = (b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8")
    durable_write(path, lambda fh: fh.write(payload))
    return n_bad


def _write_jsonl(path: Path, frame: pd.DataFrame) -> int:
    records = []
    for n, (row, whole) in enumerate(zip(_base(frame), _seconds(frame), strict=True)):
        user: object = int(row[0]) if row[0].isdigit() else row[0]
        if isinstance(user, int) and n % 2:
            user = float(user)  # 196.0 is user 196
        records.append(
            {
                "user_id": user,
                "item_id": row[1],
                "event_type": row[2],
                "timestamp": pd.Timestamp(whole, unit="s", tz="UTC").isoformat(),
                "value": float(row[4]) if row[4] else None,
                "consent": ["true", "yes", 1, True][n % 4],
            }
        )
    when = records[0]["timestamp"]
    bad = [
        {
            "user_id": "1",
            "item_id": "1",
            "event_type": "rating",
            "timestamp": when,
            "value": 3.0,
            "consent": "",
        },
        {
            "user_id": {"id": 9, "email": "someone@example.com"},
            "item_id": "1",
            "event_type": "rating",
            "timestamp": when,
            "value": 3.0,
            "consent": "true",
        },
    ]
    text = "\n".join(json.dumps(r) for r in [*records, *bad]) + "\n"
    payload = b"\xef\xbb\xbf" + text.encode("utf-8")
    durable_write(path, lambda fh: fh.write(payload))
    return len(bad)
