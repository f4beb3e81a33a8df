"""Sec. 3.4 / 4.4, App. A.1, A.4, C: circuits from learnable node masks.

Nodes
    Masks sit at the paper's eight sites of every block (App. C.1): ``norm1``, ``q``, ``k``,
    ``v`` (one node per head each, sliced from the fused qkv), ``attn_out``, ``norm2``,
    ``mlp_act`` (one node per hidden neuron) and ``mlp_out``; the other sites have one node per
    channel. A block has ``8C + 3H`` nodes. One scalar logit ``m`` per node, shared by all
    tokens and images.

Mask (Eq. 13 / 15)
    forward ``m_hat = 1[m > 0]`` (Heaviside); backward ``dm_hat/dm = tau sig(tau m)(1 - sig(tau m))``.
    Logits start at N(0.5, 0.01) (every node on) and are clamped to [-1, 1] after every step.

Ablation (Eq. 11)
    ``a~ = m_hat * a + (1 - m_hat) * a_bar`` (:func:`impact_core.methods.sites.mean_ablate`): an
    inactive node takes its per-position dataset mean from :func:`impact_core.pipeline.site_means`,
    never zero.

Objective (Eq. 10)
    ``L = L_task + k * sum_i m_hat_i``; the node count goes through the same surrogate.
    Task "class c versus rest" (our choice; the paper does not write it out): binary
    cross-entropy with logits on the margin ``s_c = z_c - logsumexp_{j != c} z_j`` with target
    ``1[y == c]``. Since ``sigmoid(s_c) = softmax(z)_c`` this is the BCE of the model's own
    probability of class c. A prediction is "c" when the model's arg-max is c
    (``z_c > max_{j != c} z_j``); accuracies on the balanced sets use that rule, so a model that
    never says "c" scores 50 %.
    AdamW (weight decay ``circuit.weight_decay``; the paper does not state it), StepLR(step_size
    epochs, gamma) as App. C.2 (Sec. 3.4 says "linear decay"; we follow the appendix).

Data
    Per class, balanced one-vs-rest sets: ``n`` images of c and ``n`` drawn uniformly from the
    other classes; training sets from the train split (``circuit.train_images_per_class``),
    evaluation sets from the eval split (``circuit.eval_images_per_class``), seeded.

Batched classes
    The logits carry a leading class axis ``(K, units)``. One forward serves all K classes: the
    per-class image batches are stacked to ``(K*B, ...)`` and every mask hook views the
    activation as ``(K, B, ...)`` (``mean_ablate``'s groups). Classes never interact (separate parameters, per-class loss
    summed), so this equals training class by class with the same seeds
    (:func:`train_masks_sequential` is the plain reference; tests assert they agree).

Evaluation (App. C.3, Eq. 12)
    circuit accuracy (inactive nodes at their means), full-model accuracy on the same set,
    ablated accuracy (circuit nodes at their means, the rest kept), node fraction
    ``|N_circuit| / |N_total|`` and ``NCQ = acc_circuit / acc_full * (1 - node fraction)``.

Baselines and faithfulness (ours; the paper has none)
    *Random ablation*: per class, ``circuit.random_draws`` uniformly random node sets with the
    circuit's number of active nodes at every site (seeded by class and draw), mean-ablated like
    the circuit; an ablated accuracy near chance means little unless random sets of the same size
    leave the model accurate. *Margins*: the mean class margin ``s_c`` over the class's positive
    eval images under five mask sets: full (no mask), circuit, ablated, random-ablated and empty
    (every node at its mean). ``faithfulness = (s_circuit - s_empty) / (s_full - s_empty)``: 1 when
    the circuit recovers the full model's margin, 0 when it does no better than no nodes at all
    (undefined when ``s_full == s_empty``); ``faithfulness_ablated`` is the same for the ablated model.

Edges (our definition; the paper gives none)
    An edge is one *nonzero weight* of a block Linear whose input node and output node are both
    active. The weight matrices and the nodes they join, per block (qkv rows are ordered
    ``(q|k|v, head, head_dim)``, proj columns ``(head, head_dim)``, as timm):

    =============  ====================================  ======================================
    matrix         input node of column j                output node of row r
    =============  ====================================  ======================================
    qkv (q part)   norm1 channel j                       q head ``r // D``
    qkv (k part)   norm1 channel j                       k head
    qkv (v part)   norm1 channel j                       v head
    proj           head ``j // D``: active when any of   attn_out channel r (LayerScale is a
                   its q, k, v nodes is active           diagonal, not an edge)
    fc1            norm2 channel j                       mlp_act neuron r (GELU is elementwise)
    fc2            mlp_act neuron j                      mlp_out channel r
    =============  ====================================  ======================================

    Residual-stream connections (``attn_out``/``mlp_out`` -> residual -> next ``norm1``/``norm2``)
    and LayerNorms carry no prunable weight and are not edges; q and k reach the head output
    through the attention pattern, not through a weight, so they join ``proj`` via the head rule
    above. The dense model's edge total is the number of weights of qkv, proj, fc1 and fc2 of all
    blocks (the weights pruning acts on). Circuit size is reported as a fraction of that total
    (the paper's measure) and as a fraction of the nonzero weights the pruned model still has.
    :func:`pruning_only_edges` is the counterfactual: the *dense* model's circuits counted on a
    pruned model's weights, the drop in size that pruning alone causes with the nodes unchanged.

Control
    ``method = pipeline.CONTROL`` (sparsity 0) is the dense model fine-tuned like a pruned one with
    nothing pruned; it gets the pruned models' ``k`` (:func:`default_k`), so dense vs control
    separates what the pipeline and the coefficient do from what pruning does.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import distributed
from ..data import Split, batches
from .sites import HEAD_SITES, PAPER_SITES, HookedViT, mean_ablate, parse_site, site_name

log = logging.getLogger("impact_core")


# ----------------------------------------------------------------------------------------
# straight-through Heaviside mask
# ----------------------------------------------------------------------------------------
class HeavisideSTE(torch.autograd.Function):
    """``1[m > 0]`` forward; ``tau * sig(tau m) * (1 - sig(tau m))`` backward (Eq. 13 / 15)."""

    @staticmethod
    def forward(ctx, m: torch.Tensor, tau: float) -> torch.Tensor:
        ctx.save_for_backward(m)
        ctx.tau = float(tau)
        return (m > 0).to(m.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (m,) = ctx.saved_tensors
        s = torch.sigmoid(ctx.tau * m)
        return grad * ctx.tau * s * (1 - s), None


def heaviside(m: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    return HeavisideSTE.apply(m, tau)


# ----------------------------------------------------------------------------------------
# masks as hooks
# ----------------------------------------------------------------------------------------
def node_sites(hooked: HookedViT) -> list[str]:
    """The masked site names of every block, in a fixed order (block-major, PAPER_SITES order)."""
    return hooked.site_names(sites=PAPER_SITES)


def num_nodes(hooked: HookedViT) -> int:
    return sum(hooked.num_units(n) for n in node_sites(hooked))


def init_logits(hooked: HookedViT, classes: Sequence[int], seed: int, mean: float = 0.5,
                std: float = 0.01, device="cpu") -> dict[str, torch.Tensor]:
    """Logits ``(K, units)`` per site, drawn from N(mean, std); class c's rows come from a generator
    seeded by ``(seed, c)`` so a class gets the same start whatever other classes share its batch."""
    names = node_sites(hooked)
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for c in classes:
        g = torch.Generator().manual_seed(int(seed) * 100_003 + int(c))
        for n in names:
            rows[n].append(mean + std * torch.randn(hooked.num_units(n), generator=g))
    return {n: torch.stack(r).to(device) for n, r in rows.items()}


def mask_hooks(masks: dict[str, torch.Tensor], means: dict[str, torch.Tensor]) -> dict:
    """Eq. 11 hooks for masks ``{site: (K, units)}``: class k's rows of the batch get mask row k.

    The same values as one :func:`~impact_core.methods.sites.mean_ablate` per site (the plain
    reference, :func:`mask_hooks_per_site`; tests assert equal outputs and gradients to float
    rounding), laid out for speed: a head site's mask is repeated over its head's ``D`` channels, so
    every site is a channel mask on a ``(K, B, N, C)`` view, and a block's q, k and v are masked
    together on the fused ``qkv`` output (one ``lerp`` where there were three and a re-stack).
    """
    out = {}
    for name, m in masks.items():
        block, site = parse_site(name)
        if site in ("q", "k", "v"):
            continue
        mean = means[name]
        if site in HEAD_SITES:
            m, mean = m.repeat_interleave(mean.shape[-1], -1), mean.flatten(-2)
        out[name] = _channel_mix(mean, m)
    for block in sorted({parse_site(n)[0] for n in masks if parse_site(n)[1] in ("q", "k", "v")}):
        qkv = [site_name(block, s) for s in ("q", "k", "v")]
        if not all(n in masks for n in qkv):
            raise KeyError(f"block {block}: q, k and v are masked together; got masks for "
                           f"{[n for n in qkv if n in masks]}")
        m = torch.cat([masks[n].repeat_interleave(means[n].shape[-1], -1) for n in qkv], -1)
        out[site_name(block, "qkv")] = _channel_mix(torch.cat([means[n].flatten(-2) for n in qkv], -1), m)
    return out


def _channel_mix(mean: torch.Tensor, keep: torch.Tensor):
    """Hook ``lerp(mean, a, keep)`` on an activation ``(K*B, N, ..., C)`` viewed as ``(K, B, N, C)``;
    ``mean`` ``(N, C)``, ``keep`` ``(K, C)``. Exact for keep in {0, 1} (as ``mean_ablate``)."""
    m = keep[:, None, None, :]

    def fn(act):
        a = act.reshape(m.shape[0], -1, act.shape[1], m.shape[-1])
        return torch.lerp(mean.to(act.dtype), a, m).reshape(act.shape)

    return fn


def mask_hooks_per_site(masks: dict[str, torch.Tensor], means: dict[str, torch.Tensor]) -> dict:
    """Plain reference of :func:`mask_hooks`: one ``mean_ablate`` hook per site."""
    return {n: mean_ablate(means[n], m, n) for n, m in masks.items()}


# ----------------------------------------------------------------------------------------
# task
# ----------------------------------------------------------------------------------------
def class_margin(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """``s_c = z_c - logsumexp_{j != c} z_j`` for logits ``(K, B, C)`` and classes ``(K,)``."""
    onehot = F.one_hot(classes, logits.shape[-1]).bool()[:, None, :]
    zc = logits.gather(-1, classes.view(-1, 1, 1).expand(-1, logits.shape[1], 1)).squeeze(-1)
    return zc - logits.masked_fill(onehot, float("-inf")).logsumexp(-1)


def task_loss(logits: torch.Tensor, classes: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Per-class BCE on the margin, mean over the batch: ``(K,)``."""
    margin = class_margin(logits, classes)
    return F.binary_cross_entropy_with_logits(margin, positive.float(), reduction="none").mean(1)


