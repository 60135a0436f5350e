"""Statistics for comparing runs: Wilson intervals for accuracies, t-intervals across seeds,
and Welch's t-test with a margin (Parameter Golf's "beats the record by at least X")."""

from __future__ import annotations

import math
from collections.abc import Sequence

from underpar.errors import ConfigError

ALTERNATIVES = ("two-sided", "greater", "less")


def _z(confidence: float) -> float:
    from scipy.stats import norm
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence}")
    return float(norm.ppf(0.5 + confidence / 2))


def mean(values: Sequence[float]) -> float:
    """The arithmetic mean; nan for no values."""
    return sum(values) / len(values) if values else math.nan


def accuracy_ci(correct: Sequence[bool | float], confidence: float = 0.95) -> dict:
    """Mean and Wilson score interval of 0/1 outcomes (fractional scores use their mean as
    the proportion): {mean, lo, hi, n}. No data gives mean nan and the interval [0, 1]."""
    n = len(correct)
    if n == 0:
        return {"mean": math.nan, "lo": 0.0, "hi": 1.0, "n": 0}
    p = sum(float(c) for c in correct) / n
    z = _z(confidence)
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At p = 0 (or 1) the bound is exactly 0 (or 1); computed, it rounds to +-1e-17.
    lo = 0.0 if p == 0 else max(0.0, center - half)
    hi = 1.0 if p == 1 else min(1.0, center + half)
    return {"mean": p, "lo": lo, "hi": hi, "n": n}


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean, sample std (ddof=1) and Student-t interval of per-seed values:
    {mean, lo, hi, n, std}; with fewer than 2 values std, lo and hi are nan."""
    from scipy.stats import t
    n = len(values)
    if n == 0:
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": 0, "std": math.nan}
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "lo": math.nan, "hi": math.nan, "n": n, "std": math.nan}
    _z(confidence)  # validates
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n, "std": std}


def welch_test(a: Sequence[float], b: Sequence[float], alternative: str = "two-sided",
               margin: float = 0.0) -> dict:
    """Welch's unequal-variance t-test of H0: mean(a) - mean(b) = margin against
    `alternative` ("greater": mean(a) - mean(b) > margin). Returns {t, df, p}; each side
    needs at least 2 values."""
    from scipy.stats import ttest_ind
    if alternative not in ALTERNATIVES:
        raise ConfigError(f"unknown alternative {alternative!r}; valid: {', '.join(ALTERNATIVES)}")
    if len(a) < 2 or len(b) < 2:
        raise ConfigError(f"welch_test needs at least 2 values per side, got {len(a)} and {len(b)}")
    shifted = [x - margin for x in a]
    result = ttest_ind(shifted, list(b), equal_var=False, alternative=alternative)
    va = sum((x - sum(a) / len(a)) ** 2 for x in a) / (len(a) - 1) / len(a)
    vb = sum((x - sum(b) / len(b)) ** 2 for x in b) / (len(b) - 1) / len(b)
    # Welch-Satterthwaite degrees of freedom (scipy only reports them in recent versions).
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if va + vb > 0 else math.nan
    return {"t": float(result.statistic), "df": float(df), "p": float(result.pvalue)}
