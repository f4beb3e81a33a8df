"""Unit attribution shared by the neuron (Sec. 3.2) and SAE latent (Sec. 3.3) analyses.

A *unit family* (:class:`UnitFamily`) says how one group of units (a block's neurons and heads,
an SAE's latents) is read from a hooked model and how a set of them is ablated. Everything
else is common:

* :func:`attribution_pass`: attribution patching, the first-order estimate of Eq. 2 per image
  and unit, ``est_u(x) = sum_t (a_u^t(x) - r_u^t) . d f_y(x) / d a_u^t / ||f(x)||`` (``r`` the
  ablation value: the dataset mean, Eq. 11, or 0), averaged per class into ``I[c, u]``, and the
  per-class unit statistics (``unit_metrics.StreamingClassStats``) for Eq. 3-7;
* :func:`ablation_jobs`: the true effect of Eq. 2, ``mean_{x in D_c} (f_c(x) - f_c^abl(x)) / ||f(x)||``,
  for several ablations at once;
* :func:`analyse`: the top-K units per class chosen on the selection half and measured on the
  other (held-out), and chosen and measured on all images (``SAME``, the paper's).

Under torchrun each process takes its rows of every batch (``distributed.local_rows``): the
attribution pass puts the per-image rows back together (``gather_rows``) so that every process
holds the full result; the ablation sums are all-reduced.
"""
from __future__ import annotations

from typing import Callable, Hashable, Iterable, Iterator, Optional, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..distributed import all_reduce_sum, gather_rows, local_rows
from .sites import parse_site
from .unit_metrics import StreamingClassStats, selected_unit_values, selection_mask, top_units

SAME = "_same"  # suffix of the paper's same-image variant of a result key


class UnitFamily(Protocol):
    """One group of ``units`` units of a hooked model."""

    units: int
    input_grad: bool  # the read activations are inner nodes: the graph must start at the input images
    clean_forward: bool  # the read hooks leave the forward exactly unchanged (its logits are the clean ones)

    def read_hooks(self, store: dict) -> dict[str, Callable]:
        """Hooks by site name that put the activations to differentiate into ``store``."""

    def activations(self, store: dict) -> list[Tensor]:
        """The activations to differentiate, from ``store``."""

    def estimate(self, acts: list[Tensor], grads: list[Tensor], norm: Tensor) -> Tensor:
        """``est_u(x)`` (module docstring) ``(B, U)`` in float64 from the activations, their gradients
        and the logit norms ``(B,)``."""

    def scores(self, acts: list[Tensor]) -> tuple[Tensor, Tensor]:
        """``(m, cls)``, each ``(B, U)``: the Eq. 5 max over patches and the Eq. 3 CLS score."""

    def ablation_hooks(self, keep: Tensor) -> dict[str, Callable]:
        """Hooks by site name ablating, per row, the units with ``keep`` ``(B, U)`` 0; keep 1 passes exactly."""


def take(batches: Iterable, limit: Optional[int]) -> Iterator[tuple[Tensor, Tensor]]:
    """The first ``limit`` images of ``batches`` (all of them for None)."""
    seen = 0
    for images, labels in batches:
        if limit is not None:
            if seen >= limit:
                return
            images, labels = images[: limit - seen], labels[: limit - seen]
        seen += len(labels)
        yield images, labels


def class_mean(sums: Tensor, count: Tensor) -> Tensor:
    """Per-class mean from sums over the leading axis; NaN for an empty class."""
    shape = (-1,) + (1,) * (sums.ndim - 1)
    out = sums / count.clamp_min(1).view(shape)
    out[count == 0] = float("nan")
    return out


# --- pass 1: attribution patching and streaming statistics ------------------------------------------------------------

