"""The two phases of ingesting one landing file: stage it, then commit it to the lake.

**Stage.** The file's chunks are read and normalised into ``lake/_staging/<sha16>/``: per
chunk, one Parquet file with a row group per event date, plus the chunk's rejected rows. The
counts (rows read, no consent, rejected by reason, dropped and PII-looking columns) decide,
before anything reaches the lake, whether the file's bad-row share is acceptable.

**Commit.** The staged rows are merged into the lake per event date, as new part files
``event_date=D/part-<sha16>-<chunk>.parquet`` (written, fsynced and renamed atomically):
events already in the lake or earlier in the file are duplicates (the same event id, or the
same content where one of the two rows came without an id: :mod:`.event_ids`); events older than the
watermark minus the allowed lateness are kept out ("late"). Rejected and late rows go to one
``lake/quarantine/<file>.<sha12>.parquet`` with a ``reason`` per row (contract columns only:
a malformed line's raw text is not kept, it may hold personal data).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.errors import DataError
from pipeline.core.privacy import Pseudonymiser
from pipeline.core.schema import LAKE_EVENT_DTYPES
from pipeline.lake.event_ids import EventIdIndex, cache_part_keys, event_keys, own_ids
from pipeline.lake.mapping import is_pii_column
from pipeline.lake.normalise import derive_event_ids, normalise_events
from pipeline.lake.readers import iter_raw_chunks
from pipeline.lake.storage import (
    QUARANTINE_SCHEMA,
    REASON,
    part_path,
    to_lake_table,
    write_table,
)
from pipeline.lake.tombstone import Tombstone
from pipeline.lake.validate import REASON_COLUMN, LandingValidator

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Policy:
    """The limits of one ingest run, applied to each of its files."""

    ingested_at: pd.Timestamp
    latest_valid: pd.Timestamp  # ingested_at + clock skew
    late_before: pd.Timestamp | None  # watermark - allowed lateness
    settle_seconds: float
    max_bad_row_share: float
    chunk_rows: int
    tombstone: Tombstone | None = None  # users erased on request: their rows never enter
    #: With a key: user ids become keyed pseudonyms before anything is staged
    pseudonymiser: Pseudonymiser | None = None


# ---- staging ---------------------------------------------------------------------------------


@dataclass
class Staged:
    """One landing file, normalised into staging chunk files, not yet in the lake."""

    folder: Path
    days: dict[str, list[tuple[Path, int, int]]] = field(default_factory=dict)  # day -> groups
    quarantine_chunks: list[Path] = field(default_factory=list)
    rows_read: int = 0
    no_consent: int = 0
    erased: int = 0  # rows of users erased on request (the tombstone), dropped unseen
    bad_rows: int = 0
    future: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    examples: list[tuple[int, str]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    pii: list[str] = field(default_factory=list)
    #: pseudonym -> CMS id of the users of the rows bound for the lake (with a key only):
    #: recorded in the serving DB's mapping before the rows are committed
    pseudonyms: dict[str, str] = field(default_factory=dict)

    def check_bad_share(self, path: Path, max_share: float) -> None:
        """Fail the file when too many of its rows are quarantined (naming reasons and rows)."""
        considered = self.rows_read - self.no_consent - self.erased
        share = self.bad_rows / considered if considered else 0.0
        if share > max_share:
            reasons = ", ".join(
                f"{reason}: {count}"
                for reason, count in sorted(self.reasons.items(), key=lambda kv: -kv[1])
            )
            examples = "; ".join(f"row {row}: {reason}" for row, reason in self.examples)
            first_row = self.examples[0][0] if self.examples else None
            raise DataError(
                f"{self.bad_rows} of {considered} rows ({share:.2%}) cannot be "
                f"ingested, more than max_bad_row_share {max_share:.2%} ({reasons}); "
                f"e.g. {examples}",
                file=str(path),
                row=first_row,
            )


def staging_dir(lake_root: Path, digest: str) -> Path:
    return lake_root / "_staging" / digest[:16]


def stage_file(
    path: Path,
    mapping: Mapping[str, str],
    policy: Policy,
    folder: Path,
    validator: LandingValidator | None = None,
) -> Staged:
    """Read, normalise and stage every chunk of ``path``; with a ``validator`` (the events
    suite), rows that fail it are rejected here, before anything reaches the lake."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    staged = Staged(folder)
    started = time.perf_counter()
    for number, raw in enumerate(iter_raw_chunks(path, mapping, policy.chunk_rows)):
        staged.rows_read += len(raw.frame) + len(raw.malformed)
        events, rejected, no_consent, _ = normalise_events(
            raw.frame,
            source=path.name,
            rows=raw.rows,
            check_replacement=raw.replaced,
            latest_valid=policy.latest_valid,
        )
        if policy.tombstone:  # before validation and quarantine: an erased id is kept nowhere
            # (the tombstone holds the CMS's ids, so it is tested before pseudonymising)
            (events, rejected), erased = policy.tombstone.drop_rows(events, rejected)
            staged.erased += erased
        if policy.pseudonymiser is not None:  # before anything is written: no raw id is
            # staged, quarantined or committed
            events, pairs = policy.pseudonymiser.frame(events)
            rejected, _ = policy.pseudonymiser.frame(rejected)
            staged.pseudonyms.update(zip(pairs["pseudonym"], pairs["user_id"], strict=True))
            events = rederive_event_ids(events)
        if raw.malformed:
            rejected = pd.concat(
                [rejected, _malformed_rows(raw.malformed, path.name)], ignore_index=True
            )
        if validator is not None and len(events):
            events, invalid = validator.split(
                events, latest_valid=policy.latest_valid, source=path.name
            )
            if len(invalid):
                rejected = pd.concat(
                    [rejected, invalid.rename(columns={REASON_COLUMN: REASON})], ignore_index=True
                )
        staged.no_consent += no_consent
        staged.dropped = sorted(set(staged.dropped) | set(raw.dropped))
        staged.pii = sorted(c for c in staged.dropped if is_pii_column(c))
        if len(events):
            _stage_by_day(
                to_lake_table(events, policy.ingested_at),
                folder / f"chunk-{number:05d}.parquet",
                staged.days,
            )
        if len(rejected):
            staged.bad_rows += len(rejected)
            staged.future += int((rejected[REASON] == "timestamp after ingestion time").sum())
            for reason, count in rejected[REASON].value_counts().items():
                staged.reasons[str(reason)] = staged.reasons.get(str(reason), 0) + int(count)
            staged.examples.extend(
                list(
                    zip(
                        rejected["source_row"].astype(int).tolist()[:5],
                        rejected[REASON].tolist()[:5],
                    )
                )
            )
            staged.examples = sorted(staged.examples)[:5]
            q_path = folder / f"quarantine-{number:05d}.parquet"
            write_table(
                to_lake_table(rejected, policy.ingested_at, with_reason=True), q_path, durable=False
            )
            staged.quarantine_chunks.append(q_path)
        logger.info(
            "%s: %d rows read so far (%.1fs)",
            path.name,
            staged.rows_read,
            time.perf_counter() - started,
        )
    if staged.erased:
        logger.info(
            "%s: %d rows of users erased on request dropped (tombstone)", path.name, staged.erased
        )
    if staged.pii:
        logger.warning(
            "%s: dropped columns that look like personal data: %s", path.name, ", ".join(staged.pii)
        )
    return staged


