"""The Prometheus export: the gauges each push builds (read back through the text format), and
pushes that never fail the pipeline (no gateway configured, an unreachable or silent one)."""

from __future__ import annotations

import datetime as dt
import logging
import math
import socket
import time

import pandas as pd
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.monitoring import prometheus

UTC = dt.timezone.utc


def _samples(registry: CollectorRegistry) -> dict[str, dict[tuple, float]]:
    """name -> {sorted label items: value}, from the registry's text exposition."""
    text = generate_latest(registry).decode()
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        assert family.type == "gauge", family.name
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_publish_registry_holds_success_time_size_and_version():
    got = _samples(prometheus.publish_registry(1234, 56, "17", 1_714_532_645.5))
    assert got == {
        "recs_last_success_timestamp_seconds": {
            (("dag", "recommendations_nightly"),): 1_714_532_645.5
        },
        "recs_published_rows": {(): 1234.0},
        "recs_published_users": {(): 56.0},
        "recs_model_version": {(): 17.0},
    }


def test_failure_registry_holds_the_failure_time_of_the_dag():
    got = _samples(prometheus.failure_registry("recommendations_rollback", 1_700_000_000))
    assert got == {
        "recs_last_failure_timestamp_seconds": {
            (("dag", "recommendations_rollback"),): 1_700_000_000.0
        }
    }


@pytest.mark.parametrize(
    ("version", "number"), [("12", 12.0), (3, 3.0), ("v4", 4.0), ("m-2", 2.0), ("1.5", 1.5)]
)
def test_version_number(version, number):
    assert prometheus.version_number(version) == number


@pytest.mark.parametrize("version", [None, "", "champion"])
def test_version_number_without_digits_is_nan(version):
    assert math.isnan(prometheus.version_number(version))


def test_monitor_registry_from_a_mapping_and_health_values():
    psi = {"price": ("all", 0.31), "category": (None, 0.12), "hour": ("mobile", 0.01)}
    health = {
        "volume_ratio": 0.42,
        "late_share": 0.01,
        "quarantine_share": 0.07,
        "newest_event_age_seconds": 7200,
        "cold_start_share": 0.2,
        "catalogue_coverage": 0.55,
        "new_item_share": 0.03,
        "odd_metric": 5,
    }
    got = _samples(prometheus.monitor_registry(psi, health, as_of=1_706_745_600))
    assert got["recs_feature_psi"] == {
        (("feature", "price"), ("group", "all")): 0.31,
        (("feature", "category"), ("group", "all")): 0.12,
        (("feature", "hour"), ("group", "mobile")): 0.01,
    }
    assert got["recs_drift_status"] == {
        (("feature", "price"),): 2.0,
        (("feature", "category"),): 1.0,
        (("feature", "hour"),): 0.0,
    }
    assert got["recs_monitor_alerts"] == {(): 1.0}
    assert got["recs_monitor_last_run_timestamp_seconds"] == {(): 1_706_745_600.0}
    assert {
        name: values[()]
        for name, values in got.items()
        if name.startswith(("recs_input_", "recs_coldstart", "recs_catalogue", "recs_new"))
    } == {
        "recs_input_volume_ratio": 0.42,
        "recs_input_late_ratio": 0.01,
        "recs_input_quarantine_ratio": 0.07,
        "recs_input_newest_event_age_seconds": 7200.0,
        "recs_coldstart_user_ratio": 0.2,
        "recs_catalogue_coverage_ratio": 0.55,
        "recs_new_item_ratio": 0.03,
    }
    assert got["recs_health_metric"] == {(("metric", "odd_metric"),): 5.0}


def test_monitor_registry_from_a_frame_takes_the_worst_status_of_a_feature():
    frame = pd.DataFrame(
        {
            "feature": ["price", "price", "age", "hour"],
            "group": ["web", "app", "all", "all"],
            "psi": [0.05, 0.4, 0.6, float("nan")],
            "status": ["ok", "alert", "unknown", None],
        }
    )
    got = _samples(prometheus.monitor_registry(frame))
    assert got["recs_feature_psi"][(("feature", "price"), ("group", "app"))] == 0.4
    assert got["recs_feature_psi"][(("feature", "price"), ("group", "web"))] == 0.05
    assert math.isnan(got["recs_feature_psi"][(("feature", "hour"), ("group", "all"))])
    assert got["recs_drift_status"] == {
        (("feature", "price"),): 2.0,
        (("feature", "age"),): -1.0,  # as the monitor said
        (("feature", "hour"),): -1.0,
    }  # NaN PSI
    assert got["recs_monitor_alerts"] == {(): 1.0}
    assert "recs_monitor_last_run_timestamp_seconds" not in got


def test_monitor_registry_from_monitoring_table_rows():
    """The rows the monitor records (metric, subject, value, status) push as they are."""
    rows = pd.DataFrame(
        {
            "metric": [
                "psi",
                "psi",
                "psi",
                "volume_ratio",
                "newest_event_age",
                "quarantine_share",
                "cold_start_share",
            ],
            "subject": ["recency_days", "event_mix", "", "", "", "", ""],
            "value": [0.27, 0.02, float("nan"), 0.9, 86_400.0, 0.0, 0.25],
            "status": ["alert", "ok", "unknown", "ok", "ok", "ok", "ok"],
            "reference": "champion v3",
        }
    )
    as_of = dt.datetime(2024, 2, 1, tzinfo=UTC)
    got = _samples(prometheus.monitor_registry(rows, {"volume_ratio": 0.8}, as_of=as_of))
    assert got["recs_feature_psi"] == {
        (("feature", "recency_days"), ("group", "all")): 0.27,
        (("feature", "event_mix"), ("group", "all")): 0.02,
    }
    assert got["recs_drift_status"] == {
        (("feature", "recency_days"),): 2.0,
        (("feature", "event_mix"),): 0.0,
    }
    assert got["recs_input_volume_ratio"] == {(): 0.8}  # the explicit health value wins
    assert got["recs_input_newest_event_age_seconds"] == {(): 86_400.0}
    assert got["recs_input_quarantine_ratio"] == {(): 0.0}
    assert got["recs_coldstart_user_ratio"] == {(): 0.25}
    assert got["recs_monitor_last_run_timestamp_seconds"] == {(): as_of.timestamp()}


