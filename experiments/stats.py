r"""Statistics of the ``compare`` report: intervals over seeds, tests against SGD, gain shares.

Every function takes per-seed values (one number per training run) and returns
plain floats; ``nan`` marks a quantity that the data cannot give (a single
seed, zero spread in both groups), ``±inf`` an unbounded interval. None of them
hides a ``nan`` in its input: it propagates.

* :func:`mean_ci`: mean and Student-t confidence interval,
  ``x̄ ± t_{(1+c)/2, n−1} · s/√n``.
* :func:`welch_test`: Welch's t-test (unequal variances) of ``mean(a) > mean(b)``,
  one-sided; the Welch–Satterthwaite degrees of freedom.
* :func:`diff_ci`: Welch interval of ``mean(a) − mean(b)``.
* :func:`gain_share`: the share of SAM's gain over SGD that a method keeps,
  ``(ā_m − ā_sgd) / (ā_sam − ā_sgd)``, with Fieller's interval for a ratio of
  two correlated estimates (they share the SGD mean).

The seeds of the different methods are treated as independent samples (Welch),
although ``compare`` gives every method the same seeds: no pairing is assumed,
which is conservative when runs of the same seed are positively correlated.
Distribution quantiles come from ``scipy.stats``.

References:
  Welch, `The generalization of "Student's" problem when several different
  population variances are involved <https://doi.org/10.2307/2332510>`_, 1947.
  Fieller, `Some problems in interval estimation
  <https://doi.org/10.1111/j.2517-6161.1954.tb00159.x>`_, 1954.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy import stats as _st


class Interval(NamedTuple):
    """An estimate with its confidence interval ``[low, high]``."""

    estimate: float
    low: float
    high: float


class WelchResult(NamedTuple):
    """Welch's one-sided test of ``mean(a) > mean(b)``."""

    t: float  # (ā − b̄) / se
    df: float  # Welch–Satterthwaite degrees of freedom
    p: float  # P(T_df ≥ t): small when a's mean is larger


def _sample(x: Sequence[float], name: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of per-seed values, got {x!r}.")
    return x


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}.")


def _mean_var(x: np.ndarray) -> tuple[float, float]:
    """Mean and variance of the mean, ``s²/n`` (``nan`` for one value)."""
    n = x.size
    return float(x.mean()), float(x.var(ddof=1) / n) if n > 1 else math.nan


def _welch_df(va: float, na: int, vb: float, nb: int) -> float:
    """Welch–Satterthwaite df of ``va + vb`` (each a variance of a mean of ``n`` values)."""
    num = (va + vb) ** 2
    den = (va**2 / (na - 1) if na > 1 else math.nan) + (vb**2 / (nb - 1) if nb > 1 else math.nan)
    return num / den if den > 0 else math.nan


