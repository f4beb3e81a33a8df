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

Validation: on a seeded sample of units per block (half drawn from the top-K sets,
half from the other units), the attribution estimate per class is compared with the
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
from .unit_metrics import StreamingClassStats, max_over_patches

log = logging.getLogger("impact_core")

UNIT_SITES = ("mlp_act", "heads")
NEURON_METRICS = ("impact", "selectivity", "class_variance", "label_entropy")
VERSION = 2  # bump when the computation changes (part of the cache key)


# --- units ----------------------------------------------------------------------------------------------------------

def block_unit_counts(hooked: HookedViT) -> tuple[int, int]:
    """(MLP neurons, heads) per block; units are numbered neurons first, then heads."""
    return hooked.mlp_dim, hooked.num_heads


def unit_labels(hooked: HookedViT) -> list[str]:
    m, h = block_unit_counts(hooked)
    return [f"neuron {i}" for i in range(m)] + [f"head {i}" for i in range(h)]


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
                     num_classes: int, device="cpu", validation_images: int = 0, desc: str = "attribution") -> dict:
    """One forward + backward per batch: importance ``I[c, u]`` and the per-class unit statistics.

    Returns ``importance`` and ``importance_val`` (the same over the first
    ``validation_images`` images) as ``{block: (C, U)}``, ``stats`` as
    ``{block: StreamingClassStats}``, and per image (in batch order) the label, the
    clean own-class logit ``f_y`` and the clean logit norm ``||f||``.
    """
    device = torch.device(device)
    hooked.eval()
    names = {b: (site_name(b, "mlp_act"), site_name(b, "heads")) for b in blocks}
    mu = {n: means[n].to(device) for pair in names.values() for n in pair}
    units = sum(block_unit_counts(hooked))
    f64 = dict(dtype=torch.float64, device=device)
    imp = {b: torch.zeros(num_classes, units, **f64) for b in blocks}
    imp_val = {b: torch.zeros(num_classes, units, **f64) for b in blocks}
    count = torch.zeros(num_classes, **f64)
    count_val = torch.zeros(num_classes, **f64)
    stats = {b: StreamingClassStats(units, num_classes, device) for b in blocks}
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
            with torch.no_grad():
                for i, b in enumerate(blocks):
                    a_mlp, a_heads = acts[2 * i].detach(), acts[2 * i + 1].detach()
                    g_mlp, g_heads = grads[2 * i], grads[2 * i + 1]
                    est = torch.cat([attribution_estimate(a_mlp, mu[names[b][0]], g_mlp),
                                     attribution_estimate(a_heads, mu[names[b][1]], g_heads)], dim=1)
                    est = gather_rows(est.double() / norm_local.double()[:, None], total)
                    imp[b].index_add_(0, y, est)
                    imp_val[b].index_add_(0, y[:n_val], est[:n_val])
                    u = unit_activation(a_mlp, a_heads)
                    stats[b].update(gather_rows(max_over_patches(u), total), y, gather_rows(u[:, 0], total))
            own.append(f_y.detach().cpu())
            norms.append(norm.cpu())
            all_labels.append(y.cpu())
            seen += len(y)
            store.clear()
    if seen == 0:
        raise ValueError("attribution_pass: no images")
    return {"importance": {b: _class_mean(imp[b], count) for b in blocks},
            "importance_val": {b: _class_mean(imp_val[b], count_val) for b in blocks},
            "stats": stats, "labels": torch.cat(all_labels), "own_logit": torch.cat(own),
            "logit_norm": torch.cat(norms), "count": count.cpu(), "count_val": count_val.cpu()}


# --- pass 2: mean ablation -------------------------------------------------------------------------------------------

