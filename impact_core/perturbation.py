"""Faithfulness of attribution maps (Sec. 3.5): insertion and deletion AUC.

Pixels are ordered by decreasing relevance (ties broken by pixel index: a stable
sort). With ``steps`` steps, step ``k = 0..steps`` has the top ``round(k * HW / steps)``
pixels (all channels of a pixel together) revealed or removed:

* insertion (AUC up): start from the reference image, put back the original pixels;
* deletion (AUC down): start from the original image, replace pixels by the reference.

The curve is the softmax probability of the target class (the attribution's target:
the class predicted on the clean image) at each step; the AUC is the trapezoid rule
over ``x = k / steps`` in [0, 1], so it lies in [0, 1].

The reference ("zero-valued reference image", Sec. 3.5). ``baseline="black"``
(default): 0 in [0, 1] pixel space, i.e. ``-mean / std`` after normalisation. This is
the paper's reading: insertion starts "from a blank image", a zero-valued *image*
is black, and the evaluation code of Chefer et al., whose attribution method the
paper adopts, zeroes pixels before normalising. ``baseline="mean"``: 0 in
normalised space (the data mean, grey), as RISE's deletion does.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import attribution as attr
from .config import Config, resolve_device

log = logging.getLogger("impact_core")

BASELINES = ("black", "mean")


def reference_value(mean, std, baseline: str = "black") -> torch.Tensor:
    """The reference pixel, per channel, in the model's normalised space."""
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; use one of {BASELINES}")
    mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
    return -mean / std if baseline == "black" else torch.zeros_like(mean)


def pixel_ranks(maps: torch.Tensor) -> torch.Tensor:
    """Rank of each pixel (0 = most relevant), (B, H*W); ties keep pixel order."""
    flat = maps.flatten(1)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks


