"""Promotion gate rules, one case each."""

from __future__ import annotations

import pytest

from pipeline.evaluation.gate import decide_promotion


def test_first_version_is_promoted_without_comparison():
    decision = decide_promotion(0.01, None, 0.5)
    assert decision.promote and decision.decision == "first"


@pytest.mark.parametrize(
    "challenger,champion,baseline,kwargs,promote,decision,words",
    [
        (0.20, 0.18, 0.10, {}, True, "promoted", "passes the gate"),
        (0.1795, 0.18, 0.10, {"tolerance": 0.001}, True, "promoted", "passes"),  # within tolerance
        (0.178, 0.18, 0.10, {"tolerance": 0.001}, False, "rejected", "worse than the champion"),
        (0.19, 0.18, 0.10, {"min_relative_gain": 0.1}, False, "rejected", "worse"),  # needs 0.197
        (0.20, 0.10, 0.25, {}, False, "rejected", "popularity baseline"),
        (0.05, 0.18, 0.10, {"force": True}, True, "forced", "force_promote"),
    ],
)
def test_gate_rules(challenger, champion, baseline, kwargs, promote, decision, words):
    got = decide_promotion(challenger, champion, baseline, **kwargs)
    assert (got.promote, got.decision) == (promote, decision)
    assert words in got.reason
    assert f"{challenger:.4f}" in got.reason


def test_the_same_recipe_retrained_is_recorded_as_a_tie_not_a_win():
    got = decide_promotion(0.20, 0.20, 0.10, same_recipe=True, interval=(0.0, 0.0))
    assert (got.promote, got.decision) == (True, "retrained")
    assert "same recipe" in got.reason and "tie, not a win" in got.reason
    assert "[+0.0000, +0.0000]" in got.reason
    # The documented rule still decides: with a required gain, a tie is not enough.
    got = decide_promotion(0.20, 0.20, 0.10, same_recipe=True, min_relative_gain=0.05)
    assert (got.promote, got.decision) == (False, "rejected")
    assert "same recipe" in got.reason and "worse than the champion" in got.reason
    # ... and so does the baseline.
    got = decide_promotion(0.20, 0.20, 0.25, same_recipe=True)
    assert (got.promote, got.decision) == (False, "rejected")


@pytest.mark.parametrize(
    "interval,require,promote",
    [
        ((-0.01, 0.03), False, True),  # reported, not required
        ((-0.01, 0.03), True, False),  # required: the holdout cannot tell them apart
        ((0.0, 0.03), True, False),  # touching zero is not above it
        ((0.002, 0.03), True, True),
        (None, True, False),  # nothing to show the difference is real
    ],
)
def test_significance_is_required_only_when_asked(interval, require, promote):
    got = decide_promotion(0.21, 0.20, 0.10, interval=interval, require_significance=require)
    assert got.promote is promote
    assert got.decision == ("promoted" if promote else "rejected")
    if not promote:
        assert "cannot tell the two recipes apart" in got.reason


def test_the_decision_carries_the_gate_settings_for_the_audit_row():
    got = decide_promotion(
        0.21,
        0.20,
        0.10,
        min_relative_gain=0.02,
        tolerance=0.005,
        interval=(-0.01, 0.03),
        require_significance=True,
    )
    row = got.to_dict()
    assert row["min_relative_gain"] == 0.02 and row["tolerance"] == 0.005
    assert row["require_significance"] is True and row["interval"] == [-0.01, 0.03]
    assert "champion x (1 + 0.02) - 0.005" in got.reason


# --- online gate ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,promote,decision",
    [
        ({}, False, "online-test"),  # a different recipe waits for the test
        ({"same_recipe": True}, True, "retrained"),  # a retrain on newer data is not a test
        ({"force": True}, True, "forced"),
    ],
)
def test_the_online_gate_holds_back_only_a_new_recipe(kwargs, promote, decision):
    got = decide_promotion(0.20, 0.18, 0.10, online=True, **kwargs)
    assert (got.promote, got.decision, got.online) == (promote, decision, True)
    if decision == "online-test":
        assert "experiment" in got.reason and "gate_online" in got.reason


def test_the_online_gate_does_not_save_a_version_that_fails_offline():
    got = decide_promotion(0.17, 0.18, 0.10, online=True)
    assert (got.promote, got.decision) == (False, "rejected")
    assert decide_promotion(0.20, None, 0.10, online=True).decision == "first"


def _online(**kwargs):
    from pipeline.evaluation.gate import decide_online

    args = {
        "version": "7",
        "champion_version": "6",
        "metric": "engaged",
        "n_challenger": 1000,
        "x_challenger": 330,
        "n_champion": 1000,
        "x_champion": 300,
        "diff_ci": (0.0, 0.05),
        "p_value": 0.04,
        "alpha": 0.05,
        "planned_users": 1000,
    }
    return decide_online(**{**args, **kwargs})


def test_online_verdict_waits_for_the_fixed_horizon():
    got = _online(n_champion=999, diff_ci=(0.2, 0.3))
    assert got.decision is None and not got.promote
    assert got.reason.startswith("keep running: 999 of 1,000")


@pytest.mark.parametrize(
    "low,decision",
    [(0.0005, "promoted-online"), (0.0, "rejected-online"), (-0.01, "rejected-online")],
)
def test_online_verdict_promotes_only_when_the_interval_lies_above_zero(low, decision):
    got = _online(diff_ci=(low, 0.05))
    assert got.decision == decision and got.promote == (decision == "promoted-online")
    assert abs(got.diff - 0.03) < 1e-12  # 330/1000 - 300/1000
    assert "v7 330/1,000 vs champion v6 300/1,000" in got.reason
    assert got.to_dict()["diff_ci"] == [low, 0.05]
