"""Serving layer on the embedded SQLite backend (pipeline.serving with dsn=None)."""

from __future__ import annotations

import ast
import datetime as dt
import re
import sqlite3
import threading
import traceback
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from pipeline.core.config import DEFAULT_USER
from pipeline.core.errors import PipelineError, ServingError
from pipeline.serving import store as serving

LOGICAL_DATE = dt.datetime(2024, 5, 1, tzinfo=dt.timezone.utc)
CMS_QUERY = "SELECT item_id, reason FROM recommendations WHERE user_id = ? ORDER BY rank"


def _publish(
    lists: pd.DataFrame, path: Path, model_version: str, **kwargs
) -> serving.PublishResult:
    return serving.publish_lists(
        lists,
        dsn=None,
        sqlite_path=path,
        model_version=model_version,
        logical_date=LOGICAL_DATE,
        **kwargs,
    )


def _expected_view(lists: pd.DataFrame, model_version: str) -> pd.DataFrame:
    expected = lists.assign(model_version=model_version, variant=None, experiment=None)[
        list(serving.VIEW_COLUMNS)
    ]
    expected = expected.sort_values(["user_id", "rank"]).reset_index(drop=True)
    expected["generated_at"] = expected["generated_at"].astype("datetime64[us, UTC]")
    return expected


def _tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {
            name
            for (name,) in conn.execute(
                "SELECT name FROM sqlite_master "
                "WHERE type = 'table' AND name LIKE 'recommendations_v%'"
            )
        }


def _catalog(path: Path) -> list[tuple]:
    with sqlite3.connect(path) as conn:
        return conn.execute(
            "SELECT version, status, model_version, dropped_at IS NOT NULL "
            "FROM recommendation_versions ORDER BY version"
        ).fetchall()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "serving" / "serving.sqlite"


def test_publish_then_read_back_exactly(db_path: Path, make_lists: Callable) -> None:
    lists = make_lists(n_users=4, n_ranks=5)

    result = _publish(lists, db_path, "m-1")

    assert result == serving.PublishResult(
        version=1, table="recommendations_v1", rows=25, users=5, model_version="m-1"
    )
    pd.testing.assert_frame_equal(
        serving.read_all(dsn=None, sqlite_path=db_path), _expected_view(lists, "m-1")
    )
    live = serving.live_version(dsn=None, sqlite_path=db_path)
    assert live is not None
    assert (live["version"], live["status"], live["rows"], live["users"]) == (1, "live", 25, 5)
    assert live["logical_date"] == LOGICAL_DATE


def test_read_user_list_matches_cms_query_and_falls_back(
    db_path: Path, make_lists: Callable
) -> None:
    lists = make_lists(n_users=2, n_ranks=4)
    _publish(lists, db_path, "m-1")

    own = serving.read_user_list("u001", dsn=None, sqlite_path=db_path)
    fallback = serving.read_user_list("nobody", dsn=None, sqlite_path=db_path)

    with sqlite3.connect(db_path) as conn:
        cms_rows = conn.execute(CMS_QUERY, ("u001",)).fetchall()
    assert list(own["rank"]) == [1, 2, 3, 4]
    assert list(own["item_id"]) == [item for item, _ in cms_rows]
    assert set(fallback["user_id"]) == {DEFAULT_USER}
    assert list(fallback["item_id"]) == list(
        lists.loc[lists["user_id"] == DEFAULT_USER].sort_values("rank")["item_id"]
    )


def test_second_publish_swaps_model_version(db_path: Path, make_lists: Callable) -> None:
    _publish(make_lists(n_ranks=3), db_path, "m-1")
    second = make_lists(n_users=5, n_ranks=2, item_prefix="new")

    result = _publish(second, db_path, "m-2")

    assert result.version == 2
    pd.testing.assert_frame_equal(
        serving.read_all(dsn=None, sqlite_path=db_path), _expected_view(second, "m-2")
    )
    assert [row[:3] for row in _catalog(db_path)] == [(1, "retired", "m-1"), (2, "live", "m-2")]


def test_keep_versions_drops_old_tables(db_path: Path, make_lists: Callable) -> None:
    for number in range(1, 5):
        _publish(make_lists(), db_path, f"m-{number}", keep_versions=2)

    assert _tables(db_path) == {"recommendations_v3", "recommendations_v4"}
    assert _catalog(db_path) == [
        (1, "retired", "m-1", 1),
        (2, "retired", "m-2", 1),
        (3, "retired", "m-3", 0),
        (4, "live", "m-4", 0),
    ]


