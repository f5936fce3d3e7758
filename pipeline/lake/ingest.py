"""Ingest: landing files -> Parquet lake partitioned by event date, each event exactly once.

This module is the ingest transaction: the lock, the manifest, and per landing file skip /
defer / stage / commit / record. Its parts: :mod:`.mapping` (column mapping), :mod:`.readers`
(formats, chunked reading, side files), :mod:`.normalise` (contract rows, rejection reasons),
:mod:`.staging` (staging and committing one file), :mod:`.event_ids` (the lake's event-id
index), :mod:`.storage` (part files, schemas, durable writes, watermark) and :mod:`.snapshot`
(the run's point-in-time view).

**Exactly once.** Each landing file is identified by the sha256 of its bytes and recorded in the
manifest ``lake/_manifest.jsonl`` (one JSON object per ingested file, rewritten atomically):
an unchanged file, or the same bytes under another name, is skipped (so are the bytes of a
file taken back by ``repair``: :mod:`.repair`). Event ids are deduplicated against the whole
lake (every date), so a replayed event -- even with another timestamp -- is never stored
twice; so is an event sent once with an ``event_id`` and once without (by content:
:mod:`.event_ids`). A file is processed in two phases: its chunks are
normalised into ``lake/_staging/<sha>/`` first; only when the whole file has been read and its
bad-row share is acceptable are the rows merged into the lake, as new part files
``event_date=D/part-<sha16>-<chunk>.parquet`` (written, fsynced and renamed atomically), and
only after that is the file added to the manifest. A crash at any point leaves either nothing
or durable rows that the retry recognises as duplicates, so the lake never double counts.

**Lateness and the future.** Each lake row carries ``ingested_at`` (the ingest's time, also in
the manifest). An event later than ``ingested_at + clock_skew`` is quarantined (clock bug or
garbage). An event older than the lake's watermark (its newest event before this ingest) minus
``allowed_lateness`` is "too late": it is kept out of the lake (a published past could
otherwise change under a re-run), counted in ``rows_late`` and quarantined with its reason, so
it can be backfilled on purpose (copy the quarantine file into the landing folder and ingest it
once with a larger ``RECS_ALLOWED_LATENESS_DAYS``). A late event within the window lands in its
own date partition. An empty lake has no watermark.

**Bad rows and bad files.** Rows that cannot be stored (unreadable timestamp or value, missing
ids, malformed line, invalid UTF-8 in a contract column, timestamp in the future) go to
``lake/quarantine/<file>.<sha12>.parquet`` with a ``reason`` per row (contract columns only:
a malformed line's raw text is not kept, it may hold personal data). When they exceed
``max_bad_row_share`` of a file's rows, the file fails. A file that cannot be read at all
(0 bytes, truncated gzip, corrupt Parquet, missing required column, unknown delimiter) fails
too. Failed files are not merged and not recorded, so they are retried on the next run; the
other files of the run are still ingested and then :class:`IngestFailed` names every failed
file (nothing is published from a failed ingest).

**Pseudonymised ids.** With a ``pseudonym_key``, every ``user_id`` is replaced by its keyed
pseudonym (:mod:`pipeline.core.privacy`) right after a chunk is normalised and the tombstone
(which holds CMS ids) applied, before validation, staging and quarantine: no raw id is written
anywhere under ``lake/``; ids derived from an event's content are derived from the pseudonym.
Each file's pairs (pseudonym, CMS id) go to ``record_pseudonyms`` (the serving DB's
``user_pseudonyms`` table) *before* its rows are committed, so that every pseudonym in the
lake can be mapped back at publish; a failure there stops the ingest (nothing of that file
is committed, a retry redoes it).

**Files still being written.** Producers should write to a dotfile and rename (dotfiles are
ignored). Otherwise: a text file modified in the last ``settle_seconds`` that does not end with
a newline, or a 0-byte file that young, is deferred to the next run (``files_deferred``); a file
that changes while it is read is deferred too. In an older file an unterminated last line that
does not parse is quarantined as a malformed row. A gzip file cut short always fails.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import functools
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from pipeline.core.config import DEFAULT_EVENT_WEIGHTS, EVENTS_SUITE, Settings
from pipeline.core.errors import ConfigError, DataError, IngestFailed, ServingError
from pipeline.core.privacy import pseudonymiser_for
from pipeline.lake.event_ids import EventIdIndex, load_lake_index
from pipeline.lake.jsonl import append_record, read_records
from pipeline.lake.keymark import check_key
from pipeline.lake.mapping import ColumnMapping, load_column_mapping
from pipeline.lake.readers import (
    DEFAULT_CHUNK_ROWS,
    check_landing_file,
    file_format,
    list_landing_files,
)
from pipeline.lake.repair_log import withheld_digests
from pipeline.lake.staging import (
    Committed,
    Policy,
    Staged,
    commit_staged,
    stage_file,
    staging_dir,
    write_quarantine,
)
from pipeline.lake.tombstone import Tombstone
from pipeline.lake.validate import LandingValidator
from pipeline.lake.validate import data_docs_dir as validation_docs_dir

logger = logging.getLogger(__name__)

MANIFEST_NAME = "_manifest.jsonl"
DEFAULT_CLOCK_SKEW = dt.timedelta(minutes=5)
DEFAULT_ALLOWED_LATENESS = dt.timedelta(days=3)
DEFAULT_SETTLE_SECONDS = 60.0
_MAX_LISTED = 20  # file names per list in IngestReport.to_dict


@dataclass
class IngestReport:
    """What one ingest did; small enough for XCom."""

    files: int = 0
    files_skipped: int = 0
    files_deferred: int = 0
    files_failed: int = 0
    rows_read: int = 0
    rows_new: int = 0
    rows_duplicate: int = 0
    rows_no_consent: int = 0
    rows_erased: int = 0  # rows of users forgotten on request (the tombstone), dropped unseen
    rows_rejected: int = 0
    rows_late: int = 0
    rows_future: int = 0
    partitions_written: int = 0
    dropped_columns: list[str] = field(default_factory=list)
    pii_columns: list[str] = field(default_factory=list)
    rejected_reasons: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    deferred: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    quarantine_files: list[str] = field(default_factory=list)
    watermark: str | None = None
    ingested_at: str | None = None
    manifest_path: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """JSON-able summary; file-name lists are capped (XCom stays small)."""
        out = asdict(self)
        for key in ("skipped", "deferred", "failed", "quarantine_files"):
            if len(out[key]) > _MAX_LISTED:
                out[key] = out[key][:_MAX_LISTED] + [f"... {len(out[key]) - _MAX_LISTED} more"]
        return out


def ingest_landing(
    landing_events_dir: Path,
    lake_dir: Path,
    *,
    ingested_at: dt.datetime | None = None,
    column_mapping: ColumnMapping | None = None,
    allowed_lateness: dt.timedelta = DEFAULT_ALLOWED_LATENESS,
    clock_skew: dt.timedelta = DEFAULT_CLOCK_SKEW,
    settle_seconds: float = DEFAULT_SETTLE_SECONDS,
    max_bad_row_share: float = 0.05,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    suite_path: Path | None = None,
    allowed_event_types: Collection[str] | None = None,
    pseudonym_key: bytes | None = None,
    record_pseudonyms: Callable[[pd.DataFrame], None] | None = None,
    data_docs_dir: Path | None = None,
) -> IngestReport:
    """Ingest every new landing file into the lake (see the module docstring); idempotent.

    With ``pseudonym_key``, user ids are stored as keyed pseudonyms and ``record_pseudonyms``
    (required then) receives each file's ``pseudonym, user_id`` pairs before its rows are
    committed.

    With ``suite_path`` (the events expectation suite) and ``allowed_event_types``, each
    file's rows are validated before they enter the lake: failing rows go to the file's
    quarantine, and the manifest records the suite's digest, so that a run's ``validate``
    does not check them again. With ``data_docs_dir`` too, each file's validation is recorded
    once (:class:`LandingValidator`): a Data Docs page and a validation log line per file.

    ``ingested_at`` (default: now) is recorded per row and per file and bounds event times.
    Raises :class:`IngestFailed` (a DataError) after the other files are ingested when some file
    failed, and DataError when there is nothing to ingest and nothing in the lake.
    """
    if pseudonym_key and record_pseudonyms is None:
        raise ConfigError(
            "a pseudonymisation key needs a place for the pseudonym mapping "
            "(record_pseudonyms): without it, no list could be served"
        )
    pseudonymiser = pseudonymiser_for(pseudonym_key)
    started = time.perf_counter()
    now = pd.Timestamp(ingested_at or dt.datetime.now(dt.timezone.utc)).tz_convert("UTC")
    mapping = column_mapping or ColumnMapping()
    lake_root = lake_dir.parent
    report = IngestReport(ingested_at=now.isoformat(), manifest_path=str(lake_root / MANIFEST_NAME))
    files = list_landing_files(landing_events_dir)
    with _ingest_lock(lake_root):
        shutil.rmtree(lake_root / "_staging", ignore_errors=True)  # leftovers of a crash
        manifest = read_manifest(lake_root)
        if not files and not manifest:
            raise DataError(
                f"no event files in {landing_events_dir} "
                "(expected *.csv, *.tsv, *.jsonl, *.parquet, optionally .gz)"
            )
        check_key(lake_root, pseudonym_key)  # one identity per user in the lake
        # in the lake, or taken back by `repair` (those bytes stay out: :mod:`.repair_log`)
        known = {record["sha256"] for record in manifest} | withheld_digests(lake_root)
        index, watermark = load_lake_index(lake_dir)
        report.watermark = watermark.isoformat() if watermark is not None else None
        late_before = watermark - allowed_lateness if watermark is not None else None
        policy = Policy(
            now,
            now + clock_skew,
            late_before,
            settle_seconds,
            max_bad_row_share,
            chunk_rows,
            Tombstone.load(lake_root),
            pseudonymiser,
        )
        errors: list[DataError] = []
        validator = None
        if suite_path is not None:  # loaded once, and only if a file needs it (GX is slow)
            validator = functools.cache(
                lambda: LandingValidator(
                    suite_path, allowed_event_types or DEFAULT_EVENT_WEIGHTS, data_docs_dir
                )
            )
        for path in files:
            try:
                _ingest_one(
                    path,
                    lake_dir,
                    known,
                    index,
                    mapping.for_file(path.name),
                    policy,
                    report,
                    validator,
                    record_pseudonyms,
                )
            except ServingError:  # the mapping could not be recorded: not the file's fault
                raise
            except DataError as exc:
                _file_failed(report, errors, path, exc)
            except Exception as exc:  # unreadable (permissions, I/O, a reader's error): the
                # file is named and fails alone, the others are still ingested
                logger.exception("ingest of %s failed unexpectedly", path.name)
                _file_failed(
                    report,
                    errors,
                    path,
                    DataError(f"cannot be read: {type(exc).__name__}: {exc}", file=str(path)),
                )
    report.seconds = round(time.perf_counter() - started, 3)
    logger.info(
        "ingest: %d files (%d skipped, %d deferred, %d failed), %d rows read, %d new, "
        "%d duplicate, %d late, %d quarantined, %d partitions in %.1fs",
        report.files,
        report.files_skipped,
        report.files_deferred,
        report.files_failed,
        report.rows_read,
        report.rows_new,
        report.rows_duplicate,
        report.rows_late,
        report.rows_rejected,
        report.partitions_written,
        report.seconds,
    )
    if errors:
        lines = "\n".join(f"- {exc}" for exc in errors)
        raise IngestFailed(
            f"{len(errors)} landing file(s) could not be ingested (nothing from "
            f"them entered the lake; they are retried on the next run):\n{lines}",
            file=errors[0].file,
            row=errors[0].row,
            column=errors[0].column,
            report=report,
        )
    return report


def ingest_lake(
    settings: Settings,
    suite_path: Path = EVENTS_SUITE,
    record_pseudonyms: Callable[[pd.DataFrame], None] | None = None,
) -> IngestReport:
    """Landing files -> lake with the run settings (the column mapping, lateness, clock skew,
    settling, bad-row share, chunking, event types, pseudonym key): the first half of the
    nightly's ``ingest``, and ``python -m pipeline.cli ingest`` for loaders between nightly
    runs. ``record_pseudonyms`` writes the pseudonym mapping (needed with a key)."""
    mapping = load_column_mapping(
        settings.landing_dir / "column_mapping.json", settings.column_mapping
    )
    # Wall-clock on purpose: it bounds "future" events and is recorded per row and per file
    # in the lake; a run's snapshot depends only on its cutoff.
    return ingest_landing(
        settings.landing_events_dir,
        settings.lake_events_dir,
        ingested_at=dt.datetime.now(dt.timezone.utc),
        column_mapping=mapping,
        allowed_lateness=dt.timedelta(days=settings.allowed_lateness_days),
        clock_skew=dt.timedelta(seconds=settings.clock_skew_seconds),
        settle_seconds=settings.landing_settle_seconds,
        max_bad_row_share=settings.max_bad_row_share,
        chunk_rows=settings.chunk_rows,
        suite_path=suite_path,
        allowed_event_types=sorted(settings.event_weights),
        pseudonym_key=settings.pseudonym_key,
        record_pseudonyms=record_pseudonyms,
        data_docs_dir=validation_docs_dir(settings.data_dir),
    )


def _file_failed(report: IngestReport, errors: list[DataError], path: Path, exc: DataError) -> None:
    report.files_failed += 1
    report.failed.append(path.name)
    logger.error("ingest of %s failed: %s", path.name, exc)
    errors.append(exc)


def _ingest_one(
    path: Path,
    lake_dir: Path,
    known: set[str],
    index: EventIdIndex,
    mapping: dict[str, str],
    policy: Policy,
    report: IngestReport,
    validator: Callable[[], LandingValidator] | None = None,
    record_pseudonyms: Callable[[pd.DataFrame], None] | None = None,
) -> None:
    """Stage, check, commit and record one landing file (or skip/defer it)."""
    check_landing_file(path)
    stat = path.stat()
    if _should_defer(path, stat, policy):
        report.files_deferred += 1
        report.deferred.append(path.name)
        logger.warning(
            "deferred %s: modified %.0fs ago and looks incomplete (still being "
            "written?); it is picked up by a later run",
            path.name,
            policy.ingested_at.timestamp() - stat.st_mtime,
        )
        return
    digest = file_sha256(path)
    if digest in known:
        report.files_skipped += 1
        report.skipped.append(path.name)
        logger.info(
            "skipped %s: its content (sha256 %s) is already in the lake (or was "
            "taken back by repair: send a corrected file)",
            path.name,
            digest[:12],
        )
        return
    lake_root = lake_dir.parent
    folder = staging_dir(lake_root, digest)
    try:
        staged = stage_file(
            path, mapping, policy, folder, validator() if validator is not None else None
        )
        if (path.stat().st_mtime_ns, path.stat().st_size) != (stat.st_mtime_ns, stat.st_size):
            shutil.rmtree(folder, ignore_errors=True)
            report.files_deferred += 1
            report.deferred.append(path.name)
            logger.warning("deferred %s: it changed while it was read", path.name)
            return
        staged.check_bad_share(path, policy.max_bad_row_share)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        if validator is not None:  # one validation result per file, however many chunks
            validator().finish(path.name)
    if staged.pseudonyms and record_pseudonyms is not None:  # mapped before committed
        try:
            record_pseudonyms(
                pd.DataFrame(
                    {
                        "pseudonym": list(staged.pseudonyms),
                        "user_id": list(staged.pseudonyms.values()),
                    }
                )
            )
        except ServingError:
            raise
        except Exception as exc:  # not the file's fault: stops the ingest, never fails it
            raise ServingError(
                f"recording the pseudonym mapping of {path.name} failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    committed = commit_staged(staged, lake_dir, index, policy)
    quarantine = write_quarantine(staged, committed, lake_root, path.name, digest)
    record = {
        "sha256": digest,
        "file": path.name,
        "bytes": stat.st_size,
        "mtime": dt.datetime.fromtimestamp(stat.st_mtime, dt.timezone.utc).isoformat(),
        "ingested_at": policy.ingested_at.isoformat(),
        "rows_read": staged.rows_read,
        "rows_new": committed.new,
        "rows_duplicate": committed.duplicate,
        "rows_no_consent": staged.no_consent,
        "rows_erased": staged.erased,
        "rows_rejected": staged.bad_rows,
        "rows_late": committed.late,
        "rows_future": staged.future,
        "dropped_columns": staged.dropped,
        "pii_columns": staged.pii,
        "partitions": sorted(committed.partitions),
        "quarantine_file": quarantine.name if quarantine else None,
        "validated": validator().digest if validator is not None else None,
    }
    append_manifest(lake_root, record)  # only now: every row above is durable
    known.add(digest)
    shutil.rmtree(staged.folder, ignore_errors=True)
    _add_to_report(report, staged, committed, quarantine)
    logger.info(
        "ingested %s (sha256 %s): %d rows, %d new, %d duplicate, %d late, "
        "%d quarantined, %d without consent",
        path.name,
        digest[:12],
        staged.rows_read,
        committed.new,
        committed.duplicate,
        committed.late,
        staged.bad_rows,
        staged.no_consent,
    )


def _add_to_report(
    report: IngestReport, staged: Staged, committed: Committed, quarantine: Path | None
) -> None:
    report.files += 1
    report.rows_read += staged.rows_read
    report.rows_new += committed.new
    report.rows_duplicate += committed.duplicate
    report.rows_no_consent += staged.no_consent
    report.rows_erased += staged.erased
    report.rows_rejected += staged.bad_rows
    report.rows_late += committed.late
    report.rows_future += staged.future
    report.partitions_written += len(committed.partitions)
    report.dropped_columns = sorted(set(report.dropped_columns) | set(staged.dropped))
    report.pii_columns = sorted(set(report.pii_columns) | set(staged.pii))
    for reason, count in staged.reasons.items():
        report.rejected_reasons[reason] = report.rejected_reasons.get(reason, 0) + count
    if committed.late:
        report.rejected_reasons["late"] = report.rejected_reasons.get("late", 0) + committed.late
    if quarantine is not None:
        report.quarantine_files.append(str(quarantine))


def _should_defer(path: Path, stat: os.stat_result, policy: Policy) -> bool:
    """Young and incomplete-looking: 0 bytes, or plain text without a final newline."""
    age = policy.ingested_at.timestamp() - stat.st_mtime
    if age >= policy.settle_seconds:
        return False
    if stat.st_size == 0:
        return True
    if path.suffix.lower() == ".gz" or file_format(path) == "parquet":
        return False
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) not in (b"\n", b"\r")


def file_sha256(path: Path) -> str:
    """sha256 of the file's bytes (its identity in the manifest)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- manifest ---------------------------------------------------------------------------------


def read_manifest(lake_root: Path) -> list[dict]:
    """The manifest records (one per ingested file), oldest first."""
    return read_records(lake_root / MANIFEST_NAME, "manifest")


def append_manifest(lake_root: Path, record: dict) -> None:
    """Add one record: the whole manifest is rewritten to a temp file, fsynced and renamed."""
    append_record(lake_root / MANIFEST_NAME, record)


@contextmanager
def _ingest_lock(lake_root: Path) -> Iterator[None]:
    """One ingest at a time per lake (an advisory lock on ``lake/.ingest.lock``)."""
    lake_root.mkdir(parents=True, exist_ok=True)
    with open(lake_root / ".ingest.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


#: The lock for the lake's other writers (erasure: :mod:`pipeline.lake.erasure`; repair:
#: :mod:`pipeline.lake.repair`), so that they never race an ingest.
ingest_lock = _ingest_lock
