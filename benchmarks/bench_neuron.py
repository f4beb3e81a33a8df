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
    out += ablation_benchmarks(device)
    return out


def ablation_benchmarks(device: str) -> list[dict]:
    """``unit_attribution.ablation_jobs`` restarted at each job's block against whole forwards (``restart=False``),
    the default model's shapes (random weights: the cost does not depend on them): 2,000 images in batches of 500,
    the top-4 units of each class mean-ablated at blocks 2, 7 and 11 on the held-out half (a claims-only model,
    clean logits given by the attribution pass), and also on every image (the displayed models' same-image sets)."""
    from impact_core.methods import neuron
    from impact_core.methods.sites import HookedViT, compute_site_means
    from impact_core.models import build_model

    cfg = load_config("default")
    torch.manual_seed(0)
    hooked = HookedViT(build_model(cfg.model).to(device).eval())
    n, b, C, blocks = cfg.neuron.images, cfg.data.batch_size, cfg.model.num_classes, list(cfg.neuron.blocks)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 1, cfg.model.img_size, cfg.model.img_size, generator=g), torch.arange(n) % C
    batches = [(x[i:i + b], y[i:i + b]) for i in range(0, n, b)]
    means = compute_site_means(hooked, batches, hooked.site_names(blocks, ("mlp_act", "heads")), device)
    with torch.no_grad():
        logits = torch.cat([hooked.model(xb.to(device)) for xb, _ in batches])
    clean = (logits.gather(1, y.to(device)[:, None]).squeeze(1), logits.norm(dim=1))
    units = hooked.mlp_dim + hooked.num_heads
    keep = torch.ones(C, units)
    keep[torch.arange(C)[:, None], torch.randint(0, units, (C, cfg.neuron.top_k), generator=g)] = 0
    half = torch.arange(n) % 2 == 0
    out = []
    for label, jobs in (("held-out half (a claims-only model)", [(blk, keep, half) for blk in blocks]),
                        ("held-out and same-image (a displayed model)",
                         [j for blk in blocks for j in ((blk, keep, half), (blk, keep))])):
        run = lambda restart: neuron.ablation_jobs(hooked, batches, means, jobs, C, device, clean=clean,  # noqa: E731
                                                   restart=restart)
        ref, fast = best_time(lambda: run(False), repeat=3), best_time(lambda: run(True), repeat=3)
        out.append(entry(f"neuron: top-K ablations restarted at their block vs whole forwards, {label}", ref, fast,
                         device, {"images": n, "blocks": blocks, "jobs": len(jobs)}))
    return out
