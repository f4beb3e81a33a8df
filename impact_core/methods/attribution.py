"""Model level (Sec. 3.5, App. A.3): transformer attribution for timm DeiT-III ViTs.

Chefer et al. (2021), "Transformer Interpretability Beyond Attention Visualization",
written from the method's description for timm ``VisionTransformer``s with a class
token, ``no_embed_class``, LayerScale and a fused ``qkv`` Linear:

* seed: one-hot relevance on the target *logit* (target = predicted class unless given);
* LRP rules, run backwards through every block:
  - Linear: alpha=1, beta=0, bias ignored:
    ``R_i = sum_j (x_i^+ w_ji^+ + x_i^- w_ji^-) / z_j^+ * R_j`` with
    ``z_j^+ = sum_i x_i^+ w_ji^+ + x_i^- w_ji^-``;
  - LayerNorm, GELU, softmax: relevance passes through unchanged;
  - residual Add ``y = a + b``: split ``R_a = a R / y``, ``R_b = b R / y``, then rescale
    both so that ``|sum R_a| : |sum R_b|`` share the incoming total (conserving);
  - the two attention matmuls ``A @ V`` and ``Q @ K^T``: gradient x input
    ``R_X = X * d(Z . stop(R / Z)) / dX``, halved for each operand;
* per block ``A_bar = mean_heads(clamp(dlogit/dA * R_A, min=0))`` with ``A`` the
  post-softmax attention and ``R_A`` its relevance; rollout ``prod_b (I + A_bar_b)``
  (rows not renormalised); the class-token row over the patch columns, reshaped to the
  patch grid, upsampled bilinearly to the image and min-max normalised per image.

DeiT-III adaptations (App. A.3):

* LayerScale ``b = gamma * u`` on each residual branch. The residual Add sees the
  *scaled* branch ``b``. Two rules for the elementwise scale itself:
  ``"z"`` (default): the z-rule, ``R_u = u gamma / b * R_b = R_b``: conserving;
  ``"inverse"``: the paper's Eq. 14, ``R_u = R_b * (gamma + eps)^-1``, which multiplies
  the branch's relevance by ``1/gamma`` (about 10 for the small model, up to 1e6 for
  DeiT-III's ``init_values=1e-6``) and so does not conserve relevance. The chapter shows
  both, layer by layer; the default is the conserving z-rule.
* qkv decoupling: the fused ``qkv`` weight is split into ``W_q, W_k, W_v`` and relevance
  runs through three separate Linear rules (value path separate). Because the
  alpha-beta rule is per output unit this equals the fused rule (tested).
* ``no_embed_class``: positional embeddings are added to patches only, so nothing
  is padded here: relevance is read from the token axis, the class token at 0 and the
  patches after ``model.num_prefix_tokens``.

Baselines: attention rollout (Abnar & Zuidema 2020: ``prod_b 0.5 (mean_h A_b + I)``),
the gradient-only generic attention explainability (Chefer et al. 2021b:
``A_bar = mean_h(clamp(dlogit/dA * A, 0))``, same rollout) and a random baseline:
one U(0, 1) score per patch (seeded), upsampled and normalised exactly as the maps
are (:func:`to_image_maps`), so it differs from the methods only in the scores.

Everything is batched (many images per call) and equals one image at a time
(tested). :func:`chefer_reference` is the plain one-image implementation (rules by
autograd, as LRP is usually written) that the fast path is tested against.
"""
from __future__ import annotations

import copy
import logging
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .sites import LOGITS, POOLED, block_name, site_name

log = logging.getLogger("impact_core")

METHODS = ("chefer", "rollout", "generic", "random")
METHOD_LABELS = {"chefer": "Transformer attribution (Chefer 2021)", "rollout": "Attention rollout",
                 "generic": "Generic attention (grad x attn)", "random": "Random"}
LAYERSCALE_RULES = ("z", "inverse")
LAYERSCALE_EPS = 1e-6  # the epsilon of Eq. 14 (the paper does not give its value)
DIV_EPS = 1e-9


class AttributionError(ValueError):
    """Bad input to an attribution method (unknown method, wrong shapes, unsupported model)."""


# ----------------------------------------------------------------------------- model access


