"""Every interval and test the book reports: one module, so a verdict is decided one way.

* An :class:`Estimate` is a point estimate with its 95% interval and the *unit* the
  interval resamples (classes, images, SAE seeds, training seeds x classes, ...).
* One training seed: ``scipy.stats.bootstrap`` (paired where the data are paired; BCa when
  the sample has at least :data:`MIN_BCA` units, the percentile method below that, as BCa's
  acceleration is unstable on very few units).
* Several training seeds: a hierarchical bootstrap (seeds with replacement, then the units
  within each drawn seed), percentile interval. Hand-written because scipy has none.
* "No change" is an equivalence claim: an interval inside ``+-margin`` (the smallest effect
  of interest, stated per metric in the preset's ``verdicts.margins``). A family of such
  comparisons is Holm-corrected on bootstrap p-values (:func:`holm`; scipy has only BH).
* :func:`side` reads an interval against 0 and the margin; the rules in
  :mod:`impact_core.claims` map those readings to verdicts.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
from scipy import stats as sps

MIN_BCA = 10  # BCa needs enough units for its jackknife acceleration; percentile below this
LEVEL = 0.95

# readings of an interval (see :func:`side`)
UP, DOWN, EQUIVALENT, UNDECIDED = "up", "down", "equivalent", "undecided"


@dataclass
class Estimate:
    """A statistic, its interval and what the interval resamples."""

    value: float
    low: float
    high: float
    unit: str
    n: int
    method: str
    distribution: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False, compare=False)

    @property
    def finite(self) -> bool:
        return bool(np.isfinite(self.low) and np.isfinite(self.high))

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def scaled(self, k: float) -> "Estimate":
        lo, hi = sorted((self.low * k, self.high * k))
        return Estimate(self.value * k, lo, hi, self.unit, self.n, self.method, self.distribution * k)

    def text(self, fmt: str = "+.3f") -> str:
        if not self.finite:
            return f"{self.value:{fmt}} (no interval: {self.method})"
        return f"{self.value:{fmt}} [{self.low:{fmt}}, {self.high:{fmt}}] ({self.unit}, n={self.n}, {self.method})"


def _clean(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Paired arrays as float64 with every unit that is not finite in all of them dropped."""
    arrays = [np.asarray(a, dtype=np.float64).ravel() for a in arrays]
    if len({len(a) for a in arrays}) > 1:
        raise ValueError(f"paired samples differ in length: {[len(a) for a in arrays]}")
    ok = np.logical_and.reduce([np.isfinite(a) for a in arrays])
    return [a[ok] for a in arrays]


def bootstrap(arrays: Sequence[np.ndarray], statistic: Callable, unit: str, *, seed: int = 0,
              n_resamples: int = 2000) -> Estimate:
    """Paired bootstrap of ``statistic(*arrays, axis=-1)`` over the units (one training seed).

    ``scipy.stats.bootstrap`` with ``paired=True``; BCa with >= :data:`MIN_BCA` units,
    percentile otherwise; a constant sample gives a zero-width interval."""
    arrays = _clean(arrays)
    n = len(arrays[0])
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), unit, 0, "no data")
    value = float(statistic(*arrays, axis=-1))
    if n < 2:
        return Estimate(value, float("nan"), float("nan"), unit, n, "one unit")
    if all(np.ptp(a) == 0 for a in arrays):
        return Estimate(value, value, value, unit, n, "constant sample", np.full(1, value))
    method = "BCa" if n >= MIN_BCA else "percentile"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = sps.bootstrap(tuple(arrays), statistic, paired=True, vectorized=True, n_resamples=n_resamples,
                            confidence_level=LEVEL, method=method, rng=np.random.default_rng(seed))
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if method == "BCa" and not (np.isfinite(low) and np.isfinite(high)):  # degenerate BCa: fall back
        method = "percentile"
        low, high = (float(q) for q in np.quantile(res.bootstrap_distribution, [(1 - LEVEL) / 2, (1 + LEVEL) / 2]))
    return Estimate(value, low, high, unit, n, method, np.asarray(res.bootstrap_distribution, dtype=np.float64))


