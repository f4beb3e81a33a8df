"""Every interval and test a verdict reads: one module, so a verdict is decided one way.

* An :class:`Estimate` is a point estimate with its 95% interval, the *unit* the interval
  resamples (classes, images, SAE seeds, training seeds, replicates) and the Student-t
  description of that interval (standard error ``se`` and degrees of freedom ``df``).
* **One interval type: Student t on the top-level units.** With one group (one training seed,
  one replicate) the units are the classes / images / SAE seeds themselves; with several groups
  (training seeds or pipeline replicates) each group is reduced to its own statistic first and
  the groups are the units (``df = groups - 1``): the classes or images are nested inside them.
  Why not the bootstrap: at the sample sizes the presets use (3 SAE seeds, 10 classes, 3
  training seeds) percentile and BCa intervals cover 73-91% (measured: the issue "Verdicts that
  keep their error rate"), and BCa's jackknife needs an n x (n-1) array (tens of GB at 50,000
  images). The t interval is exact for normal units, covers >= 93% for the moderately skewed
  units tested in ``tests/test_coverage.py``, and needs O(n) memory.
* **One alpha, one reading.** Every test is the reading of that one 95% interval, and every
  p-value comes from the same t distribution on a two-sided scale, so ``p < ALPHA`` exactly when
  the interval says so: :func:`p_side` (the interval excludes 0 on a side), :func:`p_equivalent`
  (two one-sided tests at 2.5% each: the interval lies inside ``+-margin``), :func:`p_beyond`
  (the interval lies wholly beyond the margin).
* **Families.** A conclusion that *every* comparison holds (intersection-union) needs no
  correction; a conclusion that *any* comparison holds is Holm-corrected (:func:`holm`).
* :func:`side` reads an interval against 0 and the margin; the rules in
  :mod:`impact_core.claims` map those readings to verdicts.
* :func:`bootstrap` remains for displayed statistics that are not means (chapter 2's medians);
  no verdict reads it.
"""
from __future__ import annotations

import functools
import math
import re
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import numpy as np
from scipy import stats as sps

LEVEL = 0.95
ALPHA = 1 - LEVEL

# readings of an interval (see :func:`side`)
UP, DOWN = "up", "down"                        # shown on that side of 0, not shown smaller than the margin
SMALL_UP, SMALL_DOWN = "small up", "small down"  # shown on that side of 0 *and* shown inside the margin
EQUIVALENT, UNDECIDED = "equivalent", "undecided"


@dataclass
class Estimate:
    """A statistic, its 95% interval and what the interval resamples.

    ``se`` and ``df`` describe the interval as ``value +- t_{df, 0.975} se``; when only the
    bounds are given (a hand-made estimate), ``se`` is the half-width over the normal quantile."""

    value: float
    low: float
    high: float
    unit: str
    n: int
    method: str
    df: float = math.inf
    se: Optional[float] = None

    def __post_init__(self):
        if self.se is None:
            q = _quantile(self.df)
            self.se = (self.high - self.low) / (2 * q) if self.finite else float("nan")

    @property
    def finite(self) -> bool:
        return bool(np.isfinite(self.low) and np.isfinite(self.high))

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def scaled(self, k: float) -> "Estimate":
        lo, hi = sorted((self.low * k, self.high * k))
        return Estimate(self.value * k, lo, hi, self.unit, self.n, self.method, self.df, abs(self.se * k))

    def shifted(self, c: float) -> "Estimate":
        """The estimate of ``value + c`` (the same interval, moved)."""
        return replace(self, value=self.value + c, low=self.low + c, high=self.high + c)

    def text(self, fmt: str = "+.3f") -> str:
        if not self.finite:
            return f"{self.value:{fmt}} (no interval: {self.method})"
        return f"{self.value:{fmt}} [{self.low:{fmt}}, {self.high:{fmt}}] ({self.unit}, n={self.n}, {self.method})"


@functools.lru_cache(maxsize=4096)
def _quantile(df: float) -> float:
    """The two-sided 95% quantile of Student's t with ``df`` degrees of freedom (normal at inf)."""
    return float(sps.t.ppf(1 - ALPHA / 2, df)) if np.isfinite(df) else float(sps.norm.ppf(1 - ALPHA / 2))


