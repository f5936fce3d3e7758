"""Statistics for online A/B experiments on the recommendation lists, built not to fool us.

An experiment splits users into variants: a ``control`` (the popularity list), personalised
models, maybe a ``holdout`` (no recommendations). Per variant we count trials ``n`` (users, or
impressions) and successes ``x`` (clicks, conversions), and compare every variant with the
control. Notation: ``p_v = x_v / n_v`` and ``p_c = x_c / n_c`` are the observed rates,
``z_q = Phi^-1(q)`` is the standard normal quantile, ``alpha`` the two-sided level and
``power = 1 - beta``.

The pieces:

- :func:`two_proportion_test` -> :class:`ProportionTest`: the two-sided z test of
  ``p_v = p_c`` (pooled standard error under H0), the unpooled Wald interval of the difference,
  the relative lift with a delta-method interval on the log ratio, and the minimum detectable
  effect at the sample size reached.
- :func:`required_sample_size`, :func:`minimum_detectable_effect`, :func:`plan_experiment`
  -> :class:`ExperimentPlan`, and :func:`decide`: the *fixed horizon*. The sample size is set
  before the start and the test is read once, when both groups reached it. Reading the p value
  every day and stopping at the first ``p < alpha`` ("peeking") multiplies the chances to cross
  the line by noise alone: with 14 daily looks at an A/A test the false positive rate is about
  four times alpha instead of alpha (the unit tests simulate it).
- :func:`srm_check` -> :class:`SrmResult`: sample ratio mismatch, a chi-square goodness of fit
  of the observed split to the designed one. A mismatch means the assignment or the logging is
  broken and no comparison of the variants can be trusted.
- :func:`compare_variants`: every variant against one control, Bonferroni-corrected.

Assumption: the ``n`` trials of a group are independent Bernoulli trials. That holds when the
unit counted is the unit randomised (users); counting impressions of users randomised by user
makes the trials correlated and these standard errors too small (use the user as the unit, or
a delta-method / bootstrap on user clusters).

Only numpy, scipy and pandas; nothing from the rest of the pipeline.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd
from scipy import optimize, special, stats

logger = logging.getLogger(__name__)

#: :func:`decide` outcomes.
KEEP_RUNNING = "keep running"
SIGNIFICANT = "significant"
NOT_SIGNIFICANT = "no significant difference"

#: Default p value below which :func:`srm_check` reports a sample ratio mismatch. Stricter than
#: the tests' alpha on purpose: the check runs on every experiment, every day, and a false alarm
#: stops an experiment.
SRM_THRESHOLD = 0.001

#: The columns of :func:`compare_variants`, in order.
COMPARE_COLUMNS = (
    "variant",
    "control",
    "n_variant",
    "x_variant",
    "n_control",
    "x_control",
    "p_variant",
    "p_control",
    "diff",
    "diff_low",
    "diff_high",
    "z",
    "p_value",
    "p_value_adjusted",
    "relative_lift",
    "lift_low",
    "lift_high",
    "significant",
    "mde",
    "alpha",
    "power",
    "n_comparisons",
    "ci_level",
)

_NAN = float("nan")


# ---- helpers ------------------------------------------------------------------------------


@lru_cache(maxsize=256)
def _z(q: float) -> float:
    """The standard normal quantile ``Phi^-1(q)``."""
    return float(special.ndtri(q))


def _two_sided_p(z: float) -> float:
    """``2 * (1 - Phi(|z|)) = erfc(|z| / sqrt 2)``, without cancellation in the tail."""
    return math.erfc(abs(z) / math.sqrt(2.0)) if math.isfinite(z) else _NAN


def _check_level(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value}")
    return value


def _count(value: Any, name: str) -> int:
    """A non-negative whole count (numpy integers and integral floats accepted)."""
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a non-negative whole number, got {value!r}") from None
    if not (math.isfinite(as_float) and as_float >= 0 and as_float.is_integer()):
        raise ValueError(f"{name} must be a non-negative whole number, got {value!r}")
    return int(as_float)


# ---- the two-proportion test --------------------------------------------------------------


@dataclass(frozen=True)
class ProportionTest:
    """One variant against the control (:func:`two_proportion_test` states the formulas).

    ``diff_ci`` and ``lift_ci`` are ``(low, high)`` at level ``1 - alpha``; undefined
    quantities (a group with ``n = 0``, a lift over a zero rate, ...) are NaN and then
    ``significant`` is False.
    """

    variant: str
    control: str
    n_variant: int
    x_variant: int
    n_control: int
    x_control: int
    p_variant: float
    p_control: float
    diff: float
    diff_ci: tuple[float, float]
    z: float
    p_value: float
    relative_lift: float
    lift_ci: tuple[float, float]
    significant: bool
    mde: float
    alpha: float
    power: float = 0.8

    def to_dict(self, *, flat: bool = False) -> dict[str, Any]:
        """Plain Python values. ``flat=False``: the intervals as ``[low, high]`` lists (JSON);
        ``flat=True``: as ``diff_low``/``diff_high`` and ``lift_low``/``lift_high``."""
        out = asdict(self)
        diff_ci, lift_ci = out.pop("diff_ci"), out.pop("lift_ci")
        if flat:
            out["diff_low"], out["diff_high"] = diff_ci
            out["lift_low"], out["lift_high"] = lift_ci
        else:
            out["diff_ci"], out["lift_ci"] = list(diff_ci), list(lift_ci)
        return out


def two_proportion_test(
    x_variant: int,
    n_variant: int,
    x_control: int,
    n_control: int,
    *,
    alpha: float = 0.05,
    power: float = 0.8,
    variant: str = "B",
    control: str = "A",
) -> ProportionTest:
    """Two-sided z test of equal success rates, with intervals for the difference and the lift.

    With ``p_v = x_v / n_v``, ``p_c = x_c / n_c`` and ``z* = z_{1 - alpha/2}``:

    - ``diff = p_v - p_c``;
    - ``diff_ci = diff -+ z* * sqrt(p_v (1 - p_v) / n_v + p_c (1 - p_c) / n_c)`` (unpooled
      Wald interval; NaN when that standard error is 0, i.e. both rates are 0 or both are 1,
      rather than a zero-width interval that would claim certainty);
    - ``z = diff / sqrt(p (1 - p) (1 / n_v + 1 / n_c))`` with the pooled rate
      ``p = (x_v + x_c) / (n_v + n_c)`` (the standard error under H0: ``p_v = p_c``), and
      ``p_value = 2 (1 - Phi(|z|))``; NaN when the pooled standard error is 0;
    - ``relative_lift = p_v / p_c - 1`` (NaN when ``p_c = 0``) and ``lift_ci`` by the delta
      method on the log ratio:
      ``exp(ln(p_v / p_c) -+ z* * sqrt((1 - p_v) / x_v + (1 - p_c) / x_c)) - 1``, NaN when
      ``x_v`` or ``x_c`` is 0;
    - ``significant = p_value < alpha`` (False when the p value is NaN);
    - ``mde``: :func:`minimum_detectable_effect` at ``p_c`` and the sizes reached, at
      ``alpha`` and ``power`` (NaN when a group is empty or ``p_c`` is 0 or 1).

    Zero counts and empty groups never raise; negative counts or ``x > n`` do (ValueError).
    """
    alpha = _check_level(alpha, "alpha")
    power = _check_level(power, "power")
    x_v, n_v = _count(x_variant, "x_variant"), _count(n_variant, "n_variant")
    x_c, n_c = _count(x_control, "x_control"), _count(n_control, "n_control")
    if x_v > n_v or x_c > n_c:
        raise ValueError(f"successes exceed trials: {variant} {x_v}/{n_v}, {control} {x_c}/{n_c}")
    z_star = _z(1.0 - alpha / 2.0)
    p_v = x_v / n_v if n_v else _NAN
    p_c = x_c / n_c if n_c else _NAN
    diff = p_v - p_c

    diff_ci = (_NAN, _NAN)
    z = p_value = _NAN
    if n_v and n_c:
        se_unpooled = math.sqrt(p_v * (1.0 - p_v) / n_v + p_c * (1.0 - p_c) / n_c)
        if se_unpooled > 0:
            diff_ci = (diff - z_star * se_unpooled, diff + z_star * se_unpooled)
        pooled = (x_v + x_c) / (n_v + n_c)
        se_pooled = math.sqrt(pooled * (1.0 - pooled) * (1.0 / n_v + 1.0 / n_c))
        if se_pooled > 0:
            z = diff / se_pooled
            p_value = _two_sided_p(z)

    relative_lift = p_v / p_c - 1.0 if n_v and n_c and x_c else _NAN
    lift_ci = (_NAN, _NAN)
    if x_v and x_c:  # both > 0 implies both n > 0
        log_ratio = math.log(p_v / p_c)
        se_log = math.sqrt((1.0 - p_v) / x_v + (1.0 - p_c) / x_c)
        lift_ci = (
            math.exp(log_ratio - z_star * se_log) - 1.0,
            math.exp(log_ratio + z_star * se_log) - 1.0,
        )

    mde = _NAN
    if n_v and n_c and 0.0 < p_c < 1.0:
        mde = minimum_detectable_effect(p_c, n_c, n_v, alpha=alpha, power=power)

    return ProportionTest(
        variant=str(variant),
        control=str(control),
        n_variant=n_v,
        x_variant=x_v,
        n_control=n_c,
        x_control=x_c,
        p_variant=p_v,
        p_control=p_c,
        diff=diff,
        diff_ci=diff_ci,
        z=z,
        p_value=p_value,
        relative_lift=relative_lift,
        lift_ci=lift_ci,
        significant=bool(p_value < alpha),
        mde=mde,
        alpha=alpha,
        power=power,
    )


# ---- planning: sample size, minimum detectable effect, the fixed horizon ------------------


def _check_rates(p_baseline: float, mde_abs: float) -> tuple[float, float]:
    p1, delta = float(p_baseline), float(mde_abs)
    if not 0.0 < p1 < 1.0:
        raise ValueError(f"p_baseline must be in (0, 1), got {p1}")
    if not 0.0 < delta < 1.0 - p1:
        raise ValueError(f"mde_abs must be in (0, 1 - p_baseline) = (0, {1.0 - p1}), got {delta}")
    return p1, delta


def required_sample_size(
    p_baseline: float,
    mde_abs: float,
    *,
    alpha: float = 0.05,
    power: float = 0.8,
    ratio: float = 1.0,
) -> int:
    """Trials needed in the control group to detect ``p_baseline -> p_baseline + mde_abs``.

    The normal-approximation formula for two independent proportions, two-sided, without
    continuity correction (Fleiss, Levin & Paik, *Statistical Methods for Rates and
    Proportions*, 3rd ed., 2003, sec. 4.2; the same equation R's ``stats::power.prop.test``
    solves with its default ``strict = FALSE``). With ``p1 = p_baseline``,
    ``p2 = p1 + mde_abs``, ``k = ratio = n_variant / n_control``,
    ``p = (p1 + k p2) / (1 + k)`` and ``q = 1 - p``::

        n_control = ( z_{1-alpha/2} * sqrt(p q (1 + 1/k))
                      + z_{power}   * sqrt(p1 (1 - p1) + p2 (1 - p2) / k) )^2 / mde_abs^2

    rounded up; the variant group needs ``ceil(k * n_control)``. With ``ratio = 1`` (the
    default) it is the size of each group, e.g. 3,841 for 0.10 -> 0.12 at alpha 0.05 and
    power 0.8. The first term is the standard error under H0 (pooled rate), the second under
    H1. The size is for an increase; a decrease of the same size needs slightly fewer trials
    when ``p1 < 0.5``.
    """
    p1, delta = _check_rates(p_baseline, mde_abs)
    alpha = _check_level(alpha, "alpha")
    power = _check_level(power, "power")
    k = float(ratio)
    if not (math.isfinite(k) and k > 0):
        raise ValueError(f"ratio must be positive, got {ratio}")
    p2 = p1 + delta
    pooled = (p1 + k * p2) / (1.0 + k)
    root = _z(1.0 - alpha / 2.0) * math.sqrt(pooled * (1.0 - pooled) * (1.0 + 1.0 / k)) + _z(
        power
    ) * math.sqrt(p1 * (1.0 - p1) + p2 * (1.0 - p2) / k)
    n = root * root / (delta * delta)
    # Guard against 3841.0000000001 from rounding in the last bit.
    return int(math.ceil(n - 1e-9))


def minimum_detectable_effect(
    p_baseline: float, n_control: int, n_variant: int, *, alpha: float = 0.05, power: float = 0.8
) -> float:
    """The smallest absolute increase ``delta`` over ``p_baseline`` detected with ``power``.

    The inverse of :func:`required_sample_size`: the ``delta`` in ``(0, 1 - p_baseline)``
    solving (with ``p1 = p_baseline``, ``p2 = p1 + delta`` and the pooled
    ``p = (n_c p1 + n_v p2) / (n_c + n_v)``, ``q = 1 - p``)::

        delta = z_{1-alpha/2} * sqrt(p q (1/n_c + 1/n_v))
                + z_{power}   * sqrt(p1 (1 - p1) / n_c + p2 (1 - p2) / n_v)

    found by Brent's method (the right side is concave in ``delta``, so the root is unique).
    ``inf`` when even ``p2 = 1`` is not detectable at these sizes; ValueError for an empty
    group or ``p_baseline`` outside (0, 1).
    """
    p1 = float(p_baseline)
    if not 0.0 < p1 < 1.0:
        raise ValueError(f"p_baseline must be in (0, 1), got {p1}")
    n_c, n_v = _count(n_control, "n_control"), _count(n_variant, "n_variant")
    if not (n_c and n_v):
        raise ValueError(f"both groups need trials, got n_control={n_c}, n_variant={n_v}")
    alpha = _check_level(alpha, "alpha")
    power = _check_level(power, "power")
    z_a, z_b = _z(1.0 - alpha / 2.0), _z(power)
    inv = 1.0 / n_c + 1.0 / n_v

    def gap(delta: float) -> float:
        p2 = p1 + delta
        pooled = (n_c * p1 + n_v * p2) / (n_c + n_v)
        return (
            z_a * math.sqrt(pooled * (1.0 - pooled) * inv)
            + z_b * math.sqrt(p1 * (1.0 - p1) / n_c + p2 * (1.0 - p2) / n_v)
            - delta
        )

    high = 1.0 - p1
    if gap(high) > 0:
        return math.inf
    return float(optimize.brentq(gap, 0.0, high, xtol=1e-12, rtol=1e-12))


@dataclass(frozen=True)
class ExperimentPlan:
    """The fixed horizon, set before the experiment starts (:func:`plan_experiment`).

    ``n_per_variant`` trials in every group (control included) detect an absolute increase of
    ``mde_abs`` over ``p_baseline`` with probability ``power`` at two-sided level
    ``alpha / n_comparisons`` (Bonferroni, matching :func:`compare_variants`).
    ``planned_days`` is None when the daily traffic was not given.
    """

    p_baseline: float
    mde_abs: float
    alpha: float
    power: float
    n_per_variant: int
    planned_days: int | None = None
    n_comparisons: int = 1

    def __post_init__(self) -> None:
        _check_rates(self.p_baseline, self.mde_abs)
        _check_level(self.alpha, "alpha")
        _check_level(self.power, "power")
        if _count(self.n_per_variant, "n_per_variant") < 1:
            raise ValueError("n_per_variant must be at least 1")
        if self.planned_days is not None and _count(self.planned_days, "planned_days") < 1:
            raise ValueError("planned_days must be at least 1 (or None)")
        if _count(self.n_comparisons, "n_comparisons") < 1:
            raise ValueError("n_comparisons must be at least 1")

    @property
    def alpha_per_comparison(self) -> float:
        """``alpha / n_comparisons``: the level each variant-vs-control test is read at."""
        return self.alpha / self.n_comparisons

    def to_dict(self) -> dict[str, Any]:
        """Plain values (JSON): every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExperimentPlan:
        """The inverse of :meth:`to_dict` (``planned_days`` and ``n_comparisons`` optional)."""
        days = data.get("planned_days")
        return cls(
            p_baseline=float(data["p_baseline"]),
            mde_abs=float(data["mde_abs"]),
            alpha=float(data["alpha"]),
            power=float(data["power"]),
            n_per_variant=int(data["n_per_variant"]),
            planned_days=None if days is None else int(days),
            n_comparisons=int(data.get("n_comparisons", 1)),
        )