def hierarchical_bootstrap(groups: Sequence[Sequence[np.ndarray]], statistic: Callable, unit: str, *,
                           seed: int = 0, n_resamples: int = 2000) -> Estimate:
    """Two-level bootstrap: draw training seeds with replacement, then units within each drawn
    seed (paired arrays stay paired), pool, and apply ``statistic(*arrays, axis=-1)``.

    ``groups[g]`` is the tuple of paired arrays of seed ``g``. Percentile interval."""
    groups = [_clean(g) for g in groups]
    groups = [g for g in groups if len(g[0])]
    if not groups:
        return Estimate(float("nan"), float("nan"), float("nan"), unit, 0, "no data")
    pooled = [np.concatenate([g[j] for g in groups]) for j in range(len(groups[0]))]
    value = float(statistic(*pooled, axis=-1))
    n = sum(len(g[0]) for g in groups)
    unit = f"{len(groups)} training seeds x {unit}"
    if len(groups) < 2:
        return bootstrap(groups[0], statistic, unit, seed=seed, n_resamples=n_resamples)
    rng = np.random.default_rng(seed)
    dist = np.empty(n_resamples)
    for r in range(n_resamples):
        picks = rng.integers(0, len(groups), len(groups))
        parts = []
        for g in picks:
            idx = rng.integers(0, len(groups[g][0]), len(groups[g][0]))
            parts.append([a[idx] for a in groups[g]])
        dist[r] = statistic(*[np.concatenate([p[j] for p in parts]) for j in range(len(pooled))], axis=-1)
    low, high = np.quantile(dist, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return Estimate(value, float(low), float(high), unit, n, "hierarchical percentile", dist)


def _estimate(samples: Sequence[Sequence[np.ndarray]], statistic: Callable, unit: str, seed: int,
              n_resamples: int) -> Estimate:
    """One training seed: :func:`bootstrap`; several: :func:`hierarchical_bootstrap`."""
    if len(samples) == 1:
        return bootstrap(samples[0], statistic, unit, seed=seed, n_resamples=n_resamples)
    return hierarchical_bootstrap(samples, statistic, unit, seed=seed, n_resamples=n_resamples)


def _mean_diff(a, b, axis=-1):
    return np.mean(b - a, axis=axis)


def _ratio(a, b, axis=-1):
    return np.mean(a, axis=axis) / np.mean(b, axis=axis)


def _mean(a, axis=-1):
    return np.mean(a, axis=axis)


def mean_difference(pairs: Sequence[tuple[np.ndarray, np.ndarray]], unit: str, *, seed: int = 0,
                    n_resamples: int = 2000) -> Estimate:
    """Mean over paired units of ``b - a``; ``pairs`` holds one ``(a, b)`` per training seed."""
    return _estimate([tuple(p) for p in pairs], _mean_diff, unit, seed, n_resamples)


def ratio_of_means(pairs: Sequence[tuple[np.ndarray, np.ndarray]], unit: str, *, seed: int = 0,
                   n_resamples: int = 2000) -> Estimate:
    """``mean(a) / mean(b)`` over paired units; one ``(a, b)`` per training seed."""
    return _estimate([tuple(p) for p in pairs], _ratio, unit, seed, n_resamples)


def mean(samples: Sequence[np.ndarray], unit: str, *, seed: int = 0, n_resamples: int = 2000) -> Estimate:
    """Mean over units; one array per training seed."""
    return _estimate([(np.asarray(s),) for s in samples], _mean, unit, seed, n_resamples)


def trend(levels: Sequence[float], per_level: Sequence[Sequence[np.ndarray]], unit: str, *, seed: int = 0,
          n_resamples: int = 2000) -> Estimate:
    """Dose-response: least-squares slope of the per-level mean against sparsity.

    ``per_level[s][g]``: the units' values at level ``levels[s]`` for training seed ``g``
    (the same units at every level, so they are resampled together)."""
    x = np.asarray(levels, dtype=np.float64)
    if len(x) < 2 or np.ptp(x) == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), unit, 0, "fewer than two levels")
    xc = (x - x.mean()) / np.sum((x - x.mean()) ** 2)

    def slope(*arrays, axis=-1):
        means = np.stack([np.mean(a, axis=axis) for a in arrays], axis=-1)
        return np.sum(means * xc, axis=-1)

    n_seeds = len(per_level[0])
    samples = [tuple(per_level[s][g] for s in range(len(x))) for g in range(n_seeds)]
    return _estimate(samples, slope, unit + " (slope per unit sparsity)", seed, n_resamples)


