"""Models: the DeiT-III-style small ViT (embedded default) and timm's DeiT-III B/16.

Both are timm ``VisionTransformer``s with the DeiT-III traits the methods rely on:
LayerScale (``init_values``), a class token, ``no_embed_class=True`` (position
embedding added to patches only), a fused ``qkv`` Linear and 12 blocks, so the
paper's early / middle / late blocks 2 / 7 / 11 keep their meaning.

An architecture is one :func:`register_architecture` declaration: the timm model name
(``small_deit3`` is registered in timm's own registry, so ``timm.create_model("small_deit3")``
builds it), whether the project trains it (``trained_here``) or loads ``model.checkpoint``, and
the ``timm.create_model`` arguments it takes from the ``model:`` section.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import timm
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer
from tqdm.auto import tqdm

from dataclasses import dataclass
from typing import Callable

from .config import Config, ModelConfig, ConfigError
from .data import Batches, Split
from .precision import autocast
from .distributed import all_reduce_sum, gather_rows, local_rows, world_size

log = logging.getLogger("impact_core")


class CheckpointError(FileNotFoundError):
    """A model checkpoint is missing or does not fit the architecture."""


@register_model
def small_deit3(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The project's DeiT-III-style ViT (LayerScale, class token, position embedding on patches
    only); its size comes from ``kwargs`` (the ``model:`` section)."""
    if pretrained:
        raise ValueError("small_deit3 has no pretrained weights: the project trains it")
    for timm_only in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # create_model's own
        kwargs.pop(timm_only, None)
    return VisionTransformer(**{"qkv_bias": True, "class_token": True, "no_embed_class": True,
                                "global_pool": "token", **kwargs})


@dataclass(frozen=True)
class Architecture:
    """name: a timm model name; trained_here: trained by :func:`train_dense` (else loaded from
    ``model.checkpoint``); kwargs: its ``timm.create_model`` arguments from the ``model:`` section."""

    name: str
    trained_here: bool
    kwargs: Callable[[ModelConfig], dict]


ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(name: str, trained_here: bool, kwargs: Callable[[ModelConfig], dict]) -> Architecture:
    if name in ARCHITECTURES:
        raise ValueError(f"architecture {name!r} is already registered")
    ARCHITECTURES[name] = Architecture(name, trained_here, kwargs)
    return ARCHITECTURES[name]


register_architecture("small_deit3", trained_here=True, kwargs=lambda m: dict(
    img_size=m.img_size, patch_size=m.patch_size, in_chans=m.in_chans, num_classes=m.num_classes,
    embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
    init_values=m.init_values))
register_architecture("deit3_base_patch16_224", trained_here=False, kwargs=lambda m: dict(num_classes=m.num_classes))


def architecture(mcfg: ModelConfig) -> Architecture:
    try:
        return ARCHITECTURES[mcfg.arch]
    except KeyError:
        raise ConfigError(f"model.arch: unknown architecture {mcfg.arch!r}; registered: {list(ARCHITECTURES)}") from None


def build_model(mcfg: ModelConfig) -> VisionTransformer:
    """An untrained model of the configured architecture (weights not loaded).

    Attention always takes the fused path (``F.scaled_dot_product_attention``), whatever
    ``TIMM_FUSED_ATTN`` says: no forward through the model needs the attention probabilities;
    the attribution chapter, which does, computes them in :func:`attribution.forward_trace`.
    """
    model = timm.create_model(mcfg.arch, pretrained=False, **architecture(mcfg).kwargs(mcfg))
    for blk in model.blocks:
        blk.attn.fused_attn = True
    return model


def check_checkpoint(mcfg: ModelConfig) -> None:
    """Fail fast when the configured checkpoint file is absent."""
    if not architecture(mcfg).trained_here and not mcfg.checkpoint:
        raise CheckpointError(f"model.checkpoint: {mcfg.arch} needs a local checkpoint file (no downloads here)")
    if mcfg.checkpoint and not Path(mcfg.checkpoint).is_file():
        raise CheckpointError(f"model.checkpoint: file not found: {mcfg.checkpoint}")


