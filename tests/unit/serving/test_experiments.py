"""A/B experiments: config validation, stable buckets, assignment shares, the change rules that
keep users where they were, and the ``experiments`` audit table on both serving backends."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import psycopg2
import pytest
from psycopg2 import errors as pg_errors

from pipeline.core.errors import ConfigError
from pipeline.serving import store
from pipeline.serving.experiments import (
    BUCKETS,
    AnotherExperimentRunning,
    ChangeRefused,
    Experiment,
    ExperimentError,
    Variant,
    bucket,
    bucket_array,
    check_change,
    experiment_path,
)

REPO = Path(__file__).resolve().parents[3]
CONFIG = {
    "name": "ranker-vs-popular",
    "salt": "2024-05-ranker",
    "version": 1,
    "status": "running",
    "planned_users_per_variant": 12000,
    "planned_days": 14,
    "variants": [
        {"name": "control", "kind": "popularity", "share": 0.3},
        {"name": "model", "kind": "model", "model": "champion", "share": 0.3},
        {"name": "holdout", "kind": "holdout", "share": 0.1},
    ],
}
USERS_100K = [f"user-{index:06d}" for index in range(100_000)]
USERS_50K = USERS_100K[:50_000]


def _config(**changes) -> dict:
    config = json.loads(json.dumps(CONFIG))
    config.update(changes)
    return config


def _started(**changes) -> Experiment:
    return Experiment.from_dict(_config(**changes)).start()


def _refused(config: dict, *fragments: str) -> str:
    with pytest.raises(ExperimentError) as caught:
        Experiment.from_dict(config)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


# =================================================================================================
# Config
# =================================================================================================


def test_config_round_trips_through_dict_and_file(tmp_path):
    experiment = _started()
    assert Experiment.from_dict(experiment.to_dict()) == experiment
    assert Experiment.from_dict(json.loads(json.dumps(experiment.to_dict()))) == experiment
    path = experiment_path(tmp_path, experiment.name)
    assert path == tmp_path / "experiments" / "ranker-vs-popular.json"
    experiment.save(path)
    assert Experiment.load(path) == experiment
    assert not [p for p in path.parent.iterdir() if p.name != path.name]  # no temp file left
    assert '"buckets": [\n        [0, 3000]\n      ]' in path.read_text()


@pytest.mark.parametrize(
    ("variants", "fragments"),
    [
        (
            [
                {"name": "a", "kind": "popularity", "share": 0.5},
                {"name": "b", "kind": "bandit", "share": 0.2},
            ],
            ["unknown kind 'bandit'", "popularity, model, holdout"],
        ),
        (
            [
                {"name": "a", "kind": "popularity", "share": 0.5},
                {"name": "a", "kind": "holdout", "share": 0.2},
            ],
            ["duplicate variant name(s) ['a']"],
        ),
        (
            [
                {"name": "a", "kind": "popularity", "share": 1.2},
                {"name": "b", "kind": "holdout", "share": 0.2},
            ],
            ["variant 'a'", "share 1.2 is out of range"],
        ),
        (
            [
                {"name": "a", "kind": "popularity", "share": -0.1},
                {"name": "b", "kind": "holdout", "share": 0.2},
            ],
            ["share -0.1 is out of range"],
        ),
        (
            [
                {"name": "a", "kind": "popularity", "share": 0.7},
                {"name": "b", "kind": "holdout", "share": 0.4},
            ],
            ["shares sum to 1.1, above 1"],
        ),
        (
            [
                {"name": "a", "kind": "popularity", "share": 0.5},
                {"name": "b", "kind": "model", "share": 0.2},
            ],
            ["variant 'b'", "kind 'model' needs 'model'"],
        ),
        (
            [
                {"name": "a", "kind": "popularity", "share": 0.5, "model": "champion"},
                {"name": "b", "kind": "holdout", "share": 0.2},
            ],
            ["'model' is only for kind 'model'"],
        ),
        ([{"name": "a", "kind": "popularity", "share": 0.5}], ["at least 2 variants, got 1"]),
        (
            [
                {"name": "a", "kind": "popularity", "share": 0.12345},
                {"name": "b", "kind": "holdout", "share": 0.2},
            ],
            ["not a whole number of buckets"],
        ),
        (
            [
                {"name": "a", "kind": "popularity", "shares": 0.5},
                {"name": "b", "kind": "holdout", "share": 0.2},
            ],
            ["unknown key(s) ['shares']"],
        ),
    ],
)
def test_invalid_configs_are_refused_with_clear_errors(variants, fragments):
    _refused(_config(variants=variants), *fragments)


def test_config_errors_list_every_problem_and_are_config_errors():
    config = _config(
        salt="",
        version=0,
        variants=[
            {"name": "a", "kind": "bandit", "share": 0.5},
            {"name": "b", "kind": "model", "share": 2},
        ],
    )
    message = _refused(
        config,
        "4 problems",
        "salt must be a non-empty string",
        "version must be an integer >= 1",
        "unknown kind 'bandit'",
        "kind 'model' needs 'model'",
    )
    assert issubclass(ExperimentError, ConfigError), message
    _refused(_config(salt="   "), "salt must be a non-empty string")
    _refused(_config(status="paused"), "status must be one of running, stopped")
    _refused(_config(control="treatment"), "control 'treatment' is not one of the variants")
    _refused({"salt": "s", "variants": []}, "missing 'name'")


def test_model_version_number_is_text_and_shares_may_leave_traffic_outside():
    experiment = Experiment.from_dict(
        _config(
            variants=[
                {"name": "control", "kind": "popularity", "share": 0.05},
                {"name": "v7", "kind": "model", "model": 7, "share": 0.05},
            ]
        )
    ).start()
    assert experiment.variant("v7").model == "7"
    assert experiment.free_share == pytest.approx(0.9)
    assert experiment.control_variant == "control"


def test_load_names_the_file_on_bad_json_and_bad_config(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"name": "x",\n "salt": }')
    with pytest.raises(ExperimentError, match=r"broken.json: invalid JSON at line 2"):
        Experiment.load(path)
    path.write_text(
        json.dumps(_config(variants=[{"name": "a", "kind": "popularity", "share": 0.5}]))
    )
    with pytest.raises(ExperimentError, match=r"broken.json: .*at least 2 variants"):
        Experiment.load(path)


def test_no_control_is_allowed_with_a_warning(caplog):
    experiment = Experiment.from_dict(
        _config(
            variants=[
                {"name": "a", "kind": "popularity", "share": 0.5},
                {"name": "b", "kind": "model", "model": "champion", "share": 0.5},
            ]
        )
    )
    assert experiment.control_variant is None
    experiment.start()
    assert "has no control" in caplog.text


# =================================================================================================
# Buckets and assignment
# =================================================================================================


def test_bucket_has_known_answers_computed_by_hand():
    digest = hashlib.sha256(b"2024-05-ranker:alice").digest()
    expected = int.from_bytes(digest[:8], "big") % 10_000
    assert BUCKETS == 10_000
    assert bucket("2024-05-ranker", "alice") == expected
    # Pinned values: a change of the hash, the separator or the modulus moves every user.
    assert bucket("2024-05-ranker", "alice") == 7154
    assert bucket("salt", "42") == bucket("salt", 42) == 2753
    assert bucket_array("2024-05-ranker", ["alice", "bob", 42]).tolist() == [
        7154,
        bucket("2024-05-ranker", "bob"),
        bucket("2024-05-ranker", "42"),
    ]


def test_bucket_array_matches_bucket_for_every_input_shape():
    users = USERS_100K[:2000]
    expected = [bucket("s", user) for user in users]
    assert bucket_array("s", users).tolist() == expected
    assert bucket_array("s", np.array(users)).tolist() == expected
    assert bucket_array("s", pd.Series(users, dtype="string[pyarrow]")).tolist() == expected
    assert bucket_array("s", pd.Index(users)).tolist() == expected
    assert bucket_array("s", []).tolist() == []
    with pytest.raises(ExperimentError, match="position 1"):
        bucket_array("s", ["a", None])
    with pytest.raises(ExperimentError, match="must be text"):
        bucket_array("s", np.array([1.5, 2.5]))
    with pytest.raises(ExperimentError, match="salt"):
        bucket_array("", ["a"])


def test_assignment_shares_within_tolerance_on_100k_users():
    experiment = _started()
    variants = experiment.assign(USERS_100K)
    assert variants.dtype == object and len(variants) == len(USERS_100K)
    counts = {name: int((variants == name).sum()) for name in ("control", "model", "holdout")}
    counts["outside"] = int(sum(value is None for value in variants))
    expected = {"control": 0.3, "model": 0.3, "holdout": 0.1, "outside": 0.3}
    for name, share in expected.items():
        # 5 standard deviations of a binomial share: fails by chance about once in 3 million
        sigma = (share * (1 - share) / len(USERS_100K)) ** 0.5
        assert abs(counts[name] / len(USERS_100K) - share) < 5 * sigma, (name, counts)


def test_assignment_is_the_bucket_lookup_and_new_users_follow_the_same_rule():
    experiment = _started()
    owner = {name: set() for name in ("control", "model", "holdout")}
    for v in experiment.variants:
        for start, end in v.buckets:
            owner[v.name].update(range(start, end))
    users = USERS_100K[:5000] + ["brand-new-user-1", "brand-new-user-2"]
    for user, variant in zip(users, experiment.assign(users)):
        b = bucket(experiment.salt, user)
        assert variant == next((name for name, held in owner.items() if b in held), None)
    assert experiment.assign(["brand-new-user-1"])[0] == experiment.assign(users)[-2]


def test_assignment_is_identical_across_calls_and_processes():
    experiment = _started()
    users = USERS_100K[:20_000]
    first = experiment.assign(users)
    assert (experiment.assign(users) == first).all()
    assert (Experiment.from_dict(experiment.to_dict()).assign(users) == first).all()
    script = (
        "import json, sys\n"
        "from pipeline.serving.experiments import Experiment\n"
        "config, users = json.load(sys.stdin)\n"
        "print(json.dumps(Experiment.from_dict(config).assign(users).tolist()))\n"
    )
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
        done = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            input=json.dumps([experiment.to_dict(), users]),
            env=env,
            cwd=REPO,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == first.tolist()
    assert hash("alice") != 0  # the test process' own hash() plays no part either


def test_assign_needs_a_started_experiment_and_a_stopped_one_assigns_nobody():
    draft = Experiment.from_dict(_config())
    with pytest.raises(ExperimentError, match="has no buckets yet"):
        draft.assign(["a"])
    started = draft.start()
    stopped = started.stop()
    assert stopped.status == "stopped" and stopped.version == started.version + 1
    assert all(v is None for v in stopped.assign(USERS_50K[:1000]))
    assert (
        stopped.assign(USERS_50K[:1000], ignore_status=True) == started.assign(USERS_50K[:1000])
    ).all()
    frame = started.assignments(["a", "b", "c", "d"])
    assert list(frame.columns) == ["user_id", "experiment", "variant", "kind", "model"]
    model_rows = frame[frame.variant == "model"]
    assert (model_rows.model == "champion").all() and (model_rows.kind == "model").all()


def test_start_allocates_buckets_from_the_shares():
    experiment = _started()
    assert experiment.allocated and experiment.running and experiment.version == 1
    assert {v.name: v.buckets for v in experiment.variants} == {
        "control": ((0, 3000),),
        "model": ((3000, 6000),),
        "holdout": ((6000, 7000),),
    }
    assert experiment.free_buckets == 3000
    assert experiment.start() == experiment  # a retried start changes nothing
    assert experiment.last_change["action"] == "start"


# =================================================================================================
# Changes
# =================================================================================================


def test_growing_a_variant_keeps_every_previously_assigned_user_in_place():
    before = _started()
    grown = before.change_shares({"model": 0.4, "holdout": 0.15})
    assert grown.version == before.version + 1
    assert grown.shares == {"control": 0.3, "model": 0.4, "holdout": 0.15}
    assert grown.last_change == {
        "action": "change",
        "forced": False,
        "summary": "model 30% -> 40%; holdout 10% -> 15%",
    }
    old, new = before.assign(USERS_50K), grown.assign(USERS_50K)
    inside = np.array([value is not None for value in old])
    assert (new[inside] == old[inside]).all()  # nobody in a variant moved
    joined = ~inside & np.array([value is not None for value in new])
    assert set(new[joined]) == {"model", "holdout"}  # newcomers come from outside only
    check_change(before, grown)

    added = grown.add_variant({"name": "model-b", "kind": "model", "model": "12", "share": 0.05})
    assert added.version == grown.version + 1 and added.free_share == pytest.approx(0.1)
    again = added.assign(USERS_50K)
    was_in = np.array([value is not None for value in new])
    assert (again[was_in] == new[was_in]).all()
    check_change(grown, added)


def test_shrinking_is_refused_with_the_message_and_allowed_with_force():
    experiment = _started()
    with pytest.raises(ChangeRefused) as caught:
        experiment.change_shares({"model": 0.2})
    assert (
        "shrinking variant 'model' from 30% to 20% would move 1,000 buckets' users out of "
        "it; stop the experiment and start a new one with a new salt instead" in str(caught.value)
    )

    forced = experiment.change_shares({"model": 0.2}, force=True)
    assert forced.version == 2 and forced.variant("model").share == 0.2
    assert forced.last_change["forced"] is True and forced.last_change["moved_buckets"] == 1000
    assert forced.released_buckets == ((5000, 6000),)
    old, new = experiment.assign(USERS_50K), forced.assign(USERS_50K)
    moved = old != new
    assert set(old[moved]) == {"model"} and all(value is None for value in new[moved])
    check_change(experiment, forced)

    # Released buckets never go to another variant: the free share excludes them.
    assert forced.free_share == pytest.approx(0.3)
    regrown = forced.change_shares({"control": 0.6})
    assert regrown.assign(USERS_50K)[moved].tolist() == [None] * int(moved.sum())


def test_growth_beyond_the_free_pool_removal_and_other_fixed_things_are_refused():
    experiment = _started()
    with pytest.raises(
        ChangeRefused,
        match=r"needs 40% of the users but the free share is "
        r"only 30%",
    ):
        experiment.change_shares({"model": 0.7})
    with pytest.raises(ChangeRefused, match=r"removing variant 'holdout'.*stop the experiment"):
        experiment.change_shares({"holdout": 0}, force=True)
    with pytest.raises(ChangeRefused, match=r"has no variant\(s\) \['treatment'\]"):
        experiment.change_shares({"treatment": 0.1})
    with pytest.raises(ChangeRefused, match="already has a variant 'model'"):
        experiment.add_variant({"name": "model", "kind": "holdout", "share": 0.01})
    assert experiment.change_shares({"model": 0.3}) is experiment  # no change, no new version

    edited = experiment.to_dict()
    edited["variants"] = edited["variants"][:2]
    with pytest.raises(ChangeRefused, match=r"\['holdout'\] removed"):
        experiment.apply_config(edited)
    for key, value in (("salt", "other"), ("planned_days", 7)):
        with pytest.raises(ChangeRefused, match=key):
            experiment.apply_config({**experiment.to_dict(), key: value})
    swapped = experiment.to_dict()
    swapped["variants"][1]["model"] = "challenger"
    with pytest.raises(ChangeRefused, match="would mix two treatments"):
        experiment.apply_config(swapped)

    stopped = experiment.stop()
    with pytest.raises(ChangeRefused, match="stopped experiments do not change"):
        stopped.change_shares({"model": 0.35})
    assert stopped.stop() is stopped


def test_apply_config_turns_an_edited_file_into_one_new_version():
    experiment = _started()
    edited = experiment.to_dict()
    edited["variants"][1]["share"] = 0.35  # buckets left as they were: ignored
    edited["variants"].append(
        {"name": "model-b", "kind": "model", "model": "champion", "share": 0.05}
    )
    changed = experiment.apply_config(edited)
    assert changed.version == 2 and changed.shares["model"] == 0.35
    assert changed.shares["model-b"] == 0.05
    check_change(experiment, changed)
    assert changed.apply_config({**changed.to_dict(), "status": "stopped"}).status == "stopped"
    with pytest.raises(
        ChangeRefused, match="is version 1 of .* but version 2 is current: edit the current config"
    ):
        changed.apply_config(
            {
                **experiment.to_dict(),
                "version": 1,
                "variants": [
                    *experiment.to_dict()["variants"],
                    {"name": "x", "kind": "holdout", "share": 0.01},
                ],
            }
        )


def test_check_change_catches_hand_edited_configs_that_move_users():
    experiment = _started()
    moved = experiment.to_dict()
    moved["version"] = 2
    moved["variants"][0]["buckets"] = [[3000, 6000]]
    moved["variants"][1]["buckets"] = [[0, 3000]]
    with pytest.raises(ChangeRefused, match="6,000 buckets' users would change group"):
        check_change(experiment, Experiment.from_dict(moved))
    unforced = experiment.change_shares({"model": 0.2}, force=True).to_dict()
    unforced["last_change"]["forced"] = False
    with pytest.raises(ChangeRefused, match="releasing needs a forced change"):
        check_change(experiment, Experiment.from_dict(unforced))


def test_variant_objects_validate_themselves():
    with pytest.raises(ExperimentError, match="unknown kind"):
        Variant(name="a", kind="x", share=0.1)
    with pytest.raises(ExperimentError, match="buckets hold 10 buckets"):
        Variant(name="a", kind="holdout", share=0.1, buckets=((0, 10),))


# =================================================================================================
# The experiments table, on both backends
# =================================================================================================


@pytest.fixture(params=["sqlite", "postgres"])
def target(request, tmp_path) -> dict:
    if request.param == "sqlite":
        return {"dsn": None, "sqlite_path": tmp_path / "serving.sqlite"}
    return {"dsn": request.getfixturevalue("pg_dsn"), "sqlite_path": tmp_path / "unused"}


def test_nothing_recorded_yet(target):
    assert store.read_experiments(**target).empty
    assert store.active_experiment(**target) is None


def test_table_records_start_change_stop_with_who_and_is_idempotent(target):
    started = _started()
    first = store.record_experiment(
        started, "start", "manual by alice", "ranker vs popular", **target
    )
    assert (
        store.record_experiment(started, "start", "manual by alice", "retry", **target) == first
    )  # a retried task adds no row
    active = store.active_experiment(**target)
    assert active["name"] == started.name and active["version"] == 1
    assert Experiment.from_dict(active["config"]) == started

    grown = started.change_shares({"model": 0.4})
    store.record_experiment(grown, "change", "cli", "more traffic for the model", **target)
    forced = grown.change_shares({"holdout": 0.05}, force=True)
    store.record_experiment(
        forced,
        "change",
        "manual by bob",
        "holdout too costly",
        changed_at=dt.datetime(2024, 5, 3, tzinfo=dt.timezone.utc),
        **target,
    )
    stopped = forced.stop()
    store.record_experiment(stopped.to_dict(), "stop", "cli", "horizon reached", **target)
    store.record_experiment(stopped, "stop", "cli", "horizon reached", **target)  # retry

    frame = store.read_experiments(**target)
    assert frame.action.tolist() == ["start", "change", "change", "stop"]
    assert frame.version.tolist() == [1, 2, 3, 4]
    assert frame.changed_by.tolist() == ["manual by alice", "cli", "manual by bob", "cli"]
    assert frame.reason.tolist()[0] == "ranker vs popular"
    assert frame.forced.tolist() == [False, False, True, False]
    assert frame.status.tolist() == ["running", "running", "running", "stopped"]
    assert frame.changed_at.iloc[2] == dt.datetime(2024, 5, 3, tzinfo=dt.timezone.utc)
    assert str(frame.changed_at.dt.tz) == "UTC"
    assert Experiment.from_dict(frame.config.iloc[1]) == grown
    assert store.active_experiment(**target) is None
    assert store.read_experiments(name="other", **target).empty
    assert len(store.read_experiments(name=started.name, **target)) == 4


def test_table_refuses_what_the_rules_refuse(target):
    started = _started()
    store.record_experiment(started, "start", "cli", None, **target)
    grown = started.change_shares({"model": 0.4})
    store.record_experiment(grown, "change", "cli", None, **target)
    with pytest.raises(ExperimentError, match="already recorded .* with another action"):
        store.record_experiment(grown, "start", "cli", None, **target)
    other_grown = started.change_shares({"holdout": 0.2})  # also version 2, other config
    with pytest.raises(ExperimentError, match="already recorded .* with another config"):
        store.record_experiment(other_grown, "change", "cli", None, **target)

    # A hand-edited config that moves users cannot be recorded.
    moved = grown.to_dict()
    moved["version"] = 3
    moved["variants"][0]["buckets"], moved["variants"][1]["buckets"] = (
        moved["variants"][1]["buckets"],
        [[0, 3000]],
    )
    moved["variants"][0]["share"], moved["variants"][1]["share"] = 0.4, 0.3
    with pytest.raises(ChangeRefused, match="would change group"):
        store.record_experiment(moved, "change", "manual by mallory", None, **target)
    with pytest.raises(ExperimentError, match="needs status 'stopped'"):
        store.record_experiment(grown, "stop", "cli", None, **target)
    with pytest.raises(ExperimentError, match="changed_by"):
        store.record_experiment(grown, "change", " ", None, **target)
    with pytest.raises(ExperimentError, match="no buckets"):
        store.record_experiment(Experiment.from_dict(_config()), "start", "cli", None, **target)
    with pytest.raises(ExperimentError, match="never started"):
        store.record_experiment(
            _started(name="ghost", salt="g").stop(), "stop", "cli", None, **target
        )
    assert len(store.read_experiments(**target)) == 2


def test_a_second_running_experiment_is_refused(target):
    first = _started()
    store.record_experiment(first, "start", "cli", None, **target)
    second = _started(name="bpr-vs-als", salt="2024-06-bpr")
    with pytest.raises(
        AnotherExperimentRunning,
        match=r"'ranker-vs-popular' \(version 1, .*\) is running: stop it before "
        r"starting 'bpr-vs-als'",
    ):
        store.record_experiment(second, "start", "cli", None, **target)
    store.record_experiment(first.stop(), "stop", "cli", "done", **target)
    with pytest.raises(ExperimentError, match="salt '2024-05-ranker' was used"):
        store.record_experiment(_started(name="again"), "start", "cli", None, **target)
    with pytest.raises(
        ExperimentError, match="version 1 of experiment 'ranker-vs-popular' is already recorded"
    ):
        store.record_experiment(_started(salt="fresh"), "start", "cli", None, **target)
    with pytest.raises(
        ExperimentError,
        match=r"'ranker-vs-popular' was already recorded "
        r"\(version 2, stop by cli\)",
    ):
        store.record_experiment(_started(salt="fresh", version=5), "start", "cli", None, **target)
    with pytest.raises(ChangeRefused, match="was stopped at version 2"):
        store.record_experiment(
            first.change_shares({"model": 0.35}).stop(), "stop", "cli", None, **target
        )
    store.record_experiment(second, "start", "cli", None, **target)
    assert store.active_experiment(**target)["name"] == "bpr-vs-als"


def test_concurrent_starts_and_retries_leave_one_running_experiment_and_one_row(target):
    """Two tasks that race: each check-and-insert runs alone (a write lock on the table)."""
    candidates = [_started(name=f"race-{index}", salt=f"salt-{index}") for index in range(2)]
    retried = [_started(name="race-2", salt="salt-2")] * 2  # then one version twice at once
    for batch, expect_one_row in ((candidates, False), (retried, True)):
        barrier = threading.Barrier(len(batch))
        outcomes: list[object] = [None] * len(batch)

        def run(index: int, batch=batch, barrier=barrier, outcomes=outcomes) -> None:
            barrier.wait()
            try:
                outcomes[index] = store.record_experiment(
                    batch[index], "start", "cli", None, **target
                )
            except ExperimentError as exc:
                outcomes[index] = exc

        threads = [threading.Thread(target=run, args=(index,)) for index in range(len(batch))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        if expect_one_row:
            assert all(isinstance(o, int) for o in outcomes) and len(set(outcomes)) == 1, outcomes
        else:
            assert sorted(type(o).__name__ for o in outcomes) == [
                "AnotherExperimentRunning",
                "int",
            ], outcomes
            store.record_experiment(  # whoever won is stopped; the loser may start next
                Experiment.from_dict(store.active_experiment(**target)["config"]).stop(),
                "stop",
                "cli",
                None,
                **target,
            )
    frame = store.read_experiments(**target)
    assert frame.groupby(["name", "version"]).size().max() == 1
    assert store.active_experiment(**target)["name"] == "race-2"
    assert len(frame) == 3  # the winner's start and stop, race-2's one start


def test_the_cms_role_cannot_read_the_experiments_table(pg_dsn, tmp_path):
    store.record_experiment(
        _started(), "start", "cli", None, dsn=pg_dsn, sqlite_path=tmp_path / "unused"
    )
    with psycopg2.connect(pg_dsn) as conn, conn.cursor() as cur:
        cur.execute("SET ROLE cms_reader")
        with pytest.raises(pg_errors.InsufficientPrivilege):
            cur.execute("SELECT count(*) FROM recs.experiments")
    conn.close()
