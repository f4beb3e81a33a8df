"""Named activation sites on a timm VisionTransformer (TransformerLens-style hook points).

Every studied activation has a stable name ``blocks.{i}.{site}``. The paper's eight
sites per block (App. A.4 / C.1) are::

    norm1     output of the first LayerNorm                (B, N, C)
    q, k, v   per-head slices of the fused qkv projection  (B, N, H, D)
    attn_out  attention branch after LayerScale, before the residual add  (B, N, C)
    norm2     output of the second LayerNorm               (B, N, C)
    mlp_act   MLP hidden activation after GELU             (B, N, 4C)
    mlp_out   MLP branch after LayerScale, before the residual add        (B, N, C)

Two extra readable sites serve other chapters:

    heads      per-head attention output before ``proj``   (B, N, H, D)  (neuron-level head units)
    resid_post residual stream after the block             (B, N, C)     (SAE inputs)

Attribution (:func:`impact_core.methods.attribution.forward_trace`) runs the block explicitly and
records, besides every site above, the rest of its computation under ``ATTRIBUTION_SITES``
(read there only; :class:`HookedViT` hooks only ``qkv`` of them, where circuits mask q, k and v in
one operation)::

    resid_pre  residual stream entering the block                (B, N, C)
    qkv        fused qkv projection (q, k, v side by side)       (B, N, 3C)
    pattern    attention probabilities softmax(q k^T / sqrt(D))  (B, H, N, N)
    attn_proj  attention branch after proj, before LayerScale    (B, N, C)
    resid_mid  residual stream after the attention branch's add  (B, N, C)
    mlp_fc2    MLP branch after fc2, before LayerScale           (B, N, C)

Names without a block: ``block_name(i)`` (``blocks.{i}``) is block i as a whole, ``POOLED`` the
classifier's input (the class token after the final norms) and ``LOGITS`` its output.

A *hook function* receives the activation in the shape above and returns ``None``
(read only) or a tensor of the same shape (patch). Units (nodes) are the last axis
for ``(B, N, C)`` sites and the head axis for ``(B, N, H, D)`` sites.

Means are per token position over the data set (shape ``(N, *unit_shape)``): CLS and
patch positions keep their own means. This is our reading of the paper's
"dataset-wide mean activation" (App. A.4).
"""
from __future__ import annotations

import contextlib
import re
from collections import defaultdict
from typing import Callable, Iterable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..precision import autocast
from ..distributed import all_reduce_sum, local_rows

PAPER_SITES = ("norm1", "q", "k", "v", "attn_out", "norm2", "mlp_act", "mlp_out")
EXTRA_SITES = ("heads", "resid_post")
ALL_SITES = PAPER_SITES + EXTRA_SITES  # the sites HookedViT hooks
ATTRIBUTION_SITES = ("resid_pre", "qkv", "pattern", "attn_proj", "resid_mid", "mlp_fc2")
POOLED, LOGITS = "pooled", "logits"
HEAD_SITES = ("q", "k", "v", "heads")
_QKV_INDEX = {"q": 0, "k": 1, "v": 2}
_NAME = re.compile(r"^blocks\.(\d+)\.([a-z_0-9]+)$")
_KNOWN = ALL_SITES + ATTRIBUTION_SITES

HookFn = Callable[[torch.Tensor], Optional[torch.Tensor]]


def block_name(block: int) -> str:
    """``block_name(7) == 'blocks.7'``: the block as a whole (timm's module name)."""
    return f"blocks.{block}"


def site_name(block: int, site: str) -> str:
    """``site_name(7, 'mlp_act') == 'blocks.7.mlp_act'``."""
    if site not in _KNOWN:
        raise KeyError(f"unknown site {site!r}; known: {', '.join(_KNOWN)}")
    return f"{block_name(block)}.{site}"


def parse_site(name: str) -> tuple[int, str]:
    match = _NAME.match(name)
    if not match or match.group(2) not in _KNOWN:
        raise KeyError(f"not a site name: {name!r} (expected 'blocks.<i>.<site>', site in {_KNOWN})")
    return int(match.group(1)), match.group(2)


