"""A/B statistics: known answers worked out from the formulas by hand (with ``math``, never by
calling the function under test), published sample sizes, round trips, the edge cases of empty
groups and zero counts, and seeded simulations that measure the false positive rate, the cost
of peeking and the power at the planned sample size."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from pipeline.monitoring.abstats import (
    COMPARE_COLUMNS,
    KEEP_RUNNING,
    NOT_SIGNIFICANT,
    SIGNIFICANT,
    ExperimentPlan,
    ProportionTest,
    compare_variants,
    decide,
    minimum_detectable_effect,
    plan_experiment,
    required_sample_size,
    srm_check,
    two_proportion_test,
)

Z975 = stats.norm.ppf(0.975)  # 1.959963984540054
Z80 = stats.norm.ppf(0.80)  # 0.8416212335729143


def _fleiss_n(p1: float, p2: float, alpha: float, power: float, k: float = 1.0) -> float:
    """Fleiss, Levin & Paik (2003) sec. 4.2 without continuity correction, written out here
    independently of the module: control-group n for n_variant = k * n_control."""
    pbar = (p1 + k * p2) / (1 + k)
    za, zb = stats.norm.ppf(1 - alpha / 2), stats.norm.ppf(power)
    root = za * math.sqrt(pbar * (1 - pbar) * (1 + 1 / k)) + zb * math.sqrt(
        p1 * (1 - p1) + p2 * (1 - p2) / k
    )
    return root**2 / (p2 - p1) ** 2


# ---- two_proportion_test: a textbook example by hand ---------------------------------------


def test_two_proportion_test_known_answer():
    # Variant 250/1000 vs control 200/1000.
    p_v, p_c = 0.25, 0.20
    pooled = (250 + 200) / 2000  # 0.225
    se0 = math.sqrt(pooled * (1 - pooled) * (2 / 1000))  # sqrt(0.225 * 0.775 * 0.002)
    z = (p_v - p_c) / se0  # 2.67740 (not 2.689: that is a typo)
    p_value = 2 * stats.norm.sf(abs(z))  # 0.0074196
    assert pooled == pytest.approx(0.225)
    assert z == pytest.approx(2.677398, abs=1e-6)
    assert p_value == pytest.approx(0.0074196, abs=1e-7)

    se1 = math.sqrt(p_v * (1 - p_v) / 1000 + p_c * (1 - p_c) / 1000)  # unpooled Wald
    se_log = math.sqrt((1 - p_v) / 250 + (1 - p_c) / 200)  # sqrt(0.007)
    t = two_proportion_test(250, 1000, 200, 1000, variant="B", control="A")

    assert isinstance(t, ProportionTest)
    assert (t.variant, t.control) == ("B", "A")
    assert (t.n_variant, t.x_variant, t.n_control, t.x_control) == (1000, 250, 1000, 200)
    assert t.p_variant == pytest.approx(0.25) and t.p_control == pytest.approx(0.20)
    assert t.diff == pytest.approx(0.05)
    assert t.z == pytest.approx(z, rel=1e-12)
    assert t.p_value == pytest.approx(p_value, rel=1e-9)
    assert t.diff_ci[0] == pytest.approx(0.05 - Z975 * se1, rel=1e-12)
    assert t.diff_ci[1] == pytest.approx(0.05 + Z975 * se1, rel=1e-12)
    assert t.diff_ci == pytest.approx((0.013464, 0.086536), abs=1e-6)
    assert t.relative_lift == pytest.approx(0.25)
    assert t.lift_ci[0] == pytest.approx(math.exp(math.log(1.25) - Z975 * se_log) - 1, rel=1e-12)
    assert t.lift_ci[1] == pytest.approx(math.exp(math.log(1.25) + Z975 * se_log) - 1, rel=1e-12)
    assert t.lift_ci == pytest.approx((0.060946, 0.472742), abs=1e-6)
    assert t.significant is True
    assert t.alpha == 0.05
    # The MDE at 1000 per group is the delta whose required size is 1000.
    assert required_sample_size(0.20, t.mde) == pytest.approx(1000, abs=1)


def test_two_proportion_test_alpha_and_symmetry():
    strict = two_proportion_test(250, 1000, 200, 1000, alpha=0.001)
    assert strict.significant is False  # p = 0.0074
    assert strict.diff_ci[0] < 0 < strict.diff_ci[1]  # 99.9% interval covers 0
    swapped = two_proportion_test(200, 1000, 250, 1000)
    assert swapped.z == pytest.approx(-two_proportion_test(250, 1000, 200, 1000).z)
    assert swapped.p_value == pytest.approx(0.0074196, abs=1e-7)


def test_two_proportion_test_to_dict():
    t = two_proportion_test(250, 1000, 200, 1000)
    nested = t.to_dict()
    assert nested["diff_ci"] == list(t.diff_ci) and nested["lift_ci"] == list(t.lift_ci)
    json.dumps(nested)
    flat = t.to_dict(flat=True)
    assert (flat["diff_low"], flat["diff_high"]) == t.diff_ci
    assert (flat["lift_low"], flat["lift_high"]) == t.lift_ci
    assert "diff_ci" not in flat


# ---- zero counts and empty groups ----------------------------------------------------------


@pytest.mark.parametrize(
    "x_v, n_v, x_c, n_c",
    [
        (0, 0, 0, 0),  # nothing at all
        (0, 0, 10, 100),  # empty variant
        (10, 100, 0, 0),  # empty control
        (0, 100, 0, 100),  # no successes anywhere: pooled se 0
        (100, 100, 50, 50),  # all successes everywhere: pooled se 0
    ],
)
def test_degenerate_inputs_give_nan_not_exceptions(x_v, n_v, x_c, n_c):
    t = two_proportion_test(x_v, n_v, x_c, n_c)
    assert math.isnan(t.z) and math.isnan(t.p_value)
    assert all(math.isnan(v) for v in t.diff_ci)
    assert t.significant is False
    json.dumps(t.to_dict())


def test_zero_successes_in_one_group():
    t = two_proportion_test(0, 100, 5, 100)
    pooled = 5 / 200
    z = -0.05 / math.sqrt(pooled * (1 - pooled) * 0.02)
    assert t.z == pytest.approx(z) and t.p_value == pytest.approx(2 * stats.norm.sf(abs(z)))
    assert t.relative_lift == pytest.approx(-1.0)
    assert all(math.isnan(v) for v in t.lift_ci)  # log ratio undefined with x_v = 0
    assert not math.isnan(t.diff_ci[0])
    t = two_proportion_test(5, 100, 0, 100)
    assert math.isnan(t.relative_lift) and all(math.isnan(v) for v in t.lift_ci)
    assert math.isnan(t.mde)  # control rate 0: no baseline to plan on


@pytest.mark.parametrize("args", [(-1, 10, 1, 10), (11, 10, 1, 10), (1, 10, 1.5, 10)])
def test_invalid_counts_raise(args):
    with pytest.raises(ValueError):
        two_proportion_test(*args)


# ---- planning ------------------------------------------------------------------------------


def test_required_sample_size_published_values():
    # Fleiss, Levin & Paik (2003) two-sided, without continuity correction: 3840.8 -> 3841 per
    # group for 0.10 -> 0.12 at alpha 0.05, power 0.8 (the classic ~3,841; other variants of
    # the formula give 3,839-3,843).
    assert _fleiss_n(0.10, 0.12, 0.05, 0.8) == pytest.approx(3840.8, abs=0.1)
    n = required_sample_size(0.10, 0.02)
    assert n == 3841
    assert 3839 <= n <= 3843
    # R's stats::power.prop.test documents p1 = .50, p2 = .75, power = .90 => n = 76.7 (the
    # same formula, strict = FALSE).
    assert required_sample_size(0.50, 0.25, power=0.9) == 77
    assert _fleiss_n(0.50, 0.25 + 0.50, 0.05, 0.9) == pytest.approx(76.7, abs=0.05)


def test_required_sample_size_unequal_groups():
    n = required_sample_size(0.10, 0.02, ratio=2.0)
    assert n == math.ceil(_fleiss_n(0.10, 0.12, 0.05, 0.8, k=2.0))
    assert n < 3841 < 2 * n  # a bigger variant group needs a smaller control group


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(p_baseline=0.0, mde_abs=0.01),
        dict(p_baseline=0.1, mde_abs=0.0),
        dict(p_baseline=0.95, mde_abs=0.06),
        dict(p_baseline=0.1, mde_abs=0.01, alpha=1.0),
        dict(p_baseline=0.1, mde_abs=0.01, ratio=0.0),
    ],
)
def test_required_sample_size_rejects_bad_inputs(kwargs):
    with pytest.raises(ValueError):
        required_sample_size(**kwargs)


@pytest.mark.parametrize("p, mde", [(0.05, 0.01), (0.10, 0.02), (0.30, 0.05), (0.02, 0.002)])
def test_mde_round_trip(p, mde):
    n = required_sample_size(p, mde)
    back = minimum_detectable_effect(p, n, n)
    assert back <= mde and back == pytest.approx(mde, rel=0.01)
    assert required_sample_size(p, back) == pytest.approx(n, rel=0.01)
    # unequal groups: n_variant = 3 n_control
    n_c = required_sample_size(p, mde, ratio=3.0)
    assert minimum_detectable_effect(p, n_c, 3 * n_c) == pytest.approx(mde, rel=0.01)


def test_mde_published_power():
    # R's stats::power.prop.test documents n = 50, p1 = .50, p2 = .75 => power = 0.740.
    assert minimum_detectable_effect(0.5, 50, 50, power=0.740) == pytest.approx(0.25, abs=2e-3)
    assert minimum_detectable_effect(0.5, 1, 1) == math.inf  # nothing detectable
    with pytest.raises(ValueError):
        minimum_detectable_effect(0.5, 0, 10)


def test_plan_experiment_and_json_round_trip():
    plan = plan_experiment(0.05, 0.01, daily_traffic=2000)
    assert plan.n_per_variant == required_sample_size(0.05, 0.01)
    assert plan.planned_days == math.ceil(2 * plan.n_per_variant / 2000)
    assert plan.n_comparisons == 1
    again = ExperimentPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan
    assert (
        ExperimentPlan.from_dict(
            {"p_baseline": 0.05, "mde_abs": 0.01, "alpha": 0.05, "power": 0.8, "n_per_variant": 10}
        ).planned_days
        is None
    )
    three = plan_experiment(0.05, 0.01, n_arms=3)  # 2 comparisons, Bonferroni at 0.025
    assert three.n_comparisons == 2 and three.alpha == 0.05
    assert three.n_per_variant == required_sample_size(0.05, 0.01, alpha=0.025)
    assert three.n_per_variant > plan.n_per_variant


def test_decide_waits_for_both_groups():
    plan = ExperimentPlan(p_baseline=0.2, mde_abs=0.05, alpha=0.05, power=0.8, n_per_variant=1000)
    # Hugely significant but early: keep running, the p value is not looked at.
    assert decide(two_proportion_test(400, 999, 200, 1000), plan) == KEEP_RUNNING
    assert decide(two_proportion_test(400, 1000, 200, 999), plan) == KEEP_RUNNING
    assert decide(two_proportion_test(250, 1000, 200, 1000), plan) == SIGNIFICANT
    assert decide(two_proportion_test(205, 1000, 200, 1000), plan) == NOT_SIGNIFICANT
    assert decide(two_proportion_test(0, 1000, 0, 1000), plan) == NOT_SIGNIFICANT  # NaN p
    # The plan's level rules: p = 0.0074 is not below 0.05 / 10.
    strict = ExperimentPlan(
        p_baseline=0.2, mde_abs=0.05, alpha=0.05, power=0.8, n_per_variant=1000, n_comparisons=10
    )
    assert decide(two_proportion_test(250, 1000, 200, 1000), strict) == NOT_SIGNIFICANT


# ---- sample ratio mismatch -----------------------------------------------------------------


def test_srm_balanced_split_is_fine():
    r = srm_check({"A": 5000, "B": 5000}, {"A": 0.5, "B": 0.5})
    assert r.chi2 == 0.0 and r.p_value == pytest.approx(1.0)
    assert r.mismatch is False
    assert r.expected == {"A": 5000.0, "B": 5000.0}


def test_srm_known_answer():
    # chi2 = 200^2 / 5000 + 200^2 / 5000 = 16 exactly; 1 df: p = P(|N(0,1)| > 4).
    r = srm_check({"A": 5200, "B": 4800}, {"A": 0.5, "B": 0.5})
    assert r.chi2 == pytest.approx(16.0, abs=1e-12)
    assert r.p_value == pytest.approx(math.erfc(4 / math.sqrt(2)), rel=1e-9)  # 6.33e-5
    assert r.mismatch is True
    assert "over-represented A" in r.message and "under-represented B" in r.message
    json.dumps(r.to_dict())


def test_srm_shares_as_weights_missing_and_unknown_variants():
    # 2:1:1 design; C never logged -> counts as 0 users -> mismatch naming C.
    r = srm_check({"control": 500, "B": 250}, {"control": 2, "B": 1, "C": 1})
    assert r.observed == {"control": 500, "B": 250, "C": 0}
    assert r.expected == {"control": 375.0, "B": 187.5, "C": 187.5}
    assert r.chi2 == pytest.approx(125**2 / 375 + 62.5**2 / 187.5 + 187.5)
    assert r.mismatch and "under-represented C" in r.message
    with pytest.raises(ValueError):
        srm_check({"A": 1, "Z": 1}, {"A": 0.5, "B": 0.5})
    r = srm_check({"A": 10, "B": 10, "holdout": 3}, {"A": 0.5, "B": 0.5, "holdout": 0.0})
    assert r.mismatch and r.chi2 == math.inf
    r = srm_check({"A": 0, "B": 0}, {"A": 0.5, "B": 0.5})
    assert math.isnan(r.p_value) and r.mismatch is False


# ---- many variants -------------------------------------------------------------------------


def test_compare_variants_bonferroni():
    frame = pd.DataFrame(
        {"variant": ["control", "B", "C"], "n": [1000, 1000, 1000], "x": [200, 240, 250]}
    )
    out = compare_variants(frame, control="control")
    assert tuple(out.columns) == COMPARE_COLUMNS
    assert list(out["variant"]) == ["B", "C"] and set(out["control"]) == {"control"}
    for _, row in out.iterrows():
        plain = two_proportion_test(row["x_variant"], 1000, 200, 1000)
        assert row["p_value"] == pytest.approx(plain.p_value)
        assert row["p_value_adjusted"] == pytest.approx(min(1.0, 2 * plain.p_value))
        # simultaneous intervals at 1 - 0.05 / 2
        at_half = two_proportion_test(row["x_variant"], 1000, 200, 1000, alpha=0.025)
        assert (row["diff_low"], row["diff_high"]) == pytest.approx(at_half.diff_ci)
        assert (row["lift_low"], row["lift_high"]) == pytest.approx(at_half.lift_ci)
        assert row["ci_level"] == pytest.approx(0.975) and row["n_comparisons"] == 2
    b, c = out.iloc[0], out.iloc[1]
    assert b["p_value"] < 0.05 and b["p_value_adjusted"] > 0.05  # p = 0.031, 0.062 adjusted
    assert not b["significant"]
    assert c["significant"] and c["p_value_adjusted"] == pytest.approx(2 * 0.0074196, rel=1e-4)


def test_compare_variants_single_variant_and_errors():
    frame = pd.DataFrame({"variant": ["A", "B"], "n": [1000, 1000], "x": [200, 250]})
    row = compare_variants(frame, control="A").iloc[0]
    plain = two_proportion_test(250, 1000, 200, 1000)
    assert row["p_value_adjusted"] == pytest.approx(plain.p_value)
    assert (row["diff_low"], row["diff_high"]) == pytest.approx(plain.diff_ci)
    assert compare_variants(frame[frame.variant == "A"], control="A").empty
    with pytest.raises(ValueError):
        compare_variants(frame, control="Z")
    with pytest.raises(ValueError):
        compare_variants(pd.concat([frame, frame]), control="A")
    empty = pd.DataFrame({"variant": ["A", "B", "holdout"], "n": [100, 0, 100], "x": [0, 0, 0]})
    out = compare_variants(empty, control="A")  # no exception
    assert out["p_value_adjusted"].isna().all() and not out["significant"].any()


# ---- simulations (seeded) ------------------------------------------------------------------

N_SIM = 2000
N_AA = 4000
P_AA = 0.05
DAYS = 14
#: 3 standard errors of a proportion 0.05 estimated over 2,000 trials:
#: 3 * sqrt(0.05 * 0.95 / 2000) = 0.0146.
TOLERANCE = 0.015


@pytest.fixture(scope="module")
def aa_cumulative():
    """2,000 A/A experiments (p = 0.05 in both arms), 4,000 users per arm arriving over 14
    days; cumulative (n, x_variant, x_control) per day, shape (N_SIM, DAYS)."""
    rng = np.random.default_rng(20240611)
    daily_n = np.diff(np.round(np.linspace(0, N_AA, DAYS + 1)).astype(int))
    x_v = rng.binomial(daily_n, P_AA, size=(N_SIM, DAYS)).cumsum(axis=1)
    x_c = rng.binomial(daily_n, P_AA, size=(N_SIM, DAYS)).cumsum(axis=1)
    return daily_n.cumsum(), x_v, x_c


def test_aa_false_positive_rate_is_alpha(aa_cumulative):
    n, x_v, x_c = aa_cumulative
    assert n[-1] == N_AA
    hits = [
        two_proportion_test(x_v[i, -1], N_AA, x_c[i, -1], N_AA).significant for i in range(N_SIM)
    ]
    rate = float(np.mean(hits))
    assert abs(rate - 0.05) <= TOLERANCE, rate


def test_peeking_inflates_false_positives_fixed_horizon_does_not(aa_cumulative):
    n, x_v, x_c = aa_cumulative
    plan = ExperimentPlan(
        p_baseline=P_AA,
        mde_abs=minimum_detectable_effect(P_AA, N_AA, N_AA),
        alpha=0.05,
        power=0.8,
        n_per_variant=N_AA,
        planned_days=DAYS,
    )
    peeked = fixed = 0
    for i in range(N_SIM):
        stopped = False
        verdict = KEEP_RUNNING
        for day in range(DAYS):
            test = two_proportion_test(x_v[i, day], n[day], x_c[i, day], n[day])
            if not stopped and test.p_value < 0.05:  # peek daily, stop at first p < 0.05
                stopped = True
            verdict = decide(test, plan)
            if day < DAYS - 1:
                assert verdict == KEEP_RUNNING
        peeked += stopped
        fixed += verdict == SIGNIFICANT
    peek_rate, fixed_rate = peeked / N_SIM, fixed / N_SIM
    assert peek_rate > 0.1, peek_rate  # about 0.2 with 14 looks
    assert abs(fixed_rate - 0.05) <= TOLERANCE, fixed_rate


def test_power_at_planned_sample_size():
    # 20% relative lift on 0.05 -> 0.06, planned for mde 0.01 at alpha 0.05, power 0.8.
    plan = plan_experiment(0.05, 0.01)
    n = plan.n_per_variant
    rng = np.random.default_rng(7)
    x_c = rng.binomial(n, 0.05, size=N_SIM)
    x_v = rng.binomial(n, 0.06, size=N_SIM)
    verdicts = [decide(two_proportion_test(v, n, c, n), plan) for v, c in zip(x_v, x_c)]
    power = verdicts.count(SIGNIFICANT) / N_SIM
    # the standard error of the estimate is sqrt(0.8 * 0.2 / 2000) = 0.009
    assert 0.7 <= power <= 0.9, power
