"""The alerting rules shipped in pipeline/monitoring: valid for Prometheus (``promtool check
rules``), behaving as their unit tests say (``promtool test rules``), and complete: every rule
has a severity, a summary and a description, and the thresholds match the exporter's.

``promtool`` comes with Debian's ``prometheus`` package. Without it these tests skip, unless
``RECS_REQUIRE_SERVICES=1`` (CI sets it): then they fail.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.monitoring import prometheus

FOLDER = Path(prometheus.__file__).resolve().parent
RULES = FOLDER / "alerts.rules.yml"
RULE_TESTS = FOLDER / "alerts.rules.test.yml"
INSTALL = "apt-get install -y prometheus-pushgateway prometheus"
REQUIRED = {
    "RecsListsStale",
    "RecsNightlyFailed",
    "RecsFeatureDriftAlert",
    "RecsFeatureDriftWarn",
    "RecsInputStale",
    "RecsQuarantineHigh",
    "RecsVolumeDrop",
}


def _missing(what: str) -> None:
    message = f"{what} is not installed (Debian: `{INSTALL}`)"
    if os.environ.get("RECS_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{message}; RECS_REQUIRE_SERVICES=1 forbids skipping", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool") or (
        "/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None
    )
    if found is None:
        _missing("promtool")
    return found


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def test_promtool_accepts_the_rules(promtool):
    result = _run(promtool, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_rules_pass_their_promtool_unit_tests(promtool):
    result = _run(promtool, "test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def _rules() -> list[dict]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_every_alert_has_severity_summary_and_description():
    rules = _rules()
    names = [rule["alert"] for rule in rules]  # alerting rules only, no recording rules
    assert len(names) == len(set(names))
    assert REQUIRED <= set(names)
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]


def test_the_drift_rules_name_the_feature_and_use_the_exporters_thresholds():
    rules = {rule["alert"]: rule for rule in _rules()}
    alert, warn = rules["RecsFeatureDriftAlert"], rules["RecsFeatureDriftWarn"]
    for rule in (alert, warn):
        assert "{{ $labels.feature }}" in rule["annotations"]["summary"]
        assert "recs_feature_psi" in rule["expr"]
    assert f">= {prometheus.ALERT_PSI}" in alert["expr"]
    assert f">= {prometheus.WARN_PSI} < {prometheus.ALERT_PSI}" in warn["expr"]
    assert alert["labels"]["severity"] == "critical"
    assert warn["labels"]["severity"] == "warning"


def test_the_rules_read_only_metrics_the_exporter_writes():
    exported = {
        "recs_feature_psi",
        "recs_drift_status",
        "recs_monitor_alerts",
        "recs_monitor_last_run_timestamp_seconds",
        "recs_last_success_timestamp_seconds",
        "recs_last_failure_timestamp_seconds",
        "recs_published_rows",
        "recs_published_users",
        "recs_model_version",
        prometheus.OTHER_HEALTH_GAUGE,
    }
    exported |= {name for name, _ in prometheus.HEALTH_GAUGES.values()}

    for rule in _rules():
        used = set(re.findall(r"\brecs_[a-z_]+", rule["expr"]))
        assert used and used <= exported, (rule["alert"], used - exported)
