"""Memory of the judging layer: the Student-t intervals every verdict reads against the BCa
bootstrap they replaced (``scipy.stats.bootstrap`` without ``batch=`` builds an n x (n-1)
jackknife), measured as tracemalloc's peak of one claim's three paired intervals
(level - dense, control - dense, level - control) over ``n`` images.

Rows report megabytes (``unit: MB``) in the ``reference_s`` / ``fast_s`` columns; the paper
preset's accuracy claim pairs 50,000 validation images.
"""
from __future__ import annotations

import time
import tracemalloc
import warnings

import numpy as np
from scipy import stats as sps

from impact_core import stats as S
from impact_core.bench import entry


def _claim_arrays(n: int):
    rng = np.random.default_rng(0)
    base = rng.random(n) < 0.8
    flip = lambda: (base ^ (rng.random(n) < 0.03)).astype(np.float64)  # noqa: E731
    return flip(), flip(), flip()


def _peak_mb(fn) -> tuple[float, float]:
    tracemalloc.start()
    t = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20, seconds


def _bca(a, b):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sps.bootstrap((a, b), lambda x, y, axis=-1: np.mean(y - x, axis=axis), paired=True, vectorized=True,
                             n_resamples=2000, method="BCa", rng=np.random.default_rng(0))


def _t(a, b):
    return S.mean_difference([(a, b)], "images")


def benchmarks(device: str) -> list[dict]:
    out = []
    n = 5000
    dense, control, level = _claim_arrays(n)
    pairs = [(dense, level), (dense, control), (control, level)]
    ref, ref_s = _peak_mb(lambda: [_bca(a, b) for a, b in pairs])
    fast, fast_s = _peak_mb(lambda: [_t(a, b) for a, b in pairs])
    out.append(entry(f"judging: peak MB, BCa bootstrap vs t, n={n:,}", ref, fast, "cpu",
                     {"images": n, "intervals": 3, "bca_seconds": ref_s, "t_seconds": fast_s}, unit="MB"))
    n = 50_000
    dense, control, level = _claim_arrays(n)
    pairs = [(dense, level), (dense, control), (control, level)]
    inputs_mb = 3 * n * 8 / 2**20
    fast, fast_s = _peak_mb(lambda: [_t(a, b) for a, b in pairs])
    out.append(entry(f"judging: peak MB of the t intervals, n={n:,} (ref: inputs)", inputs_mb, fast, "cpu",
                     {"images": n, "intervals": 3, "t_seconds": fast_s}, unit="MB"))
    return out