def plan_experiment(
    p_baseline: float,
    mde_abs: float,
    *,
    alpha: float = 0.05,
    power: float = 0.8,
    daily_traffic: int | None = None,
    n_arms: int = 2,
    n_comparisons: int | None = None,
) -> ExperimentPlan:
    """Fix the horizon before the start.

    ``n_per_variant = required_sample_size(p_baseline, mde_abs, alpha=alpha / n_comparisons,
    power=power)`` for each of the ``n_arms`` equal groups (control included);
    ``n_comparisons`` defaults to ``n_arms - 1`` (every variant against the control, read
    Bonferroni-corrected by :func:`compare_variants`). With ``daily_traffic`` (trials a day
    over all arms, split equally) ``planned_days = ceil(n_arms * n_per_variant /
    daily_traffic)``; run whole weeks if behaviour is weekly.
    """
    arms = _count(n_arms, "n_arms")
    if arms < 2:
        raise ValueError(f"an experiment needs at least 2 arms, got {arms}")
    comparisons = arms - 1 if n_comparisons is None else _count(n_comparisons, "n_comparisons")
    if comparisons < 1:
        raise ValueError("n_comparisons must be at least 1")
    alpha = _check_level(alpha, "alpha")
    n = required_sample_size(p_baseline, mde_abs, alpha=alpha / comparisons, power=power)
    days = None
    if daily_traffic is not None:
        traffic = _count(daily_traffic, "daily_traffic")
        if traffic < 1:
            raise ValueError("daily_traffic must be at least 1")
        days = math.ceil(arms * n / traffic)
    plan = ExperimentPlan(
        p_baseline=float(p_baseline),
        mde_abs=float(mde_abs),
        alpha=alpha,
        power=float(power),
        n_per_variant=n,
        planned_days=days,
        n_comparisons=comparisons,
    )
    logger.info(
        "experiment plan: %d per arm x %d arms (baseline %.4g, mde %.4g, alpha %.3g, "
        "power %.2f, %s days)",
        n,
        arms,
        plan.p_baseline,
        plan.mde_abs,
        alpha,
        plan.power,
        days,
    )
    return plan


