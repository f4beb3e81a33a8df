"""Cost model of the pipeline: FLOPs, bytes moved, peak memory and time of every stage.

Units of work
    A stage repeats a few *units* (one forward, one training step, one circuit-mask step, one
    batch of Chefer maps, ...) over images and models. Each unit runs once with the project's own
    functions on the ``meta`` device (shapes only, no arithmetic) at the model's real shape under
    :class:`_Tally`, a dispatch mode that counts aten operators ("ops"), their FLOPs (the formulas
    of ``torch.utils.flop_counter.FlopCounterMode``'s registry) and the bytes each one reads and
    writes (views move nothing; matrix products apart). Parameter-shaped tensors and operators are
    per call, the rest per image; the model's fused attention counts as one kernel that moves
    q, k, v and its output. Costs are affine in the depth, so a unit is traced at depth 1 and 2
    and extrapolated (exact; tested); traces are cached (``cost_units``). For one image of a ViT
    the traced forward equals the textbook count (:func:`vit_forward_flops`)::

        2 N P^2 C d                                   patch embedding (P = patch, C = channels)
        + L [2 N (4 d^2 + 2 r d^2) + 4 N^2 d]         qkv, proj, fc1, fc2; q k^T and A v
        + 2 d classes                                 head

    A backward is about 2x the forward when weights get gradients (training) and about 1x when
    they are frozen (attribution patching, circuit masks, Chefer: activation gradients only).
    The SAE step is analytic (:func:`sae_step`), since its top-k selection needs real values.

Stages (one model each; :func:`stage_costs` multiplies them over every model the code builds)
    dense training      ceil(epochs n_train / b) training steps (models trained here only)
    Wanda calibration   calib_images forwards with the input-norm hooks (Wanda methods only)
    fine-tuning         ceil(finetune_images / b) training steps + the pruning masks re-applied
    evaluation          n_eval forwards
    dataset means       calib_images forwards with float64 sums at every site
    neuron attribution  n forwards + frozen backwards down to the first analysed block
    neuron ablation     n (1 + 1/2) x blocks ablated forwards (held-out and same-image top-K),
                        + validation units x blocks x validation images, + gallery forwards
    SAE activations     n_train forwards (CLS buffered once per model) or, streamed,
                        steps x batch / tokens per image forwards per SAE; + eval images
    SAE training        steps x :func:`sae_step` + eval tokens x 4 d m (encode, decode)
    SAE features        3.5 n forwards with the SAE spliced in (attribution, clean, 1.5 n ablated)
    circuit masks       per (model, k): classes x epochs x 2 n_train images through a step with
                        mask hooks at all 8 L sites, frozen backward, AdamW on the mask logits;
                        classes go class_chunk at a time, batch_size images per class and step
    circuit evaluation  classes x 2 n_eval x (4 + random_draws) forwards with mask hooks
    attribution maps    per image: Chefer x3 (model, randomised model, other LayerScale rule),
                        generic x2, rollout x2, random x1 (a forward)
    insertion/deletion  per image: (4 methods + other rule) x references x 2 x (steps + 1) forwards

Time (:func:`predict`)
    A roofline per kernel class: eager PyTorch runs matrix products (compute-bound) and elementwise
    operators (memory-bound) one after the other, so their times add::

        compute  = FLOPs / (peak FLOP/s x efficiency)
        memory   = other bytes / (bandwidth x efficiency) + max(0, matmul bytes / bandwidth - compute)
        overhead = operators x seconds per operator
        load     = decoded images x seconds per image / max(1, loader workers)
        run      = compute + memory + overhead          on a CPU (one thread of control does all)
                 = max(compute + memory, overhead)      on a GPU (operators queue while kernels run)
        seconds  = run + load   (num_workers = 0: the main process decodes)   or   max(run, load)

    The binding term is the largest of compute, memory, overhead and load.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from .cache import ResultCache, artefact
from .config import Config, ModelConfig

GB = 1e9
SPLIT_SIZES = {"fashion_mnist": (60_000, 10_000), "imagefolder": (1_281_167, 50_000)}
"""Images in (train, eval) of each data kind: Fashion-MNIST, and ImageNet-1K (train, val) for a folder."""
BF16_BYTES = 0.6
"""Bytes moved under bf16 autocast relative to fp32: matrix products read and write bf16, while
LayerNorm, softmax and the residual stream stay fp32 (an assumption, not measured)."""
TRANSIENT = 3
"""Live activation memory of a pass beyond the tensors saved for backward: this many times the
largest tensor one operator writes (its input, its output and one temporary)."""
DP_EFFICIENCY = 0.9
"""Data-parallel efficiency under torchrun on one node (NCCL gathers and all-reduces over NVLink,
stragglers); an assumption. Applied on top of the work each process really does."""


# ---------------------------------------------------------------------------------------------
# tracing a unit of work
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Work:
    """FLOPs, bytes read and written (``mm_bytes`` of them by matrix products, convolutions and
    attention), aten operators and bytes saved for backward of some work."""

    flops: float = 0.0
    bytes: float = 0.0
    ops: float = 0.0
    saved: float = 0.0
    mm_bytes: float = 0.0

    def __add__(self, other: "Work") -> "Work":
        return Work(*(a + b for a, b in zip(vars(self).values(), vars(other).values())))

    def __sub__(self, other: "Work") -> "Work":
        return self + other * -1

    def __mul__(self, k: float) -> "Work":
        return Work(*(a * k for a in vars(self).values()))

    __rmul__ = __mul__


class _Tally(TorchDispatchMode):
    """Counts aten operators, their FLOPs (the per-operator formulas of ``FlopCounterMode``'s registry:
    matrix products, convolutions, attention) and the bytes of the tensors each one reads and writes
    (views and allocations move nothing). Bytes of tensors shaped like a parameter (weights, their
    gradients, optimiser states, masks) are counted apart: they do not grow with the batch. ``widest``
    is the largest tensor written whose leading dimension is ``batch``. Inside :meth:`fused` only
    FLOPs are counted: the caller books the fused kernel as one operator and its inputs and outputs."""

    NO_TRAFFIC = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided")

    def __init__(self, param_shapes=frozenset(), batch: int = 0):
        super().__init__()
        self.registry = FlopCounterMode(display=False).flop_registry
        self.param_shapes, self.batch = param_shapes, batch
        # bytes per image / per call (parameter-shaped), and of them those of matrix products
        self.ops, self.flops, self.widest, self.inside = 0, 0, 0, 0
        self.bytes, self.param_bytes, self.mm_bytes, self.param_mm_bytes = 0, 0, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        matmul = func._overloadpacket in self.registry
        if matmul:
            self.flops += self.registry[func._overloadpacket](*args, **kwargs, out_val=out)
        if self.inside:
            return out
        self.ops += 1
        if not (func.is_view or func._overloadpacket.__name__ in self.NO_TRAFFIC):
            self.book((args, kwargs, out), matmul)
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.ndim and t.shape[0] == self.batch:
                    self.widest = max(self.widest, t.numel() * t.element_size())
        return out

    def book(self, tensors, matmul: bool = False) -> None:
        for t in pytree.tree_leaves(tensors):
            if isinstance(t, torch.Tensor):
                size = t.numel() * t.element_size()
                per_call = tuple(t.shape) in self.param_shapes
                self.param_bytes += size if per_call else 0
                self.bytes += 0 if per_call else size
                if matmul:
                    self.param_mm_bytes += size if per_call else 0
                    self.mm_bytes += 0 if per_call else size

    @contextlib.contextmanager
    def fused(self, *io):
        """One fused kernel reading and writing ``io`` (pass the outputs in later with :meth:`book`)."""
        self.inside += 1
        try:
            yield
        finally:
            self.inside -= 1
        self.ops += 1
        self.book(io, matmul=True)


_SDPA = F.scaled_dot_product_attention


class _FusedAttention(torch.autograd.Function):
    """``scaled_dot_product_attention`` as the fused kernels the model runs (flash attention on a GPU,
    its CPU counterpart): the forward reads q, k, v and writes the output, the backward recomputes the
    scores and writes three gradients; the N x N scores never reach memory (FLOPs still counted)."""

    @staticmethod
    def forward(ctx, tally, q, k, v):
        with tally.fused(q, k, v):
            out = _SDPA(q, k, v)
        tally.book(out, matmul=True)
        ctx.tally = tally
        ctx.save_for_backward(q, k, v)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors
        with torch.enable_grad(), ctx.tally.fused(q, k, v, grad):
            leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
            grads = torch.autograd.grad(_SDPA(*leaves), leaves, grad)
        ctx.tally.book(grads, matmul=True)
        return (None, *grads)


@dataclass(frozen=True)
class Unit:
    """A unit of work at the model's depth: ``fixed`` per call (weights, optimiser, operators) plus
    ``per_image`` per image; ``widest``: bytes of the largest tensor written per image."""

    fixed: Work
    per_image: Work
    widest: float

    def over(self, images: float, batch: int) -> Work:
        """``images`` images in batches of ``batch``: ``ceil(images / batch) fixed + images per_image``."""
        return self.fixed * math.ceil(images / max(1, batch)) + self.per_image * images

    def act_bytes(self) -> float:
        """Activation memory per image: saved for backward + TRANSIENT x the largest tensor written."""
        return self.per_image.saved + TRANSIENT * self.widest

    def as_list(self) -> list[float]:
        return [*vars(self.fixed).values(), *vars(self.per_image).values(), self.widest]

    @classmethod
    def from_list(cls, values) -> "Unit":
        n = len(dataclasses.fields(Work))
        return cls(Work(*values[:n]), Work(*values[n:2 * n]), values[2 * n])


TRACE_BATCH = 2


def trace(run: Callable, model: torch.nn.Module, mcfg: ModelConfig, per_batch_only: bool = False) -> Unit:
    """One call ``run(model, mcfg, TRACE_BATCH)`` under :class:`_Tally` (the model's attention as
    :class:`_FusedAttention`), split into per-call and per-image work: operators and parameter-shaped
    bytes are per call, the rest (FLOPs, activation bytes, bytes autograd saves for backward,
    parameters excluded) per image (``per_batch_only``: everything per call)."""
    params = list(model.parameters())
    own = {p.untyped_storage()._cdata for p in params}
    saved: dict[int, int] = {}
    tally = _Tally(frozenset(tuple(p.shape) for p in params), TRACE_BATCH)

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in own and not tally.inside:
            saved[key] = t.untyped_storage().nbytes()
        return t

    def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        if attn_mask is not None or dropout_p or is_causal or kwargs:
            return _SDPA(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)
        return _FusedAttention.apply(tally, q, k, v)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    F.scaled_dot_product_attention = attention
    try:  # new tensors on the model's device; attention as matrix products, whose FLOPs are counted
        with contextlib.redirect_stderr(io.StringIO()), torch.device(_device(model)), sdpa_kernel(SDPBackend.MATH), \
                tally, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run(model, mcfg, TRACE_BATCH)
    finally:
        F.scaled_dot_product_attention = _SDPA
    B = 1 if per_batch_only else TRACE_BATCH
    image = Work(tally.flops / B, tally.bytes / B, 0, sum(saved.values()) / B, tally.mm_bytes / B)
    fixed = Work(0, tally.param_bytes, tally.ops, 0, tally.param_mm_bytes)
    if per_batch_only:
        return Unit(fixed + image, Work(), 0.0)
    return Unit(fixed, image, tally.widest / B)


def model_at_depth(mcfg: ModelConfig, depth: int, device="meta") -> torch.nn.Module:
    """:func:`impact_core.models.build_model` with another depth (a loaded architecture such as
    DeiT-III B/16 fixes its depth in timm; ``depth`` overrides it)."""
    import timm

    from .models import architecture

    with torch.device(device):
        model = timm.create_model(mcfg.arch, pretrained=False, **{**architecture(mcfg).kwargs(mcfg), "depth": depth})
    for blk in model.blocks:
        blk.attn.fused_attn = True
    return model


def _images(mcfg: ModelConfig, batch: int) -> torch.Tensor:
    return torch.zeros(batch, mcfg.in_chans, mcfg.img_size, mcfg.img_size)


def _tokens(mcfg: ModelConfig) -> int:
    return (mcfg.img_size // mcfg.patch_size) ** 2 + 1


def _hooked(model):
    from .methods.sites import HookedViT

    return HookedViT(model)


def _means(hooked, names) -> dict:
    return {n: torch.zeros(hooked.model.patch_embed.num_patches + 1, *hooked.unit_shape(n)) for n in names}


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _frozen(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


# The units. Each takes (model on meta at some depth, model config, batch) and does one call's work
# with the project's functions (where a loop body is repeated here, the function named is its source).
def _u_forward(model, mcfg, B):
    """An evaluation forward (``models.evaluate``)."""
    with torch.no_grad():
        _frozen(model)(_images(mcfg, B))


def _u_train(model, mcfg, B):
    """One step of ``models.train_classifier``: forward, cross-entropy, backward, AdamW."""
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    y = torch.zeros(B, dtype=torch.long)
    loss = F.cross_entropy(model.train()(_images(mcfg, B)), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _u_forward_backward(model, mcfg, B):
    """A forward and a backward to the input with frozen weights (``unit_attribution.attribution_pass``)."""
    x = _images(mcfg, B).requires_grad_(True)
    logits = _frozen(model)(x)
    logits[:, 0].sum().backward()


def _u_calibration(model, mcfg, B):
    """``pruning.input_norms`` over one batch."""
    from .methods import pruning

    pruning.input_norms(_frozen(model), [(_images(mcfg, B), None)], device=_device(model))


def _u_site_means(model, mcfg, B):
    """A forward with the float64 sums of ``sites.compute_site_means`` at every site."""
    from .methods.sites import ALL_SITES, site_sum_hooks

    hooked = _hooked(_frozen(model))
    with torch.no_grad(), hooked.hooks(site_sum_hooks(hooked.site_names(sites=ALL_SITES), {})):
        hooked.model(_images(mcfg, B))


def _u_ablation(model, mcfg, B):
    """An ablated forward of ``unit_attribution.ablation_jobs``: one block's units mean-ablated per row."""
    from .methods.neuron import BlockUnits, UNIT_SITES
    from .methods.sites import site_name

    hooked = _hooked(_frozen(model))
    block = hooked.depth - 1
    fam = BlockUnits(hooked, block, _means(hooked, [site_name(block, s) for s in UNIT_SITES]), _device(model))
    with torch.no_grad():
        hooked.run_with_hooks(_images(mcfg, B), fam.ablation_hooks(torch.ones(B, fam.units)))


