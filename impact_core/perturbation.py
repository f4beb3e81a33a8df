"""Faithfulness of attribution maps (Sec. 3.5): insertion and deletion AUC.

Pixels are ordered by decreasing relevance (ties broken by pixel index: a stable
sort). With ``steps`` steps, step ``k = 0..steps`` has the top ``round(k * HW / steps)``
pixels (all channels of a pixel together) revealed or removed:

* insertion (AUC up): start from the reference image, put back the original pixels;
* deletion (AUC down): start from the original image, replace pixels by the reference.

The curve is the softmax probability of the target class (the attribution's target:
the class predicted on the clean image) at each step; the AUC is the trapezoid rule
over ``x = k / steps`` in [0, 1], so it lies in [0, 1].

References (``attribution.references``; what insertion starts from and what deleted
pixels become; the first listed is the primary, the Table 4 analogue):

* ``"black"``: the paper's "zero-valued reference image" (Sec. 3.5) read as 0 in [0, 1]
  pixel space, i.e. ``-mean / std`` after normalisation, for both curves: insertion
  starts "from a blank image", a zero-valued *image* is black, and the evaluation code
  of Chefer et al., whose attribution method the paper adopts, zeroes pixels before
  normalising. On Fashion-MNIST black is also the background, so deleting background
  changes nothing.
* ``"rise"``: RISE's substitutes (Petsiuk et al. 2018, ``evaluation.py``): deletion
  replaces pixels by 0 in normalised space (the data mean); insertion starts from a
  Gaussian-blurred copy of the image. RISE blurs 224-pixel images with kernel 11 and
  sigma 5; we scale both to the image: ``sigma = 5 * H / 224`` and kernel
  ``2 * round(sigma) + 1`` (at least 3), which is 11 / 5 at 224 px and 3 / 0.625 at 28 px
  (torchvision's ``gaussian_blur``, reflect padding; blur and normalisation commute).
* ``"mean"``: 0 in normalised space for both curves.
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

REFERENCES = ("black", "mean", "rise")
RISE_BLUR = {"kernel": 11, "sigma": 5.0, "size": 224}  # RISE's insertion blur at 224 px
RANDOMISATION_THRESHOLD = 0.5  # the randomisation check fails above this median rank correlation


def reference_value(mean, std, reference: str = "black") -> torch.Tensor:
    """A constant reference pixel, per channel, in the model's normalised space:
    ``"black"`` is ``-mean / std`` (0 in pixel space), ``"mean"`` is 0."""
    if reference not in ("black", "mean"):
        raise ValueError(f"no constant reference pixel for {reference!r}; use 'black' or 'mean'")
    mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
    return -mean / std if reference == "black" else torch.zeros_like(mean)


def rise_blur_params(size: int) -> tuple[int, float]:
    """RISE's blur (kernel 11, sigma 5 at 224 px) scaled to ``size`` pixels:
    ``sigma = 5 * size / 224``, kernel ``2 * round(sigma) + 1``, at least 3."""
    sigma = RISE_BLUR["sigma"] * size / RISE_BLUR["size"]
    return max(3, 2 * round(sigma) + 1), sigma


def substitutes(images: torch.Tensor, mean, std, reference: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(insertion start, deletion fill)`` of a reference, in normalised space: a (C,)
    pixel or a (B, C, H, W) image each (see the module docstring)."""
    if reference not in REFERENCES:
        raise ValueError(f"unknown reference {reference!r}; use one of {REFERENCES}")
    if reference == "rise":
        from torchvision.transforms.functional import gaussian_blur

        (ky, sy), (kx, sx) = rise_blur_params(images.shape[-2]), rise_blur_params(images.shape[-1])
        return gaussian_blur(images, [kx, ky], [sx, sy]), reference_value(mean, std, "mean")
    value = reference_value(mean, std, reference)
    return value, value


def _reference_chunk(reference: torch.Tensor, start: int, b: int, device) -> torch.Tensor:
    """The reference of images ``start:start + b`` shaped (b or 1, 1, C, H or 1, W or 1)."""
    if reference.ndim == 1:
        return reference.to(device).reshape(1, 1, -1, 1, 1)
    return reference[start:start + b].to(device)[:, None]


