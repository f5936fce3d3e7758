"""Production moves forward only, and one promotion decision at a time, on PostgreSQL."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from pipeline.core.errors import ServingError
from pipeline.serving import store as serving

pytestmark = pytest.mark.integration

UTC = dt.timezone.utc
OLDER, NEWER = dt.datetime(2024, 1, 30, tzinfo=UTC), dt.datetime(2024, 2, 1, tzinfo=UTC)
UNUSED = Path("/nonexistent")


def test_older_lists_are_refused_under_the_publish_lock(pg_dsn: str, make_lists: Callable):
    serving.publish_lists(
        make_lists(),
        dsn=pg_dsn,
        sqlite_path=UNUSED,
        model_version="m-2",
        logical_date=NEWER,
        allow_older=False,
    )
    live = serving.read_all(dsn=pg_dsn, sqlite_path=UNUSED)
    with pytest.raises(serving.OlderThanLive, match="newer than this publish's 2024-01-30"):
        serving.publish_lists(
            make_lists(n_users=5),
            dsn=pg_dsn,
            sqlite_path=UNUSED,
            model_version="m-1",
            logical_date=OLDER,
            allow_older=False,
        )
    pd.testing.assert_frame_equal(serving.read_all(dsn=pg_dsn, sqlite_path=UNUSED), live)
    assert serving.live_version(dsn=pg_dsn, sqlite_path=UNUSED)["model_version"] == "m-2"


def test_promotion_lock_serialises_deciders_and_times_out(pg_dsn: str):
    serving.ensure_schema(dsn=pg_dsn, sqlite_path=UNUSED)
    inside, release, order = threading.Event(), threading.Event(), []

    def holder() -> None:
        with serving.promotion_lock(dsn=pg_dsn, sqlite_path=UNUSED):
            order.append("holder in")
            inside.set()
            release.wait(20)
            order.append("holder out")

    thread = threading.Thread(target=holder)
    thread.start()
    assert inside.wait(20)
    try:
        with pytest.raises(ServingError, match="another run's promotion decision"):
            with serving.promotion_lock(dsn=pg_dsn, sqlite_path=UNUSED, wait_s=0.2):
                order.append("never")
        # A publish is not blocked by a decision in progress.
        serving.publish_lists(
            pd.DataFrame(
                {
                    "user_id": ["__default__"],
                    "rank": [1],
                    "item_id": ["i"],
                    "score": [1.0],
                    "reason": ["popular"],
                    "source": ["popular"],
                    "generated_at": [pd.Timestamp(NEWER)],
                }
            ),
            dsn=pg_dsn,
            sqlite_path=UNUSED,
            model_version="m-1",
            logical_date=NEWER,
        )
    finally:
        release.set()
        thread.join(20)
    with serving.promotion_lock(dsn=pg_dsn, sqlite_path=UNUSED, wait_s=5):
        order.append("next in")
    assert order == ["holder in", "holder out", "next in"]
