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
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .precision import autocast
from .distributed import all_reduce_sum, local_rows

METHODS = ("wanda", "magnitude")


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
    """Pruning score of every weight (Eq. 1 for Wanda, ``|W|`` for magnitude)."""
    if method == "wanda":
        if norm is None:
            raise ValueError("wanda needs the input feature norms")
        return weight.abs() * norm.to(weight)[None, :]
    if method == "magnitude":
        return weight.abs()
    raise ValueError(f"unknown pruning method {method!r}; known: {METHODS}")


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


@torch.no_grad()
def prune_model(model: nn.Module, method: str, sparsity: float,
                norms: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Zero the lowest-scoring weights of every block Linear in place; return the keep-masks."""
    masks = {}
    for name, layer in prunable_linears(model).items():
        s = scores(layer.weight, method, None if norms is None else norms[name])
        masks[name] = row_mask(s, sparsity)
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
