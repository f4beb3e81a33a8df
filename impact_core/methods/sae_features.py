"""SAE feature interpretability: the neuron chapter's four metrics on SAE latents (paper Sec. 3.3 / 4.3).

Each latent of a trained :mod:`impact_core.methods.sae` SAE on ``blocks.{b}.resid_post`` is a unit.
The SAE is spliced into the residual stream at the positions of its token set::

    x  ->  x_hat(f) + (x - x_hat(f(x)))        (the SAE error term is kept)

so that with no latent touched the model is exactly unchanged, and an ablation changes the
residual only by the decoder directions of the ablated latents. The paper ablates SAE
latents to zero (Sec. 4.3, "zero ablation"), not to their mean.

Top-K latents per class: attribution patching towards zero, the same criterion as the
neuron chapter's (there towards the mean). For an image ``x`` of class ``c``::

    est_u(x) = sum_t f_u^t(x) * d f_c(x) / d f_u^t  /  ||f(x)||

is the first-order estimate of Eq. 2 when latent ``u`` is set to 0 (``f_c - f_c^abl``,
``f`` the logits). Importance ``I[c, u]`` is its mean over the images of class ``c`` (one
forward and one backward per batch for all latents and classes: each image
back-propagates its own class logit); the top-K latents of class ``c`` are the K largest.

Per class, over its top-K latents (``sae.top_k``):

* impact (Eq. 2): the top-K latents zeroed together, ``(f_c(x) - f_c^abl(x)) / ||f(x)||``
  averaged over the images of class ``c``;
* selectivity (Eq. 3): AUROC of the latent's activation on the CLS token for class ``c``
  (for an SAE trained on patch tokens only: its max over patches);
* class variance (Eq. 4) and label entropy (Eq. 6-7) of ``m_u(x)``, the latent's max over
  the patch tokens (Eq. 5) for SAEs on ``patch`` or ``all`` tokens; for a CLS-token SAE
  (the paper's probe) the latent exists on the CLS token only and ``m_u(x)`` is its CLS
  activation. NaN entries (a latent never active in a class) are skipped in the means.

Per-class means (shape ``(C,)``) and the per-(class, latent) values ``(C, K)`` are returned;
the chapter shows distributions over the latents.

Winner's curse (as in :mod:`impact_core.methods.neuron`): the evaluation images are split into two
halves, seeded and stratified by class (``unit_metrics.stratified_halves``); the top-K latents
are chosen on the selection half and measured on the other (keys ``impact``, ``selectivity``,
...). The paper's variant, chosen and measured on all images, has the suffix ``_same``.

The passes are those of :mod:`impact_core.methods.unit_attribution`, with :class:`SAELatents` as
the unit family (under torchrun each process takes its rows of every batch).

Memory: the AUROC needs every image's score for every latent, kept as float32 ``(n, U)``; for
the paper preset (10,000 evaluation images, 24,576 latents) that is 0.98 GB; the per-class sums
are ``3 x C x U`` float64 (0.59 GB for 1,000 classes). Patch activations are never stored.
"""
from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import Tensor

from . import unit_attribution
from .sae import BatchTopKSAE, token_positions
from .unit_attribution import SAME  # noqa: F401  (suffix of the same-image result keys)

log = logging.getLogger("impact_core")

SAE_METRICS = ("impact", "selectivity", "class_variance", "label_entropy")


def splice_hook(sae: BatchTopKSAE, tokens: str, store: dict, keep: Tensor | None = None, grad: bool = False):
    """Hook for ``resid_post``: replace the token set's residual by ``x_hat(f * keep) + error``.

    ``keep`` is ``(B, U)`` (0 = latent set to zero for that image) or None. With ``grad``,
    ``f`` becomes a leaf that requires grad (``store['f']``) and the output value is exactly
    the clean residual. ``store['f']`` always holds the clean latents ``(B, n_tok, U)``.
    """

    def fn(act: Tensor) -> Tensor:
        pos = token_positions(tokens, act.shape[1])
        x = act[:, pos]
        with torch.no_grad():
            f = sae.encode(x)
            err = x - sae.decode(f)
        if grad:
            f = f.detach().requires_grad_(True)
        store["f"] = f
        f_used = f if keep is None else f * keep[:, None, :].to(f.dtype)
        new = act.clone()
        new[:, pos] = sae.decode(f_used) + err
        return new

    return fn


class SAELatents:
    """The latents of ``sae`` spliced into ``blocks.{block}.resid_post`` as a ``unit_attribution.UnitFamily``:
    read at the splice, zero-ablated (``splice_hook``)."""

    input_grad = False  # the latents are leaves of the graph
    clean_forward = False  # the splice gives the clean residual up to rounding only

    def __init__(self, sae: BatchTopKSAE, block: int, tokens: str):
        self.sae, self.tokens = sae, tokens
        self.name = f"blocks.{block}.resid_post"
        self.units = sae.n_latents

    def read_hooks(self, store: dict) -> dict:
        return {self.name: splice_hook(self.sae, self.tokens, store, grad=True)}

    def activations(self, store: dict) -> list[Tensor]:
        return [store["f"]]

    def estimate(self, acts: list[Tensor], grads: list[Tensor], norm: Tensor) -> Tensor:
        """``sum_t f_u^t . d f_y / d f_u^t / ||f||`` (attribution towards 0)."""
        (f,), (g,) = acts, grads
        return ((f * g).sum(1) / norm[:, None]).double()

    def scores(self, acts: list[Tensor]) -> tuple[Tensor, Tensor]:
        """``(m, cls)``: Eq. 5 max over patches and Eq. 3 CLS score; a CLS-only or patch-only SAE uses
        what it has for both."""
        f = acts[0]
        if self.tokens == "cls":
            return f[:, 0], f[:, 0]
        if self.tokens == "patch":
            m = f.amax(1)
            return m, m
        return f[:, 1:].amax(1), f[:, 0]

    def ablation_hooks(self, keep: Tensor) -> dict:
        return {self.name: splice_hook(self.sae, self.tokens, {}, keep=keep)}


