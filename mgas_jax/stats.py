"""Intervals and paired comparisons for studies over (split, seed, size) units.

    stats.mean_interval([0.97, 0.98, 0.99])              # Interval(mean=0.98, low=..., high=..., n=3)
    stats.bootstrap_interval(values, seed=0)             # percentile bootstrap of the mean
    d = stats.paired_difference(mgas, fixed, seed=0)     # {unit: accuracy} each; matched units only
    stats.verdict(d.t, "MGAS")                           # 'MGAS better' / 'MGAS worse' / 'no detectable difference'

A paired comparison takes, for every unit both methods ran on (same split, same seed, same exported
size), the difference of their accuracies, and puts an interval on the mean difference: pairing removes
the variation that both methods share (an easy fold, a lucky seed), which unpaired intervals keep.

The units of a k-fold study are not fully independent (two folds' training sets overlap in (k-2)/(k-1)
of their images), so the t interval over folds x seeds is somewhat too narrow (Nadeau and Bengio, 2003);
the verdicts read "detectable" with that in mind.
"""
from __future__ import annotations

import dataclasses
from typing import Hashable, Mapping, Sequence

import numpy as np
from scipy import stats as scipy_stats

CONFIDENCE = 0.95


@dataclasses.dataclass(frozen=True)
class Interval:
    """A mean with a two-sided confidence interval; low = high = nan when n < 2 (no spread to judge)."""
    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def _sample(values: Sequence[float], what: str) -> np.ndarray:
    x = np.asarray(values, np.float64).ravel()
    if x.size == 0:
        raise ValueError(f"{what}: no values; an interval needs at least one (two for a spread)")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what}: non-finite values {x[~np.isfinite(x)][:3].tolist()}; drop failed runs first")
    return x


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence = {confidence}: must lie in (0, 1), e.g. 0.95")


def t_quantile(confidence: float, dof: int) -> float:
    """The two-sided Student t quantile: P(|T_dof| <= q) = confidence."""
    _check_confidence(confidence)
    return float(scipy_stats.t.ppf(0.5 + confidence / 2, dof))


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """mean ± t_{n-1} s / sqrt(n): the t interval of the mean (s with ddof 1)."""
    x = _sample(values, "mean_interval")
    mean = float(x.mean())
    if x.size < 2:
        return Interval(mean, float("nan"), float("nan"), int(x.size))
    half = t_quantile(confidence, x.size - 1) * float(x.std(ddof=1)) / np.sqrt(x.size)
    return Interval(mean, mean - half, mean + half, int(x.size))


def bootstrap_interval(values: Sequence[float], *, seed: int, resamples: int = 10_000,
                       confidence: float = CONFIDENCE) -> Interval:
    """The percentile bootstrap interval of the mean: quantiles of the means of `resamples` resamples.

    Resamples draw n values with replacement from a generator seeded by `seed` alone, so the interval is
    a pure function of (values, seed, resamples, confidence).
    """
    x = _sample(values, "bootstrap_interval")
    _check_confidence(confidence)
    if resamples < 1:
        raise ValueError(f"resamples = {resamples}: must be >= 1 (thousands for a stable interval)")
    mean = float(x.mean())
    if x.size < 2:
        return Interval(mean, float("nan"), float("nan"), int(x.size))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    low, high = np.quantile(means, [0.5 - confidence / 2, 0.5 + confidence / 2])
    return Interval(mean, float(low), float(high), int(x.size))


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """Mean of a - b over matched units, with its t and bootstrap intervals.

    Attributes:
      units: the matched units, sorted; differences[i] belongs to units[i].
      differences: (n,) a[u] - b[u].
      t, bootstrap: intervals of the mean difference.
      only_a, only_b: units one method has and the other lacks (left out of the comparison).
    """
    units: tuple
    differences: np.ndarray
    t: Interval
    bootstrap: Interval
    only_a: tuple
    only_b: tuple


def paired_difference(a: Mapping[Hashable, float], b: Mapping[Hashable, float], *, seed: int,
                      resamples: int = 10_000, confidence: float = CONFIDENCE) -> PairedDifference:
    """The paired difference a - b over the units both hold (e.g. (fold, seed, budget) -> accuracy)."""
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError(f"paired_difference: no unit in common ({len(a)} and {len(b)} units); "
                         "both methods must run on the same (split, seed, size)")
    d = np.asarray([a[u] - b[u] for u in common], np.float64)
    return PairedDifference(units=tuple(common), differences=d, t=mean_interval(d, confidence),
                            bootstrap=bootstrap_interval(d, seed=seed, resamples=resamples, confidence=confidence),
                            only_a=tuple(sorted(set(a) - set(b))), only_b=tuple(sorted(set(b) - set(a))))


def verdict(interval: Interval, name: str = "MGAS") -> str:
    """'<name> better' when the interval of (name - other) lies above 0, 'worse' below, else no difference."""
    if interval.n < 2:
        return f"too few pairs ({interval.n}) to judge"
    if interval.low > 0:
        return f"{name} better"
    if interval.high < 0:
        return f"{name} worse"
    return "no detectable difference"