# ---------------------------------------------------------------------------------------------
# reading an interval
# ---------------------------------------------------------------------------------------------
def side(est: Estimate, margin: float) -> str:
    """What an interval says about a difference, given the smallest effect of interest.

    ``EQUIVALENT``: inside ``(-margin, +margin)`` (a change smaller than the margin, i.e. two
    one-sided tests at 2.5% each); ``UP`` / ``DOWN``: the interval excludes 0 on that side and
    is not inside the margin; ``UNDECIDED``: it covers 0 without being inside the margin (or no
    interval)."""
    if not est.finite:
        return UNDECIDED
    if -margin < est.low and est.high < margin:
        return EQUIVALENT
    if est.low > 0:
        return UP
    if est.high < 0:
        return DOWN
    return UNDECIDED


def samples_needed(est: Estimate, margin: float, kind: str = "direction", family: int = 1) -> Optional[int]:
    """Units needed (same spread, same estimate) for the interval to decide, or None.

    The interval's half-width shrinks as 1/sqrt(n). ``kind="direction"``: decided when the
    interval excludes 0 (half-width below ``|value|``) or lies inside the margin (below
    ``margin - |value|``); ``kind="equivalence"``: inside the margin, or wholly beyond it
    (below ``|value| - margin``). ``family``: comparisons corrected together (Holm), accounted
    for by Bonferroni's z (conservative). None when no target is reachable or the answer would
    not exceed the units already used (the interval is then undecided for another reason)."""
    if not est.finite or est.n < 2 or est.half_width <= 0:
        return None
    v = abs(est.value)
    targets = (v, margin - v) if kind == "direction" else (margin - v, v - margin)
    targets = [t for t in targets if t > 0]
    if not targets:
        return None
    z = sps.norm.ppf(1 - (1 - LEVEL) / (2 * family)) / sps.norm.ppf(1 - (1 - LEVEL) / 2)
    n = int(math.ceil(est.n * (z * est.half_width / max(targets)) ** 2))
    return n if n > est.n else None


def equivalence_pvalue(est: Estimate, margin: float) -> float:
    """Bootstrap TOST p-value of "|difference| >= margin": the larger of the bootstrap mass
    at or beyond +margin and at or beyond -margin."""
    d = est.distribution
    if d.size == 0:
        return float("nan")
    return float(max(np.mean(d >= margin), np.mean(d <= -margin)))


def change_pvalue(est: Estimate, margin: float) -> float:
    """Bootstrap p-value of "the difference lies within +-margin" against a change beyond it
    (two-sided: twice the smaller one-sided mass, capped at 1)."""
    d = est.distribution
    if d.size == 0:
        return float("nan")
    return float(min(1.0, 2 * min(np.mean(d <= margin), np.mean(d >= -margin))))


def holm(pvalues: Sequence[float], alpha: float = 0.05) -> np.ndarray:
    """Holm's step-down rejections for a family of p-values (NaN never rejects).

    Sorted ascending, ``p_(j)`` is rejected while ``p_(j) <= alpha / (m - j)`` (j from 0).
    Hand-written: scipy offers only Benjamini-Hochberg (``false_discovery_control``)."""
    p = np.asarray(pvalues, dtype=np.float64)
    reject = np.zeros(len(p), dtype=bool)
    finite = np.flatnonzero(np.isfinite(p))
    m = len(finite)
    for j, i in enumerate(finite[np.argsort(p[finite], kind="stable")]):
        if p[i] > alpha / (m - j):
            break
        reject[i] = True
    return reject