@torch.no_grad()
def ablation_jobs(hooked: HookedViT, batches: Iterable, means: dict[str, Tensor], jobs: list[tuple[int, Tensor]],
                  num_classes: int, device="cpu", limit: Optional[int] = None, clean: Optional[tuple] = None,
                  max_batch: int = 1024, desc: str = "ablation") -> Tensor:
    """Eq. 2 averaged per class for several ablations, shape ``(jobs, C)``:
    ``mean_{x in D_c} (f_c(x) - f_c^abl(x)) / ||f(x)||``.

    A job is ``(block, keep)``: ``keep`` is ``(U,)`` (the same units ablated for every
    image) or ``(C, U)`` (the units of each image's own class); 0 marks a unit replaced by
    its per-position dataset mean (``sites.mean_ablate``). Jobs share forward passes: a
    batch is repeated once per job (up to ``max_batch`` images per forward) and each copy
    gets its own per-image mask; a unit with keep 1 passes through exactly. ``clean``
    optionally gives ``(f_y, ||f||)`` per image in batch order (from :func:`attribution_pass`),
    saving the clean forward. ``limit``: only the first images of ``batches``.
    """
    device = torch.device(device)
    hooked.eval()
    n_mlp, _ = block_unit_counts(hooked)
    units = sum(block_unit_counts(hooked))
    jobs = [(b, k.to(device, torch.float32)) for b, k in jobs]
    mu = {}
    for b, _ in jobs:
        for site in UNIT_SITES:
            mu[site_name(b, site)] = means[site_name(b, site)].to(device)
    sums = torch.zeros(len(jobs) * num_classes, dtype=torch.float64, device=device)
    count = torch.zeros(num_classes, dtype=torch.float64, device=device)
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
        seen += total
        if B == 0:
            continue
        count.index_add_(0, y, torch.ones(B, dtype=torch.float64, device=device))
        per = max(1, max_batch // B)
        for start in range(0, len(jobs), per):
            chunk = list(range(start, min(start + per, len(jobs))))
            keeps: dict[int, Tensor] = {}
            for i, j in enumerate(chunk):
                b, keep = jobs[j]
                if b not in keeps:
                    keeps[b] = torch.ones(len(chunk) * B, units, device=device)
                keeps[b][i * B:(i + 1) * B] = keep[y] if keep.ndim == 2 else keep
            fns = {}
            for b, k in keeps.items():
                m_name, h_name = site_name(b, "mlp_act"), site_name(b, "heads")
                fns[m_name] = mean_ablate(mu[m_name], k[:, None, :n_mlp], m_name)
                fns[h_name] = mean_ablate(mu[h_name], k[:, None, n_mlp:], h_name)
            abl = hooked.run_with_hooks(x.repeat(len(chunk), *([1] * (x.ndim - 1))), fns)
            abl_y = abl.gather(1, y.repeat(len(chunk))[:, None]).view(len(chunk), B)
            effect = (f_y[None] - abl_y) / norm[None]
            index = (torch.tensor(chunk, device=device)[:, None] * num_classes + y[None]).reshape(-1)
            sums.index_add_(0, index, effect.reshape(-1).double())
    all_reduce_sum(sums)
    all_reduce_sum(count)
    return _class_mean(sums.view(len(jobs), num_classes).T, count).T.cpu()


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
            validation_images: int = 0, device="cpu", seed: int = 0, max_batch: int = 1024, desc: str = "") -> dict:
    """Top-K units per class and block and their four metrics (see the module docstring).

    ``batches`` must be re-iterable in a fixed order (three passes). ``classes`` are the
    analysed classes (default: all); AUROC, entropy and importance always use all classes.
    ``max_batch``: images per forward of the ablation passes (a batch repeated per ablation).
    Returns torch-serialisable values: metric arrays of shape ``(blocks, classes)``.
    """
    blocks = check_setup(hooked, blocks, top_k, num_classes)
    classes = list(range(num_classes)) if classes is None else list(classes)
    if not classes or min(classes) < 0 or max(classes) >= num_classes:
        raise ValueError(f"classes must be a non-empty list of indices in [0, {num_classes})")
    n_mlp, n_heads = block_unit_counts(hooked)
    units = n_mlp + n_heads
    cls_idx = torch.tensor(classes)
    first = attribution_pass(hooked, batches, means, blocks, num_classes, device,
                             validation_images=validation_images, desc=f"attribution {desc}".strip())
    out = {m: torch.full((len(blocks), len(classes)), float("nan"), dtype=torch.float64)
           for m in NEURON_METRICS + ("head_fraction",)}
    topk_all, importance, jobs, val_units = [], [], [], []
    clean = (first["own_logit"], first["logit_norm"])
    for i, b in enumerate(blocks):
        imp = first["importance"][b].cpu()
        importance.append(imp.float())
        top = imp[cls_idx].nan_to_num(float("-inf")).topk(top_k, dim=1).indices  # (Ca, K)
        topk_all.append(top)
        keep = torch.ones(num_classes, units)
        keep[cls_idx[:, None], top] = 0
        jobs.append((b, keep))
        st = first["stats"][b]
        auroc, cv, ent = st.auroc().cpu(), st.class_variance().cpu(), st.label_entropy().cpu()
        cols = cls_idx[:, None].expand_as(top)
        out["selectivity"][i] = auroc[top, cols].mean(1)
        out["class_variance"][i] = cv[top, cols].nanmean(1)
        out["label_entropy"][i] = ent[top].nanmean(1)
        out["head_fraction"][i] = (top >= n_mlp).double().mean(1)
        if n_validation_units > 0 and validation_images > 0:
            val_units += [(b, u) for u in validation_units(top, units, n_validation_units, seed + 101 * b)]
    effect = ablation_jobs(hooked, batches, means, jobs, num_classes, device, clean=clean, max_batch=max_batch,
                           desc=f"ablate top-K {desc}".strip())
    out["impact"] = effect[:, cls_idx]
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
        topk=torch.stack(topk_all), importance=torch.stack(importance),
        images_per_class=first["count"], n_images=int(first["count"].sum()),
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
    """:func:`analyse` on the model at ``sparsity`` (0: dense), cached by model and neuron settings."""
    from . import pipeline
    from .config import check_sparsity, resolve_device

    sparsity = check_sparsity(sparsity, "sparsity")
    check_config(cfg)
    nc = cfg.neuron
    num_classes = cfg.model.num_classes
    classes = None if nc.classes is None else list(range(min(nc.classes, num_classes)))

    def compute():
        hooked = pipeline.hooked_model(cfg, sparsity, method)
        check_setup(hooked, nc.blocks, nc.top_k, num_classes)
        means = pipeline.site_means(cfg, sparsity, method)
        split = metric_images(cfg, pipeline.splits(cfg)["eval"])
        from .data import Batches

        batches = Batches(split, cfg.data.batch_size, num_workers=cfg.data.num_workers)
        log.info("neuron metrics %s: %d images, blocks %s, top-%d of %d units per block, %d classes",
                 pipeline.level_label(sparsity), len(split), list(nc.blocks), nc.top_k,
                 sum(block_unit_counts(hooked)), num_classes if classes is None else len(classes))
        return analyse(hooked, batches, means, nc.blocks, nc.top_k, num_classes, classes=classes,
                       n_validation_units=nc.validation_units,
                       validation_images=len(split) if nc.validation_images is None else nc.validation_images,
                       device=resolve_device(cfg), seed=cfg.seed, max_batch=4 * cfg.data.batch_size,
                       desc=pipeline.level_label(sparsity))

    return pipeline.cache_for(cfg).get_or_compute("neuron_metrics", neuron_inputs(cfg, sparsity, method), compute)