def _mask_setup(model):
    from .methods import circuits

    hooked = _hooked(_frozen(model))
    names = circuits.node_sites(hooked)
    logits = {n: torch.full((1, hooked.num_units(n)), 0.5, requires_grad=True) for n in names}
    return hooked, logits, _means(hooked, names)


def _u_circuit_step(model, mcfg, B):
    """``circuits.mask_step`` (one step of ``circuits.train_masks``) for one class of B images."""
    from .methods import circuits

    hooked, logits, means = _mask_setup(model)
    flat = torch.cat(list(logits.values()), -1).detach().requires_grad_(True)
    opt = torch.optim.AdamW([flat], lr=1e-2, weight_decay=0.01)
    circuits.mask_step(hooked, flat, means, opt, _images(mcfg, B), torch.zeros(1, B, dtype=torch.long),
                       torch.zeros(1, dtype=torch.long), k=1e-5)


def _u_circuit_eval(model, mcfg, B):
    """A forward of ``circuits.evaluate_masks`` under one mask set."""
    from .methods import circuits

    hooked, logits, means = _mask_setup(model)
    with torch.no_grad(), hooked.hooks(circuits.mask_hooks({n: (t > 0).float() for n, t in logits.items()}, means)):
        hooked.model(_images(mcfg, B))


def _u_attribute(method):
    def run(model, mcfg, B):
        """``attribution._attribute_batch`` (the work of ``attribution.attribute`` on one batch)."""
        from .methods import attribution as attr

        attr._attribute_batch(_frozen(model), _images(mcfg, B), method, None, "z", torch.Generator())
    return run


def _u_masks(model, mcfg, B):
    """``pruning.apply_masks`` after a fine-tuning step."""
    from .methods import pruning

    with torch.no_grad():
        pruning.apply_masks(model, {n: torch.ones_like(lin.weight, dtype=torch.bool)
                                    for n, lin in pruning.prunable_linears(model).items()})


def _u_project(model, mcfg, B):
    """``sparse_training.project`` (the L0 projection after a trained-sparse step)."""
    from .methods.sparse_training import project

    project(model, 0.5)


UNITS = {"forward": _u_forward, "train": _u_train, "forward_backward": _u_forward_backward,
         "calibration": _u_calibration, "site_means": _u_site_means, "ablation": _u_ablation,
         "circuit_step": _u_circuit_step, "circuit_eval": _u_circuit_eval, "chefer": _u_attribute("chefer"),
         "generic": _u_attribute("generic"), "rollout": _u_attribute("rollout"), "masks": _u_masks,
         "project": _u_project}


PER_BATCH_UNITS = ("masks", "project")
REAL_UNITS = ("project",)
"""Units traced with real weights on the CPU: ``sparse_training.magnitude_mask`` reads values."""
COST_UNITS = artefact("cost_units", 2)  # 2: bytes of matrix products apart
_MODELS: dict[tuple, dict[int, torch.nn.Module]] = {}
_TRACES: dict[tuple, tuple[Unit, Unit]] = {}
_AT_DEPTH: dict[tuple, Unit] = {}
_PARAMS: dict[tuple, int] = {}


def _shape_key(mcfg: ModelConfig) -> tuple:
    """What a unit's cost depends on besides the depth."""
    return (mcfg.arch, mcfg.img_size, mcfg.in_chans, mcfg.num_classes, mcfg.patch_size, mcfg.embed_dim,
            mcfg.num_heads, mcfg.mlp_ratio)


@functools.lru_cache(maxsize=1)
def _code_hash() -> str:
    """What a trace depends on besides the shape: this module, the model and method code it runs,
    torch and timm (part of the cache key, so a change there traces again)."""
    import timm

    here = Path(__file__).resolve().parent
    digest = hashlib.sha256(f"{torch.__version__} {timm.__version__}".encode())
    for path in [Path(__file__).resolve(), here / "models.py", *sorted((here / "methods").glob("*.py"))]:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _meta_models(mcfg: ModelConfig) -> dict[int, torch.nn.Module]:
    key = _shape_key(mcfg)
    if key not in _MODELS:
        _MODELS[key] = {L: model_at_depth(mcfg, L) for L in (1, 2)}
    return _MODELS[key]


