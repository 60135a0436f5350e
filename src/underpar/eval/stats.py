"""Statistics for comparing runs: Wilson intervals for accuracies, t-intervals across seeds,
Welch's t-test with a margin (Parameter Golf's "beats the record by at least X"), and the
challenge's verdict on two groups of seeds. Pure Python (Student's t from the regularized
incomplete beta function), so the golf install needs no scipy; tests check it against scipy."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from underpar.errors import ConfigError

ALTERNATIVES = ("two-sided", "greater", "less")


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence}")
    return statistics.NormalDist().inv_cdf(0.5 + confidence / 2)


def _betainc(a: float, b: float, x: float, y: float | None = None) -> float:
    """The regularized incomplete beta function I_x(a, b); `y` = 1 - x when the caller has it
    more precisely than 1 - x. By its continued fraction (modified Lentz method), using
    I_x(a, b) = 1 - I_y(b, a) where that converges faster."""
    y = 1.0 - x if y is None else y
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _beta_fraction(b, a, y, x)
    return _beta_fraction(a, b, x, y)


def _beta_fraction(a: float, b: float, x: float, y: float) -> float:
    log_front = a * math.log(x) + b * math.log(y) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    tiny = 1e-300
    f, c, d = 1.0, 1.0, 0.0
    for j in range(1, 2000):
        m = j // 2
        if j % 2:  # odd terms d_(2m+1)
            coef = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:  # even terms d_(2m)
            coef = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + coef * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + coef / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) / (a * f)


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with `df` degrees of freedom (df may be fractional)."""
    if math.isnan(t) or math.isnan(df) or df <= 0:
        return math.nan
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    # x = df / (df + t^2) and 1 - x, each without cancellation (t near 0 keeps its precision).
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t), t * t / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def t_cdf(t: float, df: float) -> float:
    """P(T <= t)."""
    return t_sf(-t, df)


def t_ppf(q: float, df: float) -> float:
    """The t with P(T <= t) = q (bisection on the CDF, to about 1e-12)."""
    if not 0 < q < 1:
        raise ConfigError(f"quantile must be in (0, 1), got {q}")
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > q:
        lo *= 2
    while t_cdf(hi, df) < q:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(1.0, abs(mid)):
            break
    return 0.5 * (lo + hi)


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
    n = len(values)
    if n == 0:
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": 0, "std": math.nan}
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "lo": math.nan, "hi": math.nan, "n": n, "std": math.nan}
    _z(confidence)  # validates
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n, "std": std}


def welch_test(a: Sequence[float], b: Sequence[float], alternative: str = "two-sided",
               margin: float = 0.0) -> dict:
    """Welch's unequal-variance t-test of H0: mean(a) - mean(b) = margin against
    `alternative` ("greater": mean(a) - mean(b) > margin). Returns {t, df, p}; each side
    needs at least 2 values."""
    if alternative not in ALTERNATIVES:
        raise ConfigError(f"unknown alternative {alternative!r}; valid: {', '.join(ALTERNATIVES)}")
    if len(a) < 2 or len(b) < 2:
        raise ConfigError(f"welch_test needs at least 2 values per side, got {len(a)} and {len(b)}")
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    va = sum((x - mean_a) ** 2 for x in a) / (len(a) - 1) / len(a)
    vb = sum((x - mean_b) ** 2 for x in b) / (len(b) - 1) / len(b)
    if va + vb == 0:  # no spread at all: the test is undefined (scipy says nan too)
        return {"t": math.nan, "df": math.nan, "p": math.nan}
    t = (mean_a - mean_b - margin) / math.sqrt(va + vb)
    # Welch-Satterthwaite degrees of freedom.
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    if alternative == "greater":
        p = t_sf(t, df)
    elif alternative == "less":
        p = t_cdf(t, df)
    else:
        p = min(1.0, 2.0 * t_sf(abs(t), df))
    return {"t": t, "df": df, "p": p}


def check_bar(margin_nats: float, alpha: float, practice_alpha: float = 0.25) -> None:
    """The significance bar's numbers are usable (a margin >= 0, levels in (0, 1))."""
    if not 0 < alpha < 1 or not 0 < practice_alpha < 1:
        raise ConfigError(f"alpha and practice_alpha must lie in (0, 1), got {alpha} and {practice_alpha}")
    if not margin_nats >= 0:
        raise ConfigError(f"margin_nats must be at least 0, got {margin_nats}")


def compare_groups(baseline_loss: Sequence[float], candidate_loss: Sequence[float],
                   baseline_bpb: Sequence[float], candidate_bpb: Sequence[float],
                   margin_nats: float = 0.005, alpha: float = 0.01, practice_alpha: float = 0.25) -> dict:
    """Does the candidate group of seeds beat the baseline group (lower is better)? The
    challenge's test: one-sided Welch t-test of H1: mean(baseline val_loss) - mean(candidate
    val_loss) > margin_nats, significant at p < alpha (README: 0.005 nats at p < 0.01); the
    leaderboard in practice accepted p < 0.25, reported beside it. Differences are candidate
    minus baseline (negative = better)."""
    check_bar(margin_nats, alpha, practice_alpha)
    for side, values in (("baseline", baseline_loss), ("candidate", candidate_loss)):
        if len(values) < 2:
            raise ConfigError(f"the {side} group has {len(values)} run(s); the Welch test needs at least 2 seeds per group")
    test = welch_test(baseline_loss, candidate_loss, alternative="greater", margin=margin_nats)
    no_margin = welch_test(baseline_loss, candidate_loss, alternative="greater")
    diff_loss = mean(candidate_loss) - mean(baseline_loss)
    diff_bpb = mean(candidate_bpb) - mean(baseline_bpb)
    significant = test["p"] < alpha  # False for nan (no spread at all)
    practice = test["p"] < practice_alpha
    bar = f"at least {margin_nats:g} nats better at p < {alpha:g}"
    if significant:
        verdict = f"candidate beats baseline: {bar} (p = {test['p']:.3g})"
    else:
        verdict = (f"not shown: the candidate is not {bar} (p = {test['p']:.3g}); at the leaderboard's "
                   f"practical cutoff p < {practice_alpha:g}: {'yes' if practice else 'no'}")
    return {
        "baseline": {"n": len(baseline_loss), "val_bpb": mean_ci(baseline_bpb), "val_loss": mean_ci(baseline_loss)},
        "candidate": {"n": len(candidate_loss), "val_bpb": mean_ci(candidate_bpb), "val_loss": mean_ci(candidate_loss)},
        "difference": {"val_bpb": diff_bpb, "val_loss_nats": diff_loss},
        "bar": {"margin_nats": margin_nats, "alpha": alpha, "practice_alpha": practice_alpha},
        "welch": test,
        "welch_no_margin": no_margin,
        "significant": significant,
        "below_practice_cutoff": practice,
        "verdict": verdict,
    }