def attribution_pass(hooked, batches: Iterable, families: dict[Hashable, UnitFamily], num_classes: int,
                     device="cpu", validation_images: int = 0, selection: Optional[Tensor] = None,
                     desc: str = "attribution") -> dict:
    """One forward + backward per batch for every family: ``I[c, u]`` and the per-class unit statistics.

    Each image back-propagates its own class logit ``f_y``. Returns, as ``{group: value}``:
    ``importance`` (all images), ``importance_sel`` (the selection half) and, for
    ``validation_images > 0``, ``importance_val`` (the first ``validation_images`` images), each
    ``(C, U)`` on the CPU; ``stats`` (all images) and ``stats_meas`` (the measurement half) as
    ``StreamingClassStats``. Per image in batch order: ``labels``, the own-class logit ``own_logit``
    and ``logit_norm`` ``||f||``; per class: ``count``, ``count_sel`` (and ``count_val``).
    ``selection``: bool ``(n,)`` in batch order, True for the selection half; None: no split
    (``importance_sel`` and ``stats_meas`` are then those of all images).
    """
    device = torch.device(device)
    hooked.eval()
    parts = ("", "_sel", "_val") if validation_images > 0 else ("", "_sel")
    f64 = dict(dtype=torch.float64, device=device)
    imp = {p: {g: torch.zeros(num_classes, fam.units, **f64) for g, fam in families.items()} for p in parts}
    count = {p: torch.zeros(num_classes, **f64) for p in parts}
    halves = [True, False] if selection is not None else [True]
    stats = {g: {h: StreamingClassStats(fam.units, num_classes, device) for h in halves} for g, fam in families.items()}
    stores = {g: {} for g in families}
    hooks = {name: fn for g, fam in families.items() for name, fn in fam.read_hooks(stores[g]).items()}
    input_grad = any(fam.input_grad for fam in families.values())
    own, norms, all_labels = [], [], []
    seen = 0
    with hooked.hooks(hooks):
        for images, labels in tqdm(batches, desc=desc, leave=False):
            total = len(labels)  # under torchrun this process takes its rows; gather_rows puts them back
            x = local_rows(images).to(device).requires_grad_(input_grad)
            y_local = local_rows(labels).to(device).long()
            with torch.enable_grad():
                logits = hooked.model(x)
                f_y = logits.gather(1, y_local[:, None]).squeeze(1)
                acts = {g: fam.activations(stores[g]) for g, fam in families.items()}
                grads = iter(torch.autograd.grad(f_y.sum(), [a for g in families for a in acts[g]]))
            norm_local = logits.detach().norm(dim=1)
            y = gather_rows(y_local, total)
            norm = gather_rows(norm_local, total)
            f_y = gather_rows(f_y.detach(), total)
            if selection is None:
                sel = torch.ones_like(y, dtype=torch.bool)
            elif seen + len(y) > len(selection):
                raise ValueError(f"attribution_pass: selection has {len(selection)} entries, the batches more images")
            else:
                sel = selection[seen:seen + len(y)].to(y.device)
            rows = {"": slice(None), "_sel": sel, "_val": slice(0, max(0, min(len(y), validation_images - seen)))}
            ones = torch.ones_like(y, dtype=torch.float64)
            for p in parts:
                count[p].index_add_(0, y[rows[p]], ones[rows[p]])
            with torch.no_grad():
                for g, fam in families.items():
                    a = [t.detach() for t in acts[g]]
                    est = gather_rows(fam.estimate(a, [next(grads) for _ in a], norm_local), total)
                    for p in parts:
                        imp[p][g].index_add_(0, y[rows[p]], est[rows[p]])
                    m, cls = (gather_rows(s, total) for s in fam.scores(a))
                    for h in halves:
                        half = sel if h else ~sel
                        stats[g][h].update(m[half], y[half], cls[half])
            own.append(f_y.cpu())
            norms.append(norm.cpu())
            all_labels.append(y.cpu())
            seen += len(y)
            for store in stores.values():
                store.clear()
    if seen == 0:
        raise ValueError("attribution_pass: no images")
    if selection is not None and seen != len(selection):
        raise ValueError(f"attribution_pass: selection has {len(selection)} entries for {seen} images")
    out = {"importance" + p: {g: class_mean(imp[p][g], count[p]).cpu() for g in families} for p in parts}
    out.update({"count" + p: count[p].cpu() for p in parts})
    out.update(stats={g: StreamingClassStats.combine(list(stats[g].values())) for g in families},
               stats_meas={g: stats[g][halves[-1]] for g in families},
               labels=torch.cat(all_labels), own_logit=torch.cat(own), logit_norm=torch.cat(norms))
    return out


# --- pass 2: ablation ------------------------------------------------------------------------------------------------