def _duplicate_rank(lists: pd.DataFrame) -> pd.DataFrame:
    lists.loc[(lists["user_id"] == "u001") & (lists["rank"] == 2), "rank"] = 1
    return lists


def _rank_gap(lists: pd.DataFrame) -> pd.DataFrame:
    lists.loc[(lists["user_id"] == "u000") & (lists["rank"] == 3), "rank"] = 4
    return lists


def _duplicate_item(lists: pd.DataFrame) -> pd.DataFrame:
    first = lists.loc[(lists["user_id"] == "u002") & (lists["rank"] == 1), "item_id"].iloc[0]
    lists.loc[(lists["user_id"] == "u002") & (lists["rank"] == 3), "item_id"] = first
    return lists


def _no_default(lists: pd.DataFrame) -> pd.DataFrame:
    return lists.loc[lists["user_id"] != DEFAULT_USER].reset_index(drop=True)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (_no_default, "no fallback list"),
        (_duplicate_rank, "ranks that are not 1..N"),
        (_rank_gap, "ranks that are not 1..N"),
        (_duplicate_item, "same item more than once"),
    ],
)
def test_invalid_lists_leave_old_version_live(
    db_path: Path, make_lists: Callable, breakage: Callable, message: str
) -> None:
    good = make_lists()
    _publish(good, db_path, "m-1")

    with pytest.raises(serving.ListValidationError, match=message):
        _publish(breakage(make_lists(item_prefix="bad")), db_path, "m-bad")

    pd.testing.assert_frame_equal(
        serving.read_all(dsn=None, sqlite_path=db_path), _expected_view(good, "m-1")
    )
    assert _tables(db_path) == {"recommendations_v1"}
    assert _catalog(db_path) == [(1, "live", "m-1", 0), (2, "failed", "m-bad", 1)]
    # A corrected retry publishes normally.
    assert _publish(make_lists(n_ranks=2), db_path, "m-2").version == 3
    assert serving.live_version(dsn=None, sqlite_path=db_path)["model_version"] == "m-2"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda lists: lists.drop(columns=["reason"]), "lack the columns"),
        (lambda lists: lists.iloc[0:0], "empty"),
        (
            lambda lists: lists.assign(generated_at=lists["generated_at"].dt.tz_localize(None)),
            "timezone-aware",
        ),
        (lambda lists: lists.assign(rank=lists["rank"] + 0.5), "integer"),
        (lambda lists: lists.assign(rank=lists["rank"] * 0), "integer"),
        (lambda lists: lists.assign(item_id=None), "null"),
        (lambda lists: lists.assign(score=float("inf")), "finite"),
    ],
)
def test_malformed_frames_are_refused_before_touching_the_db(
    db_path: Path, make_lists: Callable, change: Callable, message: str
) -> None:
    _publish(make_lists(), db_path, "m-1")

    with pytest.raises(serving.ListValidationError, match=message):
        _publish(change(make_lists()), db_path, "m-bad")

    assert _catalog(db_path) == [(1, "live", "m-1", 0)]


def test_ensure_schema_is_idempotent_and_uses_wal(db_path: Path, make_lists: Callable) -> None:
    for _ in range(3):
        serving.ensure_schema(dsn=None, sqlite_path=db_path)
    _publish(make_lists(), db_path, "m-1")
    serving.ensure_schema(dsn=None, sqlite_path=db_path)

    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert serving.live_version(dsn=None, sqlite_path=db_path)["model_version"] == "m-1"


def test_reads_before_first_publish(db_path: Path) -> None:
    assert serving.live_version(dsn=None, sqlite_path=db_path) is None
    with pytest.raises(serving.NothingPublishedError):
        serving.read_all(dsn=None, sqlite_path=db_path)
    serving.ensure_schema(dsn=None, sqlite_path=db_path)
    assert serving.live_version(dsn=None, sqlite_path=db_path) is None
    with pytest.raises(serving.NothingPublishedError):
        serving.read_user_list("u1", dsn=None, sqlite_path=db_path)


def test_record_promotion(db_path: Path) -> None:
    first = serving.record_promotion(
        dsn=None,
        sqlite_path=db_path,
        model_name="recommender",
        model_version="7",
        decision="promoted",
        reason="ndcg@10 +4%",
        metrics={"ndcg_at_10": 0.31, "bad": float("nan")},
        triggered_by="nightly",
        decided_at=LOGICAL_DATE,
    )
    second = serving.record_promotion(
        dsn=None,
        sqlite_path=db_path,
        model_name="recommender",
        model_version="8",
        decision="rejected",
        reason=None,
    )

    assert second == first + 1
    with sqlite3.connect(db_path) as conn:
        row = conn.execute(
            "SELECT decided_at, decision, json_extract(metrics, '$.ndcg_at_10'), "
            "json_type(metrics, '$.bad') FROM model_promotions WHERE id = ?",
            (first,),
        ).fetchone()
    assert row == ("2024-05-01T00:00:00.000000+00:00", "promoted", 0.31, "null")


