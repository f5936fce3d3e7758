"""A/B experiments in the serving DB, on both backends: the view's ``variant`` and
``experiment`` columns (after the original eight, NULL without an experiment), per-row model
versions, a fallback list per recommending variant, the ``recommendation_assignments`` view
swapped with the lists, the contract checks per user id, and a live table from before
experiments that keeps being served through the migration until the next publish."""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
from collections.abc import Callable

import pandas as pd
import psycopg2
import pytest

from pipeline.core.config import DEFAULT_USER
from pipeline.serving import store
from pipeline.serving.contract import VIEW_COLUMNS, variant_default_user

LOGICAL_DATE = dt.datetime(2024, 5, 1, tzinfo=dt.timezone.utc)
GENERATED_AT = pd.Timestamp("2024-05-01T03:04:05.123456Z")
ORIGINAL_COLUMNS = [
    "user_id",
    "rank",
    "item_id",
    "score",
    "reason",
    "source",
    "model_version",
    "generated_at",
]
CMS_QUERY = "SELECT item_id, reason FROM recommendations WHERE user_id = {} ORDER BY rank"


@pytest.fixture(params=["sqlite", "postgres"])
def target(request, tmp_path) -> dict:
    if request.param == "sqlite":
        return {"dsn": None, "sqlite_path": tmp_path / "serving.sqlite"}
    return {"dsn": request.getfixturevalue("pg_dsn"), "sqlite_path": tmp_path / "unused"}


@contextlib.contextmanager
def _cursor(target: dict):
    """A raw cursor on the serving DB, as a CMS would have (autocommit; Postgres: search_path
    recs)."""
    if target["dsn"] is None:
        conn = sqlite3.connect(target["sqlite_path"], isolation_level=None)
        try:
            yield conn.cursor()
        finally:
            conn.close()
        return
    conn = psycopg2.connect(target["dsn"])
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SET search_path = recs")
            yield cur
    finally:
        conn.close()


def _cms(target: dict, user_id: str) -> list[tuple]:
    """The CMS query, unchanged since before experiments."""
    with _cursor(target) as cur:
        cur.execute(CMS_QUERY.format("?" if target["dsn"] is None else "%s"), (user_id,))
        return [tuple(row) for row in cur.fetchall()]


def _view_columns(target: dict, view: str = "recommendations") -> list[str]:
    with _cursor(target) as cur:
        cur.execute(f"SELECT * FROM {view} WHERE 1 = 0")  # noqa: S608 (a constant name)
        return [column[0] for column in cur.description]


def _publish(target: dict, lists: pd.DataFrame, model_version: str = "5", **kwargs):
    return store.publish_lists(
        lists, model_version=model_version, logical_date=LOGICAL_DATE, **target, **kwargs
    )


def _list(user: str, items: list[str], **columns) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": user,
            "rank": range(1, len(items) + 1),
            "item_id": items,
            "score": [1.0 / r for r in range(1, len(items) + 1)],
            "reason": "because",
            "source": "ranker",
            "generated_at": GENERATED_AT,
            **columns,
        }
    )


def _experiment_lists() -> tuple[pd.DataFrame, pd.DataFrame]:
    """u0 outside, u1 control (popular), u2 model (version 7), u3 holdout (no rows); the
    defaults of users outside and of each recommending variant."""
    exp = {"experiment": "ab-1"}
    lists = pd.concat(
        [
            _list("u0", ["a", "b", "c"], variant=None, experiment=None),
            _list("u1", ["p", "q", "r"], variant="control", source="popular", **exp),
            _list("u2", ["x", "y", "z"], variant="model", model_version="7", **exp),
            _list(DEFAULT_USER, ["p", "q", "r"], variant=None, experiment=None, source="popular"),
            _list(
                variant_default_user("control"),
                ["p", "q", "r"],
                variant="control",
                source="popular",
                **exp,
            ),
            _list(
                variant_default_user("model"),
                ["m", "n", "o"],
                variant="model",
                model_version="7",
                source="popular",
                **exp,
            ),
        ],
        ignore_index=True,
    )
    assignments = pd.DataFrame(
        {
            "user_id": ["u1", "u2", "u3", "u9"],
            "experiment": "ab-1",
            "variant": ["control", "model", "holdout", "control"],
        }
    )
    return lists, assignments


