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

Winner's curse (as in :mod:`impact_core.neuron`): the evaluation images are split into two
halves, seeded and stratified by class (``unit_metrics.stratified_halves``); the top-K latents
are chosen on the selection half and measured on the other (keys ``impact``, ``selectivity``,
...). The paper's variant, chosen and measured on all images, has the suffix ``_same``.

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
SAME = "_same"  # suffix of the paper's same-image variant of a result key
VERSION = 3  # bump when the computation changes (part of the cache key); 2: held-out selection; 3: no all_auroc_max


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
                 device="cpu", selection: Tensor | None = None, desc: str = "SAE attribution") -> dict:
    """One forward + backward per batch: importance ``(C, U)`` and the per-class statistics of the latents.

    Returns ``importance`` and ``stats`` over all images; ``importance_sel`` over the
    selection half and ``stats_meas`` over the measurement half (``selection``: bool ``(n,)``
    in batch order, True = selection half; None: no split, both are those of all images).
    """
    from .unit_metrics import StreamingClassStats

    name = f"blocks.{block}.resid_post"
    U = sae.n_latents
    f64 = dict(dtype=torch.float64, device=device)
    imp_sum, imp_sel = torch.zeros(num_classes, U, **f64), torch.zeros(num_classes, U, **f64)
    count, count_sel = torch.zeros(num_classes, **f64), torch.zeros(num_classes, **f64)
    halves = [True, False] if selection is not None else [True]
    stats = {h: StreamingClassStats(U, num_classes, device=device) for h in halves}
    for p in hooked.parameters():
        p.requires_grad_(False)
    hooked.eval()
    sae.eval()
    seen = 0
    for images, labels in tqdm(batches, desc=desc, leave=False):
        x, y = images.to(device), labels.to(device).long()
        if selection is None:
            sel = torch.ones_like(y, dtype=torch.bool)
        elif seen + len(y) > len(selection):
            raise ValueError(f"feature_pass: selection has {len(selection)} entries, the batches more images")
        else:
            sel = selection[seen:seen + len(y)].to(device)
        seen += len(y)
        store: dict = {}
        logits = hooked.run_with_hooks(x, {name: splice_hook(sae, tokens, store, grad=True)})
        f = store["f"]
        (g,) = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), f)
        est = ((f.detach() * g).sum(1) / logits.detach().norm(dim=1, keepdim=True)).double()  # (B, U)
        ones = torch.ones_like(y, dtype=torch.float64)
        imp_sum.index_add_(0, y, est)
        count.index_add_(0, y, ones)
        imp_sel.index_add_(0, y[sel], est[sel])
        count_sel.index_add_(0, y[sel], ones[sel])
        cls, m = scores_of(f.detach(), tokens)
        for h in halves:
            rows = sel if h else ~sel
            stats[h].update(m[rows], y[rows], cls[rows])
    if selection is not None and seen != len(selection):
        raise ValueError(f"feature_pass: selection has {len(selection)} entries for {seen} images")

    def mean(total, n):
        out = total / n.clamp_min(1)[:, None]
        out[n == 0] = float("nan")
        return out.cpu()

    return {"importance": mean(imp_sum, count), "importance_sel": mean(imp_sel, count_sel),
            "count": count.cpu(), "count_sel": count_sel.cpu(),
            "stats": StreamingClassStats.combine(list(stats.values())), "stats_meas": stats[halves[-1]]}


@torch.no_grad()
def ablation_effects(hooked, sae: BatchTopKSAE, batches: Iterable, block: int, tokens: str, jobs: list[tuple],
                     num_classes: int, device="cpu", desc: str = "SAE ablation") -> Tensor:
    """Eq. 2 with zero ablation, per job and class: mean over ``D_c`` of ``(f_c - f_c^abl) / ||f||``, ``(jobs, C)``.

    A job is ``(keep, images)``: ``keep`` ``(C, U)`` gives each image's own class row (0 =
    latent zeroed); ``images`` (bool ``(n,)`` in batch order, None: all) are the images the
    job averages over. ``f`` are the clean model's logits (one clean forward per batch for
    all jobs); the ablated run splices the SAE with the error term kept.
    """
    name = f"blocks.{block}.resid_post"
    jobs = [(keep.to(device), images) for keep, images in jobs]
    sums = torch.zeros(len(jobs), num_classes, dtype=torch.float64, device=device)
    count = torch.zeros(len(jobs), num_classes, dtype=torch.float64, device=device)
    seen = 0
    for images, labels in tqdm(batches, desc=desc, leave=False):
        x, y = images.to(device), labels.to(device).long()
        clean = hooked.model(x)
        for j, (keep, subset) in enumerate(jobs):
            rows = torch.arange(len(y), device=device)
            if subset is not None:
                rows = rows[subset[seen:seen + len(y)].to(device)]
            if len(rows) == 0:
                continue
            xr, yr, cr = x[rows], y[rows], clean[rows]
            abl = hooked.run_with_hooks(xr, {name: splice_hook(sae, tokens, {}, keep=keep[yr])})
            effect = (cr.gather(1, yr[:, None]) - abl.gather(1, yr[:, None])).squeeze(1) / cr.norm(dim=1)
            sums[j].index_add_(0, yr, effect.double())
            count[j].index_add_(0, yr, torch.ones_like(effect, dtype=torch.float64))
        seen += len(y)
    out = sums / count.clamp_min(1)
    out[count == 0] = float("nan")
    return out.cpu()