def test_concurrent_reader_only_sees_complete_lists(db_path: Path, make_lists: Callable) -> None:
    shapes = [(6, 3), (4, 5), (8, 2), (5, 4), (7, 6), (3, 3)]
    expected_rows = {f"m-{i}": (users + 1) * ranks for i, (users, ranks) in enumerate(shapes)}
    _publish(make_lists(*shapes[0]), db_path, "m-0")
    stop = threading.Event()
    problems: list[str] = []
    seen = {version: threading.Event() for version in expected_rows}

    def read_loop() -> None:
        conn = sqlite3.connect(db_path, timeout=5)
        try:
            while not stop.is_set():
                rows = conn.execute(
                    "SELECT user_id, rank, model_version FROM recommendations "
                    "ORDER BY user_id, rank"
                ).fetchall()
                versions = {version for _, _, version in rows}
                if len(versions) != 1:
                    problems.append(f"mixed or empty result: {versions}")
                    continue
                (version,) = versions
                seen[version].set()
                if len(rows) != expected_rows[version]:
                    problems.append(
                        f"{version}: {len(rows)} rows, expected {expected_rows[version]}"
                    )
                by_user: dict[str, list[int]] = {}
                for user, rank, _ in rows:
                    by_user.setdefault(user, []).append(rank)
                for user, ranks in by_user.items():
                    if ranks != list(range(1, len(ranks) + 1)):
                        problems.append(f"{version}: {user} has ranks {ranks}")
                if not conn.execute(CMS_QUERY, (DEFAULT_USER,)).fetchall():
                    problems.append("empty fallback list")
        except sqlite3.Error as exc:
            problems.append(f"reader error: {exc}")
        finally:
            conn.close()
            for event in seen.values():  # a dead reader holds up nobody
                event.set()

    reader = threading.Thread(target=read_loop, daemon=True)
    reader.start()
    try:
        for index, shape in enumerate(shapes[1:], start=1):
            # Each swap happens under a reader that has read the version it replaces.
            assert seen[f"m-{index - 1}"].wait(30), problems[:5]
            _publish(make_lists(*shape), db_path, f"m-{index}", keep_versions=1)
        assert seen["m-5"].wait(30), problems[:5]
    finally:
        stop.set()
        reader.join(timeout=10)

    assert not problems, problems[:5]
    assert serving.live_version(dsn=None, sqlite_path=db_path)["model_version"] == "m-5"
    assert _tables(db_path) == {"recommendations_v6"}


def test_reader_holding_a_snapshot_does_not_block_publish(
    db_path: Path, make_lists: Callable
) -> None:
    _publish(make_lists(), db_path, "m-1")
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("BEGIN")
    before = holder.execute("SELECT count(*), min(model_version) FROM recommendations").fetchone()

    # A reader that blocked the writer (no WAL) would make this raise, not just take longer:
    # the holder lets go only after the publish, so the load's commit would hit the lock timeout
    # ("database is locked").
    _publish(make_lists(n_users=5), db_path, "m-2", keep_versions=1, lock_timeout_ms=500)

    # The open read transaction keeps its snapshot: old list set, complete.
    assert (
        holder.execute("SELECT count(*), min(model_version) FROM recommendations").fetchone()
        == before
        == (12, "m-1")
    )
    holder.execute("COMMIT")
    assert holder.execute(
        "SELECT count(*), min(model_version) FROM recommendations"
    ).fetchone() == (18, "m-2")
    holder.close()


def test_unopenable_sqlite_path_raises_serving_error(tmp_path: Path, make_lists: Callable) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")

    with pytest.raises(serving.ServingConnectionError, match="not-a-dir"):
        _publish(make_lists(), blocker / "serving.sqlite", "m-1")


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://alice:s3cr3t-Pw@127.0.0.1:1/recs_prod",
        "postgres://alice:s3cr3t-Pw@127.0.0.1:1/recs_prod?sslmode=disable",
        "host=127.0.0.1 port=1 dbname=recs_prod user=alice password=s3cr3t-Pw",
    ],
)
def test_unreachable_postgres_names_host_and_db_but_not_password(dsn: str) -> None:
    with pytest.raises(serving.ServingConnectionError) as caught:
        serving.live_version(dsn=dsn, sqlite_path=Path("unused"))

    message = str(caught.value)
    assert "s3cr3t" not in "".join(traceback.format_exception(caught.value))
    assert isinstance(caught.value, ServingError) and isinstance(caught.value, PipelineError)
    assert "127.0.0.1" in message and "recs_prod" in message
    assert "s3cr3t" not in message


