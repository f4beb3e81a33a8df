"""Neuron-level interpretability: paper Sec. 3.2, 4.2, App. A.2 and A.4.

Units of a block ``b`` (App. A.2), in this order:

* the MLP neurons, site ``blocks.{b}.mlp_act`` (after GELU), activation ``a_u^t``;
* the attention heads, site ``blocks.{b}.heads`` (per-head output before ``proj``), one
  unit per head whose activation is the L2 norm of its output over the head dimension.

Importance by attribution patching towards the dataset mean (Nanda): for an image
``x`` of class ``c``, the first-order estimate of Eq. 2 for unit ``u`` is

    est_u(x) = sum_t (a_u^t(x) - mu_u^t) . d f_c(x) / d a_u^t  /  ||f(x)||

i.e. the predicted normalised drop of the class logit when ``u`` is replaced by its
per-position dataset mean ``mu`` (``pipeline.site_means``). For a head, ``a`` is its
D-dimensional output vector and the dot product runs over tokens and D (mean
ablation of a head replaces that vector). ``||f(x)||`` is the clean logit norm, a
constant. Importance ``I[c, u]`` is the mean of ``est_u(x)`` over the images of class
``c``; one forward and one backward per batch give it for all units and classes
(each image back-propagates its own class logit). The top-K units of a class are the
K largest ``I[c, u]`` (signed: the largest predicted drop), MLP neurons and heads
ranked together.

Per class and block, over its top-K units:

* impact (Eq. 2): the top-K units mean-ablated together (``sites.mean_ablate``),
  ``(f_c(x) - f_c^abl(x)) / ||f(x)||`` averaged over the images of class ``c``
  (all classes at once: each image gets its own class's mask; the blocks' ablations share
  forward passes, the batch being repeated once per block);
* selectivity (Eq. 3): mean AUROC of the units' CLS activation for class ``c``;
* class variance (Eq. 4-5) and label entropy (Eq. 6-7): means over the units (NaN
  entries, see :mod:`impact_core.unit_metrics`, are skipped).

Winner's curse: the paper chooses the top-K units and measures them on the same images, which
biases the metrics towards whatever the selection favoured. The metric images are therefore
split in two halves, seeded and stratified by class (``unit_metrics.stratified_halves``): the
top-K are chosen on the *selection* half and all four metrics are measured on the
*measurement* half (the result keys ``impact``, ``selectivity``, ...). The paper's variant,
chosen and measured on all images, is kept beside it with the suffix ``_same``. One
attribution pass feeds one accumulator per half; one ablation pass runs both variants.

The passes are those of :mod:`impact_core.methods.unit_attribution`, with :class:`BlockUnits` as the
unit family (under torchrun each process takes its rows of every batch).

Validation: on a seeded sample of units per block (half drawn from the same-image top-K
sets, half from the other units), the attribution estimate per class is compared with the
true single-unit mean-ablation effect (Eq. 2 with K = 1) on the same images.
"""
from __future__ import annotations

import logging
from typing import Iterable, Optional

import numpy as np
import torch
from torch import Tensor

from . import unit_attribution
from .sites import HookedViT, mean_ablate, site_name
from .unit_attribution import SAME
from .unit_metrics import max_over_patches

log = logging.getLogger("impact_core")

UNIT_SITES = ("mlp_act", "heads")
NEURON_METRICS = ("impact", "selectivity", "class_variance", "label_entropy")


# --- units ----------------------------------------------------------------------------------------------------------

def block_unit_counts(hooked: HookedViT) -> tuple[int, int]:
    """(MLP neurons, heads) per block; units are numbered neurons first, then heads."""
    return hooked.mlp_dim, hooked.num_heads


def unit_activation(mlp_act: Tensor, heads: Tensor) -> Tensor:
    """Per-token unit activations ``(B, N, M + H)``: MLP neurons, then head-output L2 norms."""
    return torch.cat([mlp_act, heads.norm(dim=-1)], dim=-1)


def attribution_estimate(act: Tensor, mean: Tensor, grad: Tensor) -> Tensor:
    """``sum_t (a^t - mu^t) . g^t`` per image and unit: ``(B, N, U[, D]) -> (B, U)``."""
    prod = (act - mean) * grad
    return prod.sum(dim=(1, 3)) if prod.ndim == 4 else prod.sum(dim=1)