def test_without_an_experiment_the_new_columns_come_last_and_are_null(target, make_lists):
    lists = make_lists(n_users=2, n_ranks=3)
    result = _publish(target, lists, "m-1")

    assert result.assigned == 0
    assert _view_columns(target) == [*ORIGINAL_COLUMNS, "variant", "experiment"]
    assert _view_columns(target, "recommendation_assignments") == [
        "user_id",
        "experiment",
        "variant",
    ]
    view = store.read_all(**target)
    assert list(view.columns) == list(VIEW_COLUMNS)
    assert view["variant"].isna().all() and view["experiment"].isna().all()
    assert set(view["model_version"]) == {"m-1"}
    assert store.read_assignments(**target).empty
    own = lists[lists["user_id"] == "u001"].sort_values("rank")
    assert [item for item, _ in _cms(target, "u001")] == list(own["item_id"])


def test_experiment_rows_carry_variant_model_version_and_a_default_per_variant(target):
    lists, assignments = _experiment_lists()
    result = _publish(target, lists, "5", assignments=assignments)

    assert result.assigned == 4 and result.users == 6
    view = store.read_all(**target).set_index(["user_id", "rank"])
    assert view.loc["u0", "variant"].isna().all() and view.loc["u0", "experiment"].isna().all()
    assert set(view.loc["u0", "model_version"]) == {"5"}
    assert set(view.loc["u1", "variant"]) == {"control"}
    assert set(view.loc["u1", "experiment"]) == {"ab-1"}
    assert set(view.loc["u1", "model_version"]) == {"5"}  # the served model's popular list
    assert set(view.loc["u2", "model_version"]) == {"7"}  # the variant's own model version
    assert "u3" not in view.index.get_level_values(0)  # holdout: no rows
    assert view.loc[DEFAULT_USER, "variant"].isna().all()
    assert list(view.loc["__default__:model", "item_id"]) == ["m", "n", "o"]

    # The CMS query is unchanged; its fallback rule reads the assignments.
    assert [item for item, _ in _cms(target, "u2")] == ["x", "y", "z"]
    assert _cms(target, "u3") == []
    assert list(store.read_user_list("u2", **target)["item_id"]) == ["x", "y", "z"]
    assert store.read_user_list("u3", **target).empty  # holdout: never the default
    control_fallback = store.read_user_list("u9", **target)  # assigned, no list of its own
    assert set(control_fallback["user_id"]) == {"__default__:control"}
    assert set(store.read_user_list("newcomer", **target)["user_id"]) == {DEFAULT_USER}

    assert store.read_assignments(**target).to_dict("records") == assignments.sort_values(
        "user_id"
    ).to_dict("records")
    assert store.read_assignments(user_id="u3", **target)["variant"].tolist() == ["holdout"]
    live = store.live_version(**target)
    assert (live["model_version"], live["users"]) == ("5", 6)