@pytest.mark.parametrize(
    "dsn",
    [
        "mysql://alice:s3cr3t-Pw@db/recs",
        "postgresql://alice:s3cr3t-Pw@127.0.0.1:notaport/recs_prod",
    ],
)
def test_bad_dsn_is_a_clear_error_without_password(dsn: str, make_lists: Callable) -> None:
    with pytest.raises(serving.ServingConnectionError) as caught:
        serving.publish_lists(
            make_lists(),
            dsn=dsn,
            sqlite_path=Path("unused"),
            model_version="m",
            logical_date=LOGICAL_DATE,
        )

    printed = "".join(traceback.format_exception(caught.value))
    assert "s3cr3t" not in printed
    assert "recs" in str(caught.value)


# =================================================================================================
# SQL identifiers are built only with psycopg2.sql.Identifier (static check of the store, the
# contract and both backends)
# =================================================================================================

_SERVING_MODULES = ("store", "contract", "postgres", "sqlite")
_SERVING_DIR = Path(serving.__file__).parent
_SQL_WORDS = re.compile(
    r"\b(SELECT|INSERT|UPDATE|DELETE|DROP|CREATE|ALTER|GRANT|REVOKE|TRUNCATE|"
    r"COPY|ANALYZE|VACUUM|FROM|INTO|TABLE|VIEW|SCHEMA|WHERE|SET|INDEX)\b"
)
#: The SQLite backend has no psycopg2.sql: its one quoting helper validates the name against a
#: strict pattern, and its one formatter fills SQL files only with that helper's output.
_SQLITE_QUOTING = {"_ident", "_query"}


def _literal_text(node: ast.AST) -> str:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(
            part.value
            for part in node.values
            if isinstance(part, ast.Constant) and isinstance(part.value, str)
        )
    return ""


def _is_sql_sql_call(node: ast.AST) -> bool:
    """``sql.SQL(...)`` (psycopg2's composition, which only accepts Composable parts)."""
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "SQL"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "sql"
    )


def _sql_string_building(source: str, quoting: frozenset[str] = frozenset()) -> list[str]:
    """Places where SQL text is built by f-string, ``%`` or ``str.format``/concatenation, or an
    identifier is quoted by hand, outside the quoting helpers named in ``quoting``."""
    found: list[str] = []
    allowed_lines: set[int] = set()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name in quoting:
            allowed_lines.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if line in allowed_lines:
            continue
        where = f"line {line}: {ast.unparse(node)[:70]}"
        if isinstance(node, ast.JoinedStr):
            text = _literal_text(node)
            parts = node.values
            hand_quoted = any(
                isinstance(a, ast.Constant)
                and str(a.value).endswith('"')
                and isinstance(b, ast.FormattedValue)
                for a, b in zip(parts, parts[1:])
            )
            if _SQL_WORDS.search(text) or hand_quoted:
                found.append(f"f-string SQL/identifier at {where}")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mod, ast.Add)):
            if _SQL_WORDS.search(_literal_text(node.left) + _literal_text(node.right)):
                found.append(f"SQL built with an operator at {where}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "format"
            and not _is_sql_sql_call(node.func.value)
        ):
            found.append(f"str.format on SQL (use sql.SQL(...).format) at {where}")
    return found


@pytest.mark.parametrize("module", _SERVING_MODULES)
def test_serving_builds_identifiers_only_with_sql_identifier(module: str) -> None:
    quoting = frozenset(_SQLITE_QUOTING if module == "sqlite" else ())
    source = (_SERVING_DIR / f"{module}.py").read_text(encoding="utf-8")
    assert _sql_string_building(source, quoting) == []


def test_the_identifier_check_catches_string_built_sql() -> None:
    bad = """
def drop(cur, schema, table):
    cur.execute(f"DROP TABLE {schema}.{table}")
    cur.execute("SELECT * FROM %s" % table)
    cur.execute("DELETE FROM {}".format(table))
    cur.execute("SELECT * FROM " + table)
    name = f'"{schema}".recommendation_versions'
    cur.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier(table)))  # fine
"""
    found = _sql_string_building(bad)

    assert len(found) == 5, found
    assert [entry.split(" at ")[0] for entry in found].count("f-string SQL/identifier") == 2