def decide(test: ProportionTest, plan: ExperimentPlan) -> str:
    """Read a test against the fixed horizon: "keep running", "significant" or
    "no significant difference".

    While either group has fewer than ``plan.n_per_variant`` trials the answer is
    "keep running" and the p value is *not looked at*. Once both reached it, the answer is
    "significant" when ``test.p_value < plan.alpha / plan.n_comparisons`` (the level fixed
    by the plan, not the test's own ``alpha``), else "no significant difference".

    Why: a p value is calibrated for one look at a sample size fixed in advance; then
    ``P(p < alpha | no effect) = alpha``. Under no effect the running z statistic wanders like
    a random walk, and checking it every day and stopping at the first ``p < 0.05`` gives it
    many chances to cross the line: 14 daily looks at an A/A test end "significant" about 20%
    of the time, not 5% (the unit tests simulate this). Fixing the horizon at the start, and
    reading the result only there, keeps the false positive rate at alpha. Extra data after
    the horizon is harmless only if the decision is still taken once.
    """
    needed = plan.n_per_variant
    if test.n_variant < needed or test.n_control < needed:
        logger.debug(
            "%s vs %s: %d/%d and %d/%d of the planned trials, keep running",
            test.variant,
            test.control,
            test.n_variant,
            needed,
            test.n_control,
            needed,
        )
        return KEEP_RUNNING
    if test.p_value < plan.alpha_per_comparison:
        return SIGNIFICANT
    return NOT_SIGNIFICANT