def rederive_event_ids(events: pd.DataFrame) -> pd.DataFrame:
    """``events`` with every derived ``event_id`` (one the sender did not give) derived again
    from the current fields: after pseudonymisation, so that a derived id hashes the stored
    id, as the lake's content keys do (:mod:`.event_ids`; an event sent with and without an
    id is still stored once), and no derived id depends on a CMS id."""
    if not len(events):
        return events
    derived = ~own_ids(pa.array(events["event_id"].astype(object), type=pa.string()))
    if not derived.any():
        return events
    out = events.copy()
    out.loc[derived, "event_id"] = derive_event_ids(out[derived]).to_numpy()
    return out


def _stage_by_day(
    table: pa.Table, path: Path, days: dict[str, list[tuple[Path, int, int]]]
) -> None:
    """Write ``table`` with one row group per event date (rows keep file order within a day)."""
    dates = pc.cast(table.column("timestamp"), pa.date32()).to_numpy(zero_copy_only=False)
    order = np.argsort(dates, kind="stable")
    table, dates = table.take(pa.array(order)), dates[order]
    uniques, starts = np.unique(dates, return_index=True)
    ends = [*starts[1:], len(dates)]
    with pq.ParquetWriter(path, table.schema, compression="none") as writer:
        for group, (day, start, end) in enumerate(zip(uniques, starts, ends, strict=True)):
            writer.write_table(
                table.slice(int(start), int(end - start)), row_group_size=int(end - start)
            )
            days.setdefault(str(day), []).append((path, group, int(end - start)))