def says_class(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """``(K, B)`` bool: the model's arg-max is the class of row k."""
    return logits.argmax(-1) == classes[:, None]


# ----------------------------------------------------------------------------------------
# balanced one-vs-rest sets
# ----------------------------------------------------------------------------------------
def balanced_indices(labels: np.ndarray, c: int, n: int, seed: int, what: str = "split") -> tuple[np.ndarray, np.ndarray]:
    """``n`` positions of class c and ``n`` drawn uniformly from the rest, shuffled together.

    Returns (indices into ``labels``, 0/1 targets)."""
    rng = np.random.default_rng([int(seed), int(c)])
    pos = np.flatnonzero(labels == c)
    neg = np.flatnonzero(labels != c)
    if len(pos) < n or len(neg) < n:
        raise ValueError(f"{what}: class {c} has {len(pos)} images and the rest {len(neg)}; "
                         f"{n} of each are needed (lower circuit.*_images_per_class or raise data.*_images)")
    idx = np.concatenate([rng.choice(pos, n, replace=False), rng.choice(neg, n, replace=False)])
    y = np.concatenate([np.ones(n, dtype=np.int64), np.zeros(n, dtype=np.int64)])
    order = rng.permutation(2 * n)
    return idx[order], y[order]


class ClassSets:
    """Per-class balanced sets of one split; ``batch(step_idx)`` stacks class k's images at rows k."""

    def __init__(self, split: Split, classes: Sequence[int], n: int, seed: int, what: str):
        self.split, self.classes = split, list(classes)
        labels = split.labels
        made = [balanced_indices(labels, c, n, seed, what) for c in self.classes]
        self.idx = np.stack([m[0] for m in made])  # (K, 2n) positions in the split
        self.y = torch.from_numpy(np.stack([m[1] for m in made]))  # (K, 2n)

    def __len__(self) -> int:
        return self.idx.shape[1]

    def select(self, rows: Sequence[int]) -> "ClassSets":
        out = object.__new__(ClassSets)
        out.split, out.classes = self.split, [self.classes[r] for r in rows]
        out.idx, out.y = self.idx[list(rows)], self.y[list(rows)]
        return out

    def images(self, cols: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``cols``: ``(K, B)`` positions into each class's set -> images ``(K*B, ...)``, targets ``(K, B)``."""
        K, B = cols.shape
        pos = np.take_along_axis(self.idx, cols, axis=1).reshape(-1)
        x, _ = next(batches(self.split.subset(pos), batch_size=len(pos)))
        return x, torch.gather(self.y, 1, torch.from_numpy(cols))


# ----------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------
def _frozen(model: torch.nn.Module):
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    return flags


def steps_per_epoch(images: int, batch_size: int) -> int:
    """Mask-training steps per epoch: ``ceil(images / batch_size)`` (the last batch may be short)."""
    return -(-images // batch_size)


def first_decay_travel(cc) -> float:
    """How far a mask logit can move before the first learning-rate decay, taking Adam's step as
    about ``lr``: ``lr * step_size * steps_per_epoch`` (``cc``: a :class:`CircuitConfig`). A node
    switches off only when its logit crosses 0 from its ``init_mean`` start, so this must exceed
    ``init_mean`` for training to remove nodes within the schedule."""
    return cc.lr * cc.step_size * steps_per_epoch(2 * cc.train_images_per_class, cc.batch_size)


def split_sites(hooked: HookedViT, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{site: (K, units)}`` views of ``flat`` ``(K, num_nodes)``, whose columns hold :func:`node_sites`
    in order (the layout :func:`train_masks` keeps its logits in)."""
    names = node_sites(hooked)
    return dict(zip(names, flat.split([hooked.num_units(n) for n in names], -1)))


def mask_step(hooked: HookedViT, logits, means: dict[str, torch.Tensor], opt: torch.optim.Optimizer,
              x: torch.Tensor, y: torch.Tensor, classes: torch.Tensor, *, k: float, tau: float = 1.0,
              plain: bool = False) -> torch.Tensor:
    """One optimiser step of the masks of K classes at once (the body of :func:`train_masks`).

    Heaviside masks of the logits at every site, one forward of ``x`` (the K classes' batches
    stacked), loss = task loss + ``k`` x active node count per class, backward to the logits,
    ``opt.step()``, then the logits clamped to [-1, 1]. Returns the ``(K,)`` losses.

    Fast path: ``logits`` ``(K, num_nodes)``, every site's logits side by side (:func:`split_sites`),
    so the Heaviside, the node count, AdamW and the clamp are one operation each for all sites (the
    same arithmetic per element), and :func:`mask_hooks`. ``plain=True``, the readable reference:
    ``logits`` ``{site: (K, units)}``, one mask, :func:`~impact_core.methods.sites.mean_ablate` hook
    and clamp per site (an optimiser over the per-site tensors).
    """
    if plain:
        masks = {nm: heaviside(t, tau) for nm, t in logits.items()}
        hooks = mask_hooks_per_site(masks, means)
        count = torch.stack([m.sum(-1) for m in masks.values()]).sum(0)  # (K,)
    else:
        flat = heaviside(logits, tau)
        hooks = mask_hooks(split_sites(hooked, flat), means)
        count = flat.sum(-1)
    with hooked.hooks(hooks):
        z = hooked.model(x)
    z = z.view(len(classes), -1, z.shape[-1])
    loss = task_loss(z, classes, y) + k * count
    opt.zero_grad(set_to_none=True)
    loss.sum().backward()
    opt.step()
    with torch.no_grad():
        for t in (logits.values() if plain else [logits]):
            t.clamp_(-1.0, 1.0)
    return loss.detach()


def train_masks(hooked: HookedViT, means: dict[str, torch.Tensor], data: ClassSets, *, k: float,
                epochs: int, lr: float, step_size: int, gamma: float, batch_size: int, tau: float = 1.0,
                weight_decay: float = 0.01, init_mean: float = 0.5, init_std: float = 0.01, seed: int = 0,
                device="cpu", progress: bool = True, plain: bool = False,
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Learn node masks for all classes of ``data`` at once.

    Returns (logits ``{site: (K, units)}`` after training, per-step losses ``(steps, K)``).
    Class k's batch order comes from a generator seeded by ``(seed, class, epoch)``. ``plain=True``
    runs :func:`mask_step`'s readable per-site reference (tests: the same circuits to float rounding).
    """
    hooked.eval()
    flags = _frozen(hooked)
    classes = torch.tensor(data.classes, device=device)
    K, n = len(data.classes), len(data)
    init = init_logits(hooked, data.classes, seed, init_mean, init_std, device)
    means = {nm: means[nm].to(device) for nm in init}
    if plain:
        logits = {nm: t.clone().requires_grad_(True) for nm, t in init.items()}
        params = list(logits.values())
    else:
        logits = torch.cat([init[nm] for nm in node_sites(hooked)], -1).requires_grad_(True)
        params = [logits]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=not plain)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=gamma)
    losses = []
    bar = tqdm(total=epochs * steps_per_epoch(n, batch_size), desc=f"circuit masks ({K} classes)", leave=False,
               disable=not progress)
    try:
        for epoch in range(epochs):
            perm = np.stack([np.random.default_rng([int(seed), int(c), epoch]).permutation(n) for c in data.classes])
            for start in range(0, n, batch_size):
                x, y = data.images(perm[:, start:start + batch_size])
                x, y = x.to(device), y.to(device)
                losses.append(mask_step(hooked, logits, means, opt, x, y, classes, k=k, tau=tau, plain=plain).cpu())
                bar.update(1)
            sched.step()
    finally:
        bar.close()
        for p, f in zip(hooked.parameters(), flags):
            p.requires_grad_(f)
    out = logits if plain else split_sites(hooked, logits)
    return {nm: t.detach().clone() for nm, t in out.items()}, torch.stack(losses)


def train_masks_sequential(hooked: HookedViT, means, data: ClassSets, **kwargs):
    """Plain reference: :func:`train_masks` class by class (K = 1 each), results stacked."""
    outs = [train_masks(hooked, means, data.select([i]), **kwargs) for i in range(len(data.classes))]
    logits = {nm: torch.cat([o[0][nm] for o in outs]) for nm in outs[0][0]}
    return logits, torch.cat([o[1] for o in outs], dim=1)


# ----------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------
_RANDOM_STREAM = 0x52414E44  # "RAND": keeps these draws apart from the other (seed, class, ...) streams


def random_node_sets(active: dict[str, torch.Tensor], classes: Sequence[int], draws: int,
                     seed: int) -> dict[str, torch.Tensor]:
    """``{site: (K, draws, units)}`` bool: for class ``classes[i]`` and draw d, a uniformly random set
    with exactly as many nodes at every site as row i of ``active`` has. The generator is seeded by
    ``(seed, class, d)``; sites are drawn in sorted name order, so the draw does not depend on the
    other classes or on the dict order."""
    K = len(classes)
    if any(a.shape[0] != K for a in active.values()):
        raise ValueError(f"active has {next(iter(active.values())).shape[0]} rows for {K} classes")
    out = {nm: torch.zeros(K, draws, a.shape[1], dtype=torch.bool) for nm, a in active.items()}
    counts = {nm: a.bool().sum(-1).tolist() for nm, a in active.items()}
    for i, c in enumerate(classes):
        for d in range(draws):
            rng = np.random.default_rng([int(seed), int(c), d, _RANDOM_STREAM])
            for nm in sorted(active):
                pick = rng.choice(active[nm].shape[1], counts[nm][i], replace=False)
                out[nm][i, d, torch.from_numpy(pick)] = True
    return out


@torch.no_grad()
def evaluate_masks(hooked: HookedViT, means, data: ClassSets, active: dict[str, torch.Tensor],
                   batch_size: int, device="cpu", random_sets: Optional[dict[str, torch.Tensor]] = None,
                   ) -> dict[str, torch.Tensor]:
    """Accuracy and mean class margin of the model under several node mask sets, on balanced sets.

    ``active``: ``{site: (K, units)}`` 0/1 (the circuit's nodes); ``random_sets``: ``{site: (K, D, units)}``
    (:func:`random_node_sets`) or None (D = 0). Mask sets (1: node kept, 0: node at its mean):
    "full" (no mask), "circuit" (``active``), "ablated" (``1 - active``), "empty" (all 0) and, per draw
    d, "random_ablated" (``1 - random_sets[:, d]``). One forward per mask set and batch serves all K
    classes, as in training.

    Returns accuracies "full", "circuit", "ablated", "empty" ``(K,)`` and "random_ablated" ``(K, D)``, and
    "margin_<set>" for the same sets: the mean of ``s_c`` (:func:`class_margin`) over the images of c.
    """
    hooked.eval()
    K, n = len(data.classes), len(data)
    classes = torch.tensor(data.classes, device=device)
    on = {nm: a.to(device).float() for nm, a in active.items()}
    sets = {"full": None, "circuit": on, "ablated": {nm: 1 - a for nm, a in on.items()},
            "empty": {nm: torch.zeros_like(a) for nm, a in on.items()}}
    D = 0 if random_sets is None else next(iter(random_sets.values())).shape[1]
    for d in range(D):
        sets[f"random{d}"] = {nm: 1 - random_sets[nm][:, d].to(device).float() for nm in on}
    means = {nm: means[nm].to(device) for nm in on}
    correct = {key: torch.zeros(K, device=device) for key in sets}
    margin = {key: torch.zeros(K, device=device) for key in sets}
    positives = torch.zeros(K, device=device)
    cols_all = np.tile(np.arange(n), (K, 1))
    for start in range(0, n, batch_size):
        x, y = data.images(cols_all[:, start:start + batch_size])
        x, y = x.to(device), y.to(device).bool()
        positives += y.sum(1)
        for key, masks in sets.items():
            if masks is None:
                z = hooked.model(x)
            else:
                with hooked.hooks(mask_hooks(masks, means)):
                    z = hooked.model(x)
            z = z.view(K, -1, z.shape[-1]).float()
            correct[key] += (says_class(z, classes) == y).sum(1)
            margin[key] += torch.where(y, class_margin(z, classes), 0.0).sum(1)
    acc = {key: (v / n).cpu() for key, v in correct.items()}
    marg = {key: (v / positives).cpu() for key, v in margin.items()}
    rand = [f"random{d}" for d in range(D)]
    out = {}
    for prefix, vals in (("", acc), ("margin_", marg)):
        for key in ("full", "circuit", "ablated", "empty"):
            out[prefix + key] = vals[key]
        out[prefix + "random_ablated"] = torch.stack([vals[r] for r in rand], 1) if D else torch.zeros(K, 0)
    return out


def faithfulness(margin: torch.Tensor, margin_full: torch.Tensor, margin_empty: torch.Tensor) -> torch.Tensor:
    """``(s - s_empty) / (s_full - s_empty)``: 1 = the full model's margin, 0 = no better than every node at its mean."""
    return (margin - margin_empty) / (margin_full - margin_empty)


def node_fraction(hooked: HookedViT, active: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(K,)`` fraction of all nodes that are active."""
    total = sum(a.float().sum(-1) for a in active.values())
    return total / num_nodes(hooked)


def ncq(acc_circuit, acc_full, node_frac):
    """Eq. 12: ``acc_circuit / acc_full * (1 - |N_circuit| / |N_total|)``."""
    return acc_circuit / acc_full * (1 - node_frac)


def ncq_edges(acc_circuit, size_dense):
    """NCQ in the form the paper's tables follow: ``acc_circuit * (1 - size)``, size = edges / dense edges.

    Eq. 12 uses the node fraction and ``acc_circuit / acc_full``; the NCQ values printed in
    Tables 3 and 7 are instead reproduced to 3-4 digits by ``Acc * (1 - Size)`` (e.g. dense:
    0.8912 * (1 - 0.3242) = 0.602; Wanda 70%: 0.8964 * (1 - 0.1294) = 0.780), so we report both.
    """
    return acc_circuit * (1 - size_dense)


def site_fractions(hooked: HookedViT, active: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(K, depth, 8)`` fraction of active nodes per block and site (PAPER_SITES order)."""
    K = next(iter(active.values())).shape[0]
    out = torch.zeros(K, hooked.depth, len(PAPER_SITES))
    for nm, a in active.items():
        b, s = parse_site(nm)
        out[:, b, PAPER_SITES.index(s)] = a.float().mean(-1).cpu()
    return out


# ----------------------------------------------------------------------------------------
# edges
# ----------------------------------------------------------------------------------------
def _head_active(active, b: int) -> torch.Tensor:
    """A head feeds proj when any of its q, k, v nodes is active: ``(K, H)``."""
    return torch.stack([active[site_name(b, s)].bool() for s in ("q", "k", "v")]).any(0).float()


@torch.no_grad()
def edge_counts(hooked: HookedViT, active: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Edges of the circuits ``(K,)`` and the model's totals (see the module docstring).

    Returns ``{"edges": (K,), "dense_total": scalar, "remaining_total": scalar}`` (float64)."""
    D, C = hooked.head_dim, hooked.embed_dim
    act = {nm: a.double().cpu() for nm, a in active.items()}
    K = next(iter(act.values())).shape[0]
    edges = torch.zeros(K, dtype=torch.float64)
    dense = remaining = 0.0

    def count(weight, a_out, a_in):
        nz = (weight.detach().cpu() != 0).double()
        return torch.einsum("ko,oi,ki->k", a_out, nz, a_in)

    for b, blk in enumerate(hooked.model.blocks):
        g = lambda s: act[site_name(b, s)]  # noqa: E731
        W = blk.attn.qkv.weight
        for i, s in enumerate(("q", "k", "v")):
            edges += count(W[i * C:(i + 1) * C], g(s).repeat_interleave(D, dim=1), g("norm1"))
        heads = _head_active(act, b).double().repeat_interleave(D, dim=1)
        edges += count(blk.attn.proj.weight, g("attn_out"), heads)
        edges += count(blk.mlp.fc1.weight, g("mlp_act"), g("norm2"))
        edges += count(blk.mlp.fc2.weight, g("mlp_out"), g("mlp_act"))
        for lin in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2):
            dense += lin.weight.numel()
            remaining += float((lin.weight != 0).sum())
    return {"edges": edges, "dense_total": torch.tensor(dense, dtype=torch.float64),
            "remaining_total": torch.tensor(remaining, dtype=torch.float64)}


def compute_circuits(hooked: HookedViT, means, train: ClassSets, evals: ClassSets, cfg_circuit, *, k: float,
                     seed: int, device="cpu") -> dict:
    """Train in chunks of ``class_chunk`` classes, evaluate, count edges: one result dict.

    Under torchrun each process trains and evaluates every world_size-th chunk (classes are
    independent and seeded by class, so the result equals one process's) and the chunks are
    gathered. Each chunk's circuits are also compared with ``cc.random_draws`` random node sets of the
    same per-site sizes (:func:`random_node_sets`) and evaluated by class margin (:func:`evaluate_masks`)."""
    cc = cfg_circuit
    K = len(train.classes)
    chunks = [list(range(start, min(K, start + cc.class_chunk))) for start in range(0, K, cc.class_chunk)]
    local = {}
    for i in distributed.shard(np.arange(len(chunks))):
        rows = chunks[i]
        lg, ls = train_masks(hooked, means, train.select(rows), k=k, epochs=cc.epochs, lr=cc.lr,
                             step_size=cc.step_size, gamma=cc.step_gamma, batch_size=cc.batch_size, tau=cc.tau,
                             weight_decay=cc.weight_decay, init_mean=cc.init_mean, init_std=cc.init_std,
                             seed=seed, device=device)
        lg = {nm: t.cpu() for nm, t in lg.items()}
        act = {nm: t > 0 for nm, t in lg.items()}
        rand = random_node_sets(act, [train.classes[r] for r in rows], cc.random_draws, seed)
        part = evaluate_masks(hooked, means, evals.select(rows), act, cc.batch_size, device, random_sets=rand)
        local[int(i)] = (lg, ls, part)
    done = {i: v for got in distributed.gather_objects(local) for i, v in got.items()}
    parts = [done[i] for i in range(len(chunks))]
    logits = {nm: torch.cat([p[0][nm] for p in parts]) for nm in parts[0][0]}
    losses = [p[1] for p in parts]
    active = {nm: t > 0 for nm, t in logits.items()}
    ev = {key: torch.cat([p[2][key] for p in parts]) for key in parts[0][2]}
    frac = node_fraction(hooked, active)
    e = edge_counts(hooked, active)
    faith = {key: faithfulness(ev[f"margin_{key}"], ev["margin_full"], ev["margin_empty"])
             for key in ("circuit", "ablated")}
    return {
        "classes": list(train.classes), "k": float(k),
        "acc_full": ev["full"], "acc_circuit": ev["circuit"], "acc_ablated": ev["ablated"],
        "acc_random_ablated": ev["random_ablated"], "acc_empty": ev["empty"],
        **{f"margin_{key}": ev[f"margin_{key}"] for key in ("full", "circuit", "ablated", "random_ablated", "empty")},
        "faithfulness": faith["circuit"], "faithfulness_ablated": faith["ablated"],
        "node_fraction": frac, "ncq": ncq(ev["circuit"], ev["full"], frac),
        "edges": e["edges"], "edges_dense_total": e["dense_total"], "edges_remaining_total": e["remaining_total"],
        "size_dense": e["edges"] / e["dense_total"], "size_remaining": e["edges"] / e["remaining_total"],
        "site_fraction": site_fractions(hooked, active), "sites": list(PAPER_SITES),
        "nodes_total": num_nodes(hooked), "active": active, "losses": torch.cat(losses, dim=1),
    }
