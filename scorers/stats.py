"""Exact tests used by the eval verdicts; every function returns plain Python floats.

All tests are exact binomial tests (scipy.stats.binomtest), so small samples get honest p-values:
- McNemar (paired MARS vs ABLATED on a binary metric) looks only at the discordant cells b, c:
  two-sided binomial on min(b, c) of b + c at p = 0.5, identical to the last digit to
  statsmodels ``mcnemar(table, exact=True)``.
- The sign test drops ties and asks whether wins beat losses (one-sided).
- Degenerate inputs (no trials) give p = 1.0: no evidence, never a spurious "significant".

Where magnitudes matter (register gaps) the Wilcoxon signed-rank test is used; intervals of
paired effects come from a seeded percentile bootstrap; a family of tests (one hypothesis over
several capabilities) is corrected with Holm; "underpowered" verdicts carry the number of units an
exact test would need for 80% power at the observed effect.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
from scipy.stats import binom, binomtest, norm, wilcoxon

Alternative = Literal["two-sided", "greater", "less"]


def _count(name: str, value: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def binom_test(k: int, n: int, p: float = 0.5, alternative: Alternative = "greater") -> float:
    """Exact binomial test p-value for k successes in n trials; 1.0 when n == 0."""
    k, n = _count("k", k), _count("n", n)
    if k > n:
        raise ValueError(f"k={k} successes cannot exceed n={n} trials")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    if n == 0:
        return 1.0
    return float(binomtest(k, n, p, alternative=alternative).pvalue)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant cells (b: only A right, c: only B right).

    min(1, 2 * P(X <= min(b, c))) with X ~ Binomial(b + c, 1/2): the same number as
    scipy's two-sided binomtest, computed the way statsmodels' `mcnemar(exact=True)` does, so the two
    agree to the last digit (binomtest's summation differs in the last bit on some tables).
    """
    b, c = _count("b", b), _count("c", c)
    return float(min(1.0, 2.0 * binom.cdf(min(b, c), b + c, 0.5)))


def sign_test(wins: int, losses: int) -> float:
    """One-sided sign test (wins > losses), ties excluded by the caller."""
    wins, losses = _count("wins", wins), _count("losses", losses)
    return binom_test(wins, wins + losses, 0.5, alternative="greater")


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact (Clopper-Pearson) 1 - alpha confidence interval for a proportion; (0, 1) when n == 0."""
    k, n = _count("k", k), _count("n", n)
    if k > n:
        raise ValueError(f"k={k} successes cannot exceed n={n} trials")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n == 0:
        return (0.0, 1.0)
    ci = binomtest(k, n).proportion_ci(confidence_level=1.0 - alpha, method="exact")
    return (float(ci.low), float(ci.high))


# ---------------------------------------------------------------- magnitudes, intervals, families, power
def wilcoxon_signed_rank(diffs: Sequence[float], alternative: Alternative = "greater") -> float:
    """Wilcoxon signed-rank p-value on paired differences (zeros dropped, scipy's exact/normal choice).

    No nonzero difference means no evidence: p = 1.0 (scipy refuses that input).
    """
    d = np.asarray(diffs, dtype=float)
    if not np.all(np.isfinite(d)):
        raise ValueError("differences must be finite numbers")
    if not np.any(d != 0):
        return 1.0
    return float(wilcoxon(d, zero_method="wilcox", alternative=alternative).pvalue)


def bootstrap_mean_ci(values: Sequence[float], seed: int, resamples: int = 2000,
                      confidence: float = 0.95) -> list[float] | None:
    """Percentile bootstrap CI of a mean; pass paired differences (A - B per unit) for a paired CI.

    Resamples whole units with `numpy.random.default_rng(seed)`, drawing exactly what
    `scipy.stats.bootstrap(..., method="percentile", paired=True)` draws, so the same seed gives
    the same interval there and here (and in every offline re-score). `[low, high]` (a list, as it
    is stored in JSON); None below two units.
    """
    v = np.asarray(values, dtype=float)
    if resamples < 1 or not 0.0 < confidence < 1.0:
        raise ValueError(f"need resamples >= 1 and confidence in (0, 1), got {resamples}, {confidence}")
    if v.size < 2:
        return None
    idx = np.random.default_rng(seed).integers(0, v.size, size=(resamples, v.size))
    means = v[idx].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.percentile(means, [100.0 * tail, 100.0 * (1.0 - tail)])
    return [float(lo), float(hi)]


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values, in input order: reject H_i at level a iff adjusted p_i < a.

    Sorted ascending, the j-th (0-based) of m gets max over k <= j of min(1, (m - k) * p_(k)).
    """
    p = [float(x) for x in pvalues]
    if any(not 0.0 <= x <= 1.0 for x in p):
        raise ValueError(f"p-values must be in [0, 1], got {p}")
    m = len(p)
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: p[i])):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def _critical(n: np.ndarray, p0: float, level: float) -> np.ndarray:
    """Smallest c with P0(X >= c) < level, per n (n + 1 where no c qualifies)."""
    c = np.asarray(binom.isf(level, n, p0), dtype=float) + 1.0  # first guess: P0(X >= c) <= level
    c = np.where(binom.sf(c - 1, n, p0) >= level, c + 1, c)
    c = np.where((c >= 1) & (binom.sf(c - 2, n, p0) < level), c - 1, c)
    return np.minimum(c, n + 1)


