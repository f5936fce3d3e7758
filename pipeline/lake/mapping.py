"""Column mapping: a site's own layout mapped onto the event contract without code changes.

A JSON object ``{"<their column>": "<contract column>"}`` (names are case-insensitive), e.g.
``{"uid": "user_id", "ts": "timestamp", "kind": "event_type"}``, or the long form
``{"columns": {...}, "files": {"<glob on the file name>": {...}}}`` whose per-file entries
extend/override ``columns`` for matching files. It is read from
``$RECS_DATA_DIR/landing/column_mapping.json`` when present and from ``RECS_COLUMN_MAPPING``
(inline JSON or the path of a JSON file; it wins over the file). Targets must be contract
columns; mapping a column that looks like personal data (``email`` ...) onto the contract is
refused, so PII cannot be smuggled in as an id.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.errors import DataError
from pipeline.core.schema import CONTRACT_INPUT_COLUMNS, PII_NAME_PATTERN


@dataclass(frozen=True)
class ColumnMapping:
    """Source column -> contract column, globally and per file-name glob (lower-case names)."""

    columns: Mapping[str, str] = field(default_factory=dict)
    files: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def for_file(self, name: str) -> dict[str, str]:
        """The mapping that applies to the file called ``name``."""
        mapping = dict(self.columns)
        for pattern, extra in self.files.items():
            if fnmatch.fnmatch(name, pattern):
                mapping.update(extra)
        return mapping


def load_column_mapping(file: Path | None = None, override: str | None = None) -> ColumnMapping:
    """Read the column mapping from ``file`` (when it exists) and ``override`` (JSON or a path).

    ``override`` entries win over the file's. Raises DataError naming the source when the JSON
    is malformed, a target is not a contract column, or a source looks like personal data.
    """
    merged = ColumnMapping()
    for source, text in ((file, _read_text(file)), (override, _override_text(override))):
        if text is None:
            continue
        try:
            config = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"column mapping is not valid JSON: {exc}", file=str(source)) from exc
        parsed = _parse_mapping(config, str(source))
        merged = ColumnMapping(
            {**merged.columns, **parsed.columns}, {**merged.files, **parsed.files}
        )
    return merged


def _read_text(path: Path | None) -> str | None:
    return path.read_text(encoding="utf-8") if path is not None and path.is_file() else None


def _override_text(value: str | None) -> str | None:
    if not value or not value.strip():
        return None
    value = value.strip()
    return value if value.startswith("{") else Path(value).expanduser().read_text(encoding="utf-8")


def _parse_mapping(config: Any, source: str) -> ColumnMapping:
    if not isinstance(config, dict):
        raise DataError("column mapping must be a JSON object", file=source)
    if "columns" in config or "files" in config:
        columns, files = config.get("columns", {}), config.get("files", {})
    else:
        columns, files = config, {}
    if not isinstance(files, dict):
        raise DataError('"files" must map file-name globs to mappings', file=source)
    return ColumnMapping(
        _check_pairs(columns, source),
        {str(glob): _check_pairs(pairs, source) for glob, pairs in files.items()},
    )


def _check_pairs(pairs: Any, source: str) -> dict[str, str]:
    if not isinstance(pairs, dict):
        raise DataError(
            "a column mapping must map source column names to contract columns", file=source
        )
    out: dict[str, str] = {}
    for src, dst in pairs.items():
        src_name, dst_name = str(src).strip().lower(), str(dst).strip().lower()
        if dst_name not in CONTRACT_INPUT_COLUMNS:
            raise DataError(
                f"mapping {src!r} -> {dst!r}: target is not a contract column "
                f"({', '.join(CONTRACT_INPUT_COLUMNS)})",
                file=source,
                column=str(src),
            )
        if is_pii_column(src_name):
            raise DataError(
                f"mapping {src!r} -> {dst!r}: the source looks like personal data and "
                "may not enter the lake",
                file=source,
                column=str(src),
            )
        out[src_name] = dst_name
    return out


def is_pii_column(name: str) -> bool:
    """True when a column name looks like personal data (email, ip, name, phone, address...)."""
    return bool(PII_NAME_PATTERN.search(name.strip().lower()))
