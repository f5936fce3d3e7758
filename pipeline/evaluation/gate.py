"""The promotion gate: does the challenger replace the champion?

Pure decision logic, so every rule has a test. The challenger becomes champion when
- there is no champion yet (``first``), or
- an operator forces it (``forced``), or
- its nDCG@10 beats the best popularity baseline on the same holdout AND it is at least as
  good as the champion re-scored on that same holdout:
  ``challenger >= champion * (1 + min_relative_gain) - tolerance``; then
  - ``retrained`` when its recipe (training settings and model params) is the champion's:
    the champion's re-score *is* this model, so the two tie by construction. The rule decides,
    and the audit says it was a retrain on newer data, not a win;
  - ``promoted`` for a different recipe; with ``require_significance``, only when the paired
    bootstrap interval of challenger minus champion (over the holdout's users) lies above zero,
    i.e. the holdout can tell the two recipes apart.
Otherwise ``rejected``. Runs for dates older than production never reach the gate
(``backfill``, decided in :mod:`pipeline.nightly`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class GateDecision:
    """What the gate decided, and why, in words an operator can act on."""

    promote: bool
    decision: str  # first | promoted | retrained | forced | rejected | backfill
    reason: str
    challenger: float
    champion: float | None
    baseline: float
    #: Paired bootstrap interval (95%) of challenger minus champion over the holdout's users.
    interval: tuple[float, float] | None = None
    same_recipe: bool = False
    #: The gate's settings, so the audit row says which rule decided.
    min_relative_gain: float = 0.0
    tolerance: float = 0.001
    require_significance: bool = False

    def to_dict(self) -> dict:
        out = asdict(self)
        out["interval"] = list(self.interval) if self.interval is not None else None
        return out


def decide_promotion(challenger: float, champion: float | None, baseline: float, *,
                     min_relative_gain: float = 0.0, tolerance: float = 0.001,
                     force: bool = False, metric: str = "ndcg@10", same_recipe: bool = False,
                     interval: tuple[float, float] | None = None,
                     require_significance: bool = False) -> GateDecision:
    """Apply the gate rules to holdout scores (higher is better); see the module doc."""

    def decide(promote: bool, decision: str, reason: str) -> GateDecision:
        return GateDecision(promote, decision, reason, challenger, champion, baseline,
                            interval=interval, same_recipe=same_recipe,
                            min_relative_gain=min_relative_gain, tolerance=tolerance,
                            require_significance=require_significance)

    if champion is None:
        return decide(True, "first", "first version of the model: no champion yet")
    needed = champion * (1.0 + min_relative_gain) - tolerance
    summary = (f"challenger {metric} {challenger:.4f} vs champion {champion:.4f} "
               f"(needs >= {needed:.4f} = champion x (1 + {min_relative_gain:g}) - "
               f"{tolerance:g}) and best popularity baseline {baseline:.4f}")
    if interval is not None:
        summary += (f"; challenger - champion {challenger - champion:+.4f}, 95% paired "
                    f"bootstrap interval [{interval[0]:+.4f}, {interval[1]:+.4f}]")
    recipe = ("same recipe as the champion (training settings and model params), retrained "
              "on newer data: the champion's re-score is this model, so they tie by "
              "construction; " if same_recipe else "")
    if force:
        return decide(True, "forced", f"force_promote set by the operator; {recipe}{summary}")
    if challenger <= baseline:
        return decide(False, "rejected",
                      f"does not beat the popularity baseline; {recipe}{summary}")
    if challenger < needed:
        return decide(False, "rejected", f"worse than the champion; {recipe}{summary}")
    if same_recipe:
        return decide(True, "retrained",
                      f"{recipe}promoted by the rule as a tie, not a win; {summary}")
    if require_significance and (interval is None or not interval[0] > 0):
        return decide(False, "rejected",
                      "the holdout cannot tell the two recipes apart (the interval does not "
                      f"lie above zero; gate_require_significance is on); {summary}")
    return decide(True, "promoted", f"passes the gate; {summary}")