class HookedViT(nn.Module):
    """A timm ``VisionTransformer`` whose sites can be read, patched and mean-ablated by name.

    The wrapped model is unchanged (same state dict); hooks exist only inside
    :meth:`hooks` contexts, so the plain forward costs nothing extra.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.depth = len(model.blocks)
        attn = model.blocks[0].attn
        self.num_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.embed_dim = model.embed_dim
        self.mlp_dim = model.blocks[0].mlp.fc1.out_features

    # -- names and shapes ------------------------------------------------------------
    def site_names(self, blocks: Optional[Iterable[int]] = None, sites: Iterable[str] = PAPER_SITES) -> list[str]:
        blocks = range(self.depth) if blocks is None else blocks
        return [site_name(b, s) for b in blocks for s in sites]

    def unit_shape(self, name: str) -> tuple[int, ...]:
        """Per-token shape of a site's activation."""
        block, site = parse_site(name)
        if site == "qkv":
            return (3 * self.embed_dim,)
        if site in ATTRIBUTION_SITES:
            raise KeyError(f"{name}: recorded by attribution.forward_trace only; HookedViT hooks {ALL_SITES} and qkv")
        if block >= self.depth:
            raise KeyError(f"{name}: the model has {self.depth} blocks")
        if site in HEAD_SITES:
            return (self.num_heads, self.head_dim)
        return (self.mlp_dim,) if site == "mlp_act" else (self.embed_dim,)

    def num_units(self, name: str) -> int:
        return self.unit_shape(name)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    # -- hooks -------------------------------------------------------------------------
    @contextlib.contextmanager
    def hooks(self, fns: dict[str, HookFn | list[HookFn]]):
        """Register hook functions by site name for the duration of the context."""
        by_site: dict[str, list[HookFn]] = defaultdict(list)
        for name, fn in fns.items():
            self.unit_shape(name)  # validates the name
            by_site[name].extend(fn if isinstance(fn, (list, tuple)) else [fn])
        handles = []
        per_block: dict[int, dict[str, list[HookFn]]] = defaultdict(dict)
        for name, fn_list in by_site.items():
            block, site = parse_site(name)
            per_block[block][site] = fn_list
        try:
            for block, sites in per_block.items():
                handles.extend(self._register_block(block, sites))
            yield self
        finally:
            for h in handles:
                h.remove()

    def _register_block(self, index: int, sites: dict[str, list[HookFn]]):
        blk = self.model.blocks[index]
        H, D = self.num_heads, self.head_dim
        handles = []

        def plain(fn_list):
            def hook(_module, _inputs, output):
                for fn in fn_list:
                    new = fn(output)
                    if new is not None:
                        output = new
                return output

            return hook

        modules = {"norm1": blk.norm1, "qkv": blk.attn.qkv, "attn_out": blk.ls1, "norm2": blk.norm2,
                   "mlp_act": blk.mlp.act, "mlp_out": blk.ls2, "resid_post": blk}
        for site, module in modules.items():
            if site in sites:
                handles.append(module.register_forward_hook(plain(sites[site])))

        qkv_sites = {s: sites[s] for s in ("q", "k", "v") if s in sites}
        if qkv_sites:
            def qkv_hook(_module, _inputs, output):
                B, N, _ = output.shape
                parts = list(output.view(B, N, 3, H, D).unbind(2))
                changed = False
                for site, fn_list in qkv_sites.items():
                    i = _QKV_INDEX[site]
                    for fn in fn_list:
                        new = fn(parts[i])
                        if new is not None:
                            parts[i], changed = new, True
                return torch.stack(parts, dim=2).reshape(B, N, 3 * H * D) if changed else output

            handles.append(blk.attn.qkv.register_forward_hook(qkv_hook))

        if "heads" in sites:
            def heads_hook(_module, inputs):
                (x,) = inputs
                B, N, C = x.shape
                z = x.view(B, N, H, D)
                changed = False
                for fn in sites["heads"]:
                    new = fn(z)
                    if new is not None:
                        z, changed = new, True
                return (z.reshape(B, N, C),) if changed else None

            handles.append(blk.attn.proj.register_forward_pre_hook(heads_hook))
        return handles

    # -- conveniences --------------------------------------------------------------------
    def run_with_cache(self, x: torch.Tensor, names: Iterable[str], detach: bool = True):
        """Forward ``x``; return ``(logits, {name: activation})``."""
        store: dict[str, torch.Tensor] = {}

        def saver(name):
            def fn(act):
                store[name] = act.detach() if detach else act
            return fn

        with self.hooks({n: saver(n) for n in names}):
            logits = self.model(x)
        return logits, store

    def run_with_hooks(self, x: torch.Tensor, fns: dict[str, HookFn | list[HookFn]]) -> torch.Tensor:
        with self.hooks(fns):
            return self.model(x)

    # -- a forward in two parts: up to a block, then from it ----------------------------
    def residuals(self, x: torch.Tensor, blocks: Iterable[int]) -> dict[int, torch.Tensor]:
        """``{b: the residual stream entering block b}`` for the images ``x`` and each of ``blocks``: timm's
        ``forward_features`` (embedding, position, ``norm_pre``, the blocks) up to the last of them, no hooks."""
        m, wanted = self.model, sorted({int(b) for b in blocks})
        if not wanted or wanted[0] < 0 or wanted[-1] >= self.depth:
            raise ValueError(f"blocks must lie in [0, {self.depth}), got {wanted}")
        h = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        out = {}
        for b in range(wanted[-1] + 1):
            if b in wanted:
                out[b] = h
            if b < wanted[-1]:
                h = m.blocks[b](h)
        return out

    def logits_from(self, resid: torch.Tensor, block: int, fns: Optional[dict] = None) -> torch.Tensor:
        """The logits from the residual stream entering ``block`` (:meth:`residuals`): the blocks from ``block``
        on, the final norm and the head, with the hook functions ``fns`` (sites of ``block`` or later).
        ``logits_from(residuals(x, [b])[b], b, fns)`` is ``run_with_hooks(x, fns)`` without re-running the blocks
        before b (the same numbers: every operation acts on each image's rows alone)."""
        early = [n for n in (fns or {}) if parse_site(n)[0] < block]
        if early:
            raise ValueError(f"hooks {early} lie before block {block}: the forward starts there")
        m = self.model
        with self.hooks(fns or {}):
            for blk in m.blocks[block:]:
                resid = blk(resid)
            return m.forward_head(m.norm(resid))


