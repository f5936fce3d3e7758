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
    i.e. the holdout can tell the two recipes apart;
    with the online gate on (``gate_online``), a different recipe that passes all of this is
    not promoted yet: it waits as ``online-test`` for an experiment against the champion.
Otherwise ``rejected``. Runs for dates older than production never reach the gate
(``backfill``, decided in :mod:`pipeline.nightly`).

The online gate (:func:`decide_online`) reads an experiment that serves the champion to some
users and an ``online-test`` version to others. At the experiment's fixed horizon (both
variants reached ``planned_users_per_variant`` active users; the verdict is read once, never
by peeking) the version becomes champion (``promoted-online``) only when its engaged share
(or conversion) is significantly higher than the champion's: the two-proportion interval of
the difference lies above zero. Otherwise ``rejected-online``. Before the horizon: no
decision.
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
    online: bool = False

    def to_dict(self) -> dict:
        out = asdict(self)
        out["interval"] = list(self.interval) if self.interval is not None else None
        return out


def decide_promotion(
    challenger: float,
    champion: float | None,
    baseline: float,
    *,
    min_relative_gain: float = 0.0,
    tolerance: float = 0.001,
    force: bool = False,
    metric: str = "ndcg@10",
    same_recipe: bool = False,
    interval: tuple[float, float] | None = None,
    require_significance: bool = False,
    online: bool = False,
) -> GateDecision:
    """Apply the gate rules to holdout scores (higher is better); see the module doc."""

    def decide(promote: bool, decision: str, reason: str) -> GateDecision:
        return GateDecision(
            promote,
            decision,
            reason,
            challenger,
            champion,
            baseline,
            interval=interval,
            same_recipe=same_recipe,
            min_relative_gain=min_relative_gain,
            tolerance=tolerance,
            require_significance=require_significance,
            online=online,
        )

    if champion is None:
        return decide(True, "first", "first version of the model: no champion yet")
    needed = champion * (1.0 + min_relative_gain) - tolerance
    summary = (
        f"challenger {metric} {challenger:.4f} vs champion {champion:.4f} "
        f"(needs >= {needed:.4f} = champion x (1 + {min_relative_gain:g}) - "
        f"{tolerance:g}) and best popularity baseline {baseline:.4f}"
    )
    if interval is not None:
        summary += (
            f"; challenger - champion {challenger - champion:+.4f}, 95% paired "
            f"bootstrap interval [{interval[0]:+.4f}, {interval[1]:+.4f}]"
        )
    recipe = (
        "same recipe as the champion (training settings and model params), retrained "
        "on newer data: the champion's re-score is this model, so they tie by "
        "construction; "
        if same_recipe
        else ""
    )
    if force:
        return decide(True, "forced", f"force_promote set by the operator; {recipe}{summary}")
    if challenger <= baseline:
        return decide(
            False, "rejected", f"does not beat the popularity baseline; {recipe}{summary}"
        )
    if challenger < needed:
        return decide(False, "rejected", f"worse than the champion; {recipe}{summary}")
    if same_recipe:
        return decide(
            True, "retrained", f"{recipe}promoted by the rule as a tie, not a win; {summary}"
        )
    if require_significance and (interval is None or not interval[0] > 0):
        return decide(
            False,
            "rejected",
            "the holdout cannot tell the two recipes apart (the interval does not "
            f"lie above zero; gate_require_significance is on); {summary}",
        )
    if online:
        return decide(
            False,
            "online-test",
            "passes the offline gate; gate_online is on, so it becomes champion only "
            "when an experiment shows it significantly better than the champion "
            "online: run one with a variant serving this version beside one serving "
            f"the champion; {summary}",
        )
    return decide(True, "promoted", f"passes the gate; {summary}")


#: Decisions of the online gate (recorded in ``model_promotions``).
ONLINE_TEST, PROMOTED_ONLINE, REJECTED_ONLINE = "online-test", "promoted-online", "rejected-online"


@dataclass(frozen=True)
class OnlineDecision:
    """The online gate's verdict on one ``online-test`` version (see the module doc)."""

    decision: str | None  # promoted-online | rejected-online | None (horizon not reached)
    reason: str
    version: str
    champion_version: str | None
    metric: str
    n_challenger: int
    x_challenger: int
    n_champion: int
    x_champion: int
    diff: float
    diff_ci: tuple[float, float]
    p_value: float
    alpha: float
    planned_users: int

    @property
    def promote(self) -> bool:
        return self.decision == PROMOTED_ONLINE

    def to_dict(self) -> dict:
        out = asdict(self)
        out["diff_ci"] = list(self.diff_ci)
        return out


def decide_online(
    *,
    version: str,
    champion_version: str | None,
    metric: str,
    n_challenger: int,
    x_challenger: int,
    n_champion: int,
    x_champion: int,
    diff_ci: tuple[float, float],
    p_value: float,
    alpha: float,
    planned_users: int,
) -> OnlineDecision:
    """Read the experiment once, at its fixed horizon: promote ``version`` only when the
    ``1 - alpha`` interval of (challenger share - champion share) of ``metric`` lies above
    zero; before both variants reached ``planned_users`` active users, no decision."""
    diff = (x_challenger / n_challenger if n_challenger else float("nan")) - (
        x_champion / n_champion if n_champion else float("nan")
    )
    summary = (
        f"{metric} share v{version} {x_challenger:,}/{n_challenger:,} vs champion"
        f"{f' v{champion_version}' if champion_version else ''} "
        f"{x_champion:,}/{n_champion:,}: difference {diff:+.4f}, "
        f"{1 - alpha:.0%} interval [{diff_ci[0]:+.4f}, {diff_ci[1]:+.4f}], "
        f"p = {p_value:.3g}; horizon {planned_users:,} active users per variant"
    )

    def decide(decision: str | None, reason: str) -> OnlineDecision:
        return OnlineDecision(
            decision,
            reason,
            str(version),
            champion_version,
            metric,
            n_challenger,
            x_challenger,
            n_champion,
            x_champion,
            diff,
            (float(diff_ci[0]), float(diff_ci[1])),
            float(p_value),
            alpha,
            planned_users,
        )

    reached = min(n_challenger, n_champion)
    if reached < planned_users:
        return decide(
            None,
            f"keep running: {reached:,} of {planned_users:,} active users in "
            f"the smaller variant; {summary}",
        )
    if diff_ci[0] > 0:
        return decide(PROMOTED_ONLINE, f"online: significantly better than the champion; {summary}")
    return decide(
        REJECTED_ONLINE,
        "online: not significantly better than the champion (the "
        f"interval does not lie above zero); {summary}",
    )