def _clean(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Paired arrays as float64 with every unit that is not finite in all of them dropped."""
    arrays = [np.asarray(a, dtype=np.float64).ravel() for a in arrays]
    if len({len(a) for a in arrays}) > 1:
        raise ValueError(f"paired samples differ in length: {[len(a) for a in arrays]}")
    ok = np.logical_and.reduce([np.isfinite(a) for a in arrays])
    return [a[ok] for a in arrays]


def t_interval(values: np.ndarray, unit: str, *, value: Optional[float] = None, method: str = "t") -> Estimate:
    """Mean of ``values`` (one per unit) with its Student-t 95% interval over the units.

    ``value`` replaces the point estimate (a ratio's, say) while the interval keeps the spread of
    ``values`` around their own mean (the delta method's linearised units have mean 0)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    n = v.size
    centre = float(np.mean(v)) if n else float("nan")
    point = centre if value is None else float(value)
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), unit, 0, "no data")
    if n < 2:
        return Estimate(point, float("nan"), float("nan"), unit, n, "one unit")
    se = float(np.std(v, ddof=1) / math.sqrt(n))
    df = n - 1
    half = _quantile(df) * se
    return Estimate(point, point - half, point + half, unit, n, method if se > 0 else "constant sample", df, se)


def _estimate(samples: Sequence[Sequence[np.ndarray]], per_unit: Callable, per_group: Callable, unit: str,
              groups: str) -> Estimate:
    """The t interval over units (one group) or over groups (several; units nested).

    ``per_unit(*arrays)`` gives one value per unit of a group; ``per_group(*arrays)`` the group's
    statistic (a scalar). The estimate of several groups is the mean of the groups' statistics."""
    samples = [_clean(g) for g in samples]
    samples = [g for g in samples if len(g[0])]
    if not samples:
        return Estimate(float("nan"), float("nan"), float("nan"), unit, 0, "no data")
    if len(samples) == 1:
        return t_interval(per_unit(*samples[0]), unit)
    stats_ = np.array([per_group(*g) for g in samples], dtype=np.float64)
    return t_interval(stats_, f"{len(samples)} {groups} ({unit} nested)", method=f"t over {groups}")


def mean_difference(pairs: Sequence[tuple[np.ndarray, np.ndarray]], unit: str, *,
                    groups: str = "training seeds") -> Estimate:
    """Mean over paired units of ``b - a``; ``pairs`` holds one ``(a, b)`` per group (training
    seed or replicate). t interval over units, or over the groups' mean differences."""
    return _estimate([tuple(p) for p in pairs], lambda a, b: b - a, lambda a, b: np.mean(b - a), unit, groups)


def mean(samples: Sequence[np.ndarray], unit: str, *, groups: str = "training seeds") -> Estimate:
    """Mean over units; one array per group."""
    return _estimate([(np.asarray(s),) for s in samples], lambda a: a, lambda a: np.mean(a), unit, groups)


def ratio_of_means(pairs: Sequence[tuple[np.ndarray, np.ndarray]], unit: str, *,
                   groups: str = "training seeds") -> Estimate:
    """``mean(a) / mean(b)`` over paired units; one ``(a, b)`` per group.

    One group: the delta method, i.e. the t interval of the linearised units
    ``(a_i - r b_i) / mean(b)`` around ``r`` (hand-written: scipy has no ratio interval). Several
    groups: the t interval of the groups' ratios."""
    samples = [_clean(p) for p in pairs]
    samples = [g for g in samples if len(g[0])]
    if len(samples) > 1:
        return _estimate(samples, None, lambda a, b: np.mean(a) / np.mean(b), unit, groups)
    if not samples:
        return Estimate(float("nan"), float("nan"), float("nan"), unit, 0, "no data")
    a, b = samples[0]
    r = float(np.mean(a) / np.mean(b))
    return t_interval((a - r * b) / np.mean(b), unit, value=r, method="t, delta method")


def trend(levels: Sequence[float], per_level: Sequence[Sequence[np.ndarray]], unit: str, *,
          groups: str = "training seeds") -> Estimate:
    """Dose-response: least-squares slope of the per-level mean against sparsity.

    ``per_level[s][g]``: the units' values at level ``levels[s]`` for group ``g`` (the same units
    at every level). The slope of the means is the mean of the units' own slopes, so one group
    takes the t interval of the per-unit slopes; several take the t interval of the groups' slopes."""
    x = np.asarray(levels, dtype=np.float64)
    if len(x) < 2 or np.ptp(x) == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), unit, 0, "fewer than two levels")
    xc = (x - x.mean()) / np.sum((x - x.mean()) ** 2)

    def per_unit(*arrays):
        return np.sum(np.stack(arrays, axis=-1) * xc, axis=-1)

    def per_group(*arrays):
        return float(np.sum(np.array([np.mean(a) for a in arrays]) * xc))

    n_groups = len(per_level[0])
    samples = [tuple(per_level[s][g] for s in range(len(x))) for g in range(n_groups)]
    return _estimate(samples, per_unit, per_group, unit + " (slope per unit sparsity)", groups)