def _latents(hooked, sae: BatchTopKSAE, block: int, tokens: str) -> dict:
    """``{block: SAELatents}``; the model frozen (gradients flow to the latents only), the SAE in inference mode."""
    for p in hooked.parameters():
        p.requires_grad_(False)
    hooked.eval()
    sae.eval()
    return {block: SAELatents(sae, block, tokens)}


def feature_pass(hooked, sae: BatchTopKSAE, batches: Iterable, block: int, tokens: str, num_classes: int,
                 device="cpu", selection: Tensor | None = None, desc: str = "SAE attribution") -> dict:
    """:func:`unit_attribution.attribution_pass` for the latents: ``importance`` ``(C, U)``, ``stats``, ...
    (``importance_sel`` and ``stats_meas`` for the halves of ``selection``)."""
    first = unit_attribution.attribution_pass(hooked, batches, _latents(hooked, sae, block, tokens), num_classes,
                                              device, selection=selection, desc=desc)
    return {k: v[block] if isinstance(v, dict) else v for k, v in first.items()}


def ablation_effects(hooked, sae: BatchTopKSAE, batches: Iterable, block: int, tokens: str, jobs: list[tuple],
                     num_classes: int, device="cpu", max_batch: int = 1, desc: str = "SAE ablation") -> Tensor:
    """Eq. 2 with zero ablation, per job and class: mean over ``D_c`` of ``(f_c - f_c^abl) / ||f||``, ``(jobs, C)``.

    A job is ``(keep, images)``: ``keep`` ``(C, U)`` gives each image's own class row (0 =
    latent zeroed); ``images`` (bool ``(n,)`` in batch order, None: all) are the images the
    job averages over. ``f`` are the clean model's logits; the ablated run splices the SAE with
    the error term kept. ``max_batch``: see :func:`unit_attribution.ablation_jobs`.
    """
    return unit_attribution.ablation_jobs(hooked, batches, _latents(hooked, sae, block, tokens),
                                          [(block, keep, images) for keep, images in jobs], num_classes, device,
                                          max_batch=max_batch, desc=desc)


def ablation_effect(hooked, sae: BatchTopKSAE, batches: Iterable, block: int, tokens: str, keep: Tensor,
                    num_classes: int, device="cpu", desc: str = "SAE ablation") -> Tensor:
    """Eq. 2 with zero ablation for one ``keep`` ``(C, U)`` over all images, shape ``(C,)``
    (see :func:`ablation_effects`)."""
    return ablation_effects(hooked, sae, batches, block, tokens, [(keep, None)], num_classes, device, desc=desc)[0]


def analyse(hooked, sae: BatchTopKSAE, batches: Iterable, block: int, tokens: str, top_k: int, num_classes: int,
            device="cpu", selection: Tensor | None = None, seed: int = 0, max_batch: int = 1, desc: str = "",
            same_image_impact: bool = True) -> dict:
    """Top-K latents per class and their four metrics, held-out and same-image; ``batches`` must be
    re-iterable (two passes).

    ``selection``: bool ``(n,)`` in batch order, True for the selection half (default:
    ``stratified_halves(batch_labels(batches), seed)``). ``max_batch``: images per forward of the
    ablation pass (1: each of the two top-K ablations its own forwards). Returns, shape ``(C,)``: the held-out
    ``impact``, ``selectivity``, ``class_variance``, ``label_entropy`` (chosen on the selection
    half, measured on the other), the same with suffix ``_same`` (the paper's: all images), and
    ``zero_importance`` (how many of the held-out top-K have zero or NaN importance on the
    selection half); ``per_latent`` / ``per_latent_same`` ``{metric: (C, K)}``; ``topk`` /
    ``topk_same`` ``(C, K)``; ``importance`` (selection half) / ``importance_same`` ``(C, U)``.
    ``same_image_impact=False``: the same-image sets are not ablated (``impact_same`` NaN).
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= sae.n_latents:
        raise ValueError(f"top_k must be an integer in [1, {sae.n_latents}] (the number of latents), got {top_k!r}")
    res = unit_attribution.analyse(hooked, batches, _latents(hooked, sae, block, tokens), top_k, num_classes,
                                   selection=selection, seed=seed, device=device, max_batch=max_batch,
                                   desc=f"SAE {desc}".strip(), same_image_impact=same_image_impact)
    out = {}
    for suffix, chosen in res["variants"].items():
        c = chosen[block]
        per_latent = {k: v.double() for k, v in c["values"].items()}
        for key, v in per_latent.items():
            out[key + suffix] = v.nanmean(1)
        out.update({"per_latent" + suffix: per_latent, "topk" + suffix: c["top"],
                    "importance" + suffix: c["importance"].float(), "impact" + suffix: c["impact"]})
    first = res["pass"]
    return {**out, "zero_importance": res["variants"][""][block]["zero"], "selection": res["selection"].clone(),
            "images_per_class": first["count"], "n_images": int(first["count"].sum()),
            "selection_images_per_class": first["count_sel"], "n_selection_images": int(first["count_sel"].sum()),
            "top_k": top_k}
