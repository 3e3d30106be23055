"""experiments.stats against scipy's tests and hand-computed values."""

import math

import numpy as np
import pytest
from scipy import stats as st

from experiments import stats

A = [0.712, 0.705, 0.731, 0.698]
B = [0.652, 0.671, 0.644]


def test_mean_ci_matches_scipy_t_interval():
    x = np.asarray(A)
    lo, hi = st.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=st.sem(x))
    r = stats.mean_ci(A)
    assert r.estimate == pytest.approx(x.mean(), abs=1e-15)
    assert (r.low, r.high) == pytest.approx((lo, hi), abs=1e-12)


def test_mean_ci_hand_computed():
    # mean 0.92, s = 0.02, t_{0.975, 2} = 4.302652729911275 (tables), half width t·s/√3.
    r = stats.mean_ci([0.90, 0.92, 0.94])
    half = 4.302652729911275 * 0.02 / math.sqrt(3)
    assert (r.low, r.high) == pytest.approx((0.92 - half, 0.92 + half), abs=1e-10)


def test_mean_ci_single_value_has_no_interval():
    r = stats.mean_ci([0.5])
    assert r.estimate == 0.5 and math.isnan(r.low) and math.isnan(r.high)


def test_welch_test_matches_scipy_one_sided():
    ref = st.ttest_ind(A, B, equal_var=False, alternative="greater")
    r = stats.welch_test(A, B)
    assert r.t == pytest.approx(ref.statistic, rel=1e-12)
    assert r.p == pytest.approx(ref.pvalue, rel=1e-10)
    assert r.df == pytest.approx(ref.df, rel=1e-12)
    # The other direction is the complement.
    assert stats.welch_test(B, A).p == pytest.approx(1 - r.p, rel=1e-10)


def test_welch_test_hand_computed_df():
    # Welch–Satterthwaite by hand: (va + vb)² / (va²/(na−1) + vb²/(nb−1)), v = s²/n.
    va, vb = np.var(A, ddof=1) / 4, np.var(B, ddof=1) / 3
    df = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 2)
    assert stats.welch_test(A, B).df == pytest.approx(df, rel=1e-12)


def test_welch_test_undefined_cases_are_nan_not_made_up():
    assert math.isnan(stats.welch_test([0.7], B).p)
    assert math.isnan(stats.welch_test([0.7, 0.7], [0.6, 0.6]).p)  # zero spread in both


def test_diff_ci_matches_welch_interval_from_scipy():
    ref = st.ttest_ind(A, B, equal_var=False)
    lo, hi = ref.confidence_interval(0.95)
    r = stats.diff_ci(A, B)
    assert r.estimate == pytest.approx(np.mean(A) - np.mean(B), abs=1e-15)
    assert (r.low, r.high) == pytest.approx((lo, hi), abs=1e-12)


def _fieller_by_scan(num, den, v_num, v_den, cov, q):
    """The Fieller set by brute force: every θ on a fine grid satisfying the pivot inequality."""
    theta = np.linspace(-5, 5, 2_000_001)
    inside = (num - theta * den) ** 2 <= q**2 * (v_num - 2 * theta * cov + theta**2 * v_den)
    return theta[inside].min(), theta[inside].max(), inside[0] or inside[-1]


def test_fieller_interval_equals_the_set_found_by_scanning():
    num, den, v_num, v_den, cov, q = 0.03, 0.06, 1.2e-4, 1.5e-4, 0.6e-4, 2.5
    lo, hi = stats.fieller_interval(num, den, v_num, v_den, cov, q)
    slo, shi, touches_edge = _fieller_by_scan(num, den, v_num, v_den, cov, q)
    assert not touches_edge
    assert (lo, hi) == pytest.approx((slo, shi), abs=1e-5)


def test_fieller_interval_unbounded_when_denominator_not_significant():
    lo, hi = stats.fieller_interval(0.01, 0.01, 1e-4, 1e-4, 0.0, 2.0)
    assert lo == -math.inf and hi == math.inf


def test_gain_share_estimate_and_interval_by_hand():
    m, g, s = [0.66, 0.68, 0.67, 0.665], [0.60, 0.61, 0.62], [0.70, 0.72, 0.71]
    r = stats.gain_share(m, g, s)
    num, den = np.mean(m) - np.mean(g), np.mean(s) - np.mean(g)
    assert r.estimate == pytest.approx(num / den, rel=1e-12)
    vm, vg, vs = (np.var(x, ddof=1) / len(x) for x in (m, g, s))
    df_n = (vm + vg) ** 2 / (vm**2 / 3 + vg**2 / 2)
    df_d = (vs + vg) ** 2 / (vs**2 / 2 + vg**2 / 2)
    q = st.t.ppf(0.975, min(df_n, df_d))
    slo, shi, _ = _fieller_by_scan(num, den, vm + vg, vs + vg, vg, q)
    assert (r.low, r.high) == pytest.approx((slo, shi), abs=1e-5)
    assert r.low < r.estimate < r.high


def test_gain_share_of_sam_is_one_and_of_sgd_is_zero():
    g, s = [0.60, 0.61, 0.62], [0.70, 0.72, 0.71]
    assert tuple(stats.gain_share(s, g, s)) == (1.0, 1.0, 1.0)
    assert stats.gain_share(g, g, s).estimate == 0.0
    # A different method with SAM's accuracies: share 1, but a real (non-degenerate) interval.
    twin = stats.gain_share(list(s), g, s)
    assert twin.estimate == pytest.approx(1.0) and twin.low < 1.0 < twin.high


def test_gain_share_coverage_by_simulation():
    # Fieller's 95 % interval should cover the true share about 95 % of the time
    # (normal per-seed accuracies, 5 seeds, a clearly non-zero SAM gain).
    rng = np.random.default_rng(0)
    true_sgd, true_sam, true_m, sd, n, trials = 0.60, 0.68, 0.64, 0.01, 5, 2000
    covered = 0
    for _ in range(trials):
        g = rng.normal(true_sgd, sd, n)
        s = rng.normal(true_sam, sd, n)
        m = rng.normal(true_m, sd, n)
        r = stats.gain_share(m, g, s)
        covered += r.low <= 0.5 <= r.high
    assert 0.93 <= covered / trials <= 0.99


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="confidence"):
        stats.mean_ci([1.0, 2.0], confidence=95)
    with pytest.raises(ValueError, match="non-empty"):
        stats.welch_test([], [1.0])


def test_nan_propagates():
    assert math.isnan(stats.mean_ci([0.5, math.nan]).estimate)
