"""write_once: a private file created once; the first creator's content stays."""

from __future__ import annotations

import stat

from pipeline.core.files import write_once


def test_write_once_creates_a_private_file_and_never_replaces_it(tmp_path):
    path = tmp_path / "deep" / "secret.key"
    assert write_once(path, "first\n") is True
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert write_once(path, "second\n") is False
    assert path.read_text() == "first\n"
    assert [p.name for p in path.parent.iterdir()] == ["secret.key"]  # no temp file left
