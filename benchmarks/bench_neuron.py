"""Neuron-level fast paths against their references, on the default preset's shapes.

Default preset: 2,000 evaluation images; units = 3 blocks x (256 MLP neurons + 4 heads)
= 780; 10 classes. The rank AUROC replaces 7,800 ``roc_auc_score`` calls (target: 100x).
"""
from __future__ import annotations

import torch

from impact_core.bench import best_time, entry
from impact_core.config import load_config
from impact_core.methods.unit_metrics import (auroc_rank, auroc_reference, class_variance, class_variance_reference,
                                      label_entropy, label_entropy_reference)


def _inputs(device: str):
    cfg = load_config("default")
    m = cfg.model
    units = len(cfg.neuron.blocks) * (int(m.embed_dim * m.mlp_ratio) + m.num_heads)
    n, classes = cfg.neuron.images, m.num_classes
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, classes, (n,), generator=g)
    # GELU-like activations with a class-dependent shift, so the AUROCs are not all 0.5
    shift = torch.randn(classes, units, generator=g)[labels]
    scores = torch.nn.functional.gelu(torch.randn(n, units, generator=g) + shift)
    return scores.to(device), labels.to(device), classes, {"images": n, "units": units, "classes": classes}


def benchmarks(device: str) -> list[dict]:
    scores, labels, classes, shape = _inputs(device)
    ref = best_time(lambda: auroc_reference(scores, labels, classes), repeat=1, warmup=0)
    fast = best_time(lambda: auroc_rank(scores, labels, classes), repeat=5)
    out = [entry("neuron: rank AUROC vs roc_auc_score loop", ref, fast, device, shape, target=100)]
    ref = best_time(lambda: (class_variance_reference(scores, labels, classes),
                             label_entropy_reference(scores, labels, classes)), repeat=1, warmup=0)
    fast = best_time(lambda: (class_variance(scores, labels, classes), label_entropy(scores, labels, classes)),
                     repeat=5)
    out.append(entry("neuron: class variance + label entropy vs loops", ref, fast, device, shape))
    return out