def mean_ablate(mean: torch.Tensor, keep: torch.Tensor, name: str) -> HookFn:
    """Hook for Eq. 11, ``a~ = keep * a + (1 - keep) * mean``: a unit with keep 0 takes its
    per-position dataset mean ``mean`` ``(N, *unit_shape)``, keep 1 passes it through exactly.

    ``keep`` (0/1 or soft, e.g. circuits' learnable masks) is ``(units,)``, one mask for every
    image, or ``(G, units)`` (also ``(G, 1, units)``): the activation's rows ``(G*B, N, ...)`` are
    viewed as G groups ``(G, B, N, ...)`` and group g gets ``keep[g]`` (circuits: one group per
    class; neuron ablation: one per image).
    """
    _, site = parse_site(name)
    m = keep.reshape(-1, 1, 1, keep.shape[-1], *((1,) if site in HEAD_SITES else ()))

    def fn(act):
        a = act.reshape(m.shape[0], -1, *act.shape[1:])
        # lerp(mean, a, m) = mean + m (a - mean): one fused kernel, exact for m in {0, 1}
        return torch.lerp(mean.to(act.dtype), a, m).reshape(act.shape)

    return fn


def site_sum_hooks(names: list[str], sums: dict[str, torch.Tensor]) -> dict:
    """Hooks that add each named site's activation, summed over the batch in float64, into ``sums[name]``
    (created on the first batch, on the activation's device)."""
    def adder(name):
        def fn(act):
            s = act.sum(0, dtype=torch.float64)
            if name in sums:
                sums[name] += s
            else:
                sums[name] = s
        return fn

    return {n: adder(n) for n in names}


@torch.no_grad()
def compute_site_means(hooked: HookedViT, batches: Iterable, names: list[str],
                       device: torch.device | str = "cpu", desc: str = "site means",
                       precision: str = "fp32") -> dict[str, torch.Tensor]:
    """Per-position mean of every named site over the data set, in one pass.

    Accumulates float64 sums on the device; memory is ``sum_sites N * units``.
    Under torchrun each process takes its rows of every batch and the sums are all-reduced.
    """
    sums: dict[str, torch.Tensor] = {}
    count = 0
    hooked.eval()
    with hooked.hooks(site_sum_hooks(names, sums)):
        for images, _labels in tqdm(batches, desc=desc, leave=False):
            images = local_rows(images)
            with autocast(device, precision):
                hooked.model(images.to(device))
            count += images.shape[0]
    count = int(all_reduce_sum(torch.tensor(float(count), dtype=torch.float64, device=device)).item())
    if count == 0:
        raise ValueError("compute_site_means: no images")
    return {n: (all_reduce_sum(s) / count).float().cpu() for n, s in sums.items()}