def mean_ci(x: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean of ``x`` and its Student-t confidence interval (``nan`` bounds for one value).

    Example:
      >>> from experiments import stats
      >>> r = stats.mean_ci([0.90, 0.92, 0.94])
      >>> round(r.estimate, 4), round(r.high - r.estimate, 4)   # t_{0.975,2} · 0.02/√3
      (0.92, 0.0497)
    """
    _check_confidence(confidence)
    x = _sample(x, "x")
    mean, var = _mean_var(x)
    if x.size < 2:
        return Interval(mean, math.nan, math.nan)
    half = float(_st.t.ppf(0.5 + confidence / 2, x.size - 1)) * math.sqrt(var)
    return Interval(mean, mean - half, mean + half)


def welch_test(a: Sequence[float], b: Sequence[float]) -> WelchResult:
    """Welch's one-sided t-test of ``mean(a) > mean(b)``.

    Returns ``nan`` for ``t``, ``df`` and ``p`` when a group has fewer than 2
    values or both groups have zero spread (the test is then undefined: a
    reader sees ``n/a``, not a made-up p-value).

    Example:
      >>> from experiments import stats
      >>> r = stats.welch_test([0.70, 0.72, 0.71], [0.60, 0.63, 0.61])
      >>> r.p < 0.001
      True
    """
    a, b = _sample(a, "a"), _sample(b, "b")
    ma, va = _mean_var(a)
    mb, vb = _mean_var(b)
    se = math.sqrt(va + vb) if a.size > 1 and b.size > 1 else math.nan
    if not se > 0:  # nan, or both groups constant
        return WelchResult(math.nan, math.nan, math.nan)
    t = (ma - mb) / se
    df = _welch_df(va, a.size, vb, b.size)
    return WelchResult(t, df, float(_st.t.sf(t, df)))


def diff_ci(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Interval:
    """``mean(a) − mean(b)`` with its Welch confidence interval."""
    _check_confidence(confidence)
    a, b = _sample(a, "a"), _sample(b, "b")
    ma, va = _mean_var(a)
    mb, vb = _mean_var(b)
    d = ma - mb
    if a.size < 2 or b.size < 2:
        return Interval(d, math.nan, math.nan)
    if va + vb == 0:
        return Interval(d, d, d)
    q = float(_st.t.ppf(0.5 + confidence / 2, _welch_df(va, a.size, vb, b.size)))
    half = q * math.sqrt(va + vb)
    return Interval(d, d - half, d + half)


def fieller_interval(
    num: float, den: float, v_num: float, v_den: float, cov: float, q: float
) -> tuple[float, float]:
    """Fieller's interval for ``num / den`` at critical value ``q``.

    The set of ``θ`` with ``(num − θ·den)² ≤ q² · (v_num − 2θ·cov + θ²·v_den)``:
    a bounded interval when the denominator is significantly non-zero
    (``den² > q²·v_den``), otherwise unbounded, returned as ``(−inf, inf)``
    (the complement-of-an-interval case is reported as unbounded too).
    """
    a = den**2 - q**2 * v_den
    b = num * den - q**2 * cov
    c = num**2 - q**2 * v_num
    if not (math.isfinite(a) and math.isfinite(b) and math.isfinite(c)):
        return math.nan, math.nan
    if a <= 0:
        return -math.inf, math.inf
    disc = b * b - a * c
    # The point estimate num/den always satisfies the inequality, so disc >= 0 up to rounding.
    root = math.sqrt(max(disc, 0.0))
    return (b - root) / a, (b + root) / a


def gain_share(
    method: Sequence[float],
    sgd: Sequence[float],
    sam: Sequence[float],
    confidence: float = 0.95,
) -> Interval:
    """Share of SAM's gain over SGD a method keeps, with Fieller's interval.

    ``share = (m̄ − s̄gd) / (s̄am − s̄gd)``: 1 is all of SAM's gain, 0 none of it,
    negative worse than SGD. The numerator and denominator are correlated
    through the common SGD mean: ``cov = var(s̄gd)``. The critical value is
    Student's t at ``confidence`` with the smaller of the two Welch–Satterthwaite
    df. The interval is ``(−inf, inf)`` when SAM's gain is not significantly
    non-zero at that level (the share is then undefined), ``nan`` with fewer
    than 2 seeds in a group.

    Pass the SAM runs themselves (the same object) as ``method`` to get exactly
    ``(1, 1, 1)``: the numerator is then the denominator. Another method whose
    accuracies merely equal SAM's gets its share 1 with Fieller's interval.

    Example:
      >>> from experiments import stats
      >>> r = stats.gain_share([0.66, 0.67, 0.68], [0.60, 0.61, 0.62], [0.70, 0.71, 0.72])
      >>> round(r.estimate, 3)
      0.6
    """
    _check_confidence(confidence)
    m, g, s = _sample(method, "method"), _sample(sgd, "sgd"), _sample(sam, "sam")
    mm, vm = _mean_var(m)
    mg, vg = _mean_var(g)
    ms, vs = _mean_var(s)
    num, den = mm - mg, ms - mg
    share = num / den if den != 0 else math.nan
    if method is sam:
        return Interval(1.0, 1.0, 1.0)
    if min(m.size, g.size, s.size) < 2:
        return Interval(share, math.nan, math.nan)
    df = np.nanmin([_welch_df(vm, m.size, vg, g.size), _welch_df(vs, s.size, vg, g.size)])
    if not np.isfinite(df):  # every group constant: no sampling error to speak of
        return Interval(share, share, share)
    q = float(_st.t.ppf(0.5 + confidence / 2, df))
    low, high = fieller_interval(num, den, vm + vg, vs + vg, vg, q)
    return Interval(share, low, high)

