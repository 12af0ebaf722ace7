"""Exact tests used by the eval verdicts; every function returns plain Python floats.

All tests are exact binomial tests (scipy.stats.binomtest), so small samples get honest p-values:
- McNemar (paired MARS vs ABLATED on a binary metric) looks only at the discordant cells b, c:
  two-sided binomial on min(b, c) of b + c at p = 0.5, identical to
  statsmodels ``mcnemar(table, exact=True)``.
- The sign test drops ties and asks whether wins beat losses (one-sided).
- Degenerate inputs (no trials) give p = 1.0: no evidence, never a spurious "significant".
"""

from __future__ import annotations

from typing import Literal

from scipy.stats import binomtest

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
    """Two-sided exact McNemar p-value from the discordant cells (b: only A right, c: only B right)."""
    b, c = _count("b", b), _count("c", c)
    return binom_test(min(b, c), b + c, 0.5, alternative="two-sided")


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
