"""Transformer attribution: 32 images in one batched call vs the same 32 one by one.

Default preset's architecture (random weights: timing does not depend on them).
"""
import torch

from impact_core.methods import attribution as attr
from impact_core.bench import best_time, entry
from impact_core.config import load_config
from impact_core.models import build_model

BATCH = 32


def benchmarks(device: str) -> list[dict]:
    cfg = load_config("default")
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).eval()
    m = cfg.model
    images = torch.randn(BATCH, m.in_chans, m.img_size, m.img_size, device=device)

    def batched():
        attr.attribute(model, images, "chefer", batch_size=BATCH)

    def one_by_one():
        for i in range(BATCH):
            attr.attribute(model, images[i:i + 1], "chefer")

    def reference():
        for i in range(BATCH):
            attr.chefer_reference(model, images[i])

    fast = best_time(batched, repeat=3)
    single = best_time(one_by_one, repeat=1)
    ref = best_time(reference, repeat=1, warmup=0)
    config = {"arch": m.arch, "embed_dim": m.embed_dim, "depth": m.depth, "img_size": m.img_size,
              "batch": BATCH, "images_per_s_batched": BATCH / fast, "images_per_s_one_by_one": BATCH / single}
    return [entry("attribution: chefer batch 32 vs one by one", single, fast, device, config, target=5.0),
            entry("attribution: chefer batch 32 vs plain reference", ref, fast, device,
                  dict(config, images_per_s_reference=BATCH / ref))]