def test_the_assignments_swap_and_drop_with_their_version(target, make_lists):
    lists, assignments = _experiment_lists()
    _publish(target, lists, "5", assignments=assignments, keep_versions=1)
    assert len(store.read_assignments(**target)) == 4

    _publish(target, make_lists(), "6", keep_versions=1)  # the experiment stopped

    assert store.read_assignments(**target).empty
    view = store.read_all(**target)
    assert view["variant"].isna().all() and set(view["model_version"]) == {"6"}
    with _cursor(target) as cur:
        if target["dsn"] is None:
            cur.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' "
                "AND name GLOB 'recommendation*_v[0-9]*' ORDER BY name"
            )
        else:
            cur.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'recs' "
                "AND tablename ~ '^recommendation.*_v[0-9]+$' ORDER BY tablename"
            )
        tables = [name for (name,) in cur.fetchall()]
    assert tables == ["recommendation_assignments_v2", "recommendations_v2"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda lists, a: lists[
                ~((lists.user_id == "__default__:control") & (lists["rank"] == 2))
            ],
            "not 1..N without gaps",
        ),
        (
            lambda lists, a: lists.assign(
                item_id=lists["item_id"].where(lists.user_id != "__default__:model", "m")
            ),
            "the same item more than once",
        ),
        (
            lambda lists, a: lists.assign(
                variant=lists["variant"].where(lists.user_id != DEFAULT_USER, "control"),
                experiment=lists["experiment"].where(lists.user_id != DEFAULT_USER, "ab-1"),
            ),
            "its variant must be null",
        ),
        (lambda lists, a: lists.assign(experiment=None), "only one of 'variant' and 'experiment'"),
        (
            lambda lists, a: lists.assign(
                variant=lists["variant"].where(
                    (lists.user_id != "u2") | (lists["rank"] != 3), "control"
                )
            ),
            "rows of two variants",
        ),
        (lambda lists, a: lists[lists.user_id != DEFAULT_USER], "no fallback list"),
    ],
)
def test_the_contract_checks_hold_per_user_id(target, change, message):
    lists, assignments = _experiment_lists()
    _publish(target, lists, "5", assignments=assignments)
    before = store.read_all(**target)

    with pytest.raises(store.ListValidationError, match=message):
        _publish(target, change(lists, assignments), "6", assignments=assignments)
    pd.testing.assert_frame_equal(store.read_all(**target), before)


def test_an_assignment_twice_is_refused(target):
    lists, assignments = _experiment_lists()
    twice = pd.concat([assignments, assignments.iloc[:1]], ignore_index=True)
    with pytest.raises(store.ListValidationError, match="more than once"):
        _publish(target, lists, "5", assignments=twice)


# --------------------------------------------------------------------------- before experiments


def _old_shape(target: dict) -> list[tuple]:
    """The serving DB as the code before experiments left it: a live version table without
    variant and experiment, the eight-column view over it, no assignments view. Returns the
    rows of u1 (item_id, reason)."""
    store.ensure_schema(**target)  # the catalog; then take away what the new migration made
    rows = [
        ("u1", 1, "a", 0.9, "because", "ranker"),
        ("u1", 2, "b", 0.8, "because", "als"),
        (DEFAULT_USER, 1, "p", 0.5, "popular", "popular"),
    ]
    with _cursor(target) as cur:
        if target["dsn"] is None:
            cur.execute("DROP VIEW recommendation_assignments")
            cur.execute(
                "INSERT INTO recommendation_versions (table_name, rows, users, "
                "model_version, logical_date, status) VALUES ('recommendations_v1', 3, "
                "2, 'm-old', '2024-04-30T00:00:00.000000+00:00', 'live')"
            )
            cur.execute(
                "CREATE TABLE recommendations_v1 (user_id TEXT NOT NULL, rank INTEGER "
                "NOT NULL, item_id TEXT NOT NULL, score REAL, reason TEXT, source "
                "TEXT, model_version TEXT NOT NULL, generated_at TEXT NOT NULL)"
            )
            cur.executemany(
                "INSERT INTO recommendations_v1 VALUES (?, ?, ?, ?, ?, ?, 'm-old', "
                "'2024-04-30T00:00:00.000000+00:00')",
                rows,
            )
            cur.execute(
                "CREATE VIEW recommendations AS SELECT user_id, rank, item_id, score, "
                "reason, source, model_version, generated_at FROM recommendations_v1"
            )
        else:
            cur.execute("DROP VIEW recs.recommendation_assignments")
            cur.execute(
                "INSERT INTO recs.recommendation_versions (version, table_name, rows, "
                "users, model_version, logical_date, status) SELECT v, "
                "'recommendations_v' || v, 3, 2, 'm-old', '2024-04-30', 'live' FROM "
                "(SELECT nextval(pg_get_serial_sequence('recs.recommendation_versions', "
                "'version'))::int AS v) AS next_version"
            )
            cur.execute(
                'CREATE TABLE recs.recommendations_v1 (user_id text COLLATE "C" NOT '
                "NULL, rank smallint NOT NULL CHECK (rank >= 1), item_id text NOT NULL, "
                "score real, reason text, source text)"
            )
            cur.executemany(
                "INSERT INTO recs.recommendations_v1 VALUES (%s, %s, %s, %s, %s, %s)", rows
            )
            cur.execute(
                "CREATE UNIQUE INDEX recommendations_v1_user_rank ON "
                "recs.recommendations_v1 (user_id, rank)"
            )
            cur.execute(
                "CREATE VIEW recs.recommendations AS SELECT user_id, rank, item_id, "
                "score, reason, source, 'm-old'::text AS model_version, "
                "'2024-04-30 00:00+00'::timestamptz AS generated_at "
                "FROM recs.recommendations_v1"
            )
            cur.execute("GRANT SELECT ON recs.recommendations TO cms_reader")
    assert _view_columns(target) == ORIGINAL_COLUMNS
    return [("a", "because"), ("b", "because")]


