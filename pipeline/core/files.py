"""Files written once: local secrets (Airflow's, the demo's pseudonymisation key) and the
tombstone's salt. Standard library only: ``make`` runs ``python -m pipeline.cli
airflow-secrets`` with the system Python, before the virtualenv exists."""

from __future__ import annotations

import os
from pathlib import Path


def write_once(path: Path, text: str) -> bool:
    """Create ``path`` (mode 0600, fsynced) holding ``text`` unless it exists; True when this
    call created it. Two processes racing both write a temp file and hard-link it into place:
    the first link wins and the other keeps the winner's content, so a secret (a key, a
    salt) is generated exactly once."""
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(tmp, path)
    except FileExistsError:  # another process created it first: theirs stays
        return False
    finally:
        tmp.unlink()
    return True