def _check_reference(reference: torch.Tensor, images: torch.Tensor, name: str) -> None:
    C = images.shape[1]
    if tuple(reference.shape) not in ((C,), tuple(images.shape)):
        raise ValueError(f"{name} of shape {tuple(reference.shape)} must be ({C},) or {tuple(images.shape)}")


def pixel_ranks(maps: torch.Tensor) -> torch.Tensor:
    """Rank of each pixel (0 = most relevant), (B, H*W); ties keep pixel order."""
    flat = maps.flatten(1)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks


@torch.no_grad()
def perturbation_curves(model: nn.Module, images: torch.Tensor, maps: torch.Tensor, target: torch.Tensor,
                        steps: int, reference: torch.Tensor, batch_size: int = 64,
                        insertion_start: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """Target-class probability along insertion and deletion, each (B, steps + 1).

    ``reference``: what deleted pixels become; ``insertion_start``: what insertion starts
    from (default ``reference``); each a (C,) pixel or a (B, C, H, W) image, normalised.
    Perturbed images are built on the model's device, ``batch_size`` images at a time.
    """
    if images.ndim != 4 or maps.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"maps {tuple(maps.shape)} must be (B, H, W) for images {tuple(images.shape)}")
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    insertion_start = reference if insertion_start is None else insertion_start
    _check_reference(reference, images, "reference")
    _check_reference(insertion_start, images, "insertion_start")
    device = next(model.parameters()).device
    model.eval()
    B, C, H, W = images.shape
    counts = torch.round(torch.arange(steps + 1, dtype=torch.float64) * (H * W) / steps).long().to(device)
    out = {"insertion": torch.empty(B, steps + 1), "deletion": torch.empty(B, steps + 1)}
    per_chunk = max(1, batch_size // (steps + 1)) if batch_size >= steps + 1 else 1
    for start in range(0, B, per_chunk):
        x = images[start:start + per_chunk].to(device)
        b = x.shape[0]
        ranks = pixel_ranks(maps[start:start + per_chunk].to(device))  # (b, HW)
        shown = (ranks[:, None, :] < counts[None, :, None]).reshape(b, steps + 1, 1, H, W)  # top-k per step
        xs = x[:, None]
        start_ref = _reference_chunk(insertion_start, start, b, device)
        fill_ref = _reference_chunk(reference, start, b, device)
        for kind, img in (("insertion", torch.where(shown, xs, start_ref)),
                          ("deletion", torch.where(shown, fill_ref, xs))):
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
                       steps: int, reference: torch.Tensor, batch_size: int = 64,
                       insertion_start: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """Per-image insertion and deletion AUC (B,) plus the curves (B, steps + 1)."""
    curves = perturbation_curves(model, images, maps, target, steps, reference, batch_size, insertion_start)
    return {"insertion": auc(curves["insertion"]), "deletion": auc(curves["deletion"]),
            "insertion_curve": curves["insertion"], "deletion_curve": curves["deletion"]}


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


SCORE_KEYS = ("insertion", "deletion", "insertion_curve", "deletion_curve")


def score_chunk(model: nn.Module, rand_model: nn.Module, images: torch.Tensor, a, mean, std,
                seed: int, figure_rows: list[int]) -> dict:
    """Every attribution method on one chunk of images: its maps once, then per-image
    insertion / deletion AUC and curves against every reference in ``a.references``, the
    randomisation test's rank correlation, and the maps of ``figure_rows``."""
    subs = {r: substitutes(images, mean, std, r) for r in a.references}
    out = {}
    for m in attr.METHODS:
        maps = attr.attribute(model, images, m, layerscale_rule=a.layerscale_rule, batch_size=a.batch_size, seed=seed)
        row = {"figure_maps": maps["maps"][figure_rows], "scores": {}}
        for r, (start, fill) in subs.items():
            scores = insertion_deletion(model, images, maps["maps"], maps["target"], a.steps, fill,
                                        batch_size=4 * a.batch_size, insertion_start=start)
            row["scores"][r] = {key: scores[key] for key in SCORE_KEYS}
        if m != "random":
            rnd = attr.attribute(rand_model, images, m, target=maps["target"], layerscale_rule=a.layerscale_rule,
                                 batch_size=a.batch_size)
            row["randomisation"] = torch.as_tensor(attr.spearman_per_image(maps["maps"], rnd["maps"]))
        out[m] = row
    out["target"] = maps["target"]
    # Chefer's maps under the other LayerScale rule (the paper's Eq. 14 vs the conserving z-rule)
    other = other_rule(a.layerscale_rule)
    maps = attr.attribute(model, images, "chefer", target=out["target"], layerscale_rule=other,
                          batch_size=a.batch_size)
    out["chefer_other_rule"] = {"scores": {}}
    for r, (start, fill) in subs.items():
        scores = insertion_deletion(model, images, maps["maps"], maps["target"], a.steps, fill,
                                    batch_size=4 * a.batch_size, insertion_start=start)
        out["chefer_other_rule"]["scores"][r] = {key: scores[key] for key in SCORE_KEYS}
    return out


def other_rule(rule: str) -> str:
    """The LayerScale rule that is not ``rule`` (see ``attribution.LAYERSCALE_RULES``)."""
    return next(r for r in attr.LAYERSCALE_RULES if r != rule)


def attribution_results(cfg: Config, sparsity: float, method: str = "wanda") -> dict:
    """Insertion / deletion per image for every attribution method at one sparsity level
    (or the control: ``sparsity=0, method=pipeline.CONTROL``), maps of a few images for
    figures, the per-layer conservation report (both LayerScale rules) and the
    parameter-randomisation test (cached).

    Returns, with N images and ``steps + 1`` points per curve:

    * ``"scores"[reference][m]``: ``{"insertion": (N,), "deletion": (N,), "insertion_curve":
      (steps + 1,), "deletion_curve": (steps + 1,)}`` (curves: mean over images) for every
      reference in ``attribution.references`` and every method of ``attribution.METHODS``
      (the random-patch baseline included);
    * ``"methods"[m]``: the primary (first) reference's scores plus ``"figure_maps"``;
    * ``"randomisation"[m]``: (N,) Spearman correlation of trained vs randomised maps
      (NaN for a constant map; methods other than "random"), see :func:`randomisation_check`;
    * ``"other_rule"``: ``{"rule", "scores": {reference: {"insertion": (N,), "deletion": (N,)}}}``,
      Chefer's maps under the LayerScale rule that ``attribution.layerscale_rule`` is not (so the
      chapter shows whether the rule decides the result);
    * ``"references"``, ``"level"``, ``"targets"``, ``"labels"``, ``"positions"``, ``"conservation"``.

    The evaluation images are streamed in chunks of :func:`chunk_images` (at most one
    chunk's images and maps in memory); under torchrun each process scores every
    world_size-th chunk and the per-image results are gathered, equal to one process's
    (a chunk's random-baseline scores are seeded by the chunk's first position)."""
    from . import pipeline

    pipeline.check_model_kind(sparsity, method)
    a = cfg.attribution
    inputs = {"model": pipeline.model_inputs(cfg, sparsity, method), "images": a.images, "steps": a.steps,
              "references": list(a.references), "rise_blur": RISE_BLUR, "layerscale_rule": a.layerscale_rule,
              "seed": cfg.seed, "eval_images": cfg.data.eval_images, "data_kind": cfg.data.kind,
              "figure": [a.figure_classes, a.figure_per_class], "methods": list(attr.METHODS), "version": 4}
    label = pipeline.level_label(sparsity, method)

    def compute():
        model = pipeline.pruned_model(cfg, sparsity, method)
        device = resolve_device(cfg)
        split = pipeline.splits(cfg)["eval"]
        pos = evaluation_positions(cfg)
        labels = torch.as_tensor(split.labels[pos])
        fig = figure_positions(labels, a.figure_classes, a.figure_per_class)
        rand_model = attr.randomized_model(model, seed=cfg.seed + 11).to(device)
        chunk = chunk_images(a.batch_size)
        starts = list(range(0, len(pos), chunk))
        mine = distributed.shard(np.arange(len(starts)))  # under torchrun: every world_size-th chunk
        local = {}
        for c in tqdm(mine, desc=f"attribution {label}", leave=False):
            sl = slice(starts[c], starts[c] + chunk)
            images, _ = load_images(split, pos[sl], cfg.data.batch_size)
            local[int(c)] = score_chunk(model, rand_model, images, a, cfg.model.mean, cfg.model.std,
                                        seed=cfg.seed * 1_000_003 + starts[c],
                                        figure_rows=[i - starts[c] for i in fig if starts[c] <= i < starts[c] + chunk])
        chunks = {c: r for part in distributed.gather_objects(local) for c, r in part.items()}
        parts = [chunks[c] for c in range(len(starts))]
        figure_images, _ = load_images(split, pos[fig], cfg.data.batch_size)
        res = {"sparsity": sparsity, "level": label, "references": list(a.references),
               "positions": torch.as_tensor(pos), "labels": labels, "figure_positions": fig,
               "figure_images": figure_images, "methods": {}, "scores": {r: {} for r in a.references},
               "randomisation": {}, "targets": torch.cat([p["target"] for p in parts])}
        fig_maps = {m: {} for m in attr.METHODS}  # image position -> map, put back in ``fig`` order
        for c, p in enumerate(parts):
            in_chunk = [i for i in fig if starts[c] <= i < starts[c] + chunk]
            for m in attr.METHODS:
                fig_maps[m].update(zip(in_chunk, p[m]["figure_maps"]))
        for m in attr.METHODS:
            for r in a.references:
                cat = {key: torch.cat([p[m]["scores"][r][key] for p in parts]) for key in SCORE_KEYS}
                res["scores"][r][m] = {"insertion": cat["insertion"], "deletion": cat["deletion"],
                                       "insertion_curve": cat["insertion_curve"].mean(0),
                                       "deletion_curve": cat["deletion_curve"].mean(0)}
            res["methods"][m] = {**res["scores"][a.references[0]][m],
                                 "figure_maps": torch.stack([fig_maps[m][i] for i in fig])}
            if m != "random":
                res["randomisation"][m] = torch.cat([p[m]["randomisation"] for p in parts])
        res["other_rule"] = {"rule": other_rule(a.layerscale_rule), "scores": {
            r: {key: torch.cat([p["chefer_other_rule"]["scores"][r][key] for p in parts]) for key in ("insertion", "deletion")}
            for r in a.references}}
        n_cons = min(len(pos), 16)
        cons_images, _ = load_images(split, pos[:n_cons], cfg.data.batch_size)
        res["conservation"] = {rule: attr.relevance_conservation(model, cons_images, rule)
                               for rule in attr.LAYERSCALE_RULES}
        return res

    return pipeline.cache_for(cfg).get_or_compute("attribution_results", inputs, compute)


def randomisation_check(res: dict, threshold: float = RANDOMISATION_THRESHOLD) -> dict[str, dict]:
    """The model-parameter randomisation test (Adebayo et al. 2018) per method of
    ``res["randomisation"]``: ``{"median_spearman", "constant_maps", "passed"}``.

    ``constant_maps`` counts images whose rank correlation is undefined (NaN: a trained or
    randomised map is constant); ``median_spearman`` is the median over the others.
    ``passed`` needs no constant map and a median at most ``threshold``: a map that does
    not change when every weight is re-initialised does not explain the model."""
    out = {}
    for m, rho in res["randomisation"].items():
        rho = np.asarray(rho, dtype=np.float64)
        if rho.size == 0:
            raise ValueError(f"no randomisation correlations for {m!r}")
        finite = rho[np.isfinite(rho)]
        median = float(np.median(finite)) if finite.size else float("nan")
        constant = int(rho.size - finite.size)
        out[m] = {"median_spearman": median, "constant_maps": constant,
                  "passed": bool(constant == 0 and median <= threshold)}
    return out


# ----------------------------------------------------------------------------- the chapter's tables
# Every interval and check the model chapter shows is computed here (intervals by impact_core.stats),
# so the notebook only displays and glues. ``by_model`` maps a row label to an attribution_results entry.

CONSERVATION_TOLERANCE = 1e-2  # a rule "conserves" relevance when every ratio (z) or the product over blocks (Eq. 14) is within this of 1


def table4(by_model: dict[str, dict], references, seed: int = 0):
    """Table 4 analogue per reference: one row per model, each method's insertion and deletion
    as "mean [95% interval over images]" and Chefer minus random (paired over images).
    Returns ``({reference: DataFrame}, long DataFrame of means with model, level, method, metric)``."""
    import pandas as pd

    from . import stats

    def cell(v):
        e = stats.mean([np.asarray(v, dtype=np.float64)], "images", seed=seed)
        return f"{e.value:.3f} [{e.low:.3f}, {e.high:.3f}]", e

    tables, rows = {}, []
    for ref in references:
        table = {}
        for model, res in by_model.items():
            sc, line = res["scores"][ref], {}
            for metric in ("insertion", "deletion"):
                for m in attr.METHODS:
                    text, e = cell(sc[m][metric].numpy())
                    line[(metric, attr.METHOD_LABELS[m])] = text
                    rows.append({"reference": ref, "model": model, "level": res["level"], "method": m,
                                 "metric": metric, "mean": e.value, "low": e.low, "high": e.high})
                line[(metric, "Chefer vs random")] = cell(sc["chefer"][metric].numpy() - sc["random"][metric].numpy())[0]
            table[model] = line
        tables[ref] = pd.DataFrame.from_dict(table, orient="index")
        tables[ref].columns = pd.MultiIndex.from_tuples(tables[ref].columns)
    return tables, pd.DataFrame(rows)


def layerscale_rule_table(by_model: dict[str, dict], references, rule: str, seed: int = 0):
    """Chefer's AUCs under ``rule`` and under the other LayerScale rule on the same images, and
    their paired difference (other minus ``rule``) with its 95% interval over images."""
    import pandas as pd

    from . import stats

    other, rows = other_rule(rule), []
    for model, res in by_model.items():
        for ref in references:
            for metric in ("insertion", "deletion"):
                ours = res["scores"][ref]["chefer"][metric].double().numpy()
                alt = res["other_rule"]["scores"][ref][metric].double().numpy()
                d = stats.mean_difference([(ours, alt)], "images", seed=seed)
                rows.append({"model": model, "reference": ref, "metric": metric, f"{rule}-rule": f"{ours.mean():.3f}",
                             f"{other} rule": f"{alt.mean():.3f}", "difference": d.text("+.3f")})
    return pd.DataFrame(rows).set_index(["model", "reference", "metric"])


def randomisation_summary(by_model: dict[str, dict], method: str = "chefer"):
    """:func:`randomisation_check` of every model as a table, and what the chapter states about
    ``method``: the largest median rank correlation, constant maps, failing models, pass / fail."""
    import pandas as pd

    checks = {model: randomisation_check(res) for model, res in by_model.items()}
    table = pd.DataFrame([{"model": model, "method": attr.METHOD_LABELS[m], **c}
                          for model, per in checks.items() for m, c in per.items()]).set_index(["model", "method"])
    ours = {model: per[method] for model, per in checks.items()}
    medians = np.array([c["median_spearman"] for c in ours.values()], dtype=np.float64)
    return table, {"rand_threshold": RANDOMISATION_THRESHOLD,
                   "rand_rho": float(np.nanmax(medians)) if np.isfinite(medians).any() else float("nan"),
                   "rand_constant": int(sum(c["constant_maps"] for c in ours.values())),
                   "rand_failed": ", ".join(m for m, c in ours.items() if not c["passed"]) or "none",
                   "rand_pass": "passes" if all(c["passed"] for c in ours.values()) else "fails"}


def conservation_summary(conservation: dict[str, list[dict]]):
    """The per-layer conservation report of both LayerScale rules as one frame, its whole-block
    rows, and what the chapter states: the z-rule's largest deviation of a ratio from 1, the
    product of Eq. 14's per-block ratios, and whether each conserves (within
    :data:`CONSERVATION_TOLERANCE`)."""
    import pandas as pd

    cons = pd.concat([pd.DataFrame(conservation[r]) for r in attr.LAYERSCALE_RULES], ignore_index=True)
    cons["rule"] = cons["rule"].map({"z": "z-rule (R_in = R_out)", "inverse": "Eq. 14 (R_out / (gamma + eps))"})
    blocks = cons[cons.layer.str.fullmatch(r"blocks\.\d+")].copy()
    blocks["block"] = blocks.layer.str.split(".").str[1].astype(int)
    z_dev = float((cons[cons.rule.str.startswith("z")]["ratio"] - 1).abs().max())
    inv_total = float(np.prod(blocks[blocks.rule.str.startswith("Eq")]["ratio"]))
    word = lambda ok: "conserves" if ok else "does not conserve"  # noqa: E731
    return cons, blocks, {"z_dev": z_dev, "inv_total": inv_total, "z_conserves": word(z_dev < CONSERVATION_TOLERANCE),
                          "inv_conserves": word(abs(inv_total - 1) < CONSERVATION_TOLERANCE)}