def test_monitor_registry_with_nothing_measured():
    got = _samples(prometheus.monitor_registry(None))
    assert got == {"recs_monitor_alerts": {(): 0.0}}


def test_psi_rows_need_feature_and_psi():
    with pytest.raises(ValueError, match="feature"):
        prometheus.psi_frame(pd.DataFrame({"psi": [0.1]}))


@pytest.mark.parametrize(
    ("psi", "status"),
    [(0.0, 0), (0.0999, 0), (0.1, 1), (0.2499, 1), (0.25, 2), (3.0, 2), (float("nan"), -1)],
)
def test_psi_status_thresholds(psi, status):
    assert prometheus.psi_status(psi) == status


# --- pushing -----------------------------------------------------------------------------------


@pytest.fixture
def recorded(monkeypatch) -> list[dict]:
    """Replaces the prometheus_client push functions by recorders."""
    calls: list[dict] = []

    def recorder(method):
        def push(gateway, job, registry, grouping_key=None, timeout=None, **_):
            calls.append(
                {
                    "method": method,
                    "gateway": gateway,
                    "job": job,
                    "grouping_key": grouping_key,
                    "timeout": timeout,
                    "names": set(_samples(registry)),
                }
            )

        return push

    monkeypatch.setattr(prometheus, "push_to_gateway", recorder("PUT"))
    monkeypatch.setattr(prometheus, "pushadd_to_gateway", recorder("POST"))
    return calls


def test_without_a_url_nothing_is_pushed(monkeypatch, recorded, caplog):
    monkeypatch.delenv(prometheus.URL_ENV, raising=False)
    with caplog.at_level(logging.DEBUG, logger=prometheus.__name__):
        assert prometheus.push_publish(10, 2, "1", 1.0) is False
        assert prometheus.push_failure("recommendations_nightly", 2.0) is False
        assert prometheus.push_monitor({"price": ("all", 0.3)}, {"volume_ratio": 1.0}) is False
    monkeypatch.setenv(prometheus.URL_ENV, "  ")  # blank counts as unset
    assert prometheus.push_publish(10, 2, "1", 1.0) is False
    assert recorded == []
    assert all(r.levelno == logging.DEBUG for r in caplog.records if r.name == prometheus.__name__)


def test_groups_methods_job_and_timeout(monkeypatch, recorded):
    monkeypatch.setenv(prometheus.URL_ENV, "http://gateway.example:9091")
    monkeypatch.delenv(prometheus.JOB_ENV, raising=False)
    assert prometheus.push_publish(10, 2, "1", 1.0) is True
    assert prometheus.push_failure("recommendations_rollback", 2.0) is True
    monkeypatch.setenv(prometheus.JOB_ENV, "recs_staging")
    assert prometheus.push_monitor({"price": ("all", 0.3)}, url="http://other:9091") is True
    assert [
        (c["method"], c["gateway"], c["job"], c["grouping_key"], c["timeout"]) for c in recorded
    ] == [
        (
            "POST",
            "http://gateway.example:9091",
            "recs_pipeline",
            {"pipeline": "recommendations_nightly"},
            5.0,
        ),
        (
            "POST",
            "http://gateway.example:9091",
            "recs_pipeline",
            {"pipeline": "recommendations_rollback"},
            5.0,
        ),
        ("PUT", "http://other:9091", "recs_staging", {"pipeline": "monitor"}, 5.0),
    ]
    assert recorded[0]["names"] == {
        "recs_last_success_timestamp_seconds",
        "recs_published_rows",
        "recs_published_users",
        "recs_model_version",
    }
    assert recorded[1]["names"] == {"recs_last_failure_timestamp_seconds"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_unreachable_gateway_logs_a_warning_and_returns_false(monkeypatch, caplog):
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    monkeypatch.setenv(prometheus.URL_ENV, url)
    with caplog.at_level(logging.WARNING, logger=prometheus.__name__):
        assert prometheus.push_publish(10, 2, "1", 1.0) is False
        assert prometheus.push_failure("recommendations_nightly", 2.0, url=url) is False
        assert prometheus.push_monitor({"price": ("all", 0.3)}) is False
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == prometheus.__name__ and r.levelno == logging.WARNING
    ]
    assert len(warnings) == 3
    assert all(url in message and "refused" in message.lower() for message in warnings)


def test_a_gateway_that_never_answers_times_out(monkeypatch, caplog):
    """A socket that accepts connections but never replies: the push gives up after the
    timeout (shortened here) instead of hanging the task."""
    monkeypatch.setattr(prometheus, "TIMEOUT_S", 0.5)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger=prometheus.__name__):
            assert prometheus.push_publish(10, 2, "1", 1.0, url=url) is False
        assert time.monotonic() - started < 4
    assert any(
        url in r.getMessage() and "timed out" in r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING
    )