def check_model(model: nn.Module) -> None:
    """The ViT structure the rules are written for: fail with a clear message otherwise."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise AttributionError(f"expected a timm VisionTransformer, got {type(model).__name__}")
    if model.cls_token is None or model.global_pool != "token":
        raise AttributionError("transformer attribution reads the class token: need class_token=True, global_pool='token'")
    if getattr(model, "attn_pool", None) is not None:
        raise AttributionError("attention-pool heads are not supported")
    for i, blk in enumerate(model.blocks):
        attn = blk.attn
        for name in ("q_norm", "k_norm", "norm"):
            if not isinstance(getattr(attn, name, nn.Identity()), nn.Identity):
                raise AttributionError(f"blocks.{i}.attn.{name} is not Identity: qk/scale norms are not supported")
        if getattr(attn, "gate", None) is not None:
            raise AttributionError(f"blocks.{i}.attn is gated: not supported")
        if not isinstance(getattr(blk.mlp, "norm", nn.Identity()), nn.Identity):
            raise AttributionError(f"blocks.{i}.mlp.norm is not Identity: not supported")


def _gamma(ls: nn.Module, dim: int, like: torch.Tensor) -> torch.Tensor:
    """LayerScale's diagonal (ones where the block has no LayerScale)."""
    gamma = getattr(ls, "gamma", None)
    return torch.ones(dim, device=like.device, dtype=like.dtype) if gamma is None else gamma


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    x = model.patch_embed(images)
    x = model._pos_embed(x)  # no_embed_class: pos_embed on patches, then the class token prepended
    x = model.patch_drop(x)
    return model.norm_pre(x)


def forward_trace(model: nn.Module, images: torch.Tensor, keep_graph: bool = False):
    """Run the ViT explicitly (attention probabilities computed, never fused SDPA).

    Returns ``(logits, trace)``: ``trace`` maps site names (:mod:`.sites`) to activations, every
    block's ``ALL_SITES`` and ``ATTRIBUTION_SITES`` in the shapes given there (the sites equal
    :class:`~.sites.HookedViT`'s), and ``POOLED``. With ``keep_graph`` the attention patterns
    stay in the autograd graph (the token embeddings are made leaves, so gradients exist even
    for frozen weights).
    """
    trace = {}
    x = _embed(model, images)
    if keep_graph:
        x = x.detach().requires_grad_(True)
    for i, blk in enumerate(model.blocks):
        attn = blk.attn
        B, N, _ = x.shape
        H, D = attn.num_heads, attn.head_dim
        h1 = blk.norm1(x)
        qkv = attn.qkv(h1)
        q, k, v = qkv.reshape(B, N, 3, H, D).unbind(2)  # (B, N, H, D)
        A = ((q.transpose(1, 2) * attn.scale) @ k.transpose(1, 2).transpose(-2, -1)).softmax(dim=-1)
        heads = (A @ v.transpose(1, 2)).transpose(1, 2).contiguous()  # (B, N, H, D)
        o = attn.proj(heads.flatten(2))
        b1 = blk.ls1(o)
        x1 = x + b1
        h2 = blk.norm2(x1)
        g = blk.mlp.act(blk.mlp.fc1(h2))
        f2 = blk.mlp.fc2(g)
        b2 = blk.ls2(f2)
        x2 = x1 + b2
        trace.update({site_name(i, s): t for s, t in (
            ("resid_pre", x), ("norm1", h1), ("qkv", qkv), ("q", q), ("k", k), ("v", v), ("pattern", A),
            ("heads", heads), ("attn_proj", o), ("attn_out", b1), ("resid_mid", x1), ("norm2", h2),
            ("mlp_act", g), ("mlp_fc2", f2), ("mlp_out", b2), ("resid_post", x2))})
        x = x2
    xn = model.norm(x)
    pooled = model.fc_norm(xn[:, 0])
    trace[POOLED] = pooled
    logits = model.head(model.head_drop(pooled))
    return logits, trace


def patterns(model: nn.Module, trace: dict) -> list[torch.Tensor]:
    """Every block's attention pattern ``(B, H, N, N)`` from a trace, first block first."""
    return [trace[site_name(i, "pattern")] for i in range(len(model.blocks))]


# ----------------------------------------------------------------------------- fast (analytic, batched) rules