def ablation_effect(hooked, sae: BatchTopKSAE, batches: Iterable, block: int, tokens: str, keep: Tensor,
                    num_classes: int, device="cpu", desc: str = "SAE ablation") -> Tensor:
    """Eq. 2 with zero ablation for one ``keep`` ``(C, U)`` over all images, shape ``(C,)``
    (see :func:`ablation_effects`)."""
    return ablation_effects(hooked, sae, batches, block, tokens, [(keep, None)], num_classes, device, desc)[0]


def analyse(hooked, sae: BatchTopKSAE, batches: Iterable, block: int, tokens: str, top_k: int, num_classes: int,
            device="cpu", selection: Tensor | None = None, seed: int = 0, desc: str = "") -> dict:
    """Top-K latents per class and their four metrics, held-out and same-image; ``batches`` must be
    re-iterable (two passes).

    ``selection``: bool ``(n,)`` in batch order, True for the selection half (default:
    ``stratified_halves(batch_labels(batches), seed)``). Returns, shape ``(C,)``: the held-out
    ``impact``, ``selectivity``, ``class_variance``, ``label_entropy`` (chosen on the selection
    half, measured on the other), the same with suffix ``_same`` (the paper's: all images), and
    ``zero_importance`` (how many of the held-out top-K have zero or NaN importance on the
    selection half); ``per_latent`` / ``per_latent_same`` ``{metric: (C, K)}``; ``topk`` /
    ``topk_same`` ``(C, K)``; ``importance`` (selection half) / ``importance_same`` ``(C, U)``.
    """
    from .unit_metrics import selected_unit_values, selection_mask, top_units

    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= sae.n_latents:
        raise ValueError(f"top_k must be an integer in [1, {sae.n_latents}] (the number of latents), got {top_k!r}")
    selection = selection_mask(batches, selection, seed)
    first = feature_pass(hooked, sae, batches, block, tokens, num_classes, device, selection=selection,
                         desc=f"SAE attribution {desc}")
    classes = list(range(num_classes))
    variants = {"": (first["importance_sel"], first["stats_meas"], ~selection),
                SAME: (first["importance"], first["stats"], None)}
    out, jobs = {}, []
    for suffix, (imp, stats, images) in variants.items():
        top, zero = top_units(imp, top_k)  # (C, K), (C,)
        keep = torch.ones(num_classes, sae.n_latents)
        keep.scatter_(1, top, 0.0)
        jobs.append((keep, images))
        auroc = stats.auroc().cpu()
        per_latent = {k: v.double() for k, v in selected_unit_values(stats, top, classes, auroc).items()}
        for key, v in per_latent.items():
            out[key + suffix] = v.nanmean(1)
        out.update({"per_latent" + suffix: per_latent, "topk" + suffix: top, "importance" + suffix: imp.float()})
        if suffix == "":
            out["zero_importance"] = zero
    impact = ablation_effects(hooked, sae, batches, block, tokens, jobs, num_classes, device,
                              desc=f"SAE ablation {desc}").double()
    out["impact"], out["impact" + SAME] = impact[0], impact[1]
    return {**out, "selection": selection.clone(), "images_per_class": first["count"],
            "n_images": int(first["count"].sum()), "selection_images_per_class": first["count_sel"],
            "n_selection_images": int(first["count_sel"].sum()), "top_k": top_k}


def sae_feature_metrics(cfg, sparsity: float, tokens: str | None = None, k: int | None = None,
                        expansion: int | None = None, method: str = "wanda", sae_seed: int = 0) -> dict:
    """:func:`analyse` for the SAE of :func:`impact_core.sae.train_sae` (cached).

    ``method`` may be ``pipeline.CONTROL`` (at sparsity 0); ``sae_seed`` picks which of the
    model's SAEs is analysed. Images: the same ``sae.eval_images`` evaluation images as the
    SAE's quality metrics.
    """
    from . import pipeline
    from .data import Batches
    from .sae import _split_images, load_sae, sae_inputs, train_sae

    entry = train_sae(cfg, sparsity, tokens, k, expansion, method, sae_seed)
    sae_key = pipeline.cache_for(cfg).key("sae", sae_inputs(cfg, sparsity, entry["tokens"], entry["k"],
                                                            entry["expansion"], method, sae_seed))
    inputs = {"sae": sae_key, "top_k": cfg.sae.top_k, "eval_images": cfg.sae.eval_images, "version": VERSION}

    def compute():
        device = pipeline.resolve_device(cfg)
        hooked = pipeline.hooked_model(cfg, sparsity, method)
        sae = load_sae(entry, device)
        split = _split_images(pipeline.splits(cfg)["eval"], cfg.sae.eval_images, cfg.seed + 1)
        batches = Batches(split, cfg.data.batch_size)
        return analyse(hooked, sae, batches, entry["block"], entry["tokens"], cfg.sae.top_k,
                       cfg.model.num_classes, device, desc=pipeline.level_label(sparsity, method))

    return pipeline.cache_for(cfg).get_or_compute("sae_features", inputs, compute)
