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

Validation: on a seeded sample of units per block (half drawn from the same-image top-K
sets, half from the other units), the attribution estimate per class is compared with the
true single-unit mean-ablation effect (Eq. 2 with K = 1) on the same images.
"""
from __future__ import annotations

import logging
from typing import Iterable, Iterator, Optional

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .distributed import all_reduce_sum, gather_rows, local_rows
from .sites import HookedViT, mean_ablate, site_name
from .unit_metrics import (StreamingClassStats, max_over_patches, selected_unit_values, selection_mask,
                           top_units)

log = logging.getLogger("impact_core")

UNIT_SITES = ("mlp_act", "heads")
NEURON_METRICS = ("impact", "selectivity", "class_variance", "label_entropy")
SAME = "_same"  # suffix of the paper's same-image variant of a result key
VERSION = 3  # bump when the computation changes (part of the cache key); 3: held-out selection


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


def _take(batches: Iterable, limit: Optional[int]) -> Iterator[tuple[Tensor, Tensor]]:
    """The first ``limit`` images of ``batches`` (all of them for None)."""
    seen = 0
    for images, labels in batches:
        if limit is not None:
            if seen >= limit:
                return
            images, labels = images[: limit - seen], labels[: limit - seen]
        seen += len(labels)
        yield images, labels


def _class_mean(sums: Tensor, count: Tensor) -> Tensor:
    """Per-class mean from sums over the leading axis; NaN for an empty class."""
    shape = (-1,) + (1,) * (sums.ndim - 1)
    out = sums / count.clamp_min(1).view(shape)
    out[count == 0] = float("nan")
    return out


# --- pass 1: attribution patching and streaming statistics ------------------------------------------------------------

def attribution_pass(hooked: HookedViT, batches: Iterable, means: dict[str, Tensor], blocks: list[int],
                     num_classes: int, device="cpu", validation_images: int = 0, selection: Optional[Tensor] = None,
                     desc: str = "attribution") -> dict:
    """One forward + backward per batch: importance ``I[c, u]`` and the per-class unit statistics.

    Returns ``importance`` (all images), ``importance_sel`` (the selection half) and
    ``importance_val`` (the first ``validation_images`` images) as ``{block: (C, U)}``;
    ``stats`` (all images) and ``stats_meas`` (the measurement half) as
    ``{block: StreamingClassStats}``; per image (in batch order) the label, the clean
    own-class logit ``f_y`` and the clean logit norm ``||f||``. ``selection``: bool ``(n,)``
    in batch order, True for the selection half (see ``unit_metrics.stratified_halves``);
    None: no split (``importance_sel`` and ``stats_meas`` are then those of all images).
    """
    device = torch.device(device)
    hooked.eval()
    names = {b: (site_name(b, "mlp_act"), site_name(b, "heads")) for b in blocks}
    mu = {n: means[n].to(device) for pair in names.values() for n in pair}
    units = sum(block_unit_counts(hooked))
    f64 = dict(dtype=torch.float64, device=device)
    imp = {b: torch.zeros(num_classes, units, **f64) for b in blocks}
    imp_val = {b: torch.zeros(num_classes, units, **f64) for b in blocks}
    imp_sel = {b: torch.zeros(num_classes, units, **f64) for b in blocks}
    count = torch.zeros(num_classes, **f64)
    count_val = torch.zeros(num_classes, **f64)
    count_sel = torch.zeros(num_classes, **f64)
    halves = [True, False] if selection is not None else [True]
    stats = {b: {h: StreamingClassStats(units, num_classes, device) for h in halves} for b in blocks}
    store: dict[str, Tensor] = {}
    own, norms, all_labels = [], [], []

    def keep(name):
        def fn(act):
            store[name] = act
            return act  # returned so that the activation itself is in the graph (heads are a view)
        return fn

    seen = 0
    with hooked.hooks({n: keep(n) for pair in names.values() for n in pair}):
        for images, labels in tqdm(batches, desc=desc, leave=False):
            total = len(labels)  # under torchrun this process takes its rows; gather_rows puts them back
            x = local_rows(images).to(device).requires_grad_(True)
            y_local = local_rows(labels).to(device).long()
            with torch.enable_grad():
                logits = hooked.model(x)
                f_y = logits.gather(1, y_local[:, None]).squeeze(1)
                acts = [store[n] for b in blocks for n in names[b]]
                grads = torch.autograd.grad(f_y.sum(), acts)
            norm_local = logits.detach().norm(dim=1)
            y = gather_rows(y_local, total)
            norm = gather_rows(norm_local, total)
            f_y = gather_rows(f_y.detach(), total)
            ones = torch.ones_like(y, dtype=torch.float64)
            count.index_add_(0, y, ones)
            n_val = max(0, min(len(y), validation_images - seen))
            count_val.index_add_(0, y[:n_val], ones[:n_val])
            if selection is None:
                sel = torch.ones_like(y, dtype=torch.bool)
            elif seen + len(y) > len(selection):
                raise ValueError(f"attribution_pass: selection has {len(selection)} entries, the batches more images")
            else:
                sel = selection[seen:seen + len(y)].to(y.device)
            count_sel.index_add_(0, y[sel], ones[sel])
            with torch.no_grad():
                for i, b in enumerate(blocks):
                    a_mlp, a_heads = acts[2 * i].detach(), acts[2 * i + 1].detach()
                    g_mlp, g_heads = grads[2 * i], grads[2 * i + 1]
                    est = torch.cat([attribution_estimate(a_mlp, mu[names[b][0]], g_mlp),
                                     attribution_estimate(a_heads, mu[names[b][1]], g_heads)], dim=1)
                    est = gather_rows(est.double() / norm_local.double()[:, None], total)
                    imp[b].index_add_(0, y, est)
                    imp_val[b].index_add_(0, y[:n_val], est[:n_val])
                    imp_sel[b].index_add_(0, y[sel], est[sel])
                    u = unit_activation(a_mlp, a_heads)
                    m, cls = gather_rows(max_over_patches(u), total), gather_rows(u[:, 0], total)
                    for h in halves:
                        rows = sel if h else ~sel
                        stats[b][h].update(m[rows], y[rows], cls[rows])
            own.append(f_y.detach().cpu())
            norms.append(norm.cpu())
            all_labels.append(y.cpu())
            seen += len(y)
            store.clear()
    if seen == 0:
        raise ValueError("attribution_pass: no images")
    if selection is not None and seen != len(selection):
        raise ValueError(f"attribution_pass: selection has {len(selection)} entries for {seen} images")
    return {"importance": {b: _class_mean(imp[b], count) for b in blocks},
            "importance_sel": {b: _class_mean(imp_sel[b], count_sel) for b in blocks},
            "importance_val": {b: _class_mean(imp_val[b], count_val) for b in blocks},
            "stats": {b: StreamingClassStats.combine(list(stats[b].values())) for b in blocks},
            "stats_meas": {b: stats[b][halves[-1]] for b in blocks},
            "labels": torch.cat(all_labels), "own_logit": torch.cat(own), "logit_norm": torch.cat(norms),
            "count": count.cpu(), "count_val": count_val.cpu(), "count_sel": count_sel.cpu()}


# --- pass 2: mean ablation -------------------------------------------------------------------------------------------

@torch.no_grad()
def ablation_jobs(hooked: HookedViT, batches: Iterable, means: dict[str, Tensor], jobs: list[tuple],
                  num_classes: int, device="cpu", limit: Optional[int] = None, clean: Optional[tuple] = None,
                  max_batch: int = 1024, desc: str = "ablation") -> Tensor:
    """Eq. 2 averaged per class for several ablations, shape ``(jobs, C)``:
    ``mean_{x in D_c} (f_c(x) - f_c^abl(x)) / ||f(x)||``.

    A job is ``(block, keep)`` or ``(block, keep, images)``: ``keep`` is ``(U,)`` (the same
    units ablated for every image) or ``(C, U)`` (the units of each image's own class); 0
    marks a unit replaced by its per-position dataset mean (``sites.mean_ablate``).
    ``images`` (bool ``(n,)`` in batch order, None: all) restricts the job to those images
    (``D_c`` is then the class's images among them). Jobs share forward passes: each job's
    rows of a batch are stacked (up to ``max_batch`` images per forward) and each row gets
    its own mask; a unit with keep 1 passes through exactly. ``clean`` optionally gives
    ``(f_y, ||f||)`` per image in batch order (from :func:`attribution_pass`), saving the
    clean forward. ``limit``: only the first images of ``batches``.
    """
    device = torch.device(device)
    hooked.eval()
    n_mlp, _ = block_unit_counts(hooked)
    units = sum(block_unit_counts(hooked))
    jobs = [(j[0], j[1].to(device, torch.float32), j[2] if len(j) > 2 else None) for j in jobs]
    mu = {}
    for b, _, _ in jobs:
        for site in UNIT_SITES:
            mu[site_name(b, site)] = means[site_name(b, site)].to(device)
    sums = torch.zeros(len(jobs) * num_classes, dtype=torch.float64, device=device)
    count = torch.zeros(len(jobs) * num_classes, dtype=torch.float64, device=device)
    seen = 0
    for images, labels in tqdm(_take(batches, limit), desc=desc, leave=False):
        total = len(labels)  # under torchrun: this process's rows; the sums are all-reduced below
        x, y = local_rows(images).to(device), local_rows(labels).to(device).long()
        B = len(y)
        if clean is None:
            logits = hooked.model(x)
            f_y, norm = logits.gather(1, y[:, None]).squeeze(1), logits.norm(dim=1)
        else:
            f_y, norm = (local_rows(t[seen:seen + total]).to(device) for t in clean)
        every = torch.arange(B, device=device)
        rows = [every if sub is None else every[local_rows(sub[seen:seen + total]).to(device)] for _, _, sub in jobs]
        seen += total
        if B == 0:
            continue
        per = max(1, max_batch // B)
        for start in range(0, len(jobs), per):
            chunk = [j for j in range(start, min(start + per, len(jobs))) if len(rows[j])]
            if not chunk:
                continue
            r = torch.cat([rows[j] for j in chunk])
            job = torch.cat([torch.full_like(rows[j], j) for j in chunk])
            keeps: dict[int, Tensor] = {}
            offset = 0
            for j in chunk:
                b, keep, _ = jobs[j]
                if b not in keeps:
                    keeps[b] = torch.ones(len(r), units, device=device)
                n_j = len(rows[j])
                keeps[b][offset:offset + n_j] = keep[y[rows[j]]] if keep.ndim == 2 else keep
                offset += n_j
            fns = {}
            for b, k in keeps.items():
                m_name, h_name = site_name(b, "mlp_act"), site_name(b, "heads")
                fns[m_name] = mean_ablate(mu[m_name], k[:, None, :n_mlp], m_name)
                fns[h_name] = mean_ablate(mu[h_name], k[:, None, n_mlp:], h_name)
            abl = hooked.run_with_hooks(x[r], fns)
            abl_y = abl.gather(1, y[r][:, None]).squeeze(1)
            effect = (f_y[r] - abl_y) / norm[r]
            index = job * num_classes + y[r]
            sums.index_add_(0, index, effect.double())
            count.index_add_(0, index, torch.ones_like(effect, dtype=torch.float64))
    all_reduce_sum(sums)
    all_reduce_sum(count)
    return _class_mean(sums, count).view(len(jobs), num_classes).cpu()


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
            selection: Optional[Tensor] = None, desc: str = "") -> dict:
    """Top-K units per class and block and their four metrics, held-out and same-image (module docstring).

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
    classes = list(range(num_classes)) if classes is None else list(classes)
    if not classes or min(classes) < 0 or max(classes) >= num_classes:
        raise ValueError(f"classes must be a non-empty list of indices in [0, {num_classes})")
    selection = selection_mask(batches, selection, seed)
    n_mlp, n_heads = block_unit_counts(hooked)
    units = n_mlp + n_heads
    cls_idx = torch.tensor(classes)
    first = attribution_pass(hooked, batches, means, blocks, num_classes, device, validation_images=validation_images,
                             selection=selection, desc=f"attribution {desc}".strip())
    keys = NEURON_METRICS + ("head_fraction",)
    out = {m + suffix: torch.full((len(blocks), len(classes)), float("nan"), dtype=torch.float64)
           for m in keys for suffix in ("", SAME)}
    out["zero_importance"] = torch.zeros(len(blocks), len(classes), dtype=torch.long)
    topk = {"": [], SAME: []}
    importance = {"": [], SAME: []}
    jobs, val_units = [], []
    clean = (first["own_logit"], first["logit_norm"])
    measure = ~selection
    for i, b in enumerate(blocks):
        variants = {"": (first["importance_sel"][b].cpu(), first["stats_meas"][b], measure),
                    SAME: (first["importance"][b].cpu(), first["stats"][b], None)}
        for suffix, (imp, stats, images) in variants.items():
            importance[suffix].append(imp.float())
            top, zero = top_units(imp[cls_idx], top_k)  # (Ca, K), (Ca,)
            topk[suffix].append(top)
            if suffix == "":
                out["zero_importance"][i] = zero
            keep = torch.ones(num_classes, units)
            keep[cls_idx[:, None], top] = 0
            jobs.append((b, keep, images))
            values = selected_unit_values(stats, top, classes)
            out["selectivity" + suffix][i] = values["selectivity"].mean(1)
            out["class_variance" + suffix][i] = values["class_variance"].nanmean(1)
            out["label_entropy" + suffix][i] = values["label_entropy"].nanmean(1)
            out["head_fraction" + suffix][i] = (top >= n_mlp).double().mean(1)
        if n_validation_units > 0 and validation_images > 0:  # as before: units of the all-image top-K sets
            val_units += [(b, u) for u in validation_units(topk[SAME][-1], units, n_validation_units, seed + 101 * b)]
    effect = ablation_jobs(hooked, batches, means, jobs, num_classes, device, clean=clean, max_batch=max_batch,
                           desc=f"ablate top-K {desc}".strip())
    out["impact"] = effect[0::2][:, cls_idx]
    out["impact" + SAME] = effect[1::2][:, cls_idx]
    val_rows = []
    if val_units:
        single = []
        for b, u in val_units:
            keep_u = torch.ones(units)
            keep_u[u] = 0
            single.append((b, keep_u))
        true = ablation_jobs(hooked, batches, means, single, num_classes, device, limit=validation_images,
                             clean=clean, max_batch=max_batch, desc=f"validate {desc}".strip())
        for j, (b, u) in enumerate(val_units):
            est = first["importance_val"][b][:, u].cpu()
            val_rows += [(b, u, c, float(est[c]), float(true[j, c])) for c in classes]
    val = torch.tensor([r[3:] for r in val_rows], dtype=torch.float64).reshape(-1, 2)
    out.update(
        blocks=blocks, classes=classes, top_k=top_k, num_mlp=n_mlp, num_heads=n_heads,
        topk=torch.stack(topk[""]), topk_same=torch.stack(topk[SAME]),
        importance=torch.stack(importance[""]), importance_same=torch.stack(importance[SAME]),
        selection=selection.clone(), images_per_class=first["count"], n_images=int(first["count"].sum()),
        selection_images_per_class=first["count_sel"], n_selection_images=int(first["count_sel"].sum()),
        n_validation_images=int(first["count_val"].sum()),
        validation={"block": torch.tensor([r[0] for r in val_rows], dtype=torch.long),
                    "unit": torch.tensor([r[1] for r in val_rows], dtype=torch.long),
                    "class": torch.tensor([r[2] for r in val_rows], dtype=torch.long),
                    "estimate": val[:, 0], "true": val[:, 1]},
    )
    return out


# --- cached entry point for the chapter --------------------------------------------------------------------------------

def metric_images(cfg, split):
    """The evaluation images of the neuron chapter: ``neuron.images`` drawn from the eval split at ``seed``."""
    n = cfg.neuron.images
    if n is None or n >= len(split):
        return split
    idx = np.sort(np.random.default_rng(cfg.seed + 3).permutation(len(split))[:n])
    return split.subset(idx, name="neuron")


def neuron_inputs(cfg, sparsity: float, method: str = "wanda") -> dict:
    from . import pipeline

    nc = cfg.neuron
    return {"model": pipeline.model_inputs(cfg, sparsity, method), "calib_images": cfg.data.calib_images,
            "data": {"kind": cfg.data.kind, "eval_images": cfg.data.eval_images}, "seed": cfg.seed,
            "neuron": {"blocks": list(nc.blocks), "top_k": nc.top_k, "images": nc.images, "classes": nc.classes,
                       "validation_units": nc.validation_units, "validation_images": nc.validation_images},
            "version": VERSION}


def check_config(cfg) -> None:
    """The neuron settings against the model config (blocks exist, K fits), before anything is loaded."""
    from .config import ConfigError

    m, nc = cfg.model, cfg.neuron
    for b in nc.blocks:
        if b >= m.depth:
            raise ConfigError(f"neuron.blocks: block {b} is not in [0, {m.depth}) for model.depth={m.depth}")
    units = int(m.embed_dim * m.mlp_ratio) + m.num_heads
    if isinstance(nc.top_k, bool) or not isinstance(nc.top_k, int) or nc.top_k > units:
        raise ConfigError(f"neuron.top_k: must be an integer <= {units} (MLP neurons + heads per block), "
                          f"got {nc.top_k!r}")


def neuron_metrics(cfg, sparsity: float, method: str = "wanda") -> dict:
    """:func:`analyse` on the model at ``sparsity`` (0: dense; ``(0, pipeline.CONTROL)``: the control),
    cached by model and neuron settings. Every model uses the same images and the same halves
    (``stratified_halves(labels, cfg.seed)``), so the measurement images are paired across models."""
    from . import pipeline
    from .config import check_sparsity, resolve_device

    sparsity = check_sparsity(sparsity, "sparsity")
    pipeline.check_model_kind(sparsity, method)
    check_config(cfg)
    nc = cfg.neuron
    label = pipeline.level_label(sparsity, method)
    num_classes = cfg.model.num_classes
    classes = None if nc.classes is None else list(range(min(nc.classes, num_classes)))

    def compute():
        hooked = pipeline.hooked_model(cfg, sparsity, method)
        check_setup(hooked, nc.blocks, nc.top_k, num_classes)
        means = pipeline.site_means(cfg, sparsity, method)
        split = metric_images(cfg, pipeline.splits(cfg)["eval"])
        from .data import Batches

        batches = Batches(split, cfg.data.batch_size, num_workers=cfg.data.num_workers)
        log.info("neuron metrics %s: %d images (half to select, half to measure), blocks %s, top-%d of %d units "
                 "per block, %d classes", label, len(split), list(nc.blocks), nc.top_k,
                 sum(block_unit_counts(hooked)), num_classes if classes is None else len(classes))
        return analyse(hooked, batches, means, nc.blocks, nc.top_k, num_classes, classes=classes,
                       n_validation_units=nc.validation_units,
                       validation_images=len(split) if nc.validation_images is None else nc.validation_images,
                       device=resolve_device(cfg), seed=cfg.seed, max_batch=4 * cfg.data.batch_size,
                       desc=label)  # halves: stratified_halves(split labels, cfg.seed)

    return pipeline.cache_for(cfg).get_or_compute("neuron_metrics", neuron_inputs(cfg, sparsity, method), compute)


def metrics_frame(results: dict[float, dict], control: Optional[dict] = None):
    """Long table from ``{sparsity: neuron_metrics(cfg, sparsity)}`` and optionally the control's result
    (``neuron_metrics(cfg, 0.0, pipeline.CONTROL)``; its rows have level "control" and sparsity 0).

    Columns: level, sparsity, block, class, metric, value, selection, base. ``metric`` is a
    result key (``selectivity`` held-out, ``selectivity_same`` the paper's same-image variant);
    ``selection`` is "held-out" or "same-image" and ``base`` the metric without the suffix.
    """
    import pandas as pd

    from .pipeline import CONTROL, level_label

    models = [(s, "wanda", r) for s, r in results.items()] + ([(0.0, CONTROL, control)] if control is not None else [])
    rows = []
    for s, method, r in models:
        for base in NEURON_METRICS + ("head_fraction",):
            for suffix, selection in (("", "held-out"), (SAME, "same-image")):
                values = r[base + suffix]
                for i, b in enumerate(r["blocks"]):
                    for j, c in enumerate(r["classes"]):
                        rows.append({"level": level_label(s, method), "sparsity": s, "block": b, "class": c,
                                     "metric": base + suffix, "value": float(values[i, j]),
                                     "selection": selection, "base": base})
    return pd.DataFrame(rows)


def comparison_table(frame, n_boot: int = 2000, seed: int = 0):
    """Per metric, block and level (the control included when in ``frame``): medians over classes vs dense,
    Wilcoxon p and bootstrap CI."""
    import pandas as pd

    from .unit_metrics import paired_comparison

    rows = []
    dense = frame[frame.level == "dense"]
    others = frame[frame.level != "dense"].drop_duplicates("level").sort_values("sparsity", kind="stable")
    for (metric, block), d in dense.groupby(["metric", "block"]):
        d = d.set_index("class")["value"]
        for level, s in zip(others.level, others.sparsity):
            lv = frame[(frame.metric == metric) & (frame.block == block) & (frame.level == level)]
            lv = lv.set_index("class")["value"].reindex(d.index)
            res = paired_comparison(d.values, lv.values, n_boot=n_boot, seed=seed)
            rows.append({"metric": metric, "block": block, "level": level, "sparsity": s, **res})
    return pd.DataFrame(rows)


def validation_summary(results: dict[float, dict]):
    """Pearson and Spearman correlation of attribution estimate vs true single-unit effect, per level and block."""
    import pandas as pd
    from scipy.stats import pearsonr, spearmanr

    from .pipeline import level_label

    rows = []
    for s, r in results.items():
        v = r["validation"]
        for b in [None] + list(r["blocks"]):
            sel = torch.ones_like(v["block"], dtype=torch.bool) if b is None else v["block"] == b
            est, true = v["estimate"][sel].numpy(), v["true"][sel].numpy()
            ok = np.isfinite(est) & np.isfinite(true)
            est, true = est[ok], true[ok]
            if len(est) < 3 or np.std(est) == 0 or np.std(true) == 0:
                pr = sr = float("nan")
            else:
                pr, sr = float(pearsonr(est, true)[0]), float(spearmanr(est, true)[0])
            rows.append({"level": level_label(s), "sparsity": s, "block": "all" if b is None else b,
                         "pairs": int(len(est)), "pearson": pr, "spearman": sr})
    return pd.DataFrame(rows)
