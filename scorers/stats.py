"""The tests and intervals behind every verdict; every function returns plain Python floats.

docs/methods.md says which test each metric uses and why; this module only computes them:
- exact binomial tests (scipy.stats.binomtest): the sign test (ties dropped), a rate against chance on
  independent units, and McNemar on the discordant cells (min(1, 2 P(X <= min(b, c))), identical to
  statsmodels ``mcnemar(table, exact=True)``);
- the one-sample t-test and t interval on per-prompt means (the cluster-aware test of a row rate when
  several rows share a prompt: Miller 2024, "Adding Error Bars to Evals", per-cluster aggregation);
- the Wilcoxon signed-rank test on paired differences (magnitudes);
- seeded percentile bootstrap intervals over independent units (prompts), of a mean or any statistic;
- Holm's step-down correction for a family of tests;
- a-priori power: the number of units an exact binomial test, a t-test or the signed-rank test needs to
  reach 80% power at a *pre-registered* effect, never at the observed one.
Degenerate inputs (no units) give p = 1.0: no evidence, never a spurious "significant".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import cache
from typing import Literal

import numpy as np
from scipy.stats import binom, binomtest, nct, norm, t, ttest_1samp, wilcoxon

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
    return bootstrap_ci(values, lambda samples: samples.mean(axis=1), seed, resamples, confidence)


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


@cache  # a function of the design alone: one evaluation per distinct design
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


def sign_counts(diffs: Sequence[float]) -> tuple[int, int]:
    """(wins, losses): units whose paired difference is positive / negative; zeros are ties, dropped."""
    d = np.asarray(diffs, dtype=float)
    return int(np.sum(d > 0)), int(np.sum(d < 0))


def sign_test_two_sided(wins: int, losses: int) -> float:
    """Two-sided sign test (ties excluded by the caller): is either side more frequent than the other?"""
    wins, losses = _count("wins", wins), _count("losses", losses)
    return binom_test(min(wins, losses), wins + losses, 0.5, alternative="two-sided") if wins + losses else 1.0


def t_test_greater(values: Sequence[float], null: float) -> float:
    """One-sided one-sample t-test p-value that the mean of `values` exceeds `null` (scipy ttest_1samp).

    Fewer than two units: 1.0. No spread at all: the units agree exactly, so p is 0.0 when they all lie
    above `null` and 1.0 otherwise (the t statistic is infinite or undefined there).
    """
    v = np.asarray(values, dtype=float)
    if v.size < 2:
        return 1.0
    if np.all(v == v[0]):
        return 0.0 if v[0] > null else 1.0
    return float(ttest_1samp(v, null, alternative="greater").pvalue)


def t_interval(values: Sequence[float], confidence: float = 0.95) -> list[float] | None:
    """Two-sided t interval of a mean over independent units; None below two units."""
    v = np.asarray(values, dtype=float)
    if v.size < 2:
        return None
    half = float(t.ppf(0.5 + confidence / 2.0, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return [float(v.mean()) - half, float(v.mean()) + half]


def rate_interval(rates: Sequence[float], confidence: float = 0.95) -> list[float] | None:
    """The t interval of a mean of per-prompt rates, cut to [0, 1] where it reaches past either end."""
    ci = t_interval(rates, confidence)
    return None if ci is None else [max(0.0, ci[0]), min(1.0, ci[1])]


def standardized_mean(values: Sequence[float]) -> float | None:
    """Cohen's d_z: mean / sample sd of the per-unit values (differences); None without spread."""
    v = np.asarray(values, dtype=float)
    if v.size < 2 or float(v.std(ddof=1)) == 0.0:
        return None
    return float(v.mean() / v.std(ddof=1))


def bootstrap_ci(values: Sequence[float], statistic: Callable[[np.ndarray], np.ndarray], seed: int,
                 resamples: int = 2000, confidence: float = 0.95) -> list[float] | None:
    """Percentile bootstrap CI of a statistic over independent units (whole prompts are resampled).

    `statistic` maps a [resamples, n] array to [resamples] values (NaN where undefined: those resamples are
    dropped). `bootstrap_mean_ci` is this with the mean. None below two units or if every resample
    is undefined.
    """
    v = np.asarray(values, dtype=float)
    if resamples < 1 or not 0.0 < confidence < 1.0:
        raise ValueError(f"need resamples >= 1 and confidence in (0, 1), got {resamples}, {confidence}")
    if v.size < 2:
        return None
    idx = np.random.default_rng(seed).integers(0, v.size, size=(resamples, v.size))
    stats = statistic(v[idx])
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return None
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.percentile(stats, [100.0 * tail, 100.0 * (1.0 - tail)])
    return [float(lo), float(hi)]


def rowwise_dz(samples: np.ndarray) -> np.ndarray:
    """d_z of each row of a [resamples, n] array (NaN where a resample has no spread)."""
    sd = samples.std(axis=1, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sd > 0, samples.mean(axis=1) / sd, np.nan)


def t_power(n: int, delta: float, sd: float, alpha: float) -> float:
    """Power of the one-sided one-sample t-test with n units at true mean shift `delta` and spread `sd`."""
    if n < 2:
        return 0.0
    df = n - 1
    return float(nct.sf(t.ppf(1.0 - alpha, df), df, delta / sd * math.sqrt(n)))


@cache
def t_n_for_power(delta: float, sd: float, alpha: float, power: float = 0.8, n_max: int = 100_000) -> int | None:
    """Smallest n whose one-sided t-test reaches `power` at a pre-registered shift `delta` (noncentral t)."""
    if delta <= 0 or sd <= 0 or not 0.0 < alpha < 1.0 or not 0.0 < power < 1.0:
        raise ValueError(f"bad power inputs delta={delta}, sd={sd}, alpha={alpha}, power={power}")
    z = norm.ppf(1.0 - alpha) + norm.ppf(power)
    n = max(2, int((z * sd / delta) ** 2))  # the normal approximation undershoots: walk up from it
    while n <= n_max and t_power(n, delta, sd, alpha) < power:
        n += 1
    return n if n <= n_max else None


def signed_rank_n_for_power(dz: float, alpha: float, power: float = 0.8) -> int | None:
    """Units the one-sided signed-rank test needs at a pre-registered d_z: the t-test's n divided by the
    signed-rank test's asymptotic relative efficiency under normal differences, 3 / pi (Lehmann 1975)."""
    n_t = t_n_for_power(dz, 1.0, alpha, power)
    return None if n_t is None else int(math.ceil(n_t * math.pi / 3.0))