def _trace_depths(mcfg: ModelConfig, name: str) -> list:
    """Unit ``name`` traced at depth 1 and 2 (on ``meta``, or the CPU for :data:`REAL_UNITS`)."""
    models = {L: model_at_depth(mcfg, L, "cpu") for L in (1, 2)} if name in REAL_UNITS else _meta_models(mcfg)
    return [trace(UNITS[name], models[L], mcfg, name in PER_BATCH_UNITS).as_list() for L in (1, 2)]


def _traced(mcfg: ModelConfig, name: str) -> tuple[Unit, Unit]:
    """Unit ``name`` at depth 1 and 2, from the result cache (``cost_units``; traced on first use)."""
    key = _shape_key(mcfg)
    if (key, name) not in _TRACES:
        inputs = {"shape": list(key), "unit": name, "code": _code_hash()}
        pair = ResultCache(Config().cache_path).get_or_compute(COST_UNITS, inputs, lambda: _trace_depths(mcfg, name))
        _TRACES[key, name] = tuple(Unit.from_list(x) for x in pair)
    return _TRACES[key, name]


class Units:
    """``units[name]``: unit ``name`` of :data:`UNITS` at the model's depth, traced on first use;
    a cost traced at depth 1 and 2 is extrapolated linearly (it is affine in the depth)."""

    def __init__(self, mcfg: ModelConfig):
        self.mcfg = mcfg

    def __getitem__(self, name: str) -> Unit:
        key = (_shape_key(self.mcfg), self.mcfg.depth, name)
        if key not in _AT_DEPTH:
            one, two = _traced(self.mcfg, name)
            more = self.mcfg.depth - 1
            _AT_DEPTH[key] = Unit(one.fixed + (two.fixed - one.fixed) * more,
                                  one.per_image + (two.per_image - one.per_image) * more, max(one.widest, two.widest))
        return _AT_DEPTH[key]


def units(mcfg: ModelConfig) -> Units:
    return Units(mcfg)


def vit_forward_flops(mcfg: ModelConfig, images: int = 1) -> float:
    """The textbook FLOPs of a ViT forward (module docstring): linear layers and attention, x2 per
    multiply-add; LayerNorm, GELU, softmax and additions are left out."""
    d, L, r, N = mcfg.embed_dim, mcfg.depth, mcfg.mlp_ratio, _tokens(mcfg)
    patches = N - 1
    embed = 2 * patches * mcfg.in_chans * mcfg.patch_size ** 2 * d
    block = 2 * N * (4 * d * d + 2 * r * d * d) + 4 * N * N * d
    return images * (embed + L * block + 2 * d * mcfg.num_classes)


def n_params(mcfg: ModelConfig) -> int:
    """Parameters of the model, counted on its ``meta`` copies at depth 1 and 2 and extrapolated."""
    key = (_shape_key(mcfg), mcfg.depth)
    if key not in _PARAMS:
        one, two = (sum(p.numel() for p in model.parameters()) for model in _meta_models(mcfg).values())
        _PARAMS[key] = one + (two - one) * (mcfg.depth - 1)
    return _PARAMS[key]


# ---------------------------------------------------------------------------------------------
# the SAE (analytic: BatchTopK selects by value, which the meta device does not have)
# ---------------------------------------------------------------------------------------------
def sae_step(rows: int, d: int, m: int, k: int, aux_k: int, dead_fraction: float = 0.5) -> Work:
    """One ``sae.train_step`` on ``rows`` activations, ``m`` latents (``sae.choose_decode_impl``):

    FLOPs: encoder 2 rows d m forward + 2 rows d m for its weight gradient; decoder and the
    auxiliary loss over the ``dead_fraction`` m dead latents, 6 rows d x (m, dense) or (k, sparse)
    and 6 rows d x (dead m, dense) or (aux_k, sparse). Bytes: the (rows, m) pre-activations pass
    about 14 times (ReLU, BatchTopK, scatter, masks, aux top-k, their gradients); parameters and
    Adam states about 16 times (of these, the matrix products move the pre-activations twice, the
    weights and the inputs four times). Operators: counted on a small SAE (:func:`sae_step_ops`)."""
    from .methods.sae import choose_decode_impl

    sparse = choose_decode_impl(m, k) == "sparse"
    flops = 4 * rows * d * m + 6 * rows * d * (k if sparse else m) + 6 * rows * d * (aux_k if sparse else dead_fraction * m)
    bytes_ = 4 * (14 * rows * m + 8 * rows * d + 16 * 2 * m * d)
    saved = 4 * (4 * rows * m + 2 * rows * d)
    return Work(flops, bytes_, sae_step_ops(), saved, mm_bytes=4 * (2 * rows * m + 4 * m * d + 4 * rows * d))