class BlockUnits:
    """The units of block ``block`` as a ``unit_attribution.UnitFamily``: read at ``mlp_act`` and
    ``heads``, mean-ablated (Eq. 11) towards the per-position dataset means ``means``."""

    input_grad = True  # inner nodes of the model: the graph starts at the input
    clean_forward = True  # the read hooks return the activations unchanged

    def __init__(self, hooked: HookedViT, block: int, means: dict[str, Tensor], device="cpu"):
        self.names = tuple(site_name(block, site) for site in UNIT_SITES)
        self.mu = tuple(means[n].to(device) for n in self.names)
        self.n_mlp, n_heads = block_unit_counts(hooked)
        self.units = self.n_mlp + n_heads

    def read_hooks(self, store: dict) -> dict:
        def keep(name):
            def fn(act):
                store[name] = act
                return act  # returned so that the activation itself is in the graph (heads are a view)
            return fn
        return {n: keep(n) for n in self.names}

    def activations(self, store: dict) -> list[Tensor]:
        return [store[n] for n in self.names]

    def estimate(self, acts: list[Tensor], grads: list[Tensor], norm: Tensor) -> Tensor:
        """``sum_t (a_u^t - mu_u^t) . g_u^t / ||f||`` (attribution towards the mean)."""
        est = torch.cat([attribution_estimate(a, mu, g) for a, mu, g in zip(acts, self.mu, grads)], dim=1)
        return est.double() / norm.double()[:, None]

    def scores(self, acts: list[Tensor]) -> tuple[Tensor, Tensor]:
        u = unit_activation(*acts)
        return max_over_patches(u), u[:, 0]

    def ablation_hooks(self, keep: Tensor) -> dict:
        (m_name, h_name), (m_mu, h_mu) = self.names, self.mu
        return {m_name: mean_ablate(m_mu, keep[:, None, :self.n_mlp], m_name),
                h_name: mean_ablate(h_mu, keep[:, None, self.n_mlp:], h_name)}


def block_units(hooked: HookedViT, blocks: Iterable[int], means: dict[str, Tensor], device="cpu") -> dict:
    """``{block: BlockUnits}`` for each distinct block, in order."""
    return {b: BlockUnits(hooked, b, means, device) for b in dict.fromkeys(blocks)}


def check_setup(hooked: HookedViT, blocks: Iterable[int], top_k: int, num_classes: int) -> list[int]:
    """Validate blocks and K against the model before any compute."""
    blocks = list(blocks)
    if not blocks:
        raise ValueError("neuron.blocks: give at least one block")
    for b in blocks:
        if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < hooked.depth:
            raise ValueError(f"neuron.blocks: block {b!r} is not in [0, {hooked.depth}) for this model")
    if len(set(blocks)) != len(blocks):
        raise ValueError(f"neuron.blocks: repeated block in {blocks}")
    units = sum(block_unit_counts(hooked))
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= units:
        raise ValueError(f"neuron.top_k: must be an integer in [1, {units}] (units per block), got {top_k!r}")
    n_out = hooked.model.head.out_features if hasattr(hooked.model.head, "out_features") else None
    if n_out is not None and n_out != num_classes:
        raise ValueError(f"the model has {n_out} outputs but the data set {num_classes} classes")
    return blocks


# --- the two passes --------------------------------------------------------------------------------------------------

def attribution_pass(hooked: HookedViT, batches: Iterable, means: dict[str, Tensor], blocks: list[int],
                     num_classes: int, device="cpu", validation_images: int = 0, selection: Optional[Tensor] = None,
                     desc: str = "attribution") -> dict:
    """:func:`unit_attribution.attribution_pass` for the units of ``blocks``; results keyed by block."""
    return unit_attribution.attribution_pass(hooked, batches, block_units(hooked, blocks, means, device), num_classes,
                                             device, validation_images, selection, desc)


def ablation_jobs(hooked: HookedViT, batches: Iterable, means: dict[str, Tensor], jobs: list[tuple],
                  num_classes: int, device="cpu", limit: Optional[int] = None, clean: Optional[tuple] = None,
                  max_batch: int = 1024, desc: str = "ablation", restart: bool = True) -> Tensor:
    """:func:`unit_attribution.ablation_jobs` with mean ablation (Eq. 11), shape ``(jobs, C)``; a job is
    ``(block, keep[, images])``, ``keep`` ``(U,)`` or ``(C, U)`` with 0 for a unit replaced by its mean."""
    families = block_units(hooked, [j[0] for j in jobs], means, device)
    return unit_attribution.ablation_jobs(hooked, batches, families, jobs, num_classes, device, limit, clean,
                                          max_batch, desc, restart=restart)


def ablation_effect(hooked: HookedViT, batches: Iterable, means: dict[str, Tensor], block: int, keep: Tensor,
                    num_classes: int, device="cpu", limit: Optional[int] = None, clean: Optional[tuple] = None,
                    desc: str = "ablation") -> Tensor:
    """Eq. 2 averaged per class for one ablation ``(block, keep)``, shape ``(C,)`` (see :func:`ablation_jobs`)."""
    return ablation_jobs(hooked, batches, means, [(block, keep)], num_classes, device, limit, clean, desc=desc)[0]


