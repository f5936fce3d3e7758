"""The Prometheus export against a real Pushgateway: what the pipeline pushes through
``RECS_PUSHGATEWAY_URL`` is what Prometheus would scrape, groups keep each other's metrics, and
a monitor push replaces its previous snapshot.

Each test starts Debian's Pushgateway (``/usr/bin/prometheus-pushgateway``, in memory: an empty
``--persistence.file``) on a free local port and reads its ``/metrics`` back with httpx.
Without the binary these tests skip, unless ``RECS_REQUIRE_SERVICES=1`` (CI sets it): then they
fail.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.monitoring import prometheus

pytestmark = pytest.mark.integration

BINARY = "/usr/bin/prometheus-pushgateway"
INSTALL = "apt-get install -y prometheus-pushgateway prometheus"
START_TIMEOUT_S = 30
NIGHTLY = "recommendations_nightly"


def _binary() -> str:
    found = BINARY if os.access(BINARY, os.X_OK) else shutil.which("prometheus-pushgateway")
    if found is None:
        message = f"the Prometheus Pushgateway is not installed (Debian: `{INSTALL}`)"
        if os.environ.get("RECS_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{message}; RECS_REQUIRE_SERVICES=1 forbids skipping", pytrace=False)
        pytest.skip(message)
    return found


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def gateway(tmp_path: Path, monkeypatch) -> Iterator[str]:
    """A fresh Pushgateway on a free port (its URL), also set as ``RECS_PUSHGATEWAY_URL``;
    stopped afterwards."""
    binary = _binary()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "pushgateway.log").open("wb")
    # Debian's build persists to /var/lib/prometheus/pushgateway.data by default: an empty
    # file name keeps the metrics in memory, so each test starts from nothing
    process = subprocess.Popen(
        [binary, f"--web.listen-address=127.0.0.1:{port}", "--persistence.file="],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"the Pushgateway exited with {process.returncode}:\n"
                    f"{(tmp_path / 'pushgateway.log').read_text()}",
                    pytrace=False,
                )
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"the Pushgateway at {url} was not ready after {START_TIMEOUT_S} s",
                    pytrace=False,
                )
            time.sleep(0.1)
        monkeypatch.setenv(prometheus.URL_ENV, url)
        monkeypatch.delenv(prometheus.JOB_ENV, raising=False)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _scrape(url: str) -> dict[str, dict[tuple, float]]:
    """The ``recs_*`` samples the gateway exposes: name -> {sorted label items: value}."""
    response = httpx.get(f"{url}/metrics", timeout=5)
    response.raise_for_status()
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name.startswith("recs_"):
                assert family.type == "gauge", family.name
                key = tuple(sorted(sample.labels.items()))
                out.setdefault(sample.name, {})[key] = sample.value
    return out


def _labels(pipeline: str, **extra: str) -> tuple:
    labels = {"job": "recs_pipeline", "pipeline": pipeline, "instance": "", **extra}
    return tuple(sorted(labels.items()))


def test_publish_and_failure_share_the_dags_group_without_erasing_each_other(gateway):
    assert prometheus.push_publish(1200, 300, "7", 1_706_752_800.0) is True
    assert prometheus.push_failure(NIGHTLY, 1_706_839_200.0) is True
    got = _scrape(gateway)
    assert got["recs_last_success_timestamp_seconds"] == {
        _labels(NIGHTLY, dag=NIGHTLY): 1_706_752_800.0
    }
    assert got["recs_last_failure_timestamp_seconds"] == {
        _labels(NIGHTLY, dag=NIGHTLY): 1_706_839_200.0
    }
    assert got["recs_published_rows"] == {_labels(NIGHTLY): 1200.0}
    assert got["recs_published_users"] == {_labels(NIGHTLY): 300.0}
    assert got["recs_model_version"] == {_labels(NIGHTLY): 7.0}

    # the next success replaces the success metrics and keeps the failure
    assert prometheus.push_publish(1500, 310, "8", 1_706_925_600.0) is True
    got = _scrape(gateway)
    assert got["recs_last_success_timestamp_seconds"] == {
        _labels(NIGHTLY, dag=NIGHTLY): 1_706_925_600.0
    }
    assert got["recs_published_rows"] == {_labels(NIGHTLY): 1500.0}
    assert got["recs_model_version"] == {_labels(NIGHTLY): 8.0}
    assert got["recs_last_failure_timestamp_seconds"] == {
        _labels(NIGHTLY, dag=NIGHTLY): 1_706_839_200.0
    }


def test_monitor_push_lands_in_its_own_group(gateway):
    assert prometheus.push_publish(1200, 300, "7", 1_706_752_800.0) is True
    drift = pd.DataFrame(
        {
            "feature": ["price", "price", "recency_days"],
            "group": ["web", "app", "all"],
            "psi": [0.05, 0.31, 0.12],
            "status": ["ok", "alert", "warn"],
        }
    )
    health = {
        "volume_ratio": 0.45,
        "newest_event_age": 93_600.0,
        "quarantine_share": 0.02,
        "late_share": 0.0,
        "cold_start_share": 0.18,
        "catalogue_coverage": 0.6,
        "new_item_share": 0.04,
    }
    assert prometheus.push_monitor(drift, health, as_of=1_706_745_600.0) is True
    got = _scrape(gateway)

    monitor = "monitor"
    assert got["recs_feature_psi"] == {
        _labels(monitor, feature="price", group="web"): 0.05,
        _labels(monitor, feature="price", group="app"): 0.31,
        _labels(monitor, feature="recency_days", group="all"): 0.12,
    }
    assert got["recs_drift_status"] == {
        _labels(monitor, feature="price"): 2.0,
        _labels(monitor, feature="recency_days"): 1.0,
    }
    assert got["recs_monitor_alerts"] == {_labels(monitor): 1.0}
    assert got["recs_monitor_last_run_timestamp_seconds"] == {_labels(monitor): 1_706_745_600.0}
    assert got["recs_input_volume_ratio"] == {_labels(monitor): 0.45}
    assert got["recs_input_newest_event_age_seconds"] == {_labels(monitor): 93_600.0}
    assert got["recs_input_quarantine_ratio"] == {_labels(monitor): 0.02}
    assert got["recs_input_late_ratio"] == {_labels(monitor): 0.0}
    assert got["recs_coldstart_user_ratio"] == {_labels(monitor): 0.18}
    assert got["recs_catalogue_coverage_ratio"] == {_labels(monitor): 0.6}
    assert got["recs_new_item_ratio"] == {_labels(monitor): 0.04}
    # the nightly's group is untouched by the monitor's push
    assert got["recs_last_success_timestamp_seconds"] == {
        _labels(NIGHTLY, dag=NIGHTLY): 1_706_752_800.0
    }
    assert got["recs_published_rows"] == {_labels(NIGHTLY): 1200.0}


def test_a_monitor_push_replaces_the_previous_snapshot(gateway):
    assert (
        prometheus.push_monitor(
            {"price": ("all", 0.3), "hour": ("all", 0.01)}, {"volume_ratio": 0.4, "odd_metric": 3.0}
        )
        is True
    )
    # the monitor's own rows, as it records them in the monitoring table
    rows = pd.DataFrame(
        {
            "metric": ["psi", "volume_ratio"],
            "subject": ["price", ""],
            "value": [0.02, 1.1],
            "status": ["ok", "ok"],
        }
    )
    assert prometheus.push_monitor(rows, as_of=1_706_832_000.0) is True
    got = _scrape(gateway)
    assert got["recs_feature_psi"] == {_labels("monitor", feature="price", group="all"): 0.02}
    assert got["recs_drift_status"] == {_labels("monitor", feature="price"): 0.0}
    assert got["recs_monitor_alerts"] == {_labels("monitor"): 0.0}
    assert got["recs_input_volume_ratio"] == {_labels("monitor"): 1.1}
    assert "recs_health_metric" not in got  # gone with the snapshot that had it


def test_failures_of_two_dags_and_another_job(gateway, monkeypatch):
    assert prometheus.push_failure(NIGHTLY, 100.0) is True
    assert prometheus.push_failure("recommendations_rollback", 200.0) is True
    monkeypatch.setenv(prometheus.JOB_ENV, "recs_staging")
    assert prometheus.push_failure(NIGHTLY, 300.0) is True
    got = _scrape(gateway)
    staging = (("dag", NIGHTLY), ("instance", ""), ("job", "recs_staging"), ("pipeline", NIGHTLY))
    assert got["recs_last_failure_timestamp_seconds"] == {
        _labels(NIGHTLY, dag=NIGHTLY): 100.0,
        _labels("recommendations_rollback", dag="recommendations_rollback"): 200.0,
        staging: 300.0,
    }


def test_a_stopped_gateway_is_a_warning_not_an_error(gateway, caplog):
    port = _free_port()  # nothing listens there
    url = f"http://127.0.0.1:{port}"
    with caplog.at_level("WARNING", logger=prometheus.__name__):
        assert prometheus.push_publish(1, 1, "1", 1.0, url=url) is False
    assert any(url in r.getMessage() for r in caplog.records)
    assert "recs_published_rows" not in _scrape(gateway)