def safe_div(a: torch.Tensor, b: torch.Tensor, eps: float = DIV_EPS) -> torch.Tensor:
    """``a / b`` with a sign-preserving stabiliser; 0 where ``b == 0``."""
    den = b + eps * torch.where(b >= 0, 1.0, -1.0).to(b.dtype)
    return torch.where(b == 0, torch.zeros_like(a), a / den)


def lrp_linear(x: torch.Tensor, weight: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """LRP alpha=1, beta=0 through ``y = x W^T + b`` (bias ignored). Shapes (..., in), (out, in), (..., out)."""
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    wp, wn = weight.clamp(min=0), weight.clamp(max=0)
    z = xp @ wp.T + xn @ wn.T
    s = safe_div(R, z)
    return xp * (s @ wp) + xn * (s @ wn)


def _per_image_sum(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).sum(1)


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def lrp_add(a: torch.Tensor, b: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Conserving residual Add: split by contribution, then rescale per image so that the
    two parts keep their ``|sum|`` proportions and together sum to ``sum R``."""
    s = safe_div(R, a + b)
    Ra, Rb = a * s, b * s
    sa, sb, total = _per_image_sum(Ra), _per_image_sum(Rb), _per_image_sum(R)
    denom = sa.abs() + sb.abs()
    fa = safe_div(sa.abs(), denom) * safe_div(total, sa)
    fb = safe_div(sb.abs(), denom) * safe_div(total, sb)
    return Ra * _expand(fa, Ra), Rb * _expand(fb, Rb)


def lrp_matmul(a: torch.Tensor, b: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient x input through ``Z = a @ b``, each operand's relevance halved."""
    s = safe_div(R, a @ b)
    return a * (s @ b.transpose(-2, -1)) / 2, b * (a.transpose(-2, -1) @ s) / 2


def lrp_layerscale(gamma: torch.Tensor, R: torch.Tensor, rule: str = "z", eps: float = LAYERSCALE_EPS) -> torch.Tensor:
    """Relevance through ``b = gamma * u``: z-rule ``R_u = R_b`` or Eq. 14 ``R_u = R_b / (gamma + eps)``."""
    if rule == "z":
        return R
    if rule == "inverse":
        return R / (gamma + eps)
    raise AttributionError(f"unknown LayerScale rule {rule!r}; use one of {LAYERSCALE_RULES}")


def _record(record: Optional[list], name: str, r_out: torch.Tensor, r_in: torch.Tensor) -> None:
    if record is not None:
        record.append({"layer": name, "at_output": _per_image_sum(r_out).detach().cpu(),
                       "at_input": _per_image_sum(r_in).detach().cpu()})


@torch.no_grad()
def relprop(model: nn.Module, trace: dict, target: torch.Tensor, layerscale_rule: str = "z",
            eps: float = LAYERSCALE_EPS, record: Optional[list] = None, fused_qkv: bool = False) -> list[torch.Tensor]:
    """LRP from the one-hot target logit back through every block.

    Returns ``R_A`` (B, H, N, N) per block (first block first). ``record`` (a list)
    receives per-step per-image relevance sums at each step's output and input, the step
    named by its output site (see :func:`relevance_conservation`).
    """
    pooled = trace[POOLED]
    seed = F.one_hot(target, model.head.out_features).to(pooled.dtype)
    R_cls = lrp_linear(pooled, model.head.weight, seed)
    _record(record, LOGITS, seed, R_cls)
    last = trace[site_name(len(model.blocks) - 1, "resid_post")]
    R = torch.zeros(last.shape, dtype=pooled.dtype, device=pooled.device)
    R[:, 0] = R_cls  # final LayerNorm: pass-through; pooling takes the class token
    R_A = []
    for i in reversed(range(len(model.blocks))):
        blk, attn = model.blocks[i], model.blocks[i].attn
        name = lambda s: site_name(i, s)  # noqa: E731
        t = lambda s: trace[name(s)]  # noqa: E731
        B, N, C = t("resid_pre").shape
        H, D = attn.num_heads, attn.head_dim
        R_block_out = R
        # MLP branch: resid_post = resid_mid + ls2(fc2(act(fc1(norm2(resid_mid)))))
        R_x1, R_b2 = lrp_add(t("resid_mid"), t("mlp_out"), R)
        _record(record, name("resid_post"), R, torch.cat([R_x1, R_b2], 1))
        R_f2 = lrp_layerscale(_gamma(blk.ls2, C, R), R_b2, layerscale_rule, eps)
        _record(record, name("mlp_out"), R_b2, R_f2)
        R_g = lrp_linear(t("mlp_act"), blk.mlp.fc2.weight, R_f2)
        _record(record, name("mlp_fc2"), R_f2, R_g)
        R_h2 = lrp_linear(t("norm2"), blk.mlp.fc1.weight, R_g)  # GELU: pass-through
        _record(record, name("mlp_act"), R_g, R_h2)
        R = R_x1 + R_h2  # norm2: pass-through; the clone of resid_mid sums its two uses
        # attention branch: resid_mid = resid_pre + ls1(proj(pattern @ v))
        R_x, R_b1 = lrp_add(t("resid_pre"), t("attn_out"), R)
        _record(record, name("resid_mid"), R, torch.cat([R_x, R_b1], 1))
        R_o = lrp_layerscale(_gamma(blk.ls1, C, R), R_b1, layerscale_rule, eps)
        _record(record, name("attn_out"), R_b1, R_o)
        R_opre = lrp_linear(t("heads").flatten(2), attn.proj.weight, R_o)
        _record(record, name("attn_proj"), R_o, R_opre)
        R_heads = R_opre.reshape(B, N, H, D).transpose(1, 2)
        q, k, v = (t(s).transpose(1, 2) for s in ("q", "k", "v"))  # (B, H, N, D)
        R_a, R_v = lrp_matmul(t("pattern"), v, R_heads)
        _record(record, name("heads"), R_heads, torch.cat([R_a.flatten(2), R_v.flatten(2)], 2))
        R_A.append(R_a)
        R_q, R_k = lrp_matmul(q, k.transpose(-2, -1), R_a)  # softmax: pass-through
        R_k = R_k.transpose(-2, -1)
        _record(record, name("pattern"), R_a, torch.cat([R_q.flatten(2), R_k.flatten(2)], 2))
        to_tokens = lambda r: r.transpose(1, 2).reshape(B, N, H * D)  # noqa: E731
        W = attn.qkv.weight
        if fused_qkv:
            R_h1 = lrp_linear(t("norm1"), W, torch.cat([to_tokens(R_q), to_tokens(R_k), to_tokens(R_v)], -1))
        else:  # decoupled: separate q, k, v projections (value path on its own)
            Wq, Wk, Wv = W.split(H * D, dim=0)
            R_h1 = sum(lrp_linear(t("norm1"), w, to_tokens(r)) for w, r in ((Wq, R_q), (Wk, R_k), (Wv, R_v)))
        _record(record, name("qkv"), torch.cat([R_q.flatten(1), R_k.flatten(1), R_v.flatten(1)], 1), R_h1)
        R = R_x + R_h1  # norm1: pass-through; clone of resid_pre
        _record(record, block_name(i), R_block_out, R)
    return R_A[::-1]


# ----------------------------------------------------------------------------- maps


def rollout(A_bar: list[torch.Tensor]) -> torch.Tensor:
    """``prod_b (I + A_bar_b)``, later blocks on the left; (B, N, N)."""
    B, N, _ = A_bar[0].shape
    eye = torch.eye(N, device=A_bar[0].device, dtype=A_bar[0].dtype).expand(B, N, N)
    joint = eye + A_bar[0]
    for a in A_bar[1:]:
        joint = (eye + a) @ joint
    return joint


def _check_images(model: nn.Module, images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise AttributionError(f"images must be a (B, C, H, W) tensor, got {getattr(images, 'shape', type(images))}")
    in_chans = model.patch_embed.proj.in_channels
    size = tuple(model.patch_embed.img_size)
    if images.shape[1] != in_chans or tuple(images.shape[2:]) != size:
        raise AttributionError(f"images of shape {tuple(images.shape[1:])} do not fit the model "
                               f"({in_chans}, {size[0]}, {size[1]})")


def _targets(target, logits: torch.Tensor) -> torch.Tensor:
    if target is None:
        return logits.argmax(1)
    target = torch.as_tensor(target, device=logits.device).long().reshape(-1)
    if target.numel() == 1 and logits.shape[0] > 1:
        target = target.expand(logits.shape[0])
    if target.numel() != logits.shape[0]:
        raise AttributionError(f"target has {target.numel()} entries for {logits.shape[0]} images")
    if (target < 0).any() or (target >= logits.shape[1]).any():
        raise AttributionError(f"target outside [0, {logits.shape[1]})")
    return target


def to_image_maps(patch_maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of (B, gh, gw) patch maps to the image, min-max per image."""
    maps = F.interpolate(patch_maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    lo = maps.flatten(1).min(1).values[:, None, None]
    hi = maps.flatten(1).max(1).values[:, None, None]
    return safe_div(maps - lo, hi - lo)


def random_patch_scores(batch: int, grid: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """The random baseline's patch scores: one U(0, 1) draw per patch, (B, gh, gw)."""
    return torch.rand((batch, *grid), generator=generator)


def _attribute_batch(model, images, method, target, layerscale_rule, generator):
    B = images.shape[0]
    grid = model.patch_embed.grid_size
    prefix = model.num_prefix_tokens
    if method == "random":
        with torch.no_grad():
            logits = model(images)
        tgt = _targets(target, logits)
        patch = random_patch_scores(B, grid, generator).to(images.device)
        return patch, to_image_maps(patch, tuple(images.shape[2:])), tgt
    if method == "rollout":
        with torch.no_grad():
            logits, trace = forward_trace(model, images)
        tgt = _targets(target, logits)
        A_bar = []
        for A in patterns(model, trace):
            a = A.mean(1)
            a = a + torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
            A_bar.append(a / a.sum(-1, keepdim=True) - torch.eye(a.shape[-1], device=a.device, dtype=a.dtype))
        joint = rollout(A_bar)  # prod (I + (norm(A + I) - I)) = prod norm(A + I)
    else:
        with torch.enable_grad():
            logits, trace = forward_trace(model, images, keep_graph=True)
            tgt = _targets(target, logits)
            score = logits.gather(1, tgt[:, None]).sum()  # images are independent: one backward for all
            grads = torch.autograd.grad(score, patterns(model, trace))
        if method == "chefer":
            R_A = relprop(model, trace, tgt, layerscale_rule)
            A_bar = [(g * r).clamp(min=0).mean(1) for g, r in zip(grads, R_A)]
        else:  # generic (Chefer 2021b)
            A_bar = [(g * A.detach()).clamp(min=0).mean(1) for g, A in zip(grads, patterns(model, trace))]
        joint = rollout([a.detach() for a in A_bar])
    patch = joint[:, 0, prefix:].reshape(B, *grid).detach()
    return patch, to_image_maps(patch, tuple(images.shape[2:])), tgt


def attribute(model: nn.Module, images: torch.Tensor, method: str = "chefer", target=None, *,
              layerscale_rule: str = "z", batch_size: Optional[int] = None, seed: int = 0) -> dict:
    """Attribution maps for a batch of normalised images.

    Returns ``{"maps": (B, H, W) in [0, 1] on the CPU, "patch": (B, gh, gw) raw rollout row
    (for "random": U(0, 1) patch scores drawn from a generator seeded with ``seed``),
    "target": (B,)}``. ``target``: class per image (or one for all); default the predicted
    class. ``batch_size`` splits the work into chunks.
    """
    if method not in METHODS:
        raise AttributionError(f"unknown attribution method {method!r}; use one of {METHODS}")
    if layerscale_rule not in LAYERSCALE_RULES:
        raise AttributionError(f"unknown LayerScale rule {layerscale_rule!r}; use one of {LAYERSCALE_RULES}")
    check_model(model)
    _check_images(model, images)
    was_training = model.training
    model.eval()
    device = _device(model)
    generator = torch.Generator().manual_seed(seed)
    bs = batch_size or images.shape[0]
    out = {"maps": [], "patch": [], "target": []}
    try:
        for start in range(0, images.shape[0], bs):
            chunk = images[start:start + bs].to(device)
            tgt = None if target is None else torch.as_tensor(target).reshape(-1)
            if tgt is not None and tgt.numel() > 1:
                tgt = tgt[start:start + bs]
            patch, maps, t = _attribute_batch(model, chunk, method, tgt, layerscale_rule, generator)
            out["maps"].append(maps.cpu())
            out["patch"].append(patch.cpu())
            out["target"].append(t.cpu())
    finally:
        model.train(was_training)
    return {k: torch.cat(v) for k, v in out.items()}


def relevance_conservation(model: nn.Module, images: torch.Tensor, layerscale_rule: str = "z",
                           target=None) -> list[dict]:
    """Per rule step: relevance summed at the step's output and at its input, mean over images,
    and the ratio input / output: its mean and its extremes over the images.

    A conserving rule gives ``at_input / at_output = 1``. Rows run from the head down to
    block 0, each named by the site at the step's output (:mod:`.sites`), per block ``i``::

        layer                step                  input
        logits               head Linear           pooled
        blocks.i.resid_post  residual add          resid_mid + mlp_out
        blocks.i.mlp_out     LayerScale ls2        mlp_fc2
        blocks.i.mlp_fc2     fc2                   mlp_act
        blocks.i.mlp_act     GELU, fc1             norm2
        blocks.i.resid_mid   residual add          resid_pre + attn_out
        blocks.i.attn_out    LayerScale ls1        attn_proj
        blocks.i.attn_proj   proj                  heads
        blocks.i.heads       pattern @ v           pattern + v
        blocks.i.pattern     softmax, q @ k^T      q + k
        blocks.i.qkv         qkv Linear            norm1
        blocks.i             the whole block       resid_pre
    """
    check_model(model)
    _check_images(model, images)
    model.eval()
    with torch.no_grad():
        logits, trace = forward_trace(model, images.to(_device(model)))
        record: list = []
        relprop(model, trace, _targets(target, logits), layerscale_rule, record=record)
    rows = []
    for r in record:
        out, inp = r["at_output"].double(), r["at_input"].double()
        ratio = inp / out
        rows.append({"layer": r["layer"], "rule": layerscale_rule, "at_output": float(out.mean()),
                     "at_input": float(inp.mean()), "ratio": float(ratio.mean()),
                     "ratio_min": float(ratio.min()), "ratio_max": float(ratio.max())})
    return rows


# ----------------------------------------------------------------------------- plain reference (one image)


def _gi(f, inputs: list[torch.Tensor], R: torch.Tensor) -> list[torch.Tensor]:
    """Gradient x input: ``X * d(f(X) . stop(R / f(X))) / dX`` for each input."""
    inputs = [x.detach().requires_grad_(True) for x in inputs]
    with torch.enable_grad():
        Z = f(*inputs)
        S = safe_div(R, Z.detach())
        grads = torch.autograd.grad(Z, inputs, S)
    return [x.detach() * g for x, g in zip(inputs, grads)]


def _ref_linear(x, weight, R):
    wp, wn = weight.clamp(min=0), weight.clamp(max=0)
    ra, rb = _gi(lambda a, b: F.linear(a, wp) + F.linear(b, wn), [x.clamp(min=0), x.clamp(max=0)], R)
    return ra + rb


def _ref_add(a, b, R):
    ra, rb = _gi(lambda p, q: p + q, [a, b], R)
    sa, sb, total = ra.sum(), rb.sum(), R.sum()
    return (ra * safe_div(sa.abs(), sa.abs() + sb.abs()) * safe_div(total, sa),
            rb * safe_div(sb.abs(), sa.abs() + sb.abs()) * safe_div(total, sb))


def chefer_reference(model: nn.Module, image: torch.Tensor, target: Optional[int] = None,
                     layerscale_rule: str = "z") -> torch.Tensor:
    """Plain one-image transformer attribution: module by module, rules via autograd.

    Returns the raw (gh, gw) patch map (class-token row of the rollout), the quantity
    :func:`attribute` returns as ``"patch"``.
    """
    check_model(model)
    model.eval()
    image = image.reshape(1, *image.shape[-3:]).to(_device(model))
    # forward, keeping each block's tensors
    acts, attn_maps = [], []
    with torch.enable_grad():
        x = _embed(model, image).detach().requires_grad_(True)
        for blk in model.blocks:
            a = blk.attn
            h1 = blk.norm1(x)
            q, k, v = a.qkv(h1).reshape(1, -1, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            A = torch.softmax(q @ k.transpose(-2, -1) * a.scale, -1)
            attn_maps.append(A)
            o_pre = (A @ v).transpose(1, 2).flatten(2)
            x1 = x + blk.ls1(a.proj(o_pre))
            h2 = blk.norm2(x1)
            g = blk.mlp.act(blk.mlp.fc1(h2))
            x2 = x1 + blk.ls2(blk.mlp.fc2(g))
            acts.append(dict(x=x, h1=h1, q=q, k=k, v=v, A=A, o_pre=o_pre, x1=x1, h2=h2, g=g))
            x = x2
        pooled = model.fc_norm(model.norm(x)[:, 0])
        logits = model.head(pooled)
        cls = int(logits.argmax()) if target is None else int(target)
        grads = torch.autograd.grad(logits[0, cls], attn_maps)
    R = _ref_linear(pooled, model.head.weight, F.one_hot(torch.tensor([cls]), logits.shape[1]).to(pooled))
    Rx = torch.zeros_like(acts[-1]["x"])
    Rx[:, 0] = R
    cams = []
    for blk, t in zip(reversed(model.blocks), reversed(acts)):
        a, C = blk.attn, t["x"].shape[-1]
        with torch.no_grad():
            b2 = blk.ls2(blk.mlp.fc2(t["g"]))
            b1 = blk.ls1(a.proj(t["o_pre"]))
        r_x1, r_b2 = _ref_add(t["x1"].detach(), b2, Rx)
        r = lrp_layerscale(_gamma(blk.ls2, C, r_b2), r_b2, layerscale_rule)
        r = _ref_linear(t["h2"].detach(), blk.mlp.fc1.weight, _ref_linear(t["g"].detach(), blk.mlp.fc2.weight, r))
        r_x1 = r_x1 + r
        r_x, r_b1 = _ref_add(t["x"].detach(), b1, r_x1)
        r = _ref_linear(t["o_pre"].detach(), a.proj.weight, lrp_layerscale(_gamma(blk.ls1, C, r_b1), r_b1, layerscale_rule))
        r = r.reshape(1, -1, a.num_heads, a.head_dim).transpose(1, 2)
        r_A, r_v = [u / 2 for u in _gi(torch.matmul, [t["A"].detach(), t["v"].detach()], r)]
        cams.append(r_A)
        r_q, r_k = [u / 2 for u in _gi(lambda p, kk: p @ kk.transpose(-2, -1), [t["q"].detach(), t["k"].detach()], r_A)]
        r_qkv = torch.cat([u.transpose(1, 2).flatten(2) for u in (r_q, r_k, r_v)], -1)
        Rx = r_x + _ref_linear(t["h1"].detach(), a.qkv.weight, r_qkv)
    cams = cams[::-1]
    N = acts[0]["x"].shape[1]
    joint = torch.eye(N)
    for g, c in zip(grads, cams):
        a_bar = (g * c).clamp(min=0).mean(1)[0]
        joint = (torch.eye(N) + a_bar) @ joint
    return joint[0, model.num_prefix_tokens:].reshape(*model.patch_embed.grid_size).detach().cpu()


# ----------------------------------------------------------------------------- sanity check


def randomized_model(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy with every parameter re-initialised (model-parameter randomisation test,
    Adebayo et al. 2018): each module's own ``reset_parameters`` (Linear, Conv2d,
    LayerNorm, LayerScale), position embedding and class token drawn from N(0, 0.02^2); seeded."""
    rand = copy.deepcopy(model)
    torch.manual_seed(seed)
    for m in rand.modules():
        if hasattr(m, "reset_parameters") and m is not rand:
            m.reset_parameters()
    with torch.no_grad():
        for name in ("pos_embed", "cls_token"):
            p = getattr(rand, name, None)
            if isinstance(p, nn.Parameter):
                p.normal_(0, 0.02)
    return rand.eval()


def spearman_per_image(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Spearman rank correlation between two maps, per image (pixels as observations).

    NaN where either map is constant: its ranks carry no ordering, so the correlation is
    undefined (a constant map must not pass the randomisation test as "uncorrelated")."""
    from scipy.stats import spearmanr

    if a.shape != b.shape:
        raise AttributionError(f"maps of shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    a, b = a.flatten(1).numpy(), b.flatten(1).numpy()
    out = []
    for x, y in zip(a, b):
        rho = spearmanr(x, y).statistic if x.min() < x.max() and y.min() < y.max() else float("nan")
        out.append(float(rho))
    return np.asarray(out, dtype=np.float64)