@torch.no_grad()
def ablation_jobs(hooked, batches: Iterable, families: dict[Hashable, UnitFamily], jobs: list[tuple], num_classes: int,
                  device="cpu", limit: Optional[int] = None, clean: Optional[tuple] = None, max_batch: int = 1024,
                  desc: str = "ablation", restart: bool = True) -> Tensor:
    """Eq. 2 averaged per class for several ablations, shape ``(jobs, C)``:
    ``mean_{x in D_c} (f_c(x) - f_c^abl(x)) / ||f(x)||``.

    A job is ``(group, keep)`` or ``(group, keep, images)``: ``keep`` is ``(U,)`` (the same
    units ablated for every image) or ``(C, U)`` (the units of each image's own class); 0
    marks a unit ablated by ``families[group]``. ``images`` (bool ``(n,)`` in batch order,
    None: all) restricts the job to those images (``D_c`` is then the class's images among
    them). Jobs share forward passes: each job's rows of a batch are stacked (up to
    ``max_batch`` images per forward; 1: every job its own forwards) and each row gets its own
    mask. ``clean`` optionally gives ``(f_y, ||f||)`` per image in batch order (from
    :func:`attribution_pass` of families with ``clean_forward``), saving the clean forward.
    ``limit``: only the first images of ``batches``.

    ``restart``: the blocks before a family's first hooked block do not depend on the ablation, so each
    batch runs them once (``HookedViT.residuals``) and every ablated forward starts there
    (``HookedViT.logits_from``): a job at block b costs ``(depth - b) / depth`` of a forward. ``restart=False``
    is the plain path, every forward from the images; both give the same numbers (tests/test_neuron.py).
    """
    device = torch.device(device)
    hooked.eval()
    jobs = [(j[0], j[1].to(device, torch.float32), j[2] if len(j) > 2 else None) for j in jobs]
    first_block = {}  # the first block each job's family hooks
    restart = restart and bool(jobs)
    if restart:
        for g in {j[0] for j in jobs}:
            names = families[g].ablation_hooks(torch.ones(1, families[g].units, device=device))
            first_block[g] = min(parse_site(name)[0] for name in names)
        starts = sorted(set(first_block.values()))
    sums = torch.zeros(len(jobs) * num_classes, dtype=torch.float64, device=device)
    count = torch.zeros(len(jobs) * num_classes, dtype=torch.float64, device=device)
    seen = 0
    for images, labels in tqdm(take(batches, limit), desc=desc, leave=False):
        total = len(labels)  # under torchrun: this process's rows; the sums are all-reduced below
        x, y = local_rows(images).to(device), local_rows(labels).to(device).long()
        B = len(y)
        every = torch.arange(B, device=device)
        rows = [every if sub is None else every[local_rows(sub[seen:seen + total]).to(device)] for _, _, sub in jobs]
        resid = used = None
        if restart and B:  # the residual streams of the rows some job (or the clean forward) reads
            used = every if clean is None else torch.unique(torch.cat(rows))
            resid = hooked.residuals(x[used], starts)
        if clean is None:
            logits = hooked.logits_from(resid[starts[-1]], starts[-1]) if resid is not None else hooked.model(x)
            f_y, norm = logits.gather(1, y[:, None]).squeeze(1), logits.norm(dim=1)
        else:
            f_y, norm = (local_rows(t[seen:seen + total]).to(device) for t in clean)
        seen += total
        if B == 0:
            continue
        per = max(1, max_batch // B)
        for chunk in _chunks(jobs, per, [first_block.get(g, 0) for g, _, _ in jobs]):
            chunk = [j for j in chunk if len(rows[j])]
            if not chunk:
                continue
            r = torch.cat([rows[j] for j in chunk])
            job = torch.cat([torch.full_like(rows[j], j) for j in chunk])
            keeps: dict[Hashable, Tensor] = {}
            offset = 0
            for j in chunk:
                g, keep, _ = jobs[j]
                if g not in keeps:
                    keeps[g] = torch.ones(len(r), families[g].units, device=device)
                n_j = len(rows[j])
                keeps[g][offset:offset + n_j] = keep[y[rows[j]]] if keep.ndim == 2 else keep
                offset += n_j
            fns = {name: fn for g, k in keeps.items() for name, fn in families[g].ablation_hooks(k).items()}
            if resid is not None:
                b = min(first_block[g] for g in keeps)
                abl = hooked.logits_from(resid[b][torch.searchsorted(used, r)], b, fns)
            else:
                abl = hooked.run_with_hooks(x[r], fns)
            abl_y = abl.gather(1, y[r][:, None]).squeeze(1)
            effect = (f_y[r] - abl_y) / norm[r]
            index = job * num_classes + y[r]
            sums.index_add_(0, index, effect.double())
            count.index_add_(0, index, torch.ones_like(effect, dtype=torch.float64))
    all_reduce_sum(sums)
    all_reduce_sum(count)
    return class_mean(sums, count).view(len(jobs), num_classes).cpu()


def _chunks(jobs: list, per: int, first_blocks: list[int]) -> Iterator[list[int]]:
    """Job indices in order, ``per`` at a time, a new chunk wherever the first hooked block changes (a
    restarted forward starts at its chunk's earliest block: mixing blocks would run the later job's
    blocks twice). Every row is computed alone, so the chunking changes no number."""
    chunk: list[int] = []
    for j in range(len(jobs)):
        if chunk and (len(chunk) == per or first_blocks[j] != first_blocks[chunk[0]]):
            yield chunk
            chunk = []
        chunk.append(j)
    if chunk:
        yield chunk


# --- top-K units: held-out and same-image ---------------------------------------------------------------------------

def analyse(hooked, batches: Iterable, families: dict[Hashable, UnitFamily], top_k: int, num_classes: int,
            classes: Optional[list[int]] = None, selection: Optional[Tensor] = None, seed: int = 0,
            validation_images: int = 0, device="cpu", max_batch: int = 1024, desc: str = "",
            same_image_impact: bool = True) -> dict:
    """Top-K units per class and group, chosen on the selection half and measured on the other (suffix
    ``""``), or chosen and measured on all images (``SAME``); ``batches`` must be re-iterable in a fixed order.
    ``same_image_impact=False`` skips the ablation of the ``SAME`` sets (their ``impact`` is NaN; the held-out
    impact is unchanged to float rounding, its ablations packed into other forwards; the rest bit for bit).

    ``classes``: the analysed classes (default: all). ``selection``: bool ``(n,)`` in batch order
    (default: ``stratified_halves(batch_labels(batches), seed)``). Returns ``classes``,
    ``selection``, ``pass`` (the :func:`attribution_pass` result) and ``variants``
    ``{suffix: {group: {...}}}`` with ``importance`` ``(C, U)`` (the images the top-K are chosen
    on), ``top`` ``(classes, K)`` and ``zero`` ``(classes,)`` (``unit_metrics.top_units``),
    ``values`` (``unit_metrics.selected_unit_values`` on the measurement images) and ``impact``
    ``(classes,)`` (Eq. 2, the class's top-K ablated together on the measurement images).
    """
    classes = list(range(num_classes)) if classes is None else list(classes)
    if not classes or min(classes) < 0 or max(classes) >= num_classes:
        raise ValueError(f"classes must be a non-empty list of indices in [0, {num_classes})")
    selection = selection_mask(batches, selection, seed)
    first = attribution_pass(hooked, batches, families, num_classes, device, validation_images=validation_images,
                             selection=selection, desc=f"attribution {desc}".strip())
    cls_idx = torch.tensor(classes)
    sources = {"": ("importance_sel", "stats_meas", ~selection), SAME: ("importance", "stats", None)}
    variants = {suffix: {} for suffix in sources}
    jobs, chosen = [], []
    for g, fam in families.items():
        for suffix, (imp_key, stats_key, images) in sources.items():
            imp = first[imp_key][g]
            top, zero = top_units(imp[cls_idx], top_k)
            keep = torch.ones(num_classes, fam.units)
            keep[cls_idx[:, None], top] = 0
            variants[suffix][g] = {"importance": imp, "top": top, "zero": zero,
                                   "values": selected_unit_values(first[stats_key][g], top, classes)}
            if suffix == SAME and not same_image_impact:
                variants[suffix][g]["impact"] = torch.full((len(classes),), float("nan"), dtype=torch.float64)
                continue
            jobs.append((g, keep, images))
            chosen.append(variants[suffix][g])
    clean = (first["own_logit"], first["logit_norm"]) if all(f.clean_forward for f in families.values()) else None
    effect = ablation_jobs(hooked, batches, families, jobs, num_classes, device, clean=clean, max_batch=max_batch,
                           desc=f"ablate top-K {desc}".strip())
    for result, e in zip(chosen, effect):
        result["impact"] = e[cls_idx]
    return {"classes": classes, "selection": selection, "pass": first, "variants": variants}
