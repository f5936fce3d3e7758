"""The reports: Wilson intervals (known answers), the PNGs are written, summaries read well."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.monitoring.report import (
    format_impact,
    format_summary,
    wilson_interval,
    write_impact_report,
    write_report,
)

PNG = b"\x89PNG\r\n\x1a\n"


def test_wilson_interval_known_answers():
    low, high = wilson_interval(np.array([5, 0]), np.array([10, 20]))
    assert (low[0], high[0]) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert low[1] == pytest.approx(0.0) and high[1] == pytest.approx(0.1611, abs=1e-4)
    assert np.isnan(wilson_interval(np.array([0]), np.array([0]))[0][0])


def test_the_reports_are_pngs(tmp_path):
    days = pd.to_datetime(["2024-03-01", "2024-03-02"], utc=True)
    history = pd.DataFrame(
        {
            "run_date": np.repeat(days, 2),
            "metric": ["psi", "volume_ratio"] * 2,
            "subject": ["event.device", ""] * 2,
            "value": [0.01, 1.0, 0.4, 0.9],
            "status": ["ok", "ok", "alert", "ok"],
        }
    )
    assert (
        write_report(history, tmp_path / "m.png", warn=0.1, alert=0.25, title="t").read_bytes()[:8]
        == PNG
    )
    daily = pd.DataFrame(
        {
            "day": np.repeat(days, 2),
            "variant": ["a", "b"] * 2,
            "clicks": [1, 2, 3, 4],
            "impressions": [10, 10, 10, 10],
            "converted_users": [1, 1, 0, 2],
            "users_active": [5, 5, 5, 5],
        }
    )
    assert write_impact_report(daily, tmp_path / "i.png", title="t").read_bytes()[:8] == PNG
    assert write_impact_report(daily.head(0), tmp_path / "e.png", title="t").read_bytes()[:8] == PNG


def test_summaries_name_alerts_and_comparisons():
    monitor = {
        "as_of": "2024-03-02T00:00:00+00:00",
        "current_events": 1200,
        "reference": "champion v1: [2024-02-23, 2024-03-01)",
        "reference_events": 1100,
        "top_psi": [["event.device", 0.4]],
        "health": {"volume_ratio": 0.9},
        "lists": {},
        "alerts": ["psi.event.device = 0.4"],
        "warnings": [],
        "report": "r.png",
    }
    assert "ALERT: psi.event.device = 0.4" in format_summary(monitor)
    impact = {
        "start": "2024-03-01",
        "as_of": "2024-03-15",
        "served_sets": 2,
        "events": 900,
        "variants": [
            {
                "variant": "control",
                "users_served": 100,
                "users_active": 50,
                "engaged_share": 0.2,
                "conversion": 0.1,
                "ctr": None,
            }
        ],
        "comparison": [
            {
                "metric": "engaged",
                "variant": "model",
                "control": "control",
                "diff": 0.1,
                "diff_low": 0.02,
                "diff_high": 0.18,
                "p_value_adjusted": 0.01,
                "significant": True,
                "mde": 0.08,
            }
        ],
        "srm": {"mismatch": False, "p_value": 0.5, "message": "no sample ratio mismatch"},
        "report": "i.png",
    }
    text = format_impact(impact)
    assert "control" in text and "20.0%" in text and "n/a" in text
    assert "engaged: model vs control: +0.1000" in text and "significant" in text


def test_the_impact_summary_prints_undefined_statistics_as_na():
    """No conversion in the control leaves the lift and the MDE undefined (null in the
    summary's JSON); the printed summary says n/a instead of failing the task."""
    impact = {
        "start": "2024-03-01",
        "as_of": "2024-03-15",
        "served_sets": 1,
        "events": 90,
        "variants": [],
        "report": "i.png",
        "comparison": [
            {
                "metric": "converted",
                "variant": "model",
                "control": "control",
                "diff": 0.02,
                "diff_low": -0.02,
                "diff_high": 0.07,
                "p_value_adjusted": 0.39,
                "significant": False,
                "mde": None,
                "decision": "keep running (31 of 50 users)",
            }
        ],
        "srm": {"mismatch": False, "p_value": None, "message": "too few users"},
        "sitewide": [
            {
                "variant": "holdout",
                "users": 10,
                "active_any": 0,
                "conversion_any": None,
                "revenue_per_user_any": None,
            }
        ],
        "holdout_comparison": [
            {
                "metric": "converted_any",
                "variant": "model",
                "control": "holdout",
                "diff": None,
                "diff_low": None,
                "diff_high": None,
                "p_value_adjusted": None,
                "significant": False,
            }
        ],
    }
    text = format_impact(impact)
    assert "MDE at this sample n/a" in text and "(p = n/a)" in text
    assert "converted_any: model vs holdout holdout: n/a" in text
