"""SAE feature interpretability: the neuron chapter's four metrics on SAE latents (paper Sec. 3.3 / 4.3).

Each latent of a trained :mod:`impact_core.sae` SAE on ``blocks.{b}.resid_post`` is a unit.
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

Memory: the AUROC needs every image's score for every latent, kept as float32 ``(n, U)``; for
the paper preset (10,000 evaluation images, 24,576 latents) that is 0.98 GB; the per-class sums
are ``3 x C x U`` float64 (0.59 GB for 1,000 classes). Patch activations are never stored.
"""
from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .sae import BatchTopKSAE, token_positions

log = logging.getLogger("impact_core")

SAE_METRICS = ("impact", "selectivity", "class_variance", "label_entropy")
VERSION = 1  # bump when the computation changes (part of the cache key)


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


def scores_of(f: Tensor, tokens: str) -> tuple[Tensor, Tensor]:
    """``(cls_score, m)`` per image, each ``(B, U)``: the Eq. 3 score and the Eq. 5 max (see docstring)."""
    if tokens == "cls":
        return f[:, 0], f[:, 0]
    if tokens == "patch":
        m = f.amax(1)
        return m, m
    return f[:, 0], f[:, 1:].amax(1)


def feature_pass(hooked, sae: BatchTopKSAE, batches: Iterable, block: int, tokens: str, num_classes: int,
                 device="cpu", desc: str = "SAE attribution") -> dict:
    """One forward + backward per batch: importance ``(C, U)`` and the per-class statistics of the latents."""
    from .unit_metrics import StreamingClassStats

    name = f"blocks.{block}.resid_post"
    U = sae.n_latents
    imp_sum = torch.zeros(num_classes, U, dtype=torch.float64, device=device)
    count = torch.zeros(num_classes, dtype=torch.float64, device=device)
    stats = StreamingClassStats(U, num_classes, device=device)
    for p in hooked.parameters():
        p.requires_grad_(False)
    hooked.eval()
    sae.eval()
    for images, labels in tqdm(batches, desc=desc, leave=False):
        x, y = images.to(device), labels.to(device).long()
        store: dict = {}
        logits = hooked.run_with_hooks(x, {name: splice_hook(sae, tokens, store, grad=True)})
        f = store["f"]
        (g,) = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), f)
        est = (f.detach() * g).sum(1) / logits.detach().norm(dim=1, keepdim=True)  # (B, U)
        imp_sum.index_add_(0, y, est.double())
        count.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
        cls, m = scores_of(f.detach(), tokens)
        stats.update(m, y, cls)
    importance = imp_sum / count.clamp_min(1)[:, None]
    importance[count == 0] = float("nan")
    return {"importance": importance.cpu(), "count": count.cpu(), "stats": stats}


@torch.no_grad()
def ablation_effect(hooked, sae: BatchTopKSAE, batches: Iterable, block: int, tokens: str, keep: Tensor,
                    num_classes: int, device="cpu", desc: str = "SAE ablation") -> Tensor:
    """Eq. 2 with zero ablation, per class: mean over ``D_c`` of ``(f_c - f_c^abl) / ||f||``, shape ``(C,)``.

    ``keep`` is ``(C, U)``: each image's own class row (0 = latent zeroed). ``f`` are the
    clean model's logits; the ablated run splices the SAE with the error term kept.
    """
    name = f"blocks.{block}.resid_post"
    keep = keep.to(device)
    sums = torch.zeros(num_classes, dtype=torch.float64, device=device)
    count = torch.zeros(num_classes, dtype=torch.float64, device=device)
    for images, labels in tqdm(batches, desc=desc, leave=False):
        x, y = images.to(device), labels.to(device).long()
        clean = hooked.model(x)
        abl = hooked.run_with_hooks(x, {name: splice_hook(sae, tokens, {}, keep=keep[y])})
        effect = (clean.gather(1, y[:, None]) - abl.gather(1, y[:, None])).squeeze(1) / clean.norm(dim=1)
        sums.index_add_(0, y, effect.double())
        count.index_add_(0, y, torch.ones_like(effect, dtype=torch.float64))
    out = sums / count.clamp_min(1)
    out[count == 0] = float("nan")
    return out.cpu()


def analyse(hooked, sae: BatchTopKSAE, batches: Iterable, block: int, tokens: str, top_k: int, num_classes: int,
            device="cpu", desc: str = "") -> dict:
    """Top-K latents per class and their four metrics; ``batches`` must be re-iterable (two passes)."""
    if not 1 <= top_k <= sae.n_latents:
        raise ValueError(f"top_k must lie in [1, {sae.n_latents}] (the number of latents), got {top_k}")
    first = feature_pass(hooked, sae, batches, block, tokens, num_classes, device, desc=f"SAE attribution {desc}")
    imp = first["importance"]
    top = imp.nan_to_num(float("-inf")).topk(top_k, dim=1).indices  # (C, K)
    keep = torch.ones(num_classes, sae.n_latents)
    keep.scatter_(1, top, 0.0)
    impact = ablation_effect(hooked, sae, batches, block, tokens, keep, num_classes, device,
                             desc=f"SAE ablation {desc}")
    st = first["stats"]
    auroc, cv, ent = st.auroc().cpu(), st.class_variance().cpu(), st.label_entropy().cpu()
    cols = torch.arange(num_classes)[:, None].expand_as(top)
    per_latent = {"selectivity": auroc[top, cols], "class_variance": cv[top, cols], "label_entropy": ent[top]}
    out = {"impact": impact.double()}
    for key, v in per_latent.items():
        out[key] = v.double().nanmean(1)
    return {**out, "per_latent": {k: v.double() for k, v in per_latent.items()}, "topk": top,
            "importance": imp.float(), "images_per_class": first["count"], "n_images": int(first["count"].sum()),
            "top_k": top_k, "all_auroc_max": auroc.nan_to_num(0.5).amax(1).float()}


def sae_feature_metrics(cfg, sparsity: float, tokens: str | None = None, k: int | None = None,
                        expansion: int | None = None, method: str = "wanda") -> dict:
    """:func:`analyse` for the SAE of :func:`impact_core.sae.train_sae` (cached).

    Images: the same ``sae.eval_images`` evaluation images as the SAE's quality metrics.
    """
    from . import pipeline
    from .data import Batches
    from .sae import _split_images, load_sae, sae_inputs, train_sae

    entry = train_sae(cfg, sparsity, tokens, k, expansion, method)
    sae_key = pipeline.cache_for(cfg).key("sae", sae_inputs(cfg, sparsity, entry["tokens"], entry["k"],
                                                            entry["expansion"], method))
    inputs = {"sae": sae_key, "top_k": cfg.sae.top_k, "eval_images": cfg.sae.eval_images, "version": VERSION}

    def compute():
        device = pipeline.resolve_device(cfg)
        hooked = pipeline.hooked_model(cfg, sparsity, method)
        sae = load_sae(entry, device)
        split = _split_images(pipeline.splits(cfg)["eval"], cfg.sae.eval_images, cfg.seed + 1)
        batches = Batches(split, cfg.data.batch_size)
        return analyse(hooked, sae, batches, entry["block"], entry["tokens"], cfg.sae.top_k,
                       cfg.model.num_classes, device, desc=pipeline.level_label(sparsity))

    return pipeline.cache_for(cfg).get_or_compute("sae_features", inputs, compute)

