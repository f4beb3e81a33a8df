"""Sec. 3.1: Wanda and magnitude pruning of every Linear inside ``model.blocks``.

* Wanda score (Eq. 1): ``S_ij = |W_ij| * ||X_j||_2``, with ``||X_j||_2`` the L2 norm of
  input feature ``j`` over all tokens of the calibration images.
* Magnitude score: ``S_ij = |W_ij|``.
* Comparison group: each output row; the ``int(in_features * s)`` lowest scores of every
  row are zeroed (stable sort: among equal scores the lower column index goes first).
* Pruned: ``qkv``, ``proj``, ``fc1``, ``fc2`` of every block; not the patch embedding or head.
* Calibration statistics are taken from the *dense* model for all layers in one pass
  (as locuslab/wanda's image-classifier code), by forward hooks on the real timm model.

Fine-tuning keeps the mask exactly: pruned weights are zeroed again after every
optimiser step (AdamW's weight decay and momentum would otherwise revive them).

A pruning method is one registered score function (``@register_pruning_method``); the
config, the pipeline and the chapters read :data:`PRUNING_METHODS`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..precision import autocast
from ..distributed import all_reduce_sum, local_rows


@dataclass(frozen=True)
class PruningMethod:
    """``score(weight, input_norms)`` ranks the weights of one Linear (lowest pruned first);
    ``input_norms`` (``||X_j||_2`` per input feature, :func:`input_norms`) is computed on the
    calibration images only for methods that need it. ``mask(score, sparsity)`` turns the scores
    into a keep-mask (default: the lowest ``int(cols * s)`` of every row, :func:`row_mask`);
    ``sparsity``: the one sparsity a structured pattern has (2:4 is 0.5), else None."""

    name: str
    score: Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
    needs_input_norms: bool = False
    mask: Optional[Callable[[torch.Tensor, float], torch.Tensor]] = None
    sparsity: Optional[float] = None


PRUNING_METHODS: dict[str, PruningMethod] = {}


def register_pruning_method(name: str, needs_input_norms: bool = False, mask=None, sparsity=None):
    """Decorator: register ``score(weight, norm)`` as the pruning method ``name`` (see :class:`PruningMethod`)."""
    def register(score):
        if name in PRUNING_METHODS:
            raise ValueError(f"pruning method {name!r} is already registered")
        PRUNING_METHODS[name] = PruningMethod(name, score, needs_input_norms, mask, sparsity)
        return score
    return register


@register_pruning_method("wanda", needs_input_norms=True)
def wanda_score(weight: torch.Tensor, norm: Optional[torch.Tensor]) -> torch.Tensor:
    """Eq. 1: ``S_ij = |W_ij| * ||X_j||_2``."""
    if norm is None:
        raise ValueError("wanda needs the input feature norms")
    return weight.abs() * norm.to(weight)[None, :]


@register_pruning_method("magnitude")
def magnitude_score(weight: torch.Tensor, norm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``S_ij = |W_ij|``."""
    return weight.abs()


def pruning_method(name: str) -> PruningMethod:
    try:
        return PRUNING_METHODS[name]
    except KeyError:
        raise ValueError(f"unknown pruning method {name!r}; known: {list(PRUNING_METHODS)}") from None


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` inside ``model.blocks``, by its dotted module name."""
    return {f"blocks.{name}": m for name, m in model.blocks.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def input_norms(model: nn.Module, batches, device="cpu", precision: str = "fp32") -> dict[str, torch.Tensor]:
    """``||X_j||_2`` per input feature of every prunable Linear, over all calibration tokens."""
    layers = prunable_linears(model)
    sq: dict[str, torch.Tensor] = {n: torch.zeros(m.in_features, dtype=torch.float64, device=device)
                                   for n, m in layers.items()}

    def hook(name):
        def fn(_m, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            sq[name] += x.double().pow(2).sum(0)
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    model.eval()
    try:
        for images, _ in tqdm(batches, desc="calibration", leave=False):
            with autocast(device, precision):
                model(local_rows(images).to(device))  # under torchrun: this process's rows
    finally:
        for h in handles:
            h.remove()
    return {n: all_reduce_sum(s).sqrt().float() for n, s in sq.items()}


def scores(weight: torch.Tensor, method: str, norm: torch.Tensor | None = None) -> torch.Tensor:
    """Pruning score of every weight under the registered ``method``."""
    return pruning_method(method).score(weight, norm)


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Fast path: keep-mask zeroing the ``int(cols * s)`` lowest scores of every row."""
    n_prune = int(score.shape[1] * sparsity)
    keep = torch.ones_like(score, dtype=torch.bool)
    if n_prune == 0:
        return keep
    order = torch.sort(score, dim=1, stable=True).indices[:, :n_prune]
    keep.scatter_(1, order, False)
    return keep


def row_mask_reference(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Plain reference of :func:`row_mask`: Python's stable sort, row by row."""
    rows, cols = score.shape
    n_prune = int(cols * sparsity)
    keep = torch.ones(rows, cols, dtype=torch.bool)
    values = score.tolist()
    for i in range(rows):
        for j in sorted(range(cols), key=lambda c: values[i][c])[:n_prune]:
            keep[i, j] = False
    return keep


def nm_mask(score: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Fast path: N:M semi-structured keep-mask, the ``n`` lowest scores of every group of ``m``
    consecutive input weights of a row zeroed (stable: among equal scores the lower column goes
    first). 2:4 is the pattern Hopper tensor cores accelerate."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"{n}:{m} sparsity needs the input dimension ({cols}) to be a multiple of {m}")
    groups = score.reshape(rows, cols // m, m)
    order = torch.sort(groups, dim=2, stable=True).indices[..., :n]
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(2, order, False)
    return keep.reshape(rows, cols)


def nm_mask_reference(score: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Plain reference of :func:`nm_mask`: Python's stable sort, group by group."""
    rows, cols = score.shape
    keep = torch.ones(rows, cols, dtype=torch.bool)
    values = score.tolist()
    for i in range(rows):
        for g in range(0, cols, m):
            for j in sorted(range(g, g + m), key=lambda c: values[i][c])[:n]:
                keep[i, j] = False
    return keep


register_pruning_method("wanda_2_4", needs_input_norms=True, mask=lambda score, s: nm_mask(score, 2, 4),
                        sparsity=0.5)(wanda_score)


@torch.no_grad()
def prune_model(model: nn.Module, method: str, sparsity: float,
                norms: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Zero the lowest-scoring weights of every block Linear in place; return the keep-masks."""
    rule = pruning_method(method)
    mask = rule.mask or row_mask
    masks = {}
    for name, layer in prunable_linears(model).items():
        s = scores(layer.weight, method, None if norms is None else norms[name])
        masks[name] = mask(s, sparsity)
        layer.weight.mul_(masks[name].to(layer.weight.dtype))
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Re-zero pruned weights (call after every optimiser step)."""
    layers = prunable_linears(model)
    for name, keep in masks.items():
        layers[name].weight.mul_(keep.to(layers[name].weight.device, layers[name].weight.dtype))


def layer_sparsity(model: nn.Module) -> dict[str, float]:
    """Measured fraction of exactly-zero weights of every block Linear."""
    return {n: (m.weight == 0).float().mean().item() for n, m in prunable_linears(model).items()}


def masks_from_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Keep-masks read back from a pruned model's zero pattern."""
    return {n: m.weight != 0 for n, m in prunable_linears(model).items()}