@functools.lru_cache(maxsize=1)
def sae_step_ops() -> int:
    """Aten operators of one ``sae.train_step`` (with dead latents), counted on a small real SAE
    (the count does not depend on its size)."""
    from .methods import sae as sae_mod

    model = sae_mod.BatchTopKSAE(8, 64, 4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.steps_since_active.fill_(100)
    x = torch.randn(16, 8)
    model.init_from_batch(x, True)
    sae_mod.train_step(model, opt, x, aux_coefficient=1 / 32, aux_k=8, dead_after_steps=5)  # Adam's state made
    model.steps_since_active.fill_(100)
    tally = _Tally()
    with tally:
        sae_mod.train_step(model, opt, x, aux_coefficient=1 / 32, aux_k=8, dead_after_steps=5)
    return tally.ops


# ---------------------------------------------------------------------------------------------
# stage costs
# ---------------------------------------------------------------------------------------------
@dataclass
class StageCost:
    """The cost of one stage (of one chapter, over every model it builds).

    ``forwards`` / ``backwards``: images through the model (SAE training: SAE steps);
    ``peak_bytes``: device memory at ``batch``; ``fixed_peak + act_per_image x batch`` is the
    memory at another batch (``act_per_image`` 0: it does not grow with the batch);
    ``images_loaded``: images decoded from files (0 for data held in memory), by ``workers``
    loader processes (0: in the main process); ``shard``: how torchrun splits it ("rows" of every
    batch, "chunks" of classes or images, "" not split); ``chunks``: how many chunks there are;
    ``runs``: how many one-model costs were added up (models, SAEs, (model, k) pairs, passes)."""

    stage: str
    chapter: str = ""
    flops: float = 0.0
    bytes: float = 0.0
    peak_bytes: float = 0.0
    mm_bytes: float = 0.0
    forwards: float = 0.0
    backwards: float = 0.0
    ops: float = 0.0
    precision: str = "fp32"
    batch: int = 1
    fixed_peak: float = 0.0
    act_per_image: float = 0.0
    images_loaded: float = 0.0
    workers: int = 0
    shard: str = "rows"
    chunks: int = 0
    runs: int = 1

    def add(self, other: "StageCost") -> "StageCost":
        """Two stages' work done one after the other (peak: the larger; runs: added)."""
        big = self if self.peak_bytes >= other.peak_bytes else other
        return dataclasses.replace(self, flops=self.flops + other.flops, bytes=self.bytes + other.bytes,
                                   mm_bytes=self.mm_bytes + other.mm_bytes,
                                   forwards=self.forwards + other.forwards, backwards=self.backwards + other.backwards,
                                   ops=self.ops + other.ops, images_loaded=self.images_loaded + other.images_loaded,
                                   chunks=self.chunks + other.chunks, runs=self.runs + other.runs,
                                   peak_bytes=big.peak_bytes, batch=big.batch, fixed_peak=big.fixed_peak,
                                   act_per_image=big.act_per_image)


def split_sizes(cfg: Config) -> tuple[int, int]:
    """Images in the (train, eval) splits: :data:`SPLIT_SIZES` capped by ``data.train_images`` / ``eval_images``,
    less the held-out images (``data.holdout_images``) for train."""
    n_train, n_eval = SPLIT_SIZES[cfg.data.kind]
    cap = (lambda n, c: n if c is None else min(n, c))
    return max(0, cap(n_train, cfg.data.train_images) - cfg.data.holdout_images), cap(n_eval, cfg.data.eval_images)


def _stage(cfg: Config, name: str, work: Work, unit: Unit, batch: int, *, forwards=0.0, backwards=0.0,
           precision: str = "fp32", fixed_mem: float = 0.0, loaded: float = 0.0, workers: Optional[int] = None,
           shard: str = "rows", chunks: int = 0) -> StageCost:
    """A StageCost from ``work`` (bytes x :data:`BF16_BYTES` under bf16; forward-only passes run at
    ``cfg.precision``, the rest fp32); memory = weights (+ their bf16 copies) + ``fixed_mem`` +
    ``unit``'s activations x batch; images are decoded only from an image folder, by
    ``data.num_workers`` loader processes unless ``workers`` says otherwise (every pass over a
    split uses the split's workers: :func:`impact_core.data.batches`)."""
    workers = cfg.data.num_workers if workers is None else workers
    scale = BF16_BYTES if precision == "bf16" else 1.0
    fixed = n_params(cfg.model) * (6 if precision == "bf16" else 4) + fixed_mem
    act = unit.act_bytes() * scale
    return StageCost(stage=name, flops=work.flops, bytes=work.bytes * scale, mm_bytes=work.mm_bytes * scale,
                     ops=work.ops, forwards=forwards, backwards=backwards, precision=precision, batch=batch,
                     fixed_peak=fixed, act_per_image=act, peak_bytes=fixed + act * batch,
                     images_loaded=loaded if cfg.data.kind == "imagefolder" else 0.0, workers=workers, shard=shard,
                     chunks=chunks)


def dense_training(cfg: Config, steps: Optional[int] = None, sparse: bool = False) -> StageCost:
    """``models.train_dense``: ``ceil(epochs n_train / b)`` steps of (forward + training backward + AdamW);
    ``sparse``: the trained-sparse model, + ``sparse_training.project`` after every step.
    Memory: weights, gradients and two AdamW states (16 B per parameter) + activations."""
    u = units(cfg.model)
    b = cfg.train.batch_size
    steps = math.ceil(cfg.train.epochs * split_sizes(cfg)[0] / b) if steps is None else steps
    work = u["train"].over(steps * b, b) + (u["project"].fixed * steps if sparse else Work())
    return _stage(cfg, "trained-sparse training" if sparse else "dense training", work, u["train"], b,
                  forwards=steps * b, backwards=steps * b, fixed_mem=12 * n_params(cfg.model), loaded=steps * b)


def fine_tuning(cfg: Config, steps: Optional[int] = None, masked: bool = True) -> StageCost:
    """``pipeline.pruned_model``'s fine-tuning: ``ceil(finetune_images / b)`` training steps, each
    followed by ``pruning.apply_masks`` (``masked``; the control has no mask)."""
    u, p = units(cfg.model), cfg.pruning
    b = p.finetune_batch_size
    steps = (math.ceil(p.finetune_images / b) if p.finetune_images > 0 else 0) if steps is None else steps
    work = u["train"].over(steps * b, b) + (u["masks"].fixed * steps if masked else Work())
    return _stage(cfg, "fine-tuning", work, u["train"], b, forwards=steps * b, backwards=steps * b,
                  fixed_mem=12 * n_params(cfg.model), loaded=steps * b)


def calibration(cfg: Config, images: Optional[int] = None) -> StageCost:
    """``pruning.input_norms``: ``calib_images`` forwards in batches of ``data.batch_size`` with a hook
    summing the squared inputs of every block Linear in float64."""
    u, b = units(cfg.model), cfg.data.batch_size
    n = cfg.data.calib_images if images is None else images
    return _stage(cfg, "Wanda calibration", u["calibration"].over(n, b), u["calibration"], b, forwards=n,
                  precision=cfg.precision, loaded=n)


def evaluation(cfg: Config, images: Optional[int] = None) -> StageCost:
    """``models.evaluate``: ``n_eval`` forwards in batches of ``data.batch_size``."""
    u, b = units(cfg.model), cfg.data.batch_size
    n = split_sizes(cfg)[1] if images is None else images
    return _stage(cfg, "evaluation", u["forward"].over(n, b), u["forward"], b, forwards=n,
                  precision=cfg.precision, loaded=n)


def _site_elements(mcfg: ModelConfig) -> int:
    """Per-position values of every hooked site of a block: norm1, q, k, v, attn_out, norm2, mlp_out,
    heads and resid_post (d each) and mlp_act (r d)."""
    return 9 * mcfg.embed_dim + int(mcfg.embed_dim * mcfg.mlp_ratio)


def site_means(cfg: Config, images: Optional[int] = None) -> StageCost:
    """``sites.compute_site_means``: ``calib_images`` forwards with float64 per-position sums at every
    site (memory: ``8 N L x site units`` bytes of sums)."""
    u, b = units(cfg.model), cfg.data.batch_size
    n = cfg.data.calib_images if images is None else images
    sums = 8 * _tokens(cfg.model) * cfg.model.depth * _site_elements(cfg.model)
    return _stage(cfg, "dataset means", u["site_means"].over(n, b), u["site_means"], b, forwards=n,
                  precision=cfg.precision, fixed_mem=sums, loaded=n)


def _neuron_images(cfg: Config) -> int:
    n_eval = split_sizes(cfg)[1]
    return n_eval if cfg.neuron.images is None else min(cfg.neuron.images, n_eval)


def _with_backward(u: Units, share: float) -> Unit:
    """A forward and the last ``share`` of a frozen backward (autograd stops at the earliest tensor
    it differentiates)."""
    f, fb = u["forward"], u["forward_backward"]
    return Unit(f.fixed + (fb.fixed - f.fixed) * share, f.per_image + (fb.per_image - f.per_image) * share, fb.widest)


def neuron_attribution(cfg: Config, images: Optional[int] = None) -> StageCost:
    """``unit_attribution.attribution_pass``: n forwards + frozen backwards from each image's own logit
    to the first analysed block (the backward's share ``(L - min(blocks)) / L``). Memory: per class
    and unit, importance and statistics (about 8 float64 per block, unit and class)."""
    u, nc, b = units(cfg.model), cfg.neuron, cfg.data.batch_size
    n = _neuron_images(cfg) if images is None else images
    step = _with_backward(u, (cfg.model.depth - min(nc.blocks)) / cfg.model.depth)
    n_units = int(cfg.model.embed_dim * cfg.model.mlp_ratio) + cfg.model.num_heads
    stats = 8 * 8 * len(nc.blocks) * n_units * cfg.model.num_classes
    return _stage(cfg, "neuron attribution", step.over(n, b), step, b, forwards=n, backwards=n, fixed_mem=stats,
                  loaded=n, workers=cfg.data.num_workers)


def _part(unit: Unit, share: float) -> Unit:
    """``share`` of ``unit`` (its work and operators scale with the blocks run: a forward restarted at a block)."""
    return Unit(unit.fixed * share, unit.per_image * share, unit.widest)


def neuron_ablation(cfg: Config, images: Optional[int] = None, validation_units: Optional[int] = None,
                    same_image: bool = True) -> StageCost:
    """``unit_attribution.ablation_jobs``: per block the top-K ablated for the held-out (n / 2 images)
    and, with ``same_image``, the same-image variant (n), stacked up to ``4 data.batch_size`` rows per
    forward; + the validation's ``validation_units x blocks`` single-unit ablations on
    ``validation_images`` (``validation_units``: default ``neuron.validation_units``; the levels pass
    :func:`impact_core.levels.neuron.validation_units` of the model). Each pass runs the blocks before
    the last analysed one once for each image some job reads, and an ablation at block b only the blocks
    from b on (``ablation_jobs(restart=True)``): ``(L - b) / L`` of a forward."""
    u, nc, L = units(cfg.model), cfg.neuron, cfg.model.depth
    n = _neuron_images(cfg) if images is None else images
    v_units = nc.validation_units if validation_units is None else validation_units
    val = min(n, n if nc.validation_images is None else nc.validation_images) if v_units > 0 else 0
    blocks = [blk % L for blk in nc.blocks]
    per_block = (1.5 if same_image else 0.5) * n + v_units * val
    rows = per_block * len(blocks)
    b = 4 * cfg.data.batch_size
    work = sum((_part(u["ablation"], (L - blk) / L).over(per_block, b) for blk in blocks), Work())
    prefix_rows = (n if same_image else n / 2) + val  # the rows some job reads (held-out: the measurement half)
    work = work + _part(u["forward"], max(blocks) / L).over(prefix_rows, cfg.data.batch_size)
    return _stage(cfg, "neuron ablation", work, u["ablation"], b, forwards=rows, loaded=n + val,
                  workers=cfg.data.num_workers)


def gallery(cfg: Config, images: int, stage: str, workers: Optional[int] = None, sae_tokens: int = 0) -> StageCost:
    """A gallery's forward over ``images`` images (``neuron.neuron_gallery``, ``layer.sae_gallery``: the
    chapter's, so in the book); ``sae_tokens`` per image also go through the SAE encoder (2 d m)."""
    u, b = units(cfg.model), cfg.data.batch_size
    d, m, _ = _sae_shape(cfg, None, None)
    enc = 4 * sae_tokens * m * images
    work = u["forward"].over(images, b) + Work(2 * sae_tokens * d * m * images, enc, 0, 0, enc)
    return _stage(cfg, stage, work, u["forward"], b, forwards=images, loaded=images, workers=workers, shard="")


def sae_activations(cfg: Config, images: int) -> StageCost:
    """``sae.activation_chunks``: ``images`` forwards (the hook at ``resid_post`` does not stop the
    forward) in batches of ``data.batch_size``; see :func:`stage_costs` for how many images."""
    u, b = units(cfg.model), cfg.data.batch_size
    return _stage(cfg, "SAE activations", u["forward"].over(images, b), u["forward"], b, forwards=images,
                  precision=cfg.precision, loaded=images)


def _sae_shape(cfg: Config, k: Optional[int], expansion: Optional[int]) -> tuple[int, int, int]:
    s = cfg.sae
    k = s.k if k is None else k
    expansion = s.expansion if expansion is None else expansion
    return cfg.model.embed_dim, cfg.model.embed_dim * expansion, k


def _tokens_per_image(cfg: Config, tokens: str) -> int:
    return {"cls": 1, "patch": _tokens(cfg.model) - 1, "all": _tokens(cfg.model)}[tokens]


def sae_training(cfg: Config, steps: Optional[int] = None, tokens: Optional[str] = None, k: Optional[int] = None,
                 expansion: Optional[int] = None, eval_images: Optional[int] = None) -> StageCost:
    """``sae.fit``: ``steps`` x :func:`sae_step` on batches of ``sae.batch_size`` activations, then
    ``sae.evaluate``: 4 d m FLOPs per evaluation token (encode + dense decode). Memory: the SAE with
    Adam (16 B per parameter), its step's activations and the activation buffers (up to
    ``sae.buffer_max_mb``). Not split by torchrun: every process trains the same SAE."""
    s = cfg.sae
    d, m, k = _sae_shape(cfg, k, expansion)
    tokens = s.tokens if tokens is None else tokens
    steps = s.steps if steps is None else steps
    step = sae_step(s.batch_size, d, m, k, s.aux_k)
    n_eval = min(split_sizes(cfg)[1], s.eval_images or split_sizes(cfg)[1]) if eval_images is None else eval_images
    n_eval *= _tokens_per_image(cfg, tokens)
    evaluate = Work(4 * n_eval * d * m, 4 * (3 * n_eval * m + 2 * n_eval * d), 20 * math.ceil(n_eval / 4096), 0,
                    4 * (2 * n_eval * m + 2 * n_eval * d))
    n_train = split_sizes(cfg)[0] if s.train_images is None else min(s.train_images, split_sizes(cfg)[0])
    buffer = min(s.buffer_max_mb * 2 ** 20, 4 * d * (n_train * _tokens_per_image(cfg, tokens) + n_eval))
    memory = 16 * 2 * m * d + step.saved + 3 * 4 * s.batch_size * m + buffer
    return StageCost(stage="SAE training", flops=step.flops * steps + evaluate.flops,
                     bytes=step.bytes * steps + evaluate.bytes, mm_bytes=step.mm_bytes * steps + evaluate.mm_bytes,
                     ops=step.ops * steps + evaluate.ops,
                     forwards=steps, backwards=steps, batch=s.batch_size, peak_bytes=memory, fixed_peak=memory,
                     shard="")


def sae_features(cfg: Config, images: Optional[int] = None) -> StageCost:
    """``sae_features.analyse`` on the configured SAE: with the SAE spliced into ``resid_post`` (one
    encode and two decodes, 6 d m FLOPs per spliced token), an attribution pass (forward + frozen
    backward through the blocks after the SAE's), the clean forward and the held-out top-K ablation
    (n / 2; ``max_batch=1``; the same-image one is not run, ``same_image_impact=False``), which starts at
    the SAE's block (``ablation_jobs(restart=True)``): 2 n forwards and n / 2 of ``(L - block) / L`` of
    one. Memory: the AUROC scores ``(n, m)`` float32 and per-class sums ``3 x classes x m`` float64."""
    u, s, b = units(cfg.model), cfg.sae, cfg.data.batch_size
    d, m, _ = _sae_shape(cfg, None, None)
    n_eval = split_sizes(cfg)[1]
    n = min(n_eval, s.eval_images or n_eval) if images is None else images
    per_tok = _tokens_per_image(cfg, s.tokens)
    splice = Work(6 * per_tok * d * m, 4 * per_tok * (4 * m + 4 * d), 0, 0, 4 * per_tok * (3 * m + 4 * d))
    block = s.block % cfg.model.depth
    share = (cfg.model.depth - 1 - block) / cfg.model.depth
    work = _with_backward(u, share).over(n, b) + u["forward"].over(n, b) + _part(u["forward"], 1 - block / cfg.model.depth
                                                                              ).over(0.5 * n, b) \
        + splice * (1.5 * n) + Work(2 * per_tok * d * m * n, 0, 0)  # the gradient to the latents through the decoder
    memory = 4 * n * m + 8 * 3 * cfg.model.num_classes * m
    return _stage(cfg, "SAE features", work, u["forward_backward"], b, forwards=2.5 * n, backwards=n, fixed_mem=memory,
                  loaded=2 * n)


def _circuit_classes(cfg: Config, classes: Optional[int]) -> int:
    from .levels.circuit import resolve_classes

    return len(resolve_classes(cfg)) if classes is None else classes


def circuit_masks(cfg: Config, classes: Optional[int] = None, epochs: Optional[int] = None) -> StageCost:
    """``circuits.compute_circuits``'s training for one (model, k): ``ceil(classes / class_chunk)``
    chunks, each ``epochs x ceil(2 n_train / batch_size)`` steps of ``class_chunk x batch_size`` images
    (:func:`_u_circuit_step`: mask hooks at every site, frozen backward, AdamW on the masks)."""
    u, cc = units(cfg.model), cfg.circuit
    K = _circuit_classes(cfg, classes)
    epochs = cc.epochs if epochs is None else epochs
    chunks = math.ceil(K / cc.class_chunk)
    steps = chunks * epochs * math.ceil(2 * cc.train_images_per_class / cc.batch_size)
    images = K * epochs * 2 * cc.train_images_per_class
    step = u["circuit_step"]
    work = step.fixed * steps + step.per_image * images
    return _stage(cfg, "circuit masks", work, step, min(K, cc.class_chunk) * cc.batch_size, forwards=images,
                  backwards=images, loaded=images, shard="chunks", chunks=chunks)


def circuit_evaluation(cfg: Config, classes: Optional[int] = None) -> StageCost:
    """``circuits.evaluate_masks``: per chunk and eval batch, one forward per mask set (full, circuit,
    ablated, empty and ``random_draws`` random sets) of ``class_chunk x batch_size`` images."""
    u, cc = units(cfg.model), cfg.circuit
    K = _circuit_classes(cfg, classes)
    chunks = math.ceil(K / cc.class_chunk)
    sets = 4 + cc.random_draws
    batches = chunks * math.ceil(2 * cc.eval_images_per_class / cc.batch_size) * sets
    images = K * 2 * cc.eval_images_per_class * sets
    ev = u["circuit_eval"]
    work = ev.fixed * batches + ev.per_image * images
    return _stage(cfg, "circuit evaluation", work, ev, min(K, cc.class_chunk) * cc.batch_size, forwards=images,
                  loaded=K * 2 * cc.eval_images_per_class, shard="chunks", chunks=chunks)


def _attribution_images(cfg: Config) -> int:
    return min(cfg.attribution.images, split_sizes(cfg)[1])


ATTRIBUTION_CALLS = {"chefer": 3, "generic": 2, "rollout": 2}
"""``perturbation.score_chunk``: maps of every method on the model, of every method but random on the
randomised model, and Chefer's under the other LayerScale rule; random maps cost one forward."""


def attribution_maps(cfg: Config, images: Optional[int] = None, calls: dict = ATTRIBUTION_CALLS,
                     random_maps: int = 1) -> StageCost:
    """``attribution.attribute`` over the attribution images, in batches of ``attribution.batch_size``:
    per image ``calls`` maps of each method and ``random_maps`` random maps (a forward each). Memory:
    the batch's explicit forward (attention probabilities kept) and its relevance."""
    u, a = units(cfg.model), cfg.attribution
    n = _attribution_images(cfg) if images is None else images
    work = u["forward"].over(n, a.batch_size) * random_maps
    for method, times in calls.items():
        work = work + u[method].over(n, a.batch_size) * times
    chunks = math.ceil(n / (4 * a.batch_size))
    return _stage(cfg, "attribution maps", work, u["chefer"], a.batch_size,
                  forwards=n * (sum(calls.values()) + random_maps),
                  backwards=n * (calls.get("chefer", 0) + calls.get("generic", 0)), loaded=n, shard="chunks",
                  chunks=chunks)


def insertion_deletion(cfg: Config, images: Optional[int] = None, curves: Optional[int] = None,
                       ends: Optional[int] = None) -> StageCost:
    """``perturbation.insertion_deletion``: per image and curve 2 x (steps + 1) forwards in batches of
    ``4 attribution.batch_size``; ``curves`` per image (default: 4 methods + Chefer's other rule, times
    the references). ``ends``: the curves share their map-independent ends (``perturbation.endpoint_probs``,
    3 forwards per image and reference, ``ends`` references): each curve forwards its 2 x (steps - 1) inner steps."""
    from .methods.attribution import METHODS

    u, a = units(cfg.model), cfg.attribution
    n = _attribution_images(cfg) if images is None else images
    curves = (len(METHODS) + 1) * len(a.references) if curves is None else curves
    if ends is None:
        forwards = n * curves * 2 * (a.steps + 1)
    else:
        forwards = n * (curves * 2 * (a.steps - 1) + 3 * ends)
    b = 4 * a.batch_size
    return _stage(cfg, "insertion/deletion", u["forward"].over(forwards, b), u["forward"], b, forwards=forwards,
                  shard="chunks", chunks=math.ceil(n / (4 * a.batch_size)))


# ---------------------------------------------------------------------------------------------
# every stage of a book: which models each chapter builds
# ---------------------------------------------------------------------------------------------
CHAPTERS = ("pruning", "neuron", "layer", "circuit", "model", "sparse_training")


class _Book:
    """Adds up stage costs per (chapter, stage), each artefact once (the result cache): the first
    chapter in book order that needs an artefact pays for it."""

    def __init__(self, cfg: Config):
        from .levels import with_dense
        from .pipeline import CONTROL

        self.cfg, self.with_dense, self.control = cfg, with_dense, CONTROL
        self.done: set = set()
        self.rows: dict[tuple[str, str], StageCost] = {}
        self.added: list[StageCost] = []  # every stage added, in order (:func:`piece_seconds` reads a piece's)

    def key(self, s: float, m: str) -> tuple:
        """An artefact's model: the one dense model, or a model of the current replicate (``self.cfg``)."""
        from .pipeline import is_dense

        return ("dense",) if is_dense(s, m) else (float(s), m, self.cfg.replicate)

    def once(self, *key) -> bool:
        if key in self.done:
            return False
        self.done.add(key)
        return True

    def add(self, chapter: str, cost: StageCost) -> None:
        cost = dataclasses.replace(cost, chapter=chapter)
        self.added.append(cost)
        slot = (chapter, cost.stage)
        self.rows[slot] = self.rows[slot].add(cost) if slot in self.rows else cost

    def model(self, chapter: str, s: float, m: str) -> None:
        """The model itself: the dense one (trained here or loaded), a trained-sparse one, or a pruned
        (calibrated unless magnitude, fine-tuned) one; the control is fine-tuned only."""
        from .methods.pruning import PRUNING_METHODS
        from .models import architecture
        from .pipeline import TRAINED_SPARSE

        from .pipeline import MATCHED, RANDOM_WEIGHTS, reinit_blocks

        cfg, key = self.cfg, self.key(s, m)
        if not self.once("model", key) or m == RANDOM_WEIGHTS or reinit_blocks(m):  # initialisation: no training
            return
        if m == MATCHED:  # a checkpoint of the dense training: every checkpoint's held-out top-1 (once), the level's
            self.model(chapter, s, "wanda")
            self.checkpoints(chapter)
            self.add(chapter, _named(evaluation(cfg, cfg.data.holdout_images), "held-out evaluation"))
            return
        if key == ("dense",) or m == TRAINED_SPARSE:
            if architecture(cfg.model).trained_here:
                self.add(chapter, dense_training(cfg, sparse=m == TRAINED_SPARSE))
            return
        if m != self.control and PRUNING_METHODS[m].needs_input_norms:
            self.model(chapter, 0.0, "wanda")
            self.add(chapter, calibration(cfg))
        self.add(chapter, fine_tuning(cfg, masked=m != self.control))

    def checkpoints(self, chapter: str) -> None:
        """The held-out top-1 of every dense checkpoint (``pipeline.checkpoint_accuracies``), once for the book."""
        from .pipeline import checkpoint_steps

        cfg = self.cfg
        self.model(chapter, 0.0, "wanda")
        if self.once("checkpoint_accuracy"):
            steps = math.ceil(cfg.train.epochs * split_sizes(cfg)[0] / cfg.train.batch_size)
            for _ in checkpoint_steps(steps, cfg.train.checkpoints):
                self.add(chapter, _named(evaluation(cfg, cfg.data.holdout_images), "held-out evaluation"))

    def accuracy(self, chapter: str, s: float, m: str) -> None:
        self.model(chapter, s, m)
        if self.once("accuracy", self.key(s, m)):
            self.add(chapter, evaluation(self.cfg))

    def means(self, chapter: str, s: float, m: str) -> None:
        self.model(chapter, s, m)
        if self.once("means", self.key(s, m)):
            self.add(chapter, site_means(self.cfg))

    def neuron(self, chapter: str, s: float, m: str) -> None:
        self.means(chapter, s, m)
        if self.once("neuron", self.key(s, m), self.cfg.replicate):
            from .levels.neuron import same_image_impact, validation_units

            self.add(chapter, neuron_attribution(self.cfg))
            self.add(chapter, neuron_ablation(self.cfg, validation_units=validation_units(self.cfg, s, m),
                                              same_image=same_image_impact(self.cfg, s, m)))

    def sae(self, chapter: str, s: float, m: str, tokens: str, k: int, expansion: int, seed: int,
            book: bool = False) -> None:
        """One SAE and the activations it needs: buffered and stored in the result cache (computed once
        per model and token set for the whole build, at most ``sae.cache_activations_mb``), buffered only
        (once per process: ``prepare`` for the levels' SAEs, the chapter's own for the sweep's) or
        streamed (each SAE's ``steps x batch / tokens per image`` images, + half a shuffling pool)."""
        cfg, sc = self.cfg, self.cfg.sae
        self.model(chapter, s, m)
        if not self.once("sae", self.key(s, m), self.cfg.replicate, tokens, k, expansion, seed):
            return
        suffix = " (book)" if book else ""
        n_train = split_sizes(cfg)[0] if sc.train_images is None else min(sc.train_images, split_sizes(cfg)[0])
        n_eval = min(split_sizes(cfg)[1], sc.eval_images or split_sizes(cfg)[1])
        per = _tokens_per_image(cfg, tokens)
        d = cfg.model.embed_dim

        def once_per_set(split: str, images: int) -> bool:
            mb = 4 * d * per * images / 2 ** 20
            if mb > sc.buffer_max_mb:
                return True
            where = () if mb <= sc.cache_activations_mb else (book,)
            return self.once(f"sae_{split}_acts", self.key(s, m), tokens, *where)

        if 4 * d * per * n_train <= sc.buffer_max_mb * 2 ** 20:
            if once_per_set("train", n_train):
                self.add(chapter, _named(sae_activations(cfg, n_train), "SAE activations" + suffix, book))
        else:
            pool = max(sc.pool_batches * sc.batch_size, sc.batch_size)
            images = math.ceil((sc.steps * sc.batch_size + pool / 2) / per)
            self.add(chapter, _named(sae_activations(cfg, images), "SAE activations" + suffix, book))
        if once_per_set("eval", n_eval):
            self.add(chapter, _named(sae_activations(cfg, n_eval), "SAE activations" + suffix, book))
        self.add(chapter, _named(sae_training(cfg, tokens=tokens, k=k, expansion=expansion), "SAE training" + suffix,
                                 book))

    def circuits(self, chapter: str, s: float, m: str, k: float, book: bool = False) -> None:
        self.means(chapter, s, m)
        if self.once("circuits", self.key(s, m), self.cfg.replicate, float(k)):
            suffix = " (k sweep, book)" if book else ""
            self.add(chapter, _named(circuit_masks(self.cfg), "circuit masks" + suffix, book))
            self.add(chapter, _named(circuit_evaluation(self.cfg), "circuit evaluation" + suffix, book))

    def attribution(self, chapter: str, s: float, m: str) -> None:
        self.model(chapter, s, m)
        if self.once("attribution", self.key(s, m), self.cfg.replicate):
            from .levels.model import CLAIM_METHODS, attribution_methods, display_count

            cfg, refs = self.cfg, len(self.cfg.attribution.references)
            claims_only = attribution_methods(cfg, s, m) == CLAIM_METHODS
            n_show = min(display_count(cfg), _attribution_images(cfg))
            # the claims' Chefer maps and random order on every image ...
            self.add(chapter, attribution_maps(cfg, calls={"chefer": 1}))
            self.add(chapter, insertion_deletion(cfg, curves=len(CLAIM_METHODS) * refs, ends=refs))
            if not claims_only:  # ... the rest (randomised model, other rule, rollout, generic) on the display images
                self.add(chapter, attribution_maps(cfg, images=n_show, calls={"chefer": 2, "generic": 2, "rollout": 2},
                                                   random_maps=0))
                self.add(chapter, insertion_deletion(cfg, images=n_show, curves=3 * refs, ends=0))  # ends shared


def _named(cost: StageCost, name: str, book: bool = False) -> StageCost:
    """``cost`` under another stage name; ``book``: computed by the chapter in the book, not by
    ``prepare`` (so one process, not split by torchrun)."""
    return dataclasses.replace(cost, stage=name, shard="" if book else cost.shard)


_PIECE_WORK: dict[Callable, Callable] = {}


def register_piece_work(entry: Callable, work: Callable) -> None:
    """Declare the stages of a new kind of piece (a level outside this package, say): ``work(book, chapter,
    piece)`` adds them to ``book`` (a :class:`_Book`: its ``model``, ``accuracy``, ``circuits``, ... or
    ``add(chapter, StageCost)``) for the pieces whose entry point is ``entry``."""
    _PIECE_WORK[entry] = work


def _piece_work(book: "_Book", chapter: str, piece) -> None:
    """The stages of one piece of the work plan (:class:`impact_core.levels.Piece`), by its entry point:
    the plan's pieces are the one description of the work, which this turns into units (forwards,
    training steps, mask steps, ...) for the cost model and for the plan's order (:func:`piece_seconds`).
    A new kind of piece needs a line here or a :func:`register_piece_work` (a test walks every preset's plan)."""
    if piece.entry in _PIECE_WORK:
        _PIECE_WORK[piece.entry](book, chapter, piece)
        return
    from . import pipeline
    from .levels import circuit as circuit_level, layer as layer_level, model as model_level, neuron as neuron_level
    from .levels import pruning as pruning_level

    entry, args, kw = piece.entry, piece.args, dict(piece.kwargs)
    if entry is pipeline.checkpoint_accuracies:
        book.checkpoints(chapter)
        return
    model_args = entry in (pipeline.accuracy, pruning_level.built_model) and len(args) > 1  # (sparsity, method)
    s, m = float(args[0]), kw.get("method", args[1] if model_args else "wanda")
    cfg, sc = book.cfg, book.cfg.sae
    if entry is pipeline.accuracy:
        book.accuracy(chapter, s, m)
    elif entry is pruning_level.built_model:
        if cfg.replicate == 0 or m == pipeline.CONTROL or (m, s) in pruning_level.claim_models(cfg):
            book.accuracy(chapter, s, m)
        else:
            book.model(chapter, s, m)
    elif entry is neuron_level.neuron_metrics:
        book.neuron(chapter, s, m)
    elif entry in (layer_level.model_results, layer_level.quality_over_seeds):
        for seed in range(layer_level.sae_seeds_of(cfg)):
            book.sae(chapter, s, m, sc.tokens, sc.k, sc.expansion, seed)
        if entry is layer_level.model_results and book.once("sae_features", book.key(s, m), cfg.replicate):
            book.add(chapter, sae_features(cfg))
    elif entry is layer_level.train_sae:  # a row of the chapter's sweep (Tables 5 / 6): one SAE, seed 0
        _, tokens, k, expansion = args
        book.sae(chapter, s, m, tokens, k, expansion, 0, book=True)
    elif entry is circuit_level.circuit_results:
        k = kw.get("k") or circuit_level.default_k(cfg, s, m)
        book.circuits(chapter, s, m, k, book=not piece.per_replicate)  # the k sweep's middle k: display only
    elif entry is model_level.attribution_results:
        book.attribution(chapter, s, m)
    else:
        raise KeyError(f"the cost model has no stages for pieces of {entry.__module__}.{entry.__qualname__} "
                       f"({piece.label!r}): add them to cost._piece_work or declare them with cost.register_piece_work")


def piece_seconds(cfg: Config, pieces, device: Optional["Device"] = None) -> dict[str, float]:
    """Predicted seconds of each piece of the work plan (``levels.level_pieces``) on ``device``
    (:data:`REFERENCE_CPU` when None): the stages :func:`_piece_work` gives it, each artefact paid
    for by the first piece in ``pieces`` that needs it (the cache computes it once). The plan orders
    its pieces by these (:func:`impact_core.schedule.plan`), so the order and the cost model read one
    description of the work; a piece the cost model cannot describe is an error before any compute."""
    from .levels import for_replicate

    device = REFERENCE_CPU if device is None else device
    book, out = _Book(cfg), {}
    for piece in pieces:
        book.cfg, book.added = for_replicate(cfg, piece.replicate), []
        _piece_work(book, "plan", piece)
        out[piece.label] = sum(predict_seconds(st, device) for st in book.added)
    return out


def _chapter_work(book: "_Book") -> None:
    """What the chapters compute themselves, outside the plan's pieces: the neuron and SAE galleries."""
    cfg, sc = book.cfg, book.cfg.sae
    for s in (0.0, max(book.with_dense(cfg.neuron.sparsities))):
        if book.once("neuron_gallery", s):
            book.add("neuron", gallery(cfg, _neuron_images(cfg), "neuron gallery (book)", cfg.data.num_workers))
    n_sae_eval = min(split_sizes(cfg)[1], sc.eval_images or split_sizes(cfg)[1])
    for s in (0.0, max(book.with_dense(sc.sparsities))):
        if book.once("sae_gallery", s):
            book.add("layer", gallery(cfg, n_sae_eval, "SAE gallery (book)",
                                      sae_tokens=_tokens_per_image(cfg, sc.tokens)))


def stage_costs(cfg: Config) -> list[StageCost]:
    """Every stage of the book on ``cfg``, per chapter: the work plan's pieces (``levels.level_pieces``, each
    replicate's copies included: what ``make book`` computes), turned into stages by :func:`_piece_work`, then
    the chapters' own galleries (:func:`_chapter_work`). Each cached artefact is counted once, by the first
    chapter in book order that needs it."""
    from .levels import for_replicate, level_pieces

    book = _Book(cfg)
    for chapter in CHAPTERS:  # each chapter's level has the chapter's name
        for piece in level_pieces(cfg, [chapter]):
            book.cfg = for_replicate(cfg, piece.replicate)
            _piece_work(book, chapter, piece)
    book.cfg = cfg
    _chapter_work(book)
    order = {c: i for i, c in enumerate(CHAPTERS)}
    return sorted(book.rows.values(), key=lambda r: order[r.chapter])


# ---------------------------------------------------------------------------------------------
# devices and time
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Device:
    """What runs a stage. ``peak_flops``: FLOP/s per precision (vendor sheet or measured);
    ``efficiency``: the fraction of it reached by the model's matrix products; ``bandwidth``:
    bytes/s of device memory and ``bandwidth_efficiency`` its reachable fraction; ``overhead_s``:
    seconds per aten operator (Python, dispatch, kernel launch); ``memory``: bytes;
    ``async_dispatch``: operators are queued while earlier kernels run (GPUs); ``decode_s``: seconds
    to read, decode and resize one ImageNet JPEG on one host core."""

    name: str
    peak_flops: dict
    bandwidth: float
    overhead_s: float
    memory: float
    efficiency: dict = field(default_factory=lambda: {"fp32": 1.0, "bf16": 1.0})
    bandwidth_efficiency: float = 1.0
    async_dispatch: bool = False
    decode_s: float = 4e-3
    note: str = ""


def _gpu(name: str, bandwidth: float, memory: float, note: str) -> Device:
    return Device(name=name, peak_flops={"bf16": 989e12, "fp32": 67e12}, bandwidth=bandwidth, overhead_s=6e-6,
                  memory=memory, efficiency={"bf16": 0.7, "fp32": 0.75}, bandwidth_efficiency=0.8,
                  async_dispatch=True, decode_s=4e-3, note=note)


H100 = _gpu("h100", 3.35e12, 80 * GB, "H100 SXM: 989 TFLOP/s bf16 dense, 67 TFLOP/s fp32 (no tensor cores: "
            "TF32 is off in PyTorch by default), 3.35 TB/s, 80 GB (vendor sheet)")
H200 = _gpu("h200", 4.8e12, 141 * GB, "H200 SXM: the H100's compute, 4.8 TB/s, 141 GB (vendor sheet)")


REFERENCE_CPU = Device(name="cpu (reference)", peak_flops={"fp32": 70e9, "bf16": 180e9}, bandwidth=25e9,
                       overhead_s=3e-6, memory=8 * GB,
                       note="one thread of a 2-core build: round values of calibrate_cpu_loaded on 2026-12-06 "
                            "(71.6 GFLOP/s fp32, 25.6 GB/s, 3.0 us per operator); what the plan orders its pieces "
                            "by (only their ratios matter), never a prediction of a build")


def _best(fn: Callable[[], object], repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def calibrate_cpu(mcfg: Optional[ModelConfig] = None, repeat: int = 3) -> Device:
    """Measure this machine at ``torch.get_num_threads()`` threads (a few seconds):

    * FLOP/s of ``torch.matmul`` at the model's sizes, ``(rows, d) @ (d, 3d)``, ``(d, r d)`` and
      ``(r d, d)`` (qkv, fc1, fc2; about 1 GFLOP a call, a quarter in bf16), in fp32 and bf16;
    * bandwidth: a copy of a 256 MB tensor (read and write counted);
    * per-operator overhead: the mean time of many tiny operators of the kinds a ViT runs (add, mul,
      linear, layer_norm, gelu, softmax, a copy) on 1 x 16 tensors, where arithmetic is negligible;
    * memory: the machine's RAM."""
    import os

    mcfg = ModelConfig() if mcfg is None else mcfg
    d, hidden = mcfg.embed_dim, int(mcfg.embed_dim * mcfg.mlp_ratio)
    shapes = [(d, 3 * d), (d, hidden), (hidden, d)]
    per_row = sum(2 * i * o for i, o in shapes)
    peak = {}
    for precision, dtype, budget in (("fp32", torch.float32, 1e9), ("bf16", torch.bfloat16, 0.25e9)):
        rows = int(min(4096, max(256, budget / per_row)))
        mats = [(torch.randn(rows, i, dtype=dtype), torch.randn(i, o, dtype=dtype)) for i, o in shapes]
        peak[precision] = rows * per_row / _best(lambda: [a @ b for a, b in mats], repeat)
    src = torch.ones(64 * 2 ** 20)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.nbytes / _best(lambda: dst.copy_(src), repeat)
    x, w = torch.randn(1, 16), torch.randn(16, 16)
    tiny = [lambda: x + x, lambda: x * x, lambda: F.linear(x, w), lambda: F.layer_norm(x, (16,)),
            lambda: F.gelu(x), lambda: x.softmax(-1), lambda: x.t().contiguous()]
    overhead = _best(lambda: [op() for _ in range(300) for op in tiny], repeat) / (300 * len(tiny))
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Device(name="cpu", peak_flops=peak, bandwidth=bandwidth, overhead_s=overhead, memory=memory,
                  note=f"this machine, {torch.get_num_threads()} thread(s), calibrated at d={d}")


def _keep_busy(mcfg: ModelConfig, threads: int, stop) -> None:
    """A background process of :func:`calibrate_cpu_loaded`: what a build's other worker does, training steps
    of the model (batch 64, random images, AdamW), until ``stop`` is set. A steady load: a second calibration
    in its place alternates matrix, copy and tiny-operator phases and made the calibration vary by +-20%."""
    from .models import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(mcfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    x = torch.randn(64, mcfg.in_chans, mcfg.img_size, mcfg.img_size)
    y = torch.randint(0, mcfg.num_classes, (64,))
    while not stop.is_set():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def calibrate_cpu_loaded(mcfg: Optional[ModelConfig] = None, processes: int = 2, threads: int = 1,
                         rounds: int = 5) -> Device:
    """:func:`calibrate_cpu` at ``threads`` threads while ``processes - 1`` other processes train the model (as a
    build's other workers do): the machine as a build of ``processes`` worker processes sees it (they share
    the memory bus and caches, which an idle-machine calibration does not: it predicted the default book 29%
    fast, docs/cost_model.md). Each quantity is the median of ``rounds`` calibrations."""
    import multiprocessing as mp
    import statistics

    mcfg = ModelConfig() if mcfg is None else mcfg
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    others = [ctx.Process(target=_keep_busy, args=(mcfg, threads, stop), daemon=True) for _ in range(processes - 1)]
    for p in others:
        p.start()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        time.sleep(5.0 if others else 0.0)  # let the others import torch and start training
        runs = [calibrate_cpu(mcfg) for _ in range(rounds)]  # one is noisy (+-15% under load): the median of each
        device = dataclasses.replace(
            runs[0], peak_flops={k: statistics.median(r.peak_flops[k] for r in runs) for k in runs[0].peak_flops},
            bandwidth=statistics.median(r.bandwidth for r in runs),
            overhead_s=statistics.median(r.overhead_s for r in runs))
    finally:
        torch.set_num_threads(before)
        stop.set()
        for p in others:
            p.join(timeout=60)
    return dataclasses.replace(device, note=f"this machine, {threads} thread(s) in each of {processes} busy "
                                            f"processes, calibrated at d={mcfg.embed_dim}")


DEVICES = {"cpu": calibrate_cpu, "h100": lambda mcfg=None: H100, "h200": lambda mcfg=None: H200}


def get_device(name: str, mcfg: Optional[ModelConfig] = None) -> Device:
    """A device preset by name: ``cpu`` (calibrated now, at ``mcfg``'s sizes), ``h100``, ``h200``."""
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}; known devices: {', '.join(DEVICES)}")
    return DEVICES[name](mcfg)


@dataclass(frozen=True)
class Prediction:
    """Predicted seconds of a stage, its terms and the binding one."""

    seconds: float
    compute_s: float
    memory_s: float
    overhead_s: float
    load_s: float
    binding: str


def predict(stage: StageCost, device: Device) -> Prediction:
    """The module docstring's formula: a roofline per kernel class (matrix products, everything else),
    the dispatch overhead and the image loading; ``memory_s`` is the memory time not hidden by compute."""
    bandwidth = device.bandwidth * device.bandwidth_efficiency
    compute = stage.flops / (device.peak_flops[stage.precision] * device.efficiency[stage.precision])
    mm_memory = stage.mm_bytes / bandwidth
    memory = (stage.bytes - stage.mm_bytes) / bandwidth + max(0.0, mm_memory - compute)
    overhead = stage.ops * device.overhead_s
    load = stage.images_loaded * device.decode_s / max(1, stage.workers)
    kernels = compute + memory
    run = max(kernels, overhead) if device.async_dispatch else kernels + overhead
    seconds = run + load if stage.workers == 0 else max(run, load)
    terms = {"compute": compute, "memory": memory, "overhead": overhead, "load": load}
    return Prediction(seconds, compute, memory, overhead, load, max(terms, key=terms.get))


def predict_seconds(stage: StageCost, device: Device) -> float:
    return predict(stage, device).seconds


def largest_batch(stage: StageCost, device: Device) -> Optional[int]:
    """The largest batch whose memory fits the device (None: the stage's memory does not grow with
    its batch; 0: not even one image fits)."""
    if stage.act_per_image <= 0:
        return None
    return max(0, int((device.memory - stage.fixed_peak) // stage.act_per_image))


def on_gpus(stage: StageCost, gpus: int) -> StageCost:
    """One process's share under ``torchrun --nproc_per_node gpus``: "rows" splits every batch
    (FLOPs, bytes and images / gpus; operators not: each process runs every batch), "chunks" hands
    out whole chunks (``ceil(chunks / gpus)`` of them each), "" is not split."""
    if gpus <= 1 or not stage.shard:
        return stage
    if stage.shard == "rows":
        k, ops = 1 / gpus, stage.ops
        batch = max(1, stage.batch // gpus)
    else:
        k = math.ceil(stage.chunks / gpus) / max(1, stage.chunks)
        ops, batch = stage.ops * k, stage.batch
    return dataclasses.replace(stage, flops=stage.flops * k, bytes=stage.bytes * k, mm_bytes=stage.mm_bytes * k, ops=ops,
                               forwards=stage.forwards * k, backwards=stage.backwards * k,
                               images_loaded=stage.images_loaded * k, batch=batch,
                               peak_bytes=stage.fixed_peak + stage.act_per_image * batch)


@dataclass
class Projection:
    """:func:`project`'s result: per stage (cost, prediction on one device, seconds on ``gpus``), hours
    per chapter on ``gpus``, the total, the device-hours of the whole book on one device, and
    ``circuits[classes]`` = {runs, run_device_hours, device_hours, hours} for the preset's classes
    and for 1,000 (:func:`project`)."""

    device: Device
    gpus: int
    rows: list
    chapters: dict
    total_hours: float
    device_hours: float
    circuits: dict


def seconds_on(stage: StageCost, device: Device, gpus: int = 1, efficiency: float = DP_EFFICIENCY) -> float:
    """Wall seconds of ``stage`` on ``gpus`` devices: one process's share (:func:`on_gpus`), divided
    by the data-parallel ``efficiency`` when the stage is split."""
    split = gpus > 1 and bool(stage.shard)
    return predict(on_gpus(stage, gpus), device).seconds / (efficiency if split else 1.0)


def project(cfg: Config, device: Device, gpus: int = 1, efficiency: float = DP_EFFICIENCY,
            classes: int = 1000) -> Projection:
    """Hours per chapter of the book on ``gpus`` devices under torchrun (:func:`seconds_on`), and the
    circuits with ``circuit.classes`` = the first ``classes`` classes beside the preset's own: per
    (model, k) run and for all the book's runs, in device-hours (one device) and in hours on ``gpus``."""
    rows, chapters = [], {c: 0.0 for c in CHAPTERS}
    for st in stage_costs(cfg):
        rows.append((st, predict(st, device), seconds_on(st, device, gpus, efficiency)))
        chapters[st.chapter] += rows[-1][2] / 3600
    circuits = {}
    wide = dataclasses.replace(cfg, circuit=dataclasses.replace(
        cfg.circuit, classes=list(range(min(classes, cfg.model.num_classes)))))
    for c in (cfg, wide):
        run = [circuit_masks(c), circuit_evaluation(c)]
        book = [st for st in stage_costs(c) if st.stage.startswith("circuit")]
        circuits[_circuit_classes(c, None)] = {
            "runs": sum(st.runs for st in book if st.stage.startswith("circuit masks")),
            "run_device_hours": sum(predict(st, device).seconds for st in run) / 3600,
            "device_hours": sum(predict(st, device).seconds for st in book) / 3600,
            "hours": sum(seconds_on(st, device, gpus, efficiency) for st in book) / 3600}
    return Projection(device, gpus, rows, {c: h for c, h in chapters.items() if h > 0}, sum(chapters.values()),
                      sum(r[1].seconds for r in rows) / 3600, circuits)


def format_table(proj: Projection) -> str:
    """:func:`project` as markdown: the stages, the hours per chapter and the circuits' classes."""
    dev, g = proj.device, proj.gpus
    lines = [f"| chapter | stage | runs | FLOPs | bytes | peak memory (at batch) | largest batch | seconds on 1 "
             f"{dev.name} | binding | hours on {g} x {dev.name} |", "|---|---|---|---|---|---|---|---|---|---|"]
    for st, one, many in proj.rows:
        big = largest_batch(st, dev)
        lines.append(f"| {st.chapter} | {st.stage} | {st.runs} | {st.flops:.3g} | {st.bytes:.3g} | "
                     f"{st.peak_bytes / GB:.3g} GB ({st.batch}) | {'-' if big is None else big} | "
                     f"{one.seconds:.4g} | {one.binding} | {many / 3600:.3g} |")
    lines += ["", f"| chapter | hours on {g} x {dev.name} |", "|---|---|"]
    lines += [f"| {chapter} | {hours:.3g} |" for chapter, hours in proj.chapters.items()]
    lines.append(f"| **total** | **{proj.total_hours:.3g}** (the book on one {dev.name}: "
                 f"{proj.device_hours:.3g} device-hours) |")
    lines += ["", f"| circuit classes | (model, k) runs in the book | one run, {dev.name}-hours | all runs, "
              f"{dev.name}-hours | all runs, hours on {g} x {dev.name} |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {c['runs']} | {c['run_device_hours']:.3g} | {c['device_hours']:.3g} | {c['hours']:.3g} |"
              for k, c in proj.circuits.items()]
    return "\n".join(lines)
