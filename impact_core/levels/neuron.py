"""Neuron level (Sec. 4.2, Fig. 2): the cached neuron metrics of each model, their tables and claims.

:func:`neuron_metrics` runs :func:`impact_core.methods.neuron.analyse` on one model (dense,
pruned or the control) and caches the result; :func:`neuron_claims` judges the paper's four
"no systematic change" claims on it.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import pandas as pd
import torch
from scipy.stats import pearsonr, spearmanr

from .. import pipeline
from ..cache import artefact
from ..claims import Claim, Judge, as_array, no_change_claim
from ..data import Batches, seeded_subset
from ..methods.neuron import NEURON_METRICS, SAME, analyse, block_unit_counts, check_setup
from ..methods.unit_metrics import paired_comparison
from ..pipeline import CONTROL, model_label
from . import Level, over_models, register_level

log = logging.getLogger("impact_core")

NEURON_METRICS_ENTRY = artefact("neuron_metrics", 3)  # 3: held-out selection


def metric_images(cfg, split):
    """The evaluation images of the neuron chapter: ``neuron.images`` drawn from the eval split at ``seed + 3``."""
    return seeded_subset(split, cfg.neuron.images, cfg.seed + 3, name="neuron")


def neuron_inputs(cfg, sparsity: float, method: str = "wanda") -> dict:
    nc = cfg.neuron
    return {"model": pipeline.model_inputs(cfg, sparsity, method),
            "site_means": pipeline.site_means_key(cfg, sparsity, method),
            "data": {"kind": cfg.data.kind, "eval_images": cfg.data.eval_images}, "seed": cfg.seed,
            "neuron": {"blocks": list(nc.blocks), "top_k": nc.top_k, "images": nc.images, "classes": nc.classes,
                       "validation_units": nc.validation_units, "validation_images": nc.validation_images}}


def neuron_metrics(cfg, sparsity: float, method: str = "wanda") -> dict:
    """:func:`analyse` on the model at ``sparsity`` (0: dense; ``(0, pipeline.CONTROL)``: the control),
    cached by model and neuron settings. Every model uses the same images and the same halves
    (``stratified_halves(labels, cfg.seed)``), so the measurement images are paired across models."""
    nc = cfg.neuron
    label = pipeline.model_label(sparsity, method)
    num_classes = cfg.model.num_classes
    classes = None if nc.classes is None else list(range(min(nc.classes, num_classes)))

    def compute():
        hooked = pipeline.hooked_model(cfg, sparsity, method)
        check_setup(hooked, nc.blocks, nc.top_k, num_classes)
        means = pipeline.site_means(cfg, sparsity, method)
        split = metric_images(cfg, pipeline.splits(cfg)["eval"])
        batches = Batches(split, cfg.data.batch_size, num_workers=cfg.data.num_workers)
        log.info("neuron metrics %s: %d images (half to select, half to measure), blocks %s, top-%d of %d units "
                 "per block, %d classes", label, len(split), list(nc.blocks), nc.top_k,
                 sum(block_unit_counts(hooked)), num_classes if classes is None else len(classes))
        return analyse(hooked, batches, means, nc.blocks, nc.top_k, num_classes, classes=classes,
                       n_validation_units=nc.validation_units,
                       validation_images=len(split) if nc.validation_images is None else nc.validation_images,
                       device=pipeline.resolve_device(cfg), seed=cfg.seed, max_batch=4 * cfg.data.batch_size,
                       desc=label)  # halves: stratified_halves(split labels, cfg.seed)

    return pipeline.cache_for(cfg).get_or_compute(NEURON_METRICS_ENTRY, neuron_inputs(cfg, sparsity, method), compute)


def metrics_frame(results: dict[float, dict], control: Optional[dict] = None):
    """Long table from ``{sparsity: neuron_metrics(cfg, sparsity)}`` and optionally the control's result
    (``neuron_metrics(cfg, 0.0, pipeline.CONTROL)``; its rows have level "control" and sparsity 0).

    Columns: level, sparsity, block, class, metric, value, selection, base. ``metric`` is a
    result key (``selectivity`` held-out, ``selectivity_same`` the paper's same-image variant);
    ``selection`` is "held-out" or "same-image" and ``base`` the metric without the suffix.
    """
    models = [(s, "wanda", r) for s, r in results.items()] + ([(0.0, CONTROL, control)] if control is not None else [])
    rows = []
    for s, method, r in models:
        for base in NEURON_METRICS + ("head_fraction",):
            for suffix, selection in (("", "held-out"), (SAME, "same-image")):
                values = r[base + suffix]
                for i, b in enumerate(r["blocks"]):
                    for j, c in enumerate(r["classes"]):
                        rows.append({"level": model_label(s, method), "sparsity": s, "block": b, "class": c,
                                     "metric": base + suffix, "value": float(values[i, j]),
                                     "selection": selection, "base": base})
    return pd.DataFrame(rows)


def comparison_table(frame, n_boot: int = 2000, seed: int = 0):
    """Per metric, block and level (the control included when in ``frame``): medians over classes vs dense,
    Wilcoxon p and bootstrap CI."""
    rows = []
    dense = frame[frame.level == "dense"]
    others = frame[frame.level != "dense"].drop_duplicates("level").sort_values("sparsity", kind="stable")
    for (metric, block), d in dense.groupby(["metric", "block"]):
        d = d.set_index("class")["value"]
        for level, s in zip(others.level, others.sparsity):
            lv = frame[(frame.metric == metric) & (frame.block == block) & (frame.level == level)]
            lv = lv.set_index("class")["value"].reindex(d.index)
            res = paired_comparison(d.values, lv.values, n_boot=n_boot, seed=seed)
            rows.append({"metric": metric, "block": block, "level": level, "sparsity": s, **res})
    return pd.DataFrame(rows)


def validation_summary(results: dict[float, dict]):
    """Pearson and Spearman correlation of attribution estimate vs true single-unit effect, per level and block."""
    rows = []
    for s, r in results.items():
        v = r["validation"]
        for b in [None] + list(r["blocks"]):
            sel = torch.ones_like(v["block"], dtype=torch.bool) if b is None else v["block"] == b
            est, true = v["estimate"][sel].numpy(), v["true"][sel].numpy()
            ok = np.isfinite(est) & np.isfinite(true)
            est, true = est[ok], true[ok]
            if len(est) < 3 or np.std(est) == 0 or np.std(true) == 0:
                pr = sr = float("nan")
            else:
                pr, sr = float(pearsonr(est, true)[0]), float(spearmanr(est, true)[0])
            rows.append({"level": model_label(s), "sparsity": s, "block": "all" if b is None else b,
                         "pairs": int(len(est)), "pearson": pr, "spearman": sr})
    return pd.DataFrame(rows)


def neuron_claims(runs: list[dict], j: Judge, metrics=("selectivity", "label_entropy", "class_variance", "impact"),
                  kind: str = "neuron") -> list[Claim]:
    """``runs[g] = {"by_sparsity": {sparsity: neuron_metrics}, "control": neuron_metrics}``; metric
    arrays are (blocks, classes), held-out selection. Judged on level minus control per block."""
    names = {"selectivity": "selectivity", "label_entropy": "label entropy", "class_variance": "class variance",
             "impact": "mean-ablation impact"}
    out = []
    first = runs[0]
    sparsities = sorted(s for s in first["by_sparsity"] if s > 0)
    blocks = list(first["by_sparsity"][0.0]["blocks"])
    for metric in metrics:
        comparisons = {}
        for i, b in enumerate(blocks):
            for s in sparsities:
                comparisons[(b, s)] = ([as_array(r["control"][metric][i]) for r in runs],
                                       [as_array(r["by_sparsity"][s][metric][i]) for r in runs])
        c = no_change_claim(j, id=f"{kind}.{metric}", level=kind,
                            claim=f"{names[metric]} shows no systematic change with sparsity",
                            paper="no systematic change", metric=metric, comparisons=comparisons, unit="classes")
        dense_ctl = [j.diff([(as_array(r["by_sparsity"][0.0][metric][i]), as_array(r["control"][metric][i])) for r in runs],
                            "classes") for i in range(len(blocks))]
        c.control = "; ".join(f"block {b}: {e.text('+.3f')}" for b, e in zip(blocks, dense_ctl))
        out.append(c)
    return out


def gather(cfg) -> dict:
    """``{"by_sparsity": {sparsity: neuron_metrics}, "control": neuron_metrics}`` (dense at 0)."""
    return over_models(lambda s, method: neuron_metrics(cfg, s, method=method), cfg.neuron.sparsities)


register_level(Level(
    name="neuron", title="Neuron level", section="neuron", gather=gather, claims=neuron_claims,
    chapter="book/chapters/02_neuron", after=("pruning",),
    parameters={"sparsity": "neuron.sparsities", "blocks": "neuron.blocks", "top_k": "neuron.top_k"}))
