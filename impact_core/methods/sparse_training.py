"""Weight sparsity trained in from scratch (after Gao et al. 2025, "Weight-sparse transformers
have interpretable circuits"), for the chapter that asks whether a model *trained* sparse is
simpler to interpret where a pruned one is not.

The constraint: every Linear inside ``model.blocks`` keeps only its ``k`` largest-magnitude
weights (an L0 constraint per matrix, ``k = round((1 - s) * numel)``), enforced by projection
after every optimiser step. The kept fraction is annealed from dense to the target:
``s(t) = target * min(1, t / (anneal_fraction * steps))`` (Gao et al. anneal the L0 from dense
over the first part of training; the linear shape and ``anneal_fraction`` = 0.5 are our
choices). Architecture, data, optimiser and budget are the dense model's; only the projection
is added. What we do not take from Gao et al.: their activation sparsity, their bridges, and
their much longer budgets.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .pruning import prunable_linears


def scheduled_sparsity(step: int, steps: int, target: float, anneal_fraction: float = 0.5) -> float:
    """The sparsity after optimiser step ``step`` (1-based) of ``steps``: linear from 0 to
    ``target``, reached at step ``ceil(anneal_fraction * steps)`` and held after it."""
    if not 0 <= target < 1:
        raise ValueError(f"target sparsity must lie in [0, 1), got {target}")
    if not 0 < anneal_fraction <= 1:
        raise ValueError(f"anneal_fraction must lie in (0, 1], got {anneal_fraction}")
    reach = max(1, math.ceil(anneal_fraction * steps))
    return target * min(1.0, step / reach)


def kept_weights(numel: int, sparsity: float) -> int:
    """``k``: how many weights of a matrix of ``numel`` the L0 constraint keeps."""
    return max(1, round((1.0 - sparsity) * numel))


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask of the ``kept_weights`` largest ``|W|`` of the whole matrix (ties: the lower
    flat index is kept first, as a stable sort would).

    Fast path (it runs after every optimiser step): the k-th largest magnitude ``t`` by
    ``torch.kthvalue`` (linear time, where a sort is ``n log n``), every ``|W| > t`` kept, then
    the first of the ``|W| == t`` in flat order up to ``k``; :func:`magnitude_mask_reference` is
    the plain stable sort it equals (tested, ties included)."""
    k = kept_weights(weight.numel(), sparsity)
    a = weight.detach().abs().flatten()
    if k >= a.numel():
        return torch.ones_like(weight, dtype=torch.bool)
    t = torch.kthvalue(a, a.numel() - k + 1).values
    keep = a > t
    missing = k - int(keep.sum())
    if missing > 0:
        keep[torch.nonzero(a == t).flatten()[:missing]] = True
    return keep.view_as(weight)


def magnitude_mask_reference(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Plain reference of :func:`magnitude_mask`: Python's stable sort of the flat magnitudes (the
    fast path before it was ``torch.sort(..., stable=True)``, equal to this)."""
    values = weight.detach().abs().flatten().tolist()
    k = kept_weights(len(values), sparsity)
    keep = torch.zeros(len(values), dtype=torch.bool)
    for j in sorted(range(len(values)), key=lambda c: -values[c])[:k]:
        keep[j] = True
    return keep.view_as(weight)


@torch.no_grad()
def project(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """Zero all but the largest-magnitude weights of every block Linear in place (the L0
    projection); return the keep-masks."""
    masks = {}
    for name, layer in prunable_linears(model).items():
        masks[name] = magnitude_mask(layer.weight, sparsity)
        layer.weight.mul_(masks[name].to(layer.weight.dtype))
    return masks


class L0Projection:
    """``after_step`` hook for a trainer: after optimiser step t, :func:`project` to
    :func:`scheduled_sparsity` ``(t)``. ``history`` records the sparsity of every step."""

    def __init__(self, steps: int, target: float, anneal_fraction: float = 0.5):
        self.steps, self.target, self.anneal_fraction = steps, target, anneal_fraction
        self.step = 0
        self.history: list[float] = []

    def __call__(self, model: nn.Module) -> None:
        self.step += 1
        s = scheduled_sparsity(self.step, self.steps, self.target, self.anneal_fraction)
        project(model, s)
        self.history.append(s)
