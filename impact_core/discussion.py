"""Sec. 5: the four levels side by side, from the results the chapters cached.

Every result is taken from the same cached functions the chapters call, so a book
built in one run recomputes nothing here; with ``params/seeds.yaml`` the other
seeds are computed (and cached) on first use.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from . import claims as C
from . import pipeline
from .config import Config


def levels(sparsities) -> list[float]:
    return [0.0] + sorted(float(s) for s in sparsities if s > 0)


def for_seed(cfg: Config, seed: int) -> Config:
    """The same configuration with another training seed (and its own cache entries)."""
    return dataclasses.replace(cfg, seed=seed)


def gather(cfg: Config) -> dict:
    """Every level's cached results: accuracy, neuron metrics, SAE quality, circuits, attribution."""
    from . import circuits, neuron, perturbation, sae

    out = {"accuracy": {(m, s): pipeline.accuracy(cfg, s, m)
                        for m in cfg.pruning.methods for s in levels(cfg.pruning.sparsities)}}
    out["neuron"] = {s: neuron.neuron_metrics(cfg, s) for s in levels(cfg.neuron.sparsities)}
    out["sae"] = {s: sae.quality_row(sae.train_sae(cfg, s)) for s in levels(cfg.sae.sparsities)}
    out["circuit"] = {s: circuits.circuit_results(cfg, s) for s in levels(cfg.circuit.sparsities)}
    out["attribution"] = {s: perturbation.attribution_results(cfg, s) for s in levels(cfg.attribution.sparsities)}
    return out


def claims_of(results: dict, seed: int = 0) -> list[C.Claim]:
    """All claims, judged on one set of results."""
    from . import neuron

    table = neuron.comparison_table(neuron.metrics_frame(results["neuron"]), seed=seed)
    return (C.pruning_claims(results["accuracy"]) + C.neuron_claims(table) + C.sae_claims(results["sae"])
            + C.circuit_claims(results["circuit"], seed=seed) + C.attribution_claims(results["attribution"], seed=seed))


def _relative(values_by_level: dict[float, np.ndarray], seed: int = 0) -> list[dict]:
    """Mean change relative to dense (``mean_s / mean_dense - 1``) with a paired bootstrap interval."""
    dense = np.asarray(values_by_level[0.0], dtype=float)
    rows = []
    for s, v in values_by_level.items():
        if s == 0:
            continue
        v = np.asarray(v, dtype=float)
        ratio, lo, hi = C.ratio_of_means(v, dense, seed=seed, n_boot=1000)
        rows.append({"sparsity": s, "change": ratio - 1, "low": lo - 1, "high": hi - 1})
    return rows


def effects(results: dict, seed: int = 0) -> pd.DataFrame:
    """One row per (level of analysis, metric, sparsity): relative change vs dense and its interval.

    Intervals: bootstrap over classes (neuron, circuit) or images (model); the SAE has one
    probe per level, so its rows carry no interval (low = high = change).
    """
    from .neuron import NEURON_METRICS

    rows = []
    neuron = results["neuron"]
    for metric in NEURON_METRICS:
        per_level = {s: np.nanmean(r[metric].numpy(), axis=0) for s, r in neuron.items()}  # mean over blocks
        rows += [{"analysis": "neuron", "metric": metric, **r} for r in _relative(per_level, seed)]
    sae = results["sae"]
    for metric in ("NMSE", "dead"):
        d = sae[0.0][metric]
        for s, q in sae.items():
            if s > 0:
                change = q[metric] / d - 1 if d else float("nan")
                rows.append({"analysis": "layer", "metric": metric, "sparsity": s, "change": change,
                             "low": change, "high": change})
    circ = results["circuit"]
    for metric in ("node_fraction", "size_dense", "ncq"):
        rows += [{"analysis": "circuit", "metric": metric, **r}
                 for r in _relative({s: r[metric].numpy() for s, r in circ.items()}, seed)]
    attr = results["attribution"]
    for metric in ("insertion", "deletion"):
        rows += [{"analysis": "model", "metric": metric, **r}
                 for r in _relative({s: r["methods"]["chefer"][metric].numpy() for s, r in attr.items()}, seed)]
    return pd.DataFrame(rows)


def claims_table(cfg: Config) -> tuple[pd.DataFrame, dict]:
    """The claims table: one seed, or every seed of ``cfg.seeds`` with a robust verdict."""
    seeds = cfg.seeds or [cfg.seed]
    per_seed, results = [], {}
    for seed in seeds:
        results[seed] = gather(for_seed(cfg, seed))
        per_seed.append(claims_of(results[seed], seed=seed))
    if len(seeds) == 1:
        table = pd.DataFrame([c.to_dict() for c in per_seed[0]])
    else:
        table = pd.DataFrame(C.combine_seeds(per_seed))
    return table, results
