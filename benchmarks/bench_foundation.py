"""Foundation benchmarks: hook overhead of the named sites, and the pruning mask fast path."""
from __future__ import annotations

import torch

from impact_core.bench import best_time, entry
from impact_core.config import load_config
from impact_core.models import build_model
from impact_core.methods.pruning import row_mask, row_mask_reference
from impact_core.methods.sites import ALL_SITES, HookedViT


def benchmarks(device: str) -> list[dict]:
    torch.manual_seed(0)
    cfg = load_config("default")
    model = build_model(cfg.model).to(device).eval()
    hooked = HookedViT(model)
    x = torch.randn(256, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size, device=device)
    names = hooked.site_names(sites=ALL_SITES)
    conf = {"preset": "default", "batch": 256, "sites": len(names)}
    out = []

    @torch.no_grad()
    def plain():
        model(x)

    @torch.no_grad()
    def hooked_noop():
        with hooked.hooks({n: (lambda a: None) for n in names}):
            model(x)

    sums = {}

    @torch.no_grad()
    def hooked_means():
        def add(name):
            def fn(a):
                s = a.sum(0, dtype=torch.float64)
                sums[name] = sums[name] + s if name in sums else s
            return fn
        with hooked.hooks({n: add(n) for n in names}):
            model(x)

    t_plain = best_time(plain, repeat=5)
    t_noop = best_time(hooked_noop, repeat=5)
    t_means = best_time(hooked_means, repeat=5)
    # ratio = plain / hooked: 1 / overhead. Targets: overhead <= 1.15x (no capture), <= 2x (means).
    out.append(entry("sites: all hooked, nothing captured (vs plain timm)", t_plain, t_noop, device,
                     {**conf, "overhead": t_noop / t_plain}, target=1 / 1.15))
    out.append(entry("sites: dataset means accumulated (vs plain timm)", t_plain, t_means, device,
                     {**conf, "overhead": t_means / t_plain}, target=1 / 2.0))

    score = torch.rand(4 * cfg.model.embed_dim, cfg.model.embed_dim, generator=torch.Generator().manual_seed(0))
    t_ref = best_time(lambda: row_mask_reference(score, 0.7), repeat=1, warmup=0)
    t_fast = best_time(lambda: row_mask(score, 0.7), repeat=5)
    out.append(entry("pruning: per-row mask, torch.sort vs Python sort", t_ref, t_fast, "cpu",
                     {"shape": list(score.shape), "sparsity": 0.7}))
    return out
