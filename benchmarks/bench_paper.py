"""The paper architecture (DeiT-III B/16, random weights) on the current device.

* Throughput: images/s of the plain timm forward and of the forward with every named site
  hooked (nothing captured); ratio = overhead.
* Peak memory of each pass over a data set, for ``n`` and ``2n`` images: a streaming pass
  holds one batch at a time, so its peak does not grow with the number of images
  (ratio = peak(n) / peak(2n), target >= 0.8). On a GPU the peak is
  ``torch.cuda.max_memory_allocated``; on the CPU it is the growth of the resident set
  (``ru_maxrss``) of a forked process that runs only that pass.
"""
from __future__ import annotations

import multiprocessing as mp
import resource

import numpy as np
import torch

from impact_core import bench, neuron, pruning
from impact_core.config import load_config
from impact_core.models import build_model
from impact_core.sae import activation_chunks
from impact_core.sites import ALL_SITES, HookedViT, compute_site_means


def batches(n_images: int, batch: int, device: str):
    g = torch.Generator().manual_seed(0)
    for start in range(0, n_images, batch):
        b = min(batch, n_images - start)
        yield torch.randn(b, 3, 224, 224, generator=g), torch.randint(0, 1000, (b,), generator=g)


def passes(hooked: HookedViT, device: str, batch: int) -> dict:
    """name -> function(n_images) running that pass over n random images."""
    names = hooked.site_names(sites=ALL_SITES)
    means = {n: torch.zeros(197, *hooked.unit_shape(n)) for n in hooked.site_names([11], ["mlp_act", "heads"])}
    return {
        "Wanda calibration norms": lambda n: pruning.input_norms(hooked.model, batches(n, batch, device), device),
        "dataset means, every site": lambda n: compute_site_means(hooked, batches(n, batch, device), names, device),
        "neuron attribution pass, block 11": lambda n: neuron.attribution_pass(
            hooked, batches(n, batch, device), means, [11], 1000, device),
        "SAE activation streaming, all tokens": lambda n: sum(
            c.shape[0] for c in activation_chunks(hooked, batches(n, batch, device), "blocks.11.resid_post", "all",
                                                  device)),
    }


def _child(fn, n, conn):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn(n)
    conn.send((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) / 1024)  # kB -> MB
    conn.close()


def peak_mb(fn, n: int, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(n)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(fn, n, send))
    proc.start()
    value = recv.recv()
    proc.join()
    return max(float(value), 1e-3)


def benchmarks(device: str) -> list[dict]:
    cfg = load_config("paper")
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).eval()
    hooked = HookedViT(model)
    batch = 64 if device.startswith("cuda") else 4
    x = torch.randn(batch, 3, 224, 224, device=device)
    config = {"model": cfg.model.arch, "batch": batch, "threads": torch.get_num_threads()}
    rows = []
    with torch.no_grad():
        plain = bench.best_time(lambda: model(x), repeat=3)
        with hooked.hooks({n: (lambda a: None) for n in hooked.site_names(sites=ALL_SITES)}):
            hooked_s = bench.best_time(lambda: model(x), repeat=3)
    rows.append(bench.entry(f"paper architecture: images/s plain {batch / plain:.1f}, every site hooked "
                            f"{batch / hooked_s:.1f} (overhead)", plain, hooked_s, device, config))
    n = 2 * batch if not device.startswith("cuda") else 4 * batch
    for name, fn in passes(hooked, device, batch).items():
        small, large = peak_mb(fn, n, device), peak_mb(fn, 2 * n, device)
        rows.append(bench.entry(f"peak memory: {name}, {n} vs {2 * n} images (MB)", small, large, device,
                                {**config, "images": [n, 2 * n]}, target=0.8, unit="MB"))
    return rows


if __name__ == "__main__":
    import sys

    for row in benchmarks(sys.argv[1] if len(sys.argv) > 1 else "cpu"):
        print(bench.format_row(row), row["config"])
