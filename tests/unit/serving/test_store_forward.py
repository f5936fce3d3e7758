"""Production moves forward only, and one promotion decision at a time (SQLite backend)."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from pipeline.core.errors import ServingError
from pipeline.serving import store as serving
from pipeline.serving.sqlite import SqliteBackend

UTC = dt.timezone.utc
OLDER, NEWER = dt.datetime(2024, 1, 30, tzinfo=UTC), dt.datetime(2024, 2, 1, tzinfo=UTC)


def _publish(lists: pd.DataFrame, path: Path, version: str, when: dt.datetime, **kwargs):
    return serving.publish_lists(
        lists, dsn=None, sqlite_path=path, model_version=version, logical_date=when, **kwargs
    )


def test_older_lists_never_replace_newer_ones_unless_allowed(tmp_path, make_lists: Callable):
    path = tmp_path / "serving.sqlite"
    _publish(make_lists(), path, "m-2", NEWER, allow_older=False)
    live = serving.read_all(dsn=None, sqlite_path=path)

    with pytest.raises(
        serving.OlderThanLive, match="2024-02-01 00:00, newer than this publish's 2024-01-30 00:00"
    ):
        _publish(make_lists(n_users=5), path, "m-1", OLDER, allow_older=False)
    pd.testing.assert_frame_equal(serving.read_all(dsn=None, sqlite_path=path), live)
    assert serving.live_version(dsn=None, sqlite_path=path)["version"] == 1  # nothing reserved

    _publish(make_lists(n_users=4), path, "m-2", NEWER, allow_older=False)  # same date: a re-run
    _publish(make_lists(n_users=5), path, "m-1", OLDER)  # a rollback may go back
    assert serving.live_version(dsn=None, sqlite_path=path)["model_version"] == "m-1"


def test_promotion_decisions_take_turns(tmp_path):
    path = tmp_path / "serving.sqlite"
    order: list[str] = []
    first_inside, release = threading.Event(), threading.Event()

    def first() -> None:
        with serving.promotion_lock(dsn=None, sqlite_path=path):
            order.append("first in")
            first_inside.set()
            release.wait(10)
            order.append("first out")

    def second() -> None:
        with serving.promotion_lock(dsn=None, sqlite_path=path):
            order.append("second in")

    one = threading.Thread(target=first)
    one.start()
    assert first_inside.wait(10)
    two = threading.Thread(target=second)
    two.start()
    two.join(0.3)
    assert two.is_alive()  # waiting for the first decision
    with pytest.raises(ServingError, match="another promotion decision held"):
        with serving.promotion_lock(dsn=None, sqlite_path=path, wait_s=0.1):
            order.append("never")
    release.set()
    one.join(10)
    two.join(10)
    assert order == ["first in", "first out", "second in"]
    # The promotion lock is not the publish lock: a decision never blocks a publish.
    with serving.promotion_lock(dsn=None, sqlite_path=path), SqliteBackend(path).publish_lock():
        order.append("publish while deciding")
    assert order[-1] == "publish while deciding"