def metrics_frame(results: dict[float, dict]):
    """Long table (level, sparsity, block, class, metric, value) from ``{sparsity: neuron_metrics(...)}``."""
    import pandas as pd

    from .pipeline import level_label

    rows = []
    for s, r in results.items():
        for i, b in enumerate(r["blocks"]):
            for j, c in enumerate(r["classes"]):
                for m in NEURON_METRICS + ("head_fraction",):
                    rows.append({"level": level_label(s), "sparsity": s, "block": b, "class": c,
                                 "metric": m, "value": float(r[m][i, j])})
    return pd.DataFrame(rows)


def comparison_table(frame, n_boot: int = 2000, seed: int = 0):
    """Per metric, block and level: medians over classes vs dense, Wilcoxon p and bootstrap CI."""
    import pandas as pd

    from .pipeline import level_label
    from .unit_metrics import paired_comparison

    rows = []
    dense = frame[frame.sparsity == 0]
    for (metric, block), d in dense.groupby(["metric", "block"]):
        d = d.set_index("class")["value"]
        for s in sorted(frame.sparsity.unique()):
            if s == 0:
                continue
            lv = frame[(frame.metric == metric) & (frame.block == block) & (frame.sparsity == s)]
            lv = lv.set_index("class")["value"].reindex(d.index)
            res = paired_comparison(d.values, lv.values, n_boot=n_boot, seed=seed)
            rows.append({"metric": metric, "block": block, "level": level_label(s), "sparsity": s, **res})
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