@torch.no_grad()
def perturbation_curves(model: nn.Module, images: torch.Tensor, maps: torch.Tensor, target: torch.Tensor,
                        steps: int, reference: torch.Tensor, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Target-class probability along insertion and deletion, each (B, steps + 1).

    Perturbed images are built on the model's device, ``batch_size`` images at a time.
    """
    if images.ndim != 4 or maps.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"maps {tuple(maps.shape)} must be (B, H, W) for images {tuple(images.shape)}")
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = next(model.parameters()).device
    model.eval()
    B, C, H, W = images.shape
    counts = torch.round(torch.arange(steps + 1, dtype=torch.float64) * (H * W) / steps).long().to(device)
    ref = reference.to(device).reshape(1, C, 1, 1)
    out = {"insertion": torch.empty(B, steps + 1), "deletion": torch.empty(B, steps + 1)}
    per_chunk = max(1, batch_size // (steps + 1)) if batch_size >= steps + 1 else 1
    for start in range(0, B, per_chunk):
        x = images[start:start + per_chunk].to(device)
        b = x.shape[0]
        ranks = pixel_ranks(maps[start:start + per_chunk].to(device))  # (b, HW)
        shown = (ranks[:, None, :] < counts[None, :, None]).reshape(b, steps + 1, 1, H, W)  # top-k per step
        xs = x[:, None]
        for kind, img in (("insertion", torch.where(shown, xs, ref)), ("deletion", torch.where(shown, ref, xs))):
            flat = img.reshape(b * (steps + 1), C, H, W)
            probs = torch.cat([model(flat[i:i + batch_size]).softmax(-1) for i in range(0, flat.shape[0], batch_size)])
            t = target[start:start + b].to(device).repeat_interleave(steps + 1)
            out[kind][start:start + b] = probs.gather(1, t[:, None]).reshape(b, steps + 1).cpu()
    return out


def auc(curves: torch.Tensor) -> torch.Tensor:
    """Trapezoid area under (B, steps + 1) curves over x in [0, 1]."""
    steps = curves.shape[1] - 1
    return ((curves[:, 1:] + curves[:, :-1]) / 2).sum(1) / steps


def insertion_deletion(model: nn.Module, images: torch.Tensor, maps: torch.Tensor, target: torch.Tensor,
                       steps: int, reference: torch.Tensor, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Per-image insertion and deletion AUC plus the curves."""
    curves = perturbation_curves(model, images, maps, target, steps, reference, batch_size)
    return {"insertion": auc(curves["insertion"]), "deletion": auc(curves["deletion"]),
            "insertion_curve": curves["insertion"], "deletion_curve": curves["deletion"]}


def bootstrap_ci(values, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean over images."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


# ----------------------------------------------------------------------------- the chapter's artefact


def evaluation_images(cfg: Config) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """The ``attribution.images`` evaluation images (a seeded sample of the eval split),
    the same for every sparsity level: ``(positions in the eval split, images, labels)``."""
    from . import pipeline
    from .data import batches

    split = pipeline.splits(cfg)["eval"]
    n = min(cfg.attribution.images, len(split))
    pos = np.sort(np.random.default_rng(cfg.seed + 5).permutation(len(split))[:n])
    sub = split.subset(pos)
    xs, ys = zip(*batches(sub, cfg.data.batch_size))
    return pos, torch.cat(xs), torch.cat(ys)


def figure_positions(labels: torch.Tensor, classes: int, per_class: int) -> list[int]:
    """A few images per class (the first ``classes`` classes present) for the map grid."""
    pos = []
    for c in sorted(set(labels.tolist()))[:classes]:
        pos += torch.nonzero(labels == c).flatten()[:per_class].tolist()
    return pos


def attribution_results(cfg: Config, sparsity: float, method: str = "wanda") -> dict:
    """Insertion / deletion per image for every attribution method at one sparsity level,
    maps of a few images for figures, the per-layer conservation report (both
    LayerScale rules) and the parameter-randomisation test (cached)."""
    from . import pipeline

    a = cfg.attribution
    inputs = {"model": pipeline.model_inputs(cfg, sparsity, method), "images": a.images, "steps": a.steps,
              "baseline": a.baseline, "layerscale_rule": a.layerscale_rule, "seed": cfg.seed,
              "eval_images": cfg.data.eval_images, "data_kind": cfg.data.kind,
              "figure": [a.figure_classes, a.figure_per_class], "methods": list(attr.METHODS), "version": 1}

    def compute():
        model = pipeline.pruned_model(cfg, sparsity, method)
        device = resolve_device(cfg)
        pos, images, labels = evaluation_images(cfg)
        ref = reference_value(cfg.model.mean, cfg.model.std, a.baseline)
        fig = figure_positions(labels, a.figure_classes, a.figure_per_class)
        rand_model = attr.randomized_model(model, seed=cfg.seed + 11).to(device)
        res = {"sparsity": sparsity, "positions": torch.as_tensor(pos), "labels": labels, "figure_positions": fig,
               "figure_images": images[fig], "methods": {}, "randomisation": {}}
        bs = a.batch_size
        for m in tqdm(attr.METHODS, desc=f"attribution {pipeline.level_label(sparsity)}", leave=False):
            out = attr.attribute(model, images, m, layerscale_rule=a.layerscale_rule, batch_size=bs, seed=cfg.seed)
            scores = insertion_deletion(model, images, out["maps"], out["target"], a.steps, ref, batch_size=4 * bs)
            res["methods"][m] = {"insertion": scores["insertion"], "deletion": scores["deletion"],
                                 "insertion_curve": scores["insertion_curve"].mean(0),
                                 "deletion_curve": scores["deletion_curve"].mean(0),
                                 "figure_maps": out["maps"][fig]}
            if m != "random":
                rnd = attr.attribute(rand_model, images, m, target=out["target"],
                                     layerscale_rule=a.layerscale_rule, batch_size=bs)
                res["randomisation"][m] = torch.as_tensor(attr.spearman_per_image(out["maps"], rnd["maps"]))
        res["targets"] = out["target"]
        n_cons = min(len(images), 16)
        res["conservation"] = {rule: attr.relevance_conservation(model, images[:n_cons], rule)
                               for rule in attr.LAYERSCALE_RULES}
        return res

    return pipeline.cache_for(cfg).get_or_compute("attribution_results", inputs, compute)
