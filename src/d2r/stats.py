"""The statistics of a study's report, pure functions of numbers: a 95% interval on an
accuracy (Student's t over seeds, Wilson on one run's images), Welch's t-test between two
methods' seeds, and the exact McNemar test on two models' per-image flags. scipy gives the
distributions; every formula is written out here so a test can check it against scipy's own
tests and against a hand computation."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from scipy import stats as scipy_stats

LEVEL = 0.95


def t_interval(values: Sequence[float], level: float = LEVEL) -> list[float] | None:
    """Student's t interval on the mean of `values` (one figure per seed): mean +- t * s /
    sqrt(k), t the (1 + level) / 2 quantile with k - 1 degrees of freedom; None for one value."""
    k = len(values)
    if k < 2:
        return None
    mean, s = statistics.fmean(values), statistics.stdev(values)
    half = float(scipy_stats.t.ppf((1 + level) / 2, k - 1)) * s / math.sqrt(k)
    return [mean - half, mean + half]


def wilson(correct: int, n: int, level: float = LEVEL) -> list[float] | None:
    """Wilson's score interval on a proportion `correct` / `n` (one run's accuracy on its n
    images); None without images."""
    if n <= 0:
        return None
    z = float(scipy_stats.norm.ppf((1 + level) / 2))
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [max(0.0, centre - half), min(1.0, centre + half)]


def welch_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p-value of Welch's t-test (unequal variances) between the seeds' figures of
    two rows; None when either has fewer than two seeds or both have no spread."""
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        return None
    t = (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return float(2 * scipy_stats.t.sf(abs(t), dof))


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: b images only the first model gets right, c only the
    second; under the null each of the b + c discordant images is a fair coin."""
    n = b + c
    if n == 0:
        return 1.0
    return float(min(1.0, 2 * scipy_stats.binom.cdf(min(b, c), n, 0.5)))


def discordant(first: Sequence[bool], second: Sequence[bool]) -> tuple[int, int]:
    """(b, c): images only `first` gets right, and only `second`, of the same images."""
    if len(first) != len(second):
        raise ValueError(f"McNemar needs the same images: {len(first)} vs {len(second)} flags")
    b = sum(1 for x, y in zip(first, second, strict=True) if x and not y)
    c = sum(1 for x, y in zip(first, second, strict=True) if y and not x)
    return b, c