def load_checkpoint(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Load a state dict (plain, or under a 'model' / 'state_dict' key, as DeiT releases ship it)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise CheckpointError(f"checkpoint {path} could not be read: {err}") from err
    for key in ("model", "state_dict", "model_state"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise CheckpointError(f"checkpoint {path} does not fit the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}")
    model.load_state_dict(state)
    return model


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: Split, batch_size: int = 256,
             device: torch.device | str = "cpu", desc: str = "evaluate", precision: str = "fp32") -> dict:
    """Top-1 and top-5 accuracy on a split, and ``correct`` (N,) bool: whether each image's
    top-1 prediction is right (the unit the accuracy claims bootstrap over).
    ``precision``: see :mod:`impact_core.precision`."""
    model.eval()
    correct = []
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # top-1, top-5, images
    for images, labels in tqdm(Batches(split, batch_size), desc=desc, leave=False):
        n = labels.numel()
        images, labels = local_rows(images), local_rows(labels)  # under torchrun: this process's rows
        with autocast(device, precision):
            logits = model(images.to(device))
        labels = labels.to(device)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        counts[0] += (top[:, 0] == labels).sum()
        counts[1] += (top == labels[:, None]).any(1).sum()
        counts[2] += labels.numel()
        correct.append(gather_rows((top[:, 0] == labels).to(torch.uint8), n).cpu().bool())
    correct1, correct5, total = all_reduce_sum(counts).tolist()
    return {"top1": correct1 / total, "top5": correct5 / total, "images": int(total),
            "correct": torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool)}


def train_classifier(model: torch.nn.Module, split: Split, *, images: int, batch_size: int, lr: float,
                     weight_decay: float, warmup_fraction: float = 0.05, label_smoothing: float = 0.0,
                     seed: int = 0, device: torch.device | str = "cpu", after_step=None,
                     desc: str = "train") -> list[float]:
    """AdamW with linear warm-up and cosine decay over ``images`` training images.

    ``after_step(model)`` runs after every optimiser step (pruning uses it to re-apply masks).
    Returns the loss of every step. Deterministic on CPU for a given seed. Under torchrun
    each process takes its rows of every global batch and DistributedDataParallel averages
    the gradients (equal to the full-batch gradient when the batch divides evenly).
    """
    if len(split) < batch_size:  # every batch would be partial and skipped: the loop would never end
        raise ValueError(f"{desc}: the {split.name} split has {len(split)} images, fewer than one batch of "
                         f"{batch_size}; lower the batch size (train.batch_size / pruning.finetune_batch_size)")
    torch.manual_seed(seed)
    model.train().to(device)
    forward = model
    if world_size() > 1:
        forward = torch.nn.parallel.DistributedDataParallel(model)
    steps = max(1, math.ceil(images / batch_size))
    params_decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embed" not in n]
    params_other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "pos_embed" not in n)]
    # foreach: one update kernel per operation over all tensors (about 150) instead of one per tensor; the
    # same numbers as the plain per-tensor loop, bit for bit (tests/test_models.py)
    opt = torch.optim.AdamW([{"params": params_decay, "weight_decay": weight_decay},
                             {"params": params_other, "weight_decay": 0.0}], lr=lr, foreach=True)
    warm = max(1, int(warmup_fraction * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    losses: list[float] = []
    epoch = 0
    bar = tqdm(total=steps, desc=desc, leave=False)
    while len(losses) < steps:
        for x, y in Batches(split, batch_size, shuffle=True, seed=seed * 1000 + epoch):
            if len(x) < batch_size:
                continue
            x, y = local_rows(x), local_rows(y)
            loss = F.cross_entropy(forward(x.to(device)), y.to(device), label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if after_step is not None:
                after_step(model)
            losses.append(loss.item())
            bar.update(1)
            if len(losses) % 50 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
            if len(losses) >= steps:
                break
        epoch += 1
    bar.close()
    model.eval()
    return losses


def train_dense(cfg: Config, splits: dict[str, Split], device: torch.device | str = "cpu", after_step=None,
                desc: str = "train dense"):
    """Train the small DeiT-III-style model from scratch on the training split.

    ``after_step``: None, or ``after_step(steps) -> hook`` that builds the trainer's after-step
    hook once the number of optimiser steps is known (the trained-sparse model's L0 projection)."""
    if not architecture(cfg.model).trained_here:
        raise ConfigError(f"model.arch={cfg.model.arch} is not trained here; it is loaded from model.checkpoint")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).to(device)
    t = cfg.train
    images = int(t.epochs * len(splits["train"]))
    hook = None if after_step is None else after_step(max(1, math.ceil(images / t.batch_size)))
    losses = train_classifier(model, splits["train"], images=images, batch_size=t.batch_size, lr=t.lr,
                              weight_decay=t.weight_decay, warmup_fraction=t.warmup_fraction,
                              label_smoothing=t.label_smoothing, seed=cfg.seed, device=device,
                              after_step=hook, desc=desc)
    return model, losses
