"""DAG integrity: imports cleanly, wired as documented, configured for production."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOWNSTREAM = {
    "check_trigger": {"ingest"},
    "ingest": {"validate"},
    "validate": {"build_features"},
    "build_features": {"tune"},
    "tune": {"label_windows"},
    "label_windows": {"train", "evaluate"},
    "train": {"register"},
    "evaluate": {"register"},
    "register": {"publish"},
    "publish": set(),
}


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import BundleDagBag

    return BundleDagBag(dag_folder=str(REPO / "dags"), bundle_path=REPO / "dags")


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}
    assert "recommendations_nightly" in dagbag.dag_ids


def test_nightly_runs_the_stages_in_order_with_train_and_evaluate_side_by_side(dagbag):
    from pipeline.nightly import STAGES

    dag = dagbag.dags["recommendations_nightly"]
    assert {t.task_id for t in dag.tasks} == {"check_trigger", *STAGES} == set(DOWNSTREAM)
    for task_id, downstream in DOWNSTREAM.items():
        assert dag.get_task(task_id).downstream_task_ids == downstream, task_id
    order = [t.task_id for t in dag.topological_sort()]
    assert order[:6] == [
        "check_trigger",
        "ingest",
        "validate",
        "build_features",
        "tune",
        "label_windows",
    ]
    assert order[-2:] == ["register", "publish"]


def test_nightly_schedule_and_defaults(dagbag):
    dag = dagbag.dags["recommendations_nightly"]
    # Its cron, or a drift alert from the monitor.
    assert dag.timetable.timetable.expression == "0 2 * * *"
    assert str(dag.timetable.timetable.timezone) == "UTC"
    assert dag.timetable.asset_condition.uri == "recs://monitor/drift-alert"
    assert dag.catchup is False and dag.max_active_runs == 1
    assert dag.start_date.year == 1990 and str(dag.start_date.tzinfo) == "UTC"
    assert dag.doc_md and "recommendations" in dag.tags
    assert all(task.retries >= 2 for task in dag.tasks)


def test_params_are_validated_and_described(dagbag):
    from airflow.sdk.definitions.param import ParamsDict
    from airflow.sdk.exceptions import ParamValidationError

    dag = dagbag.dags["recommendations_nightly"]
    for name in ("top_n", "lookback_days"):
        assert name in dag.params
    for name, param in dag.params.items():
        assert param.description, f"param {name} has no description for the trigger form"
    params = ParamsDict(dag.params)
    with pytest.raises(ParamValidationError, match="top_n"):
        params["top_n"] = 0


def test_dag_file_has_no_heavy_top_level_imports():
    source = (REPO / "dags" / "recommendations_nightly.py").read_text()
    top_level = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    heavy = ("pandas", "numpy", "implicit", "xgboost", "mlflow", "great_expectations", "pipeline")
    assert not [line for line in top_level if any(h in line for h in heavy)]


def test_airflow_cfg_points_at_the_repo():
    from airflow.configuration import conf

    assert Path(conf.get("core", "dags_folder")).resolve() == (REPO / "dags").resolve()
    assert conf.getboolean("core", "load_examples") is False
    assert conf.getint("core", "parallelism") <= 4


def test_every_task_has_a_timeout_and_the_failure_notifier(dagbag):
    from recs_support import notify_failure

    for dag_id in (
        "recommendations_nightly",
        "recommendations_rollback",
        "recommendations_monitor",
        "recommendations_impact",
        "recommendations_forget_user",
    ):
        for task in dagbag.dags[dag_id].tasks:
            assert task.execution_timeout is not None, f"{dag_id}.{task.task_id}"
            assert task.execution_timeout.total_seconds() >= 300
            assert (
                notify_failure in list(task.on_failure_callback or [])
                or task.on_failure_callback is notify_failure
            ), f"{dag_id}.{task.task_id}"


def test_every_param_is_a_pipeline_setting(dagbag):
    import dataclasses

    from pipeline.core.config import Settings

    fields = {f.name for f in dataclasses.fields(Settings)}
    params = dagbag.dags["recommendations_nightly"].params
    names = set(params) - {"retrain_cooldown_hours"}  # the DAG's own wiring
    assert names <= fields, names - fields
    defaults = Settings()
    for name in names:  # the form's defaults are the pipeline's
        assert params[name] == getattr(defaults, name), name


def test_the_failure_notifier_is_quiet_when_no_address_is_configured(monkeypatch):
    from recs_support import notify_failure

    monkeypatch.delenv("RECS_ALERT_EMAIL", raising=False)
    assert notify_failure({}) is None  # no SMTP connection needed, nothing raised


def test_the_failure_mail_names_the_first_line_of_the_error():
    from recs_support import first_error_line

    assert first_error_line(ValueError("bad value\nTraceback ...")) == "ValueError: bad value"
    assert first_error_line(RuntimeError("RuntimeError: said twice")) == "RuntimeError: said twice"
    assert first_error_line(None).startswith("unknown error")


def test_ingest_updates_the_lake_asset_that_schedules_the_monitor(dagbag):
    nightly = dagbag.dags["recommendations_nightly"]
    monitor = dagbag.dags["recommendations_monitor"]
    assert [a.uri for a in nightly.get_task("ingest").outlets] == ["recs://lake/events"]
    assert monitor.timetable.asset_condition.uri == "recs://lake/events"
    assert [a.uri for a in monitor.get_task("trigger_retrain").outlets] == [
        "recs://monitor/drift-alert"
    ]
    assert {t.task_id for t in monitor.tasks} == {"monitor", "notify", "trigger_retrain"}
    assert monitor.max_active_runs == 1 and monitor.catchup is False
    for name, param in monitor.params.items():
        assert param.description, f"monitor param {name} has no description"


def test_the_retrain_cool_down_is_a_param_with_an_environment_default(dagbag):
    assert dagbag.dags["recommendations_nightly"].params["retrain_cooldown_hours"] == 12.0


def test_the_impact_dag_runs_after_every_ingest(dagbag):
    impact = dagbag.dags["recommendations_impact"]
    assert impact.timetable.asset_condition.uri == "recs://lake/events"
    assert [t.task_id for t in impact.tasks] == ["impact"]
    assert impact.max_active_runs == 1 and impact.catchup is False
    for name, param in impact.params.items():
        assert param.description, f"impact param {name} has no description"


def test_the_forget_user_dag_is_manual_and_validates_its_ids(dagbag):
    from airflow.sdk.definitions.param import ParamsDict
    from airflow.sdk.exceptions import ParamValidationError

    dag = dagbag.dags["recommendations_forget_user"]
    assert type(dag.timetable).__name__ == "NullTimetable"  # schedule=None: manual only
    assert dag.catchup is False and dag.max_active_runs == 1 and dag.doc_md
    assert [t.task_id for t in dag.tasks] == ["forget"]
    assert all(task.retries >= 2 for task in dag.tasks)
    assert set(dag.params) == {"user_ids", "requested_by", "reason"}
    for name, param in dag.params.items():
        assert param.description, f"forget-user param {name} has no description"
    params = ParamsDict(dag.params)
    params["user_ids"] = ["u1", "someone@example.com"]
    for bad in ([], [""], [" u1"], ["x" * 513], "u1", [7]):
        with pytest.raises(ParamValidationError, match="user_ids"):
            params["user_ids"] = bad