def bootstrap(arrays: Sequence[np.ndarray], statistic: Callable, unit: str, *, seed: int = 0,
              n_resamples: int = 2000) -> Estimate:
    """Paired percentile bootstrap of ``statistic(*arrays, axis=-1)`` over the units, for displayed
    statistics that are not means (medians); no verdict reads it. ``batch=`` bounds its memory."""
    arrays = _clean(arrays)
    n = len(arrays[0])
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), unit, 0, "no data")
    value = float(statistic(*arrays, axis=-1))
    if n < 2:
        return Estimate(value, float("nan"), float("nan"), unit, n, "one unit")
    if all(np.ptp(a) == 0 for a in arrays):
        return Estimate(value, value, value, unit, n, "constant sample", se=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = sps.bootstrap(tuple(arrays), statistic, paired=True, vectorized=True, n_resamples=n_resamples,
                            confidence_level=LEVEL, method="percentile", rng=np.random.default_rng(seed), batch=256)
    return Estimate(value, float(res.confidence_interval.low), float(res.confidence_interval.high), unit, n,
                    "percentile bootstrap")


# ---------------------------------------------------------------------------------------------
# reading an interval: p-values from the interval's own t distribution, on a two-sided scale
# ---------------------------------------------------------------------------------------------
def _above(est: Estimate, x: float) -> float:
    """One-sided p of "the true value is at most x" (small when the estimate is well above x)."""
    if not est.finite:
        return float("nan")
    if est.se == 0:
        return 0.0 if est.value > x else 1.0
    return float(sps.t.sf((est.value - x) / est.se, est.df))


def _below(est: Estimate, x: float) -> float:
    if not est.finite:
        return float("nan")
    if est.se == 0:
        return 0.0 if est.value < x else 1.0
    return float(sps.t.cdf((est.value - x) / est.se, est.df))


def p_side(est: Estimate, expected: str) -> float:
    """p of "no change towards ``expected``" (``+`` or ``-``): below ALPHA exactly when the 95%
    interval excludes 0 on that side."""
    return min(1.0, 2 * (_above(est, 0.0) if expected == "+" else _below(est, 0.0)))


def p_equivalent(est: Estimate, margin: float) -> float:
    """Two one-sided tests of "|difference| >= margin": below ALPHA exactly when the 95%
    interval lies inside ``(-margin, +margin)``."""
    return min(1.0, 2 * max(_above(est, -margin), _below(est, margin)))


def p_beyond(est: Estimate, margin: float) -> float:
    """p of "|difference| <= margin": below ALPHA exactly when the 95% interval lies wholly
    beyond ``+margin`` or wholly below ``-margin``."""
    return min(1.0, 2 * min(_above(est, margin), _below(est, -margin)))


def side(est: Estimate, margin: float) -> str:
    """What an interval says about a difference, given the smallest effect of interest.

    ``UP`` / ``DOWN``: the interval excludes 0 on that side and does not lie inside the margin;
    ``SMALL_UP`` / ``SMALL_DOWN``: it excludes 0 and lies inside ``(-margin, +margin)`` (a change
    shown to exist and shown smaller than the margin); ``EQUIVALENT``: inside the margin and
    covering 0; ``UNDECIDED``: covers 0 without lying inside the margin (or no interval).

    As an interval narrows around a true value, the reading only moves from UNDECIDED to a
    decided reading, and from UP to SMALL_UP (never back): the rules stay monotone in precision."""
    if not est.finite:
        return UNDECIDED
    inside = -margin < est.low and est.high < margin
    if est.low > 0:
        return SMALL_UP if inside else UP
    if est.high < 0:
        return SMALL_DOWN if inside else DOWN
    return EQUIVALENT if inside else UNDECIDED


def unit_name(est: Estimate) -> str:
    """What an interval's units are called, without their count or nesting: "3 replicates (classes nested)"
    -> "replicates", "classes" -> "classes" (for "about N replicates would decide")."""
    return re.sub(r"^\d+ ", "", est.unit.split(" (")[0])


def units_needed(est: Estimate, target: float) -> Optional[int]:
    """Units (same spread) for the t interval's half-width to fall below ``target``, or None.

    The half-width is ``t_{n-1} s / sqrt(n)`` with ``s = se sqrt(n)`` the spread of the units (for
    estimates over groups the units are the groups: training seeds or replicates)."""
    if not est.finite or est.n < 2 or not est.se or target <= 0:
        return None
    s = est.se * math.sqrt(est.n)
    n = max(2, int(math.ceil((_quantile(math.inf) * s / target) ** 2)))
    while n < 10**7 and _quantile(n - 1) * s / math.sqrt(n) >= target:
        n = int(n * 1.05) + 1
    return n if n < 10**7 else None


def samples_needed(est: Estimate, margin: float, kind: str = "direction", family: int = 1) -> Optional[int]:
    """Units needed (same spread, same estimate) for the interval to decide, or None.

    ``kind="direction"``: decided when the interval excludes 0 (half-width below ``|value|``) or
    lies inside the margin (below ``margin - |value|``); ``kind="equivalence"``: inside the margin,
    or wholly beyond it (below ``|value| - margin``). ``family``: Holm-corrected comparisons,
    accounted for by Bonferroni's quantile (conservative). None when no target is reachable or the
    answer would not exceed the units already used."""
    if not est.finite or est.n < 2 or est.half_width <= 0:
        return None
    v = abs(est.value)
    targets = (v, margin - v) if kind == "direction" else (margin - v, v - margin)
    targets = [t for t in targets if t > 0]
    if not targets:
        return None
    z = sps.norm.ppf(1 - ALPHA / (2 * family)) / sps.norm.ppf(1 - ALPHA / 2)
    n = units_needed(est, max(targets) / z)
    return n if n and n > est.n else None


def holm(pvalues: Sequence[float], alpha: float = ALPHA) -> np.ndarray:
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