# ---- sample ratio mismatch ----------------------------------------------------------------


@dataclass(frozen=True)
class SrmResult:
    """A sample ratio mismatch check (:func:`srm_check`)."""

    chi2: float
    p_value: float
    mismatch: bool
    observed: dict[str, int]
    expected: dict[str, float]
    message: str
    threshold: float = SRM_THRESHOLD

    def to_dict(self) -> dict[str, Any]:
        """Plain values (JSON)."""
        return asdict(self)


def srm_check(
    counts: Mapping[str, int],
    expected_shares: Mapping[str, float],
    *,
    threshold: float = SRM_THRESHOLD,
) -> SrmResult:
    """Chi-square goodness of fit of the observed split to the designed one.

    With ``N = sum_i o_i`` observed units and the designed shares normalised to sum to 1
    (``{"A": 1, "B": 1}`` means 50/50), ``e_i = N * s_i`` and::

        chi2 = sum_i (o_i - e_i)^2 / e_i,   p_value = P(chi2_{k-1} >= chi2)

    (``scipy.stats.chisquare``, ``k`` variants). ``mismatch = p_value < threshold``.
    A variant of the design missing from ``counts`` counts as 0 units; a variant counted but
    not in the design is a ValueError (a configuration error); a designed share of 0 with
    units observed is a mismatch (``chi2 = inf``, ``p_value = 0``). No units at all: NaN and
    no mismatch. The message names the most over- and under-represented variants (by
    ``o_i / e_i - 1``).
    """
    threshold = _check_level(threshold, "threshold")
    unknown = sorted(set(counts) - set(expected_shares))
    if unknown:
        raise ValueError(f"variants counted but not in the design: {unknown}")
    if len(expected_shares) < 2:
        raise ValueError("a split needs at least 2 variants")
    names = list(expected_shares)
    weights = np.array([float(expected_shares[v]) for v in names])
    if not (np.all(np.isfinite(weights)) and np.all(weights >= 0) and weights.sum() > 0):
        raise ValueError(
            f"expected shares must be non-negative and not all 0: {dict(expected_shares)}"
        )
    observed = {v: _count(counts.get(v, 0), f"counts[{v!r}]") for v in names}
    total = sum(observed.values())
    shares = weights / weights.sum()
    expected = {v: float(total * s) for v, s in zip(names, shares)}

    if total == 0:
        return SrmResult(
            chi2=_NAN,
            p_value=_NAN,
            mismatch=False,
            observed=observed,
            expected=expected,
            message="no units observed",
            threshold=threshold,
        )
    impossible = [v for v, s in zip(names, shares) if s == 0 and observed[v] > 0]
    if impossible:
        message = f"sample ratio mismatch: units in variants designed to get none: {impossible}"
        logger.warning(message)
        return SrmResult(
            chi2=math.inf,
            p_value=0.0,
            mismatch=True,
            observed=observed,
            expected=expected,
            message=message,
            threshold=threshold,
        )

    live = [v for v, s in zip(names, shares) if s > 0]
    obs = np.array([observed[v] for v in live], dtype=float)
    exp = np.array([expected[v] for v in live])
    if len(live) < 2:
        chi2, p_value = 0.0, 1.0
    else:
        result = stats.chisquare(obs, exp)
        chi2, p_value = float(result.statistic), float(result.pvalue)
    deviation = obs / exp - 1.0
    over, under = live[int(np.argmax(deviation))], live[int(np.argmin(deviation))]
    if deviation.max() == deviation.min():
        detail = "split exactly as designed"
    else:
        detail = (
            f"most over-represented {over} ({deviation.max():+.2%} vs expected), "
            f"most under-represented {under} ({deviation.min():+.2%})"
        )
    mismatch = bool(p_value < threshold)
    if mismatch:
        message = (
            f"sample ratio mismatch (chi2 = {chi2:.4g}, p = {p_value:.3g} < "
            f"{threshold:g}): {detail}; do not trust the comparison"
        )
        logger.warning(message)
    else:
        message = f"no sample ratio mismatch (chi2 = {chi2:.4g}, p = {p_value:.3g}): {detail}"
    return SrmResult(
        chi2=chi2,
        p_value=p_value,
        mismatch=mismatch,
        observed=observed,
        expected=expected,
        message=message,
        threshold=threshold,
    )