def _malformed_rows(malformed: list[tuple[int, str]], source: str) -> pd.DataFrame:
    """Quarantine rows for lines that could not be parsed: lineage and reason only."""
    frame = pd.DataFrame(
        {c: pd.Series(index=range(len(malformed)), dtype=d) for c, d in LAKE_EVENT_DTYPES.items()}
    )
    frame["source_file"] = pd.Series(source, index=frame.index, dtype="string")
    frame["source_row"] = np.array([row for row, _ in malformed], dtype=np.int64)
    frame[REASON] = pd.Series([reason for _, reason in malformed], dtype="string")
    return frame


# ---- committing ------------------------------------------------------------------------------


@dataclass
class Committed:
    """What committing one staged file did."""

    new: int = 0
    duplicate: int = 0
    late: int = 0
    partitions: set[str] = field(default_factory=set)
    late_tables: list[pa.Table] = field(default_factory=list)


def commit_staged(staged: Staged, lake_dir: Path, index: EventIdIndex, policy: Policy) -> Committed:
    """Merge the staged rows into the lake, one part file per date: dedupe across the whole
    lake by event id, and by content where one of two rows came without an id
    (:mod:`.event_ids`); keep late events out."""
    committed = Committed()
    for day, batch, groups in _day_batches(staged.days, policy.chunk_rows * 2):
        table = pa.concat_tables(
            [pq.ParquetFile(path).read_row_group(group) for path, group, _ in groups]
        )
        keys = event_keys(table)
        duplicate = index.duplicates(keys)
        committed.duplicate += int(duplicate.sum())
        keep = ~duplicate
        if policy.late_before is not None:
            ts = table.column("timestamp")
            late = pc.less(ts, pa.scalar(policy.late_before.to_pydatetime(), type=ts.type))
            late = late.to_numpy(zero_copy_only=False) & keep
            if late.any():
                committed.late += int(late.sum())
                reason = (
                    f"late: before the lake watermark minus the allowed lateness "
                    f"({policy.late_before.isoformat()})"
                )
                late_rows = table.filter(pa.array(late))
                committed.late_tables.append(
                    late_rows.append_column(
                        REASON, pa.array([reason] * late_rows.num_rows, type=pa.large_string())
                    )
                )
                keep &= ~late
        new = table.filter(pa.array(keep))
        if new.num_rows:
            part = part_path(lake_dir, day, staged.folder.name, batch)
            write_table(new, part, durable=True)
            cache_part_keys(lake_dir, part, keys.where(keep))  # the next run reads these
            committed.partitions.add(day)
        committed.new += new.num_rows
        index.add_keys(keys.where(keep))
    return committed


def _day_batches(
    days: dict[str, list[tuple[Path, int, int]]], max_rows: int
) -> Iterator[tuple[str, int, list[tuple[Path, int, int]]]]:
    """Per date (in order), the staged row groups in batches of at most ~``max_rows`` rows."""
    for day in sorted(days):
        batch, rows, number = [], 0, 0
        for group in days[day]:
            if batch and rows + group[2] > max_rows:
                yield day, number, batch
                batch, rows, number = [], 0, number + 1
            batch.append(group)
            rows += group[2]
        yield day, number, batch


def write_quarantine(
    staged: Staged, committed: Committed, lake_root: Path, name: str, digest: str
) -> Path | None:
    """One quarantine Parquet per landing file (rows + ``reason``), or None when clean."""
    tables = [pq.read_table(p) for p in staged.quarantine_chunks]
    tables += [
        t.select(QUARANTINE_SCHEMA.names).cast(QUARANTINE_SCHEMA) for t in committed.late_tables
    ]
    if not tables:
        return None
    path = lake_root / "quarantine" / f"{name}.{digest[:12]}.parquet"
    write_table(pa.concat_tables([t.cast(QUARANTINE_SCHEMA) for t in tables]), path, durable=True)
    logger.warning(
        "%s: %d rows quarantined at ingest -> %s", name, sum(t.num_rows for t in tables), path
    )
    return path
