"""The promotion gate: does the challenger replace the champion?

Pure decision logic, so every rule has a test. The challenger becomes champion when
- there is no champion yet, or
- an operator forces it (``force_promote``), or
- its nDCG@10 beats the best popularity baseline on the same holdout AND it is at least as
  good as the champion re-scored on that same holdout:
  ``challenger >= champion * (1 + min_relative_gain) - tolerance``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class GateDecision:
    """What the gate decided, and why, in words an operator can act on."""

    promote: bool
    decision: str  # promoted | forced | rejected | first
    reason: str
    challenger: float
    champion: float | None
    baseline: float

    def to_dict(self) -> dict:
        return asdict(self)


def decide_promotion(challenger: float, champion: float | None, baseline: float, *,
                     min_relative_gain: float = 0.0, tolerance: float = 0.001,
                     force: bool = False, metric: str = "ndcg@10") -> GateDecision:
    """Apply the gate rules to holdout scores (higher is better)."""
    scores = {"challenger": challenger, "champion": champion, "baseline": baseline}
    if champion is None:
        return GateDecision(True, "first", "first version of the model: no champion yet",
                            **scores)
    needed = champion * (1.0 + min_relative_gain) - tolerance
    summary = (f"challenger {metric} {challenger:.4f} vs champion {champion:.4f} "
               f"(needs >= {needed:.4f}) and best popularity baseline {baseline:.4f}")
    if force:
        return GateDecision(True, "forced", f"force_promote set by the operator; {summary}",
                            **scores)
    if challenger <= baseline:
        return GateDecision(False, "rejected",
                            f"does not beat the popularity baseline; {summary}", **scores)
    if challenger < needed:
        return GateDecision(False, "rejected", f"worse than the champion; {summary}", **scores)
    return GateDecision(True, "promoted", f"passes the gate; {summary}", **scores)