# ---- many variants against one control ----------------------------------------------------


def compare_variants(
    frame: pd.DataFrame, *, control: str, alpha: float = 0.05, power: float = 0.8
) -> pd.DataFrame:
    """Every variant of ``frame`` (columns ``variant``, ``n``, ``x``; one row per variant)
    against ``control``, one row per non-control variant in the frame's order
    (:data:`COMPARE_COLUMNS`).

    Multiple comparisons: **Bonferroni**. With ``m`` non-control variants,
    ``p_value_adjusted = min(1, m * p_value)`` and ``significant = p_value_adjusted < alpha``
    (equivalently ``p_value < alpha / m``), so the chance that *any* variant is declared
    different from the control when none is stays at most ``alpha``. The intervals
    (``diff_low``/``diff_high``, ``lift_low``/``lift_high``) and ``mde`` are computed at
    ``alpha / m`` too, i.e. simultaneous ``1 - alpha`` intervals at per-comparison level
    ``ci_level = 1 - alpha / m``, consistent with the adjusted decision. (Holm would be
    slightly more powerful for the decision but has no matching intervals; with the 1-3
    variants we run the difference is small.) ``p_value`` is the unadjusted p value;
    ``alpha`` is the family level passed in. With one variant nothing changes.
    """
    alpha = _check_level(alpha, "alpha")
    missing = {"variant", "n", "x"} - set(frame.columns)
    if missing:
        raise ValueError(f"frame lacks columns {sorted(missing)}")
    names = frame["variant"].astype(str)
    if names.duplicated().any():
        raise ValueError(
            f"one row per variant expected, repeated: {sorted(set(names[names.duplicated()]))}"
        )
    if control not in set(names):
        raise ValueError(f"control {control!r} not among the variants {list(names)}")
    rows = {name: (n, x) for name, n, x in zip(names, frame["n"], frame["x"])}
    n_c, x_c = rows[control]
    others = [name for name in names if name != control]
    m = len(others)
    if m == 0:
        return pd.DataFrame(columns=list(COMPARE_COLUMNS))
    level = alpha / m
    out = []
    for name in others:
        n_v, x_v = rows[name]
        test = two_proportion_test(
            x_v, n_v, x_c, n_c, alpha=level, power=power, variant=name, control=control
        )
        row = test.to_dict(flat=True)
        adjusted = min(1.0, m * test.p_value) if math.isfinite(test.p_value) else _NAN
        row.update(
            p_value_adjusted=adjusted,
            significant=bool(adjusted < alpha),
            alpha=alpha,
            n_comparisons=m,
            ci_level=1.0 - level,
        )
        out.append(row)
    result = pd.DataFrame(out, columns=list(COMPARE_COLUMNS))
    logger.info(
        "compared %d variants with %s (Bonferroni, alpha %.3g): %d significant",
        m,
        control,
        alpha,
        int(result["significant"].sum()),
    )
    return result
