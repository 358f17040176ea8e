"""The statistics every analysis shares: intervals for proportions, means and ratios, differences,
and the within-question comparison of a truth against the model's own wrong candidates.

Numpy (and scipy's t quantiles) on arrays; nothing here runs a model. Every interval is two-sided 95% unless a
``level`` says otherwise; bootstraps resample questions (the unit the claims are about) and are
seeded by the ``rng`` passed in. Empty input gives ``nan`` rather than an error, so a cell without
wrong samples shows as missing, not as a number.
"""

from __future__ import annotations

import numpy as np
from scipy import stats as scipy_stats

Z95 = 1.959963984540054
# Two decision scores of one question tie when they agree up to the float rounding of batched runs.
TIE_RTOL, TIE_ATOL = 1e-5, 1e-6

Interval = tuple[float, float, float]  # (estimate, lo, hi)


def seed_interval(values: np.ndarray, bounds: tuple[float, float | None] | None = None, level: float = 0.95
                  ) -> tuple[float, float]:
    """Interval of the mean of a few independent runs' values (seeds): Student's t. For a quantity
    confined to ``bounds`` the t-interval is taken on a scale that keeps it inside: the logit of the
    value's place between two bounds (a proportion or an AUC: ``(0, 1)``; values within 1e-3 of a bound
    count as that close), the log of its distance above a lower bound alone (``(0, None)``: a
    ratio). ``nan`` for fewer than two values."""
    v = np.asarray(values, float)
    if len(v) < 2 or np.isnan(v).any():
        return float("nan"), float("nan")
    t = scipy_stats.t.ppf(0.5 + level / 2, len(v) - 1)
    if bounds is None:
        half = t * v.std(ddof=1) / np.sqrt(len(v))
        return float(v.mean() - half), float(v.mean() + half)
    a, b = bounds
    if b is None:
        to, back = np.log, np.exp
        u = np.maximum(v - a, 1e-3 * max(float(np.abs(v - a).max()), 1e-12))
    else:
        def to(x):
            return np.log(x / (1 - x))

        def back(z):
            return 1 / (1 + np.exp(-z))
        u = np.clip((v - a) / (b - a), 1e-3, 1 - 1e-3)
    z = to(u)
    half = t * z.std(ddof=1) / np.sqrt(len(z))
    lo, hi = min(back(z.mean() - half), u.mean()), max(back(z.mean() + half), u.mean())
    scale = 1.0 if b is None else b - a
    return float(a + scale * lo), float(a + scale * hi)


def wilson(k: np.ndarray | int, n: np.ndarray | int, z: float = Z95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of k successes in n trials (nan where n = 0)."""
    k, n = np.asarray(k, float), np.asarray(n, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        denom = 1 + z**2 / n
        centre = (p + z**2 / (2 * n)) / denom
        half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    return centre - half, centre + half


def percentile_interval(draws: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` interval of bootstrap draws, ignoring nan draws (nan if none is finite)."""
    draws = np.asarray(draws, float)
    if not np.isfinite(draws).any():
        return np.nan, np.nan
    tail = 100 * (1 - level) / 2
    lo, hi = np.nanpercentile(draws, [tail, 100 - tail])
    return float(lo), float(hi)


def resample_index(n: int, rng: np.random.Generator, n_boot: int) -> np.ndarray:
    """``n_boot`` bootstrap resamples of ``n`` units, as an index array of shape ``(n_boot, n)``."""
    return rng.integers(0, n, (n_boot, n)) if n else np.zeros((n_boot, 0), int)


def boot_mean(x: np.ndarray, rng: np.random.Generator, n_boot: int, level: float = 0.95) -> Interval:
    """Mean of ``x`` with a bootstrap interval over its entries."""
    x = np.asarray(x, float)
    if len(x) == 0:
        return np.nan, np.nan, np.nan
    return (float(x.mean()), *percentile_interval(x[resample_index(len(x), rng, n_boot)].mean(1), level))


def boot_ratio(num: np.ndarray, den: np.ndarray, rng: np.random.Generator, n_boot: int) -> Interval:
    """``sum(num) / sum(den)`` over units with a bootstrap interval over units."""
    if den.sum() == 0:
        return np.nan, np.nan, np.nan
    idx = resample_index(len(num), rng, n_boot)
    with np.errstate(invalid="ignore", divide="ignore"):
        draws = num[idx].sum(1) / den[idx].sum(1)
    return (float(num.sum() / den.sum()), *percentile_interval(draws))


def proportion_difference(p0: float, n0: int, p1: float, n1: int, z: float = Z95) -> Interval:
    """``p1 - p0`` of two independent proportions with a normal-approximation interval."""
    d = p1 - p0
    se = np.sqrt(p1 * (1 - p1) / max(n1, 1) + p0 * (1 - p0) / max(n0, 1))
    return float(d), float(d - z * se), float(d + z * se)


def ties(a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
    """Where two scores are equal up to batched-run rounding (the one tie rule of the project)."""
    return np.isclose(a, b, rtol=TIE_RTOL, atol=TIE_ATOL)


def above(a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
    """1 where ``a`` beats ``b``, 0.5 on a tie, 0 where it loses: one AUC comparison."""
    tie = ties(a, b)
    return (np.asarray(a) > np.asarray(b)) * ~tie + 0.5 * tie


def within_auc(truth: np.ndarray, wrong: list[np.ndarray]) -> np.ndarray:
    """Per question: the share of its own wrong candidates scored below its truth (ties count half)."""
    return np.array([np.mean(above(t, w)) for t, w in zip(truth, wrong)])


def mean_gap(truth: np.ndarray, wrong: list[np.ndarray]) -> np.ndarray:
    """Per question: truth's score minus the mean score of its own wrong candidates."""
    return np.array([t - np.mean(w) for t, w in zip(truth, wrong)])


def between_auc(truth: np.ndarray, wrong: list[np.ndarray]) -> float:
    """AUC of each question's truth against the wrong candidates of *other* questions."""
    if len(truth) < 2:
        return np.nan
    w_all = np.concatenate(wrong)
    owner = np.repeat(np.arange(len(wrong)), [len(w) for w in wrong])
    total = 0.0
    for start in range(0, len(w_all), 1024):  # (wrong candidate, truth) blocks
        w, o = w_all[start:start + 1024], owner[start:start + 1024]
        wins = above(truth[None, :], w[:, None])
        total += wins.sum() - wins[np.arange(len(w)), o].sum()
    return float(total / (len(w_all) * (len(truth) - 1)))
