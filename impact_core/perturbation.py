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
from . import distributed
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


def evaluation_positions(cfg: Config) -> np.ndarray:
    """Positions in the eval split of the ``attribution.images`` evaluation images (a seeded
    sample, sorted), the same for every sparsity level."""
    from . import pipeline

    split = pipeline.splits(cfg)["eval"]
    n = min(cfg.attribution.images, len(split))
    return np.sort(np.random.default_rng(cfg.seed + 5).permutation(len(split))[:n])


def load_images(split, positions: np.ndarray, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from .data import batches

    xs, ys = zip(*batches(split.subset(positions), batch_size))
    return torch.cat(xs), torch.cat(ys)


def figure_positions(labels: torch.Tensor, classes: int, per_class: int) -> list[int]:
    """A few images per class (the first ``classes`` classes present) for the map grid."""
    pos = []
    for c in sorted(set(labels.tolist()))[:classes]:
        pos += torch.nonzero(labels == c).flatten()[:per_class].tolist()
    return pos


def chunk_images(batch_size: int) -> int:
    """Images per chunk of the attribution pass: the unit of streaming and of sharding."""
    return 4 * batch_size


def score_chunk(model: nn.Module, rand_model: nn.Module, images: torch.Tensor, a, reference: torch.Tensor,
                seed: int, figure_rows: list[int]) -> dict:
    """Every attribution method on one chunk of images: per-image insertion / deletion AUC and
    curves, the randomisation test's rank correlation, and the maps of ``figure_rows``."""
    out = {}
    for m in attr.METHODS:
        maps = attr.attribute(model, images, m, layerscale_rule=a.layerscale_rule, batch_size=a.batch_size, seed=seed)
        scores = insertion_deletion(model, images, maps["maps"], maps["target"], a.steps, reference,
                                    batch_size=4 * a.batch_size)
        row = {key: scores[key] for key in ("insertion", "deletion", "insertion_curve", "deletion_curve")}
        row["figure_maps"] = maps["maps"][figure_rows]
        if m != "random":
            rnd = attr.attribute(rand_model, images, m, target=maps["target"], layerscale_rule=a.layerscale_rule,
                                 batch_size=a.batch_size)
            row["randomisation"] = torch.as_tensor(attr.spearman_per_image(maps["maps"], rnd["maps"]))
        out[m] = row
    out["target"] = maps["target"]
    return out


def attribution_results(cfg: Config, sparsity: float, method: str = "wanda") -> dict:
    """Insertion / deletion per image for every attribution method at one sparsity level,
    maps of a few images for figures, the per-layer conservation report (both
    LayerScale rules) and the parameter-randomisation test (cached).

    The evaluation images are streamed in chunks of :func:`chunk_images` (at most one
    chunk's images and maps in memory); under torchrun each process scores every
    world_size-th chunk and the per-image results are gathered, equal to one process's
    (a chunk's random-baseline noise is seeded by the chunk's first position)."""
    from . import pipeline

    a = cfg.attribution
    inputs = {"model": pipeline.model_inputs(cfg, sparsity, method), "images": a.images, "steps": a.steps,
              "baseline": a.baseline, "layerscale_rule": a.layerscale_rule, "seed": cfg.seed,
              "eval_images": cfg.data.eval_images, "data_kind": cfg.data.kind,
              "figure": [a.figure_classes, a.figure_per_class], "methods": list(attr.METHODS), "version": 2}

    def compute():
        model = pipeline.pruned_model(cfg, sparsity, method)
        device = resolve_device(cfg)
        split = pipeline.splits(cfg)["eval"]
        pos = evaluation_positions(cfg)
        labels = torch.as_tensor(split.labels[pos])
        ref = reference_value(cfg.model.mean, cfg.model.std, a.baseline)
        fig = figure_positions(labels, a.figure_classes, a.figure_per_class)
        rand_model = attr.randomized_model(model, seed=cfg.seed + 11).to(device)
        chunk = chunk_images(a.batch_size)
        starts = list(range(0, len(pos), chunk))
        mine = distributed.shard(np.arange(len(starts)))  # under torchrun: every world_size-th chunk
        local = {}
        for c in tqdm(mine, desc=f"attribution {pipeline.level_label(sparsity)}", leave=False):
            sl = slice(starts[c], starts[c] + chunk)
            images, _ = load_images(split, pos[sl], cfg.data.batch_size)
            local[int(c)] = score_chunk(model, rand_model, images, a, ref, seed=cfg.seed * 1_000_003 + starts[c],
                                        figure_rows=[i - starts[c] for i in fig if starts[c] <= i < starts[c] + chunk])
        chunks = {c: r for part in distributed.gather_objects(local) for c, r in part.items()}
        parts = [chunks[c] for c in range(len(starts))]
        figure_images, _ = load_images(split, pos[fig], cfg.data.batch_size)
        res = {"sparsity": sparsity, "positions": torch.as_tensor(pos), "labels": labels, "figure_positions": fig,
               "figure_images": figure_images, "methods": {}, "randomisation": {},
               "targets": torch.cat([p["target"] for p in parts])}
        fig_maps = {m: {} for m in attr.METHODS}  # image position -> map, put back in ``fig`` order
        for c, p in enumerate(parts):
            in_chunk = [i for i in fig if starts[c] <= i < starts[c] + chunk]
            for m in attr.METHODS:
                fig_maps[m].update(zip(in_chunk, p[m]["figure_maps"]))
        for m in attr.METHODS:
            cat = {key: torch.cat([p[m][key] for p in parts]) for key in parts[0][m] if key != "figure_maps"}
            res["methods"][m] = {"insertion": cat["insertion"], "deletion": cat["deletion"],
                                 "insertion_curve": cat["insertion_curve"].mean(0),
                                 "deletion_curve": cat["deletion_curve"].mean(0),
                                 "figure_maps": torch.stack([fig_maps[m][i] for i in fig])}
            if m != "random":
                res["randomisation"][m] = cat["randomisation"]
        n_cons = min(len(pos), 16)
        cons_images, _ = load_images(split, pos[:n_cons], cfg.data.batch_size)
        res["conservation"] = {rule: attr.relevance_conservation(model, cons_images, rule)
                               for rule in attr.LAYERSCALE_RULES}
        return res

    return pipeline.cache_for(cfg).get_or_compute("attribution_results", inputs, compute)
