"""Circuit masks: 10 classes trained in one batched forward vs the class-by-class loop.

Same model (the default preset's architecture, seeded random weights), same per-class
image sets, same hyper-parameters; ``reference`` = :func:`train_masks_sequential`,
``fast`` = :func:`train_masks`. Target (issue 5): at least 3x at the default preset's
``circuit.batch_size`` (8 images per class and step), the setting the chapter trains with.

Both paths do the same floating-point work; the batched one saves only per-step costs
(dispatch, hooks, optimiser, many small kernels) and runs larger kernels that use both
cores, so the ratio falls as the per-class step grows. The rows at 16 and 32 images per
class show that dependence (on the 2-core machine about 4x at 8, 3x at 16, 2x at 32).
A GPU, where one batched step costs about as much as a small one, is where the batching
pays most.
"""
import numpy as np
import torch

from impact_core import bench
from impact_core.methods import circuits as C
from impact_core.config import load_config
from impact_core.data import InMemoryImages, Split
from impact_core.models import build_model
from impact_core.methods.sites import PAPER_SITES, HookedViT, compute_site_means

CLASSES = 10
PER_CLASS = 32  # positives per class (same number of negatives): 64 images per class


def setup(device: str):
    cfg = load_config("default")
    torch.manual_seed(0)
    hooked = HookedViT(build_model(cfg.model).to(device).eval())
    rng = np.random.default_rng(0)
    n = CLASSES * PER_CLASS * 2
    labels = np.arange(n) % CLASSES
    images = rng.integers(0, 256, size=(n, cfg.model.img_size, cfg.model.img_size), dtype=np.uint8)
    split = Split("bench", InMemoryImages(images, labels, cfg.model.mean, cfg.model.std), np.arange(n),
                  list(range(CLASSES)))
    x = split.dataset.images[:256].to(device)
    means = compute_site_means(hooked, [(x, None)], hooked.site_names(sites=PAPER_SITES), device=device,
                               desc="bench means")
    data = C.ClassSets(split, list(range(CLASSES)), PER_CLASS, seed=0, what="bench")
    kwargs = dict(k=cfg.circuit.k_dense, epochs=1, lr=cfg.circuit.lr, step_size=cfg.circuit.step_size,
                  gamma=cfg.circuit.step_gamma, batch_size=cfg.circuit.batch_size, tau=cfg.circuit.tau, seed=0,
                  device=device, progress=False)
    return cfg, hooked, means, data, kwargs


def benchmarks(device: str) -> list[dict]:
    """One row per images-per-class batch: the default preset's ``circuit.batch_size`` (the
    chapter's setting) carries the issue's 3x target; 16 and 32 show how the ratio depends on
    the per-step work."""
    cfg, hooked, means, data, kwargs = setup(device)
    chapter = cfg.circuit.batch_size
    rows = []
    for batch in dict.fromkeys((chapter, 16, 32)):
        kw = dict(kwargs, batch_size=batch)
        fast = bench.best_time(lambda: C.train_masks(hooked, means, data, **kw), repeat=3)
        ref = bench.best_time(lambda: C.train_masks_sequential(hooked, means, data, **kw), repeat=3)
        config = {"classes": CLASSES, "images_per_class": 2 * PER_CLASS, "batch_per_class": batch,
                  "steps": C.steps_per_epoch(2 * PER_CLASS, batch), "model": "default preset architecture",
                  "embed_dim": cfg.model.embed_dim, "depth": cfg.model.depth, "threads": torch.get_num_threads()}
        setting = " (the chapter's circuit.batch_size)" if batch == chapter else ""
        rows.append(bench.entry(f"circuit masks: 10 classes batched vs sequential, {batch} images per class and "
                                f"step{setting}", ref, fast, device, config, target=3.0 if batch == chapter else None))
    rows.append(plain_row(device, hooked, means, data, dict(kwargs, batch_size=chapter)))
    return rows


def plain_row(device: str, hooked, means, data, kw) -> dict:
    """The batched path's mask step (all sites' logits in one tensor: one Heaviside, node count, AdamW
    and clamp; head masks as channel masks and q, k, v masked on the fused qkv output) against its
    readable per-site reference (``train_masks(plain=True)``: one mask, ``mean_ablate`` hook, optimiser
    update and clamp per site; the same circuits to float rounding: tests/test_circuits.py)."""
    ref = bench.best_time(lambda: C.train_masks(hooked, means, data, plain=True, **kw), repeat=3)
    fast = bench.best_time(lambda: C.train_masks(hooked, means, data, **kw), repeat=3)
    config = {"classes": CLASSES, "images_per_class": 2 * PER_CLASS, "batch_per_class": kw["batch_size"],
              "sites": len(hooked.site_names(sites=PAPER_SITES)), "threads": torch.get_num_threads()}
    return bench.entry("circuit masks: one flat logit tensor and channel-layout masks vs the per-site reference "
                       "(batched path, the chapter's batch)", ref, fast, device, config)


if __name__ == "__main__":
    import sys

    for row in benchmarks(sys.argv[1] if len(sys.argv) > 1 else "cpu"):
        print(bench.format_row(row), row["config"])
