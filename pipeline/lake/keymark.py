"""Which ids the lake holds: ``lake/_ids.json`` says "clear" or "pseudonymised" under the key
with a given fingerprint (:func:`pipeline.core.privacy.key_fingerprint`).

Every ingest checks it before it writes, so that one lake never holds two identities of a
user: an ingest without the key (a loader's shell where ``RECS_PSEUDONYM_KEY_FILE`` is not
set) would otherwise store clear ids beside the pseudonyms, and one with another key a second
set of pseudonyms. ``rekey`` is the one way to change it, and it rewrites the mark. A lake
written before the mark existed holds clear ids.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.core.errors import ConfigError
from pipeline.core.privacy import key_fingerprint
from pipeline.lake.storage import durable_write, lake_part_files

MARK_NAME = "_ids.json"


def read_mark(lake_root: Path) -> dict | None:
    path = lake_root / MARK_NAME
    return json.loads(path.read_text()) if path.exists() else None


def write_mark(lake_root: Path, key: bytes | None) -> None:
    """Record that the lake now holds clear ids (``key`` None) or pseudonyms under ``key``."""
    mark = (
        {"ids": "clear"}
        if key is None
        else {"ids": "pseudonymised", "key_fingerprint": key_fingerprint(key)}
    )
    payload = json.dumps(mark, sort_keys=True).encode()
    lake_root.mkdir(parents=True, exist_ok=True)
    durable_write(lake_root / MARK_NAME, lambda fh: fh.write(payload))


def check_key(lake_root: Path, key: bytes | None) -> None:
    """Refuse (ConfigError, before anything is written) an ingest whose key does not match
    the ids the lake holds; mark a new lake."""
    mark = read_mark(lake_root)
    if mark is None:
        if key is not None and lake_part_files(lake_root / "events"):
            raise ConfigError(
                "the lake holds user ids in clear and a pseudonymisation key is now set: "
                "pseudonymise the lake first with `python -m pipeline.cli rekey "
                "--new-key-file <key file>` (README, 'Pseudonymised ids'), or unset the key"
            )
        write_mark(lake_root, key)
        return
    if mark.get("ids") == "clear":
        if key is not None:
            raise ConfigError(
                "the lake holds user ids in clear and a pseudonymisation key is set: "
                "pseudonymise the lake first with `python -m pipeline.cli rekey "
                "--new-key-file <key file>`, or unset the key"
            )
        return
    if key is None:
        raise ConfigError(
            f"the lake holds pseudonymised user ids (key {mark.get('key_fingerprint')}) and "
            "no key is set: this ingest would store clear ids beside them. Set "
            "RECS_PSEUDONYM_KEY_FILE (or RECS_PSEUDONYM_KEY, or the Airflow Variable "
            "recs_pseudonym_key) to the lake's key"
        )
    if key_fingerprint(key) != mark.get("key_fingerprint"):
        raise ConfigError(
            f"the lake's ids are pseudonymised under key {mark.get('key_fingerprint')}, not "
            f"under the key set now ({key_fingerprint(key)}): set the lake's key, or change "
            "keys with `python -m pipeline.cli rekey --new-key-file <key file>`"
        )
