"""Promotion gate rules, one case each."""

from __future__ import annotations

import pytest

from pipeline.gate import decide_promotion


def test_first_version_is_promoted_without_comparison():
    decision = decide_promotion(0.01, None, 0.5)
    assert decision.promote and decision.decision == "first"


@pytest.mark.parametrize("challenger,champion,baseline,kwargs,promote,decision,words", [
    (0.20, 0.18, 0.10, {}, True, "promoted", "passes the gate"),
    (0.1795, 0.18, 0.10, {"tolerance": 0.001}, True, "promoted", "passes"),   # within tolerance
    (0.178, 0.18, 0.10, {"tolerance": 0.001}, False, "rejected", "worse than the champion"),
    (0.19, 0.18, 0.10, {"min_relative_gain": 0.1}, False, "rejected", "worse"),  # needs 0.197
    (0.20, 0.10, 0.25, {}, False, "rejected", "popularity baseline"),
    (0.05, 0.18, 0.10, {"force": True}, True, "forced", "force_promote"),
])
def test_gate_rules(challenger, champion, baseline, kwargs, promote, decision, words):
    got = decide_promotion(challenger, champion, baseline, **kwargs)
    assert (got.promote, got.decision) == (promote, decision)
    assert words in got.reason
    assert f"{challenger:.4f}" in got.reason
