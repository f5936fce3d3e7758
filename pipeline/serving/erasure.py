"""Right to erasure: forget users everywhere the pipeline keeps them, and keep them out.

:func:`forget_users` is what the DAG ``recommendations_forget_user`` and ``python -m
pipeline.cli forget-user`` run. It lives in the serving package, the lowest layer that sees
both stores (serving sits above the lake; the top-level modules cannot import one another,
so a top-level home would be out of the CLI's reach):

1. the lake side (:func:`pipeline.lake.erasure.erase_users`, under the ingest lock): the
   tombstone first (from then on ingest drops their rows, so an old landing file or a re-sent
   export cannot bring them back), then the lake parts, quarantine, served-list history and
   run folders; it also finds the registered model versions trained on their data (the runs
   whose id map held them);
2. the serving DB (:func:`forget_serving_users`): a plain ``DELETE`` from every table with a
   ``user_id`` column -- the list table of every kept version (live and retired: a rollback
   must not bring them back), its assignments table and the pseudonym mapping
   ``user_pseudonyms`` (their pseudonym can no longer be traced back) -- in one transaction (see the
   backends' ``forget_users``): no view swap, so the CMS reads on without a pause, and from
   the commit on the view has no rows for them (a forgotten user gets the fallback list like
   any unknown user);
3. the audit row in the serving DB's ``erasures`` table (:func:`record_erasure`): who asked,
   when, why, the counts per store and the model versions (no id, in clear or hashed).

The CMS's ids are converted to the ids as stored in the lake by
:func:`pipeline.core.privacy.stored_user_id` (once, here, with the settings' pseudonym key:
the lake holds their pseudonyms); the serving DB holds the CMS's own ids (the view's contract
and the mapping's ``user_id``) and is asked with them.

**Retries.** Every step is idempotent. A small journal (``lake/_erased/pending/<key>.json``,
``<key>`` a keyed hash of the id set, the journal holding counts and versions only) carries
the counts, the model versions and the request id from an interrupted attempt to its retry,
so the ``erasures`` row of a request is written once (unique ``request_id``) and complete;
rows an interrupted step removed before the crash are the only ones it cannot count.
Models stay in the MLflow registry until the next nightly retrains without the users (see
the README, "Privacy").
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.core.config import Settings, as_utc
from pipeline.core.errors import ServingError
from pipeline.core.privacy import check_user_ids, stored_user_id
from pipeline.lake.erasure import erase_users
from pipeline.lake.storage import durable_write
from pipeline.lake.tombstone import erased_dir, request_key
from pipeline.serving.contract import NothingPublishedError
from pipeline.serving.store import backend_for

logger = logging.getLogger(__name__)

ERASURE_COLUMNS = (
    "id",
    "request_id",
    "requested_at",
    "completed_at",
    "requested_by",
    "reason",
    "users",
    "removed",
    "model_versions",
)


def forget_serving_users(
    user_ids: Iterable[str],
    *,
    dsn: str | None,
    sqlite_path: Path,
    schema: str | None = None,
    dry_run: bool = False,
) -> dict[str, int]:
    """Delete the rows of ``user_ids`` (CMS ids) from every serving table that holds user
    ids; returns ``{"serving_list_rows", "serving_assignment_rows", "serving_other_rows",
    "serving_tables"}`` (rows removed, or found with ``dry_run``; tables that had some).
    Idempotent. Raises :class:`ServingError` when the database fails (nothing is deleted
    then: one transaction)."""
    ids = sorted(set(user_ids))
    backend = backend_for(dsn, sqlite_path, schema)
    per_table = backend.forget_users(ids, dry_run=dry_run) if ids else {}
    counts = {
        "serving_list_rows": 0,
        "serving_assignment_rows": 0,
        "serving_other_rows": 0,
        "serving_tables": sum(1 for rows in per_table.values() if rows),
    }
    for table, rows in per_table.items():
        if table.startswith("recommendation_assignments_v"):
            counts["serving_assignment_rows"] += int(rows)
        elif table.startswith("recommendations_v"):
            counts["serving_list_rows"] += int(rows)
        else:
            counts["serving_other_rows"] += int(rows)
    logger.info(
        "erasure%s (serving, %s, %d user id(s)): %s",
        " (dry run)" if dry_run else "",
        backend.target,
        len(ids),
        json.dumps(counts, sort_keys=True),
    )
    return counts


def record_erasure(
    *,
    request_id: str,
    requested_at: datetime,
    requested_by: str,
    reason: str | None,
    users: int,
    removed: Mapping[str, int],
    model_versions: Iterable[str],
    dsn: str | None,
    sqlite_path: Path,
    schema: str | None = None,
) -> tuple[int, bool]:
    """Append the ``erasures`` row of one request (counts only); a request already recorded
    (a retried task) is not recorded again. Returns (id, inserted)."""
    if not requested_by or not requested_by.strip():
        raise ServingError("an erasure must say who asked for it (requested_by)")
    params: dict[str, Any] = {
        "request_id": request_id,
        "requested_at": as_utc(requested_at),
        "requested_by": requested_by,
        "reason": reason,
        "users": int(users),
        "removed": json.dumps({k: int(v) for k, v in removed.items()}, sort_keys=True),
        "model_versions": json.dumps(list(model_versions)),
    }
    record_id, inserted = backend_for(dsn, sqlite_path, schema).insert_erasure(params)
    logger.info(
        "erasure %s recorded (id %d) by %s",
        "was" if inserted else "was already",
        record_id,
        requested_by,
    )
    return record_id, inserted


def read_erasures(*, dsn: str | None, sqlite_path: Path, schema: str | None = None) -> pd.DataFrame:
    """The ``erasures`` rows, oldest first (``removed`` a dict, ``model_versions`` a list,
    times UTC); empty before the first erasure."""
    try:
        rows = backend_for(dsn, sqlite_path, schema).read_rows("read_erasures.sql", {})
    except (NothingPublishedError, ServingError) as exc:
        if isinstance(exc, NothingPublishedError) or "no such table" in str(exc):
            return pd.DataFrame(columns=list(ERASURE_COLUMNS))
        raise
    frame = pd.DataFrame([list(row) for row in rows], columns=list(ERASURE_COLUMNS))
    for column in ("removed", "model_versions"):
        frame[column] = [json.loads(v) if isinstance(v, (str, bytes)) else v for v in frame[column]]
    for column in ("requested_at", "completed_at"):
        frame[column] = pd.to_datetime(frame[column], utc=True, format="ISO8601")
    return frame


# ---- the whole erasure: lake, serving, record ------------------------------------------------

_LAKE_COUNTS = (
    "tombstone_added",
    "lake_events",
    "lake_parts_rewritten",
    "lake_parts_removed",
    "quarantine_rows",
    "staging_removed",
    "served_history_rows",
    "run_folders",
    "run_rows",
    "run_ids_blanked",
    "run_files_rewritten",
    "run_reports_removed",
)


def forget_users(
    settings: Settings,
    user_ids: Iterable[str],
    *,
    requested_by: str,
    reason: str | None = None,
    dsn: str | None = None,
    schema: str | None = None,
    request_id: str | None = None,
    dry_run: bool = False,
    now: dt.datetime | None = None,
) -> dict[str, Any]:
    """Forget ``user_ids`` (the CMS's ids) in the lake, quarantine, run folders, served-list
    history and serving DB, add them to the ingest tombstone and record the erasure (see the
    module docstring). ``dsn`` None: the embedded SQLite file. ``request_id`` names the
    request in ``erasures`` (the DAG passes its run id; default: a new random id, or the one
    of an interrupted attempt with the same ids). With ``dry_run``, count what would be
    removed, change nothing, record nothing.

    Returns counts only (small for XCom): ``request_id``, ``erasure_id``, ``recorded``
    (False when the request was recorded already), ``users``, ``removed`` (per store),
    ``model_versions``, ``dry_run``. Raises ValueError for unusable ids or no
    ``requested_by``, ServingError when the serving DB fails (a retry completes it)."""
    cms_ids = check_user_ids(user_ids)
    if not isinstance(requested_by, str) or not requested_by.strip():
        raise ValueError("requested_by must say who asked for the erasure")
    stored_ids = [stored_user_id(user, settings.pseudonym_key) for user in cms_ids]
    lake_root = settings.lake_events_dir.parent
    runs_root = settings.data_dir / "runs"
    serving = {"dsn": dsn, "sqlite_path": settings.serving_sqlite_path, "schema": schema}
    if dry_run:
        lake = erase_users(lake_root, runs_root, stored_ids, dry_run=True)
        counts = {
            **_lake_counts(lake.to_dict()),
            **forget_serving_users(cms_ids, dry_run=True, **serving),
        }
        return {
            "request_id": None,
            "erasure_id": None,
            "recorded": False,
            "users": len(cms_ids),
            "removed": counts,
            "model_versions": lake.model_versions,
            "dry_run": True,
        }

    key = request_key(lake_root, stored_ids)[:32]
    journal_path = erased_dir(lake_root) / "pending" / f"{key}.json"
    journal = _read_journal(journal_path)
    if journal is None:
        journal = {
            "request_id": request_id or f"erasure-{uuid.uuid4().hex}",
            "requested_at": as_utc(now or dt.datetime.now(dt.timezone.utc)).isoformat(),
            "removed": {},
            "model_versions": [],
            "steps": [],
        }
    else:
        logger.warning(
            "resuming an interrupted erasure (request %s, started %s)",
            journal["request_id"],
            journal["requested_at"],
        )
    _write_journal(journal_path, journal)

    lake = erase_users(lake_root, runs_root, stored_ids, tombstone_ids=cms_ids)
    _add(journal, _lake_counts(lake.to_dict()), lake.model_versions, "lake")
    _write_journal(journal_path, journal)

    _add(journal, forget_serving_users(cms_ids, **serving), [], "serving")
    _write_journal(journal_path, journal)

    erasure_id, recorded = record_erasure(
        request_id=journal["request_id"],
        requested_at=as_utc(journal["requested_at"]),
        requested_by=requested_by,
        reason=reason,
        users=len(cms_ids),
        removed=journal["removed"],
        model_versions=journal["model_versions"],
        **serving,
    )
    journal_path.unlink(missing_ok=True)
    result = {
        "request_id": journal["request_id"],
        "erasure_id": erasure_id,
        "recorded": recorded,
        "users": len(cms_ids),
        "removed": journal["removed"],
        "model_versions": journal["model_versions"],
        "dry_run": False,
    }
    logger.info(
        "erasure %s of %d user(s) done: %s; models trained on their data: %s",
        result["request_id"],
        len(cms_ids),
        json.dumps(result["removed"], sort_keys=True),
        ", ".join(result["model_versions"]) or "none found",
    )
    return result


def _lake_counts(lake: dict[str, Any]) -> dict[str, int]:
    return {key: int(lake[key]) for key in _LAKE_COUNTS}


def _add(journal: dict[str, Any], counts: dict[str, int], versions: list[str], step: str) -> None:
    """Add a step's counts to the journal's (a re-run step adds what it found left)."""
    for key, value in counts.items():
        journal["removed"][key] = int(journal["removed"].get(key, 0)) + int(value)
    known = list(journal["model_versions"])
    journal["model_versions"] = known + [v for v in versions if v not in known]
    journal["steps"].append(step)


def _read_journal(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        logger.warning("erasure journal %s unreadable (%s): starting a new request", path, exc)
        return None


def _write_journal(path: Path, journal: dict[str, Any]) -> None:
    text = json.dumps(journal, sort_keys=True, indent=1).encode("utf-8")
    durable_write(path, lambda fh: fh.write(text))