def binomial_power(n: int | np.ndarray, p1: float, p0: float, alpha: float,
                   alternative: Literal["greater", "two-sided"] = "greater") -> np.ndarray:
    """Power of the exact binomial test (reject when p < alpha) at true rate p1, per number of trials n.

    "two-sided" is the McNemar case (p0 = 0.5): both tails at alpha / 2, as scipy's two-sided
    binomtest is at p0 = 0.5.
    """
    n = np.asarray(n, dtype=float)
    if alternative == "greater":
        return binom.sf(_critical(n, p0, alpha) - 1, n, p1)
    if p0 != 0.5:
        raise ValueError("the two-sided power is implemented for p0 = 0.5 (McNemar) only")
    c = _critical(n, 0.5, alpha / 2.0)
    return binom.sf(c - 1, n, p1) + binom.cdf(n - c, n, p1)


def binomial_n_for_power(p1: float, p0: float, alpha: float, power: float = 0.8,
                         alternative: Literal["greater", "two-sided"] = "greater",
                         n_max: int = 100_000) -> int | None:
    """Smallest number of trials whose exact test reaches `power` at the true rate p1; None if p1 shows
    no effect in the tested direction (p1 <= p0) or more than n_max trials would be needed.
    """
    if not 0.0 <= p1 <= 1.0 or not 0.0 < p0 < 1.0 or not 0.0 < alpha < 1.0 or not 0.0 < power < 1.0:
        raise ValueError(f"bad power inputs p1={p1}, p0={p0}, alpha={alpha}, power={power}")
    if p1 <= p0:
        return None
    n = np.arange(1, n_max + 1)
    reached = np.nonzero(binomial_power(n, p1, p0, alpha, alternative) >= power)[0]
    return int(n[reached[0]]) if reached.size else None


def wilcoxon_n_for_power(diffs: Sequence[float], alpha: float, power: float = 0.8) -> int | None:
    """Noether's (1987) sample size for the one-sided signed-rank test at the observed effect.

    n = (z_{1-alpha} + z_{power})^2 / (3 (p' - 1/2)^2), with p' = P(D + D' > 0) estimated from
    every pair of distinct observed differences (ties count one half). None when p' <= 1/2.
    """
    d = np.asarray(diffs, dtype=float)
    if d.size < 2:
        return None
    i, j = np.triu_indices(d.size, k=1)
    s = d[i] + d[j]
    p_prime = float(np.mean(s > 0) + 0.5 * np.mean(s == 0))
    if p_prime <= 0.5:
        return None
    z = norm.ppf(1.0 - alpha) + norm.ppf(power)
    return int(math.ceil(z * z / (3.0 * (p_prime - 0.5) ** 2)))