def validation_units(top: Tensor, num_units: int, n: int, seed: int) -> list[int]:
    """A seeded sample of ``n`` units: half of the most frequent top-K units, half of the rest."""
    n = min(n, num_units)
    freq = torch.bincount(top.reshape(-1), minlength=num_units)
    ranked = [int(u) for u in torch.argsort(-freq, stable=True) if freq[u] > 0]
    chosen = ranked[: (n + 1) // 2]
    rest = np.array(sorted(set(range(num_units)) - set(chosen)))
    rng = np.random.default_rng(seed)
    chosen += [int(u) for u in rng.choice(rest, size=min(n - len(chosen), len(rest)), replace=False)]
    return sorted(chosen)


# --- everything for one model ----------------------------------------------------------------------------------------

def analyse(hooked: HookedViT, batches: Iterable, means: dict[str, Tensor], blocks: Iterable[int], top_k: int,
            num_classes: int, classes: Optional[list[int]] = None, n_validation_units: int = 8,
            validation_images: int = 0, device="cpu", seed: int = 0, max_batch: int = 1024,
            selection: Optional[Tensor] = None, desc: str = "", same_image_impact: bool = True) -> dict:
    """Top-K units per class and block and their four metrics, held-out and same-image (module docstring).
    ``same_image_impact=False``: the same-image sets are not ablated (``impact_same`` NaN; display only).

    ``batches`` must be re-iterable in a fixed order (three passes). ``classes`` are the
    analysed classes (default: all); AUROC, entropy and importance always use all classes.
    ``selection``: bool ``(n,)`` in batch order, True for the selection half (default:
    ``stratified_halves(batch_labels(batches), seed)``). ``max_batch``: images per forward of the ablation passes.

    Returns torch-serialisable values. Shape ``(blocks, classes)``: the held-out metrics
    ``impact``, ``selectivity``, ``class_variance``, ``label_entropy``, ``head_fraction``
    (units chosen on the selection half, measured on the other), the same with suffix
    ``_same`` (chosen and measured on all images, the paper's), and ``zero_importance``
    (how many of the held-out top-K have zero or NaN importance on the selection half).
    ``topk`` / ``topk_same`` ``(blocks, classes, K)``; ``importance`` (selection half) /
    ``importance_same`` (all images) ``(blocks, C, U)``; ``selection`` ``(n,)``.
    """
    blocks = check_setup(hooked, blocks, top_k, num_classes)
    n_mlp, n_heads = block_unit_counts(hooked)
    units = n_mlp + n_heads
    families = block_units(hooked, blocks, means, device)
    res = unit_attribution.analyse(hooked, batches, families, top_k, num_classes, classes=classes, selection=selection,
                                   seed=seed, validation_images=validation_images, device=device,
                                   max_batch=max_batch, desc=desc, same_image_impact=same_image_impact)
    classes, selection, first = res["classes"], res["selection"], res["pass"]
    out = {}
    for suffix, chosen in res["variants"].items():
        per_block = [chosen[b] for b in blocks]
        values = [c["values"] for c in per_block]
        out["impact" + suffix] = torch.stack([c["impact"] for c in per_block])
        out["selectivity" + suffix] = torch.stack([v["selectivity"].mean(1) for v in values]).double()
        out["class_variance" + suffix] = torch.stack([v["class_variance"].nanmean(1) for v in values]).double()
        out["label_entropy" + suffix] = torch.stack([v["label_entropy"].nanmean(1) for v in values]).double()
        out["head_fraction" + suffix] = torch.stack([(c["top"] >= n_mlp).double().mean(1) for c in per_block])
        out["topk" + suffix] = torch.stack([c["top"] for c in per_block])
        out["importance" + suffix] = torch.stack([c["importance"].float() for c in per_block])
    out["zero_importance"] = torch.stack([res["variants"][""][b]["zero"] for b in blocks])
    val_rows = []
    if n_validation_units > 0 and validation_images > 0:  # units of the all-image top-K sets
        val_units = [(b, u) for i, b in enumerate(blocks)
                     for u in validation_units(out["topk" + SAME][i], units, n_validation_units, seed + 101 * b)]
        single = []
        for b, u in val_units:
            keep_u = torch.ones(units)
            keep_u[u] = 0
            single.append((b, keep_u))
        true = unit_attribution.ablation_jobs(hooked, batches, families, single, num_classes, device,
                                              limit=validation_images, clean=(first["own_logit"], first["logit_norm"]),
                                              max_batch=max_batch, desc=f"validate {desc}".strip())
        for j, (b, u) in enumerate(val_units):
            est = first["importance_val"][b][:, u]
            val_rows += [(b, u, c, float(est[c]), float(true[j, c])) for c in classes]
    val = torch.tensor([r[3:] for r in val_rows], dtype=torch.float64).reshape(-1, 2)
    out.update(
        blocks=blocks, classes=classes, top_k=top_k, num_mlp=n_mlp, num_heads=n_heads,
        selection=selection.clone(), images_per_class=first["count"], n_images=int(first["count"].sum()),
        selection_images_per_class=first["count_sel"], n_selection_images=int(first["count_sel"].sum()),
        n_validation_images=min(validation_images, int(first["count"].sum())),
        validation={"block": torch.tensor([r[0] for r in val_rows], dtype=torch.long),
                    "unit": torch.tensor([r[1] for r in val_rows], dtype=torch.long),
                    "class": torch.tensor([r[2] for r in val_rows], dtype=torch.long),
                    "estimate": val[:, 0], "true": val[:, 1]},
    )
    return out