def test_an_old_live_table_keeps_serving_through_the_migration(target, make_lists):
    expected = _old_shape(target)
    assert _cms(target, "u1") == expected

    store.ensure_schema(**target)  # what every publish runs first

    assert _cms(target, "u1") == expected  # the same live table, the same answer
    assert _view_columns(target) == [*ORIGINAL_COLUMNS, "variant", "experiment"]
    view = store.read_all(**target)
    assert len(view) == 3 and view["variant"].isna().all() and view["experiment"].isna().all()
    assert set(view["model_version"]) == {"m-old"}
    assert store.read_assignments(**target).empty
    assert list(store.read_user_list("u1", **target)["item_id"]) == ["a", "b"]
    assert set(store.read_user_list("nobody", **target)["user_id"]) == {DEFAULT_USER}
    store.ensure_schema(**target)  # idempotent
    if target["dsn"] is not None:  # the upgraded views stay readable for the CMS role
        with _cursor(target) as cur:
            cur.execute("SET ROLE cms_reader")
            cur.execute("SELECT count(*) FROM recommendations")
            assert cur.fetchone() == (3,)
            cur.execute("SELECT count(*) FROM recommendation_assignments")
            assert cur.fetchone() == (0,)
            cur.execute("RESET ROLE")

    lists, assignments = _experiment_lists()  # the next publish swaps to the new shape
    _publish(target, lists, "5", assignments=assignments)
    assert set(store.read_all(**target)["variant"].dropna()) == {"control", "model"}
    assert _cms(target, "u1") == [("p", "because"), ("q", "because"), ("r", "because")]
    assert store.live_version(**target)["version"] == 2


def test_reads_upgrade_an_old_schema_themselves(target):
    expected = _old_shape(target)

    view = store.read_all(**target)  # no publish and no explicit migration in between

    assert list(view.columns) == list(VIEW_COLUMNS) and len(view) == 3
    assert _cms(target, "u1") == expected
    assert store.read_user_list("u1", **target)["variant"].isna().all()


def test_reads_before_the_first_publish_say_nothing_is_published(target):
    for read in (store.read_all, store.read_assignments):
        with pytest.raises(store.NothingPublishedError):
            read(**target)
    store.ensure_schema(**target)
    with pytest.raises(store.NothingPublishedError):
        store.read_user_list("u1", **target)


def test_a_lists_frame_without_the_new_columns_publishes_as_before(target, make_lists: Callable):
    lists = make_lists(n_users=1, n_ranks=2)
    _publish(target, lists, "m-1")
    _publish(target, lists.assign(model_version=None), "m-2")  # nulls: the publish's version
    assert set(store.read_all(**target)["model_version"]) == {"m-2"}
