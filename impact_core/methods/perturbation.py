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

import torch
import torch.nn as nn

from . import attribution as attr

log = logging.getLogger("impact_core")

REFERENCES = ("black", "mean", "rise")
RISE_BLUR = {"kernel": 11, "sigma": 5.0, "size": 224}  # RISE's insertion blur at 224 px


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


def _target_probs(model: nn.Module, flat: torch.Tensor, target: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Softmax probability of ``target`` (one per row) for every image of ``flat``, ``batch_size`` at a time."""
    probs = torch.cat([model(flat[i:i + batch_size]).softmax(-1) for i in range(0, flat.shape[0], batch_size)])
    return probs.gather(1, target[:, None]).squeeze(1)


def _check_curves(images: torch.Tensor, maps: torch.Tensor, steps: int, reference, insertion_start) -> None:
    if images.ndim != 4 or maps.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"maps {tuple(maps.shape)} must be (B, H, W) for images {tuple(images.shape)}")
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    _check_reference(reference, images, "reference")
    _check_reference(insertion_start, images, "insertion_start")


@torch.no_grad()
def endpoint_probs(model: nn.Module, images: torch.Tensor, target: torch.Tensor, reference: torch.Tensor,
                   insertion_start: Optional[torch.Tensor] = None, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """The target-class probability at the ends of the curves, which no map changes, each (B,):
    ``"clean"`` (the image: insertion's last step, deletion's first), ``"start"`` (insertion's first:
    ``insertion_start``, default ``reference``) and ``"fill"`` (deletion's last: every pixel ``reference``).
    :func:`perturbation_curves` takes them to skip those forwards for every map of the same images."""
    insertion_start = reference if insertion_start is None else insertion_start
    device = next(model.parameters()).device
    model.eval()
    x, t = images.to(device), target.to(device)
    out = {}
    for key, ref in (("clean", None), ("start", insertion_start), ("fill", reference)):
        img = x if ref is None else _reference_chunk(ref, 0, x.shape[0], device)[:, 0].expand_as(x).contiguous()
        out[key] = _target_probs(model, img, t, batch_size).cpu()
    return out


@torch.no_grad()
def perturbation_curves(model: nn.Module, images: torch.Tensor, maps: torch.Tensor, target: torch.Tensor,
                        steps: int, reference: torch.Tensor, batch_size: int = 64,
                        insertion_start: Optional[torch.Tensor] = None,
                        endpoints: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """Target-class probability along insertion and deletion, each (B, steps + 1).

    ``reference``: what deleted pixels become; ``insertion_start``: what insertion starts
    from (default ``reference``); each a (C,) pixel or a (B, C, H, W) image, normalised.
    Perturbed images are built on the model's device, ``batch_size`` images at a time.
    ``endpoints``: :func:`endpoint_probs` of the same images and references; the first and last steps
    are then read from it and only the ``steps - 1`` inner steps are forwarded (the numbers of
    :func:`perturbation_curves_reference`, which forwards every step, to float rounding: tested).
    """
    if endpoints is None:
        return perturbation_curves_reference(model, images, maps, target, steps, reference, batch_size,
                                             insertion_start)
    insertion_start = reference if insertion_start is None else insertion_start
    _check_curves(images, maps, steps, reference, insertion_start)
    device = next(model.parameters()).device
    model.eval()
    B, C, H, W = images.shape
    inner = steps - 1
    counts = torch.round(torch.arange(1, steps, dtype=torch.float64) * (H * W) / steps).long().to(device)
    out = {"insertion": torch.empty(B, steps + 1), "deletion": torch.empty(B, steps + 1)}
    out["insertion"][:, 0], out["insertion"][:, -1] = endpoints["start"], endpoints["clean"]
    out["deletion"][:, 0], out["deletion"][:, -1] = endpoints["clean"], endpoints["fill"]
    if inner == 0:
        return out
    per_chunk = max(1, batch_size // inner) if batch_size >= inner else 1
    for start in range(0, B, per_chunk):
        x = images[start:start + per_chunk].to(device)
        b = x.shape[0]
        ranks = pixel_ranks(maps[start:start + per_chunk].to(device))  # (b, HW)
        shown = (ranks[:, None, :] < counts[None, :, None]).reshape(b, inner, 1, H, W)  # top-k per inner step
        xs = x[:, None]
        start_ref = _reference_chunk(insertion_start, start, b, device)
        fill_ref = _reference_chunk(reference, start, b, device)
        t = target[start:start + b].to(device).repeat_interleave(inner)
        for kind, img in (("insertion", torch.where(shown, xs, start_ref)),
                          ("deletion", torch.where(shown, fill_ref, xs))):
            probs = _target_probs(model, img.reshape(b * inner, C, H, W), t, batch_size)
            out[kind][start:start + b, 1:-1] = probs.reshape(b, inner).cpu()
    return out


@torch.no_grad()
def perturbation_curves_reference(model: nn.Module, images: torch.Tensor, maps: torch.Tensor, target: torch.Tensor,
                                  steps: int, reference: torch.Tensor, batch_size: int = 64,
                                  insertion_start: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """The plain computation of :func:`perturbation_curves`: every step of both curves, the ends included,
    forwarded for this map."""
    insertion_start = reference if insertion_start is None else insertion_start
    _check_curves(images, maps, steps, reference, insertion_start)
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
        t = target[start:start + b].to(device).repeat_interleave(steps + 1)
        for kind, img in (("insertion", torch.where(shown, xs, start_ref)),
                          ("deletion", torch.where(shown, fill_ref, xs))):
            probs = _target_probs(model, img.reshape(b * (steps + 1), C, H, W), t, batch_size)
            out[kind][start:start + b] = probs.reshape(b, steps + 1).cpu()
    return out


def auc(curves: torch.Tensor) -> torch.Tensor:
    """Trapezoid area under (B, steps + 1) curves over x in [0, 1]."""
    steps = curves.shape[1] - 1
    return ((curves[:, 1:] + curves[:, :-1]) / 2).sum(1) / steps


def insertion_deletion(model: nn.Module, images: torch.Tensor, maps: torch.Tensor, target: torch.Tensor,
                       steps: int, reference: torch.Tensor, batch_size: int = 64,
                       insertion_start: Optional[torch.Tensor] = None,
                       endpoints: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """Per-image insertion and deletion AUC (B,) plus the curves (B, steps + 1) (``endpoints``: see
    :func:`perturbation_curves`)."""
    curves = perturbation_curves(model, images, maps, target, steps, reference, batch_size, insertion_start,
                                 endpoints)
    return {"insertion": auc(curves["insertion"]), "deletion": auc(curves["deletion"]),
            "insertion_curve": curves["insertion"], "deletion_curve": curves["deletion"]}


# ----------------------------------------------------------------------------- the chapter's artefact


def figure_positions(labels: torch.Tensor, classes: int, per_class: int) -> list[int]:
    """A few images per class (the first ``classes`` classes present) for the map grid."""
    pos = []
    for c in sorted(set(labels.tolist()))[:classes]:
        pos += torch.nonzero(labels == c).flatten()[:per_class].tolist()
    return pos


SCORE_KEYS = ("insertion", "deletion", "insertion_curve", "deletion_curve")


def score_chunk(model: nn.Module, rand_model: nn.Module, images: torch.Tensor, a, mean, std,
                seed: int, figure_rows: list[int], methods=attr.METHODS, extras: bool = True) -> dict:
    """Every attribution method of ``methods`` on one chunk of images: its maps once, then per-image
    insertion / deletion AUC and curves against every reference in ``a.references`` and the maps of
    ``figure_rows``; with ``extras`` (display only), also the randomisation test's rank correlation
    and Chefer's maps under the other LayerScale rule. Each method's numbers do not depend on which
    other methods run (tested)."""
    subs = {r: substitutes(images, mean, std, r) for r in a.references}
    ends = {}  # reference -> (target, endpoint_probs): the curves' map-independent ends, once per chunk

    def endpoints(r, target):
        if r not in ends or not torch.equal(ends[r][0], target):
            start, fill = subs[r]
            ends[r] = (target, endpoint_probs(model, images, target, fill, start, batch_size=4 * a.batch_size))
        return ends[r][1]

    out = {}
    for m in methods:
        maps = attr.attribute(model, images, m, layerscale_rule=a.layerscale_rule, batch_size=a.batch_size, seed=seed)
        row = {"figure_maps": maps["maps"][figure_rows], "scores": {}}
        for r, (start, fill) in subs.items():
            scores = insertion_deletion(model, images, maps["maps"], maps["target"], a.steps, fill,
                                        batch_size=4 * a.batch_size, insertion_start=start,
                                        endpoints=endpoints(r, maps["target"]))
            row["scores"][r] = {key: scores[key] for key in SCORE_KEYS}
        if m != "random" and extras:
            rnd = attr.attribute(rand_model, images, m, target=maps["target"], layerscale_rule=a.layerscale_rule,
                                 batch_size=a.batch_size)
            row["randomisation"] = torch.as_tensor(attr.spearman_per_image(maps["maps"], rnd["maps"]))
        out[m] = row
    out["target"] = maps["target"]
    if not extras:
        return out
    # Chefer's maps under the other LayerScale rule (the paper's Eq. 14 vs the conserving z-rule)
    other = other_rule(a.layerscale_rule)
    maps = attr.attribute(model, images, "chefer", target=out["target"], layerscale_rule=other,
                          batch_size=a.batch_size)
    out["chefer_other_rule"] = {"scores": {}}
    for r, (start, fill) in subs.items():
        scores = insertion_deletion(model, images, maps["maps"], maps["target"], a.steps, fill,
                                    batch_size=4 * a.batch_size, insertion_start=start,
                                    endpoints=endpoints(r, maps["target"]))
        out["chefer_other_rule"]["scores"][r] = {key: scores[key] for key in SCORE_KEYS}
    return out


def other_rule(rule: str) -> str:
    """The LayerScale rule that is not ``rule`` (see ``attribution.LAYERSCALE_RULES``)."""
    return next(r for r in attr.LAYERSCALE_RULES if r != rule)


# ----------------------------------------------------------------------------- the chapter's tables
# Every interval and check the model chapter shows is computed here (intervals by impact_core.stats),
# so the notebook only displays and glues. ``by_model`` maps a row label to an attribution_results entry.
