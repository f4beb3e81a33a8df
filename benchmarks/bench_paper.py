"""The paper architecture (DeiT-III B/16, random weights) on the current device.

* Throughput: images/s of the plain timm forward, of the forward with every named site
  hooked (nothing captured; ratio = 1 / overhead) and under bf16 autocast.
* Peak memory of each pass over a data set, for ``n`` and ``2n`` images: a streaming pass
  holds one batch at a time, so its peak does not grow with the number of images
  (ratio = peak(n) / peak(2n), target >= 0.8). On a GPU the peak is
  ``torch.cuda.max_memory_allocated``; on the CPU it is the largest growth of the resident
  set above its start (sampled every millisecond) in a fresh process that runs only that pass.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import torch

from impact_core import bench
from impact_core.methods import neuron, pruning
from impact_core.config import REPO_ROOT, load_config
from impact_core.models import build_model
from impact_core.precision import autocast
from impact_core.methods.sae import activation_chunks
from impact_core.methods.sites import ALL_SITES, HookedViT, compute_site_means


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


def peak_mb(fns: dict, name: str, n: int, device: str, batch: int) -> float:
    """Peak memory of the pass ``fns[name]`` over ``n`` images, in MB above what the model itself takes."""
    if device.startswith("cuda"):
        fn = fns[name]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(n)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    # CPU: a fresh process runs only this pass (forking a process that has used OpenMP can hang)
    out = subprocess.run([sys.executable, __file__, "--peak", name, str(n), str(batch)], capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    return max(float(out.stdout.strip().splitlines()[-1]), 1e-3)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_child(name: str, n: int, batch: int) -> float:
    """Largest resident-set growth above the start of the pass, sampled every millisecond."""
    hooked = _model("cpu")
    fn = passes(hooked, "cpu", batch)[name]
    start, peak, done = _rss_mb(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        fn(n)
    finally:
        done.set()
        sampler.join()
    return max(peak[0], _rss_mb()) - start


def _model(device: str) -> HookedViT:
    torch.manual_seed(0)
    return HookedViT(build_model(load_config("paper").model).to(device).eval())


def benchmarks(device: str) -> list[dict]:
    hooked = _model(device)
    model = hooked.model
    batch = 64 if device.startswith("cuda") else 4
    x = torch.randn(batch, 3, 224, 224, device=device)
    config = {"model": load_config("paper").model.arch, "batch": batch, "threads": torch.get_num_threads()}
    rows = []
    with torch.no_grad():
        plain = bench.best_time(lambda: model(x), repeat=3)
        with hooked.hooks({n: (lambda a: None) for n in hooked.site_names(sites=ALL_SITES)}):
            hooked_s = bench.best_time(lambda: model(x), repeat=3)
        with autocast(device, "bf16"):
            bf16 = bench.best_time(lambda: model(x), repeat=3)
    rows.append(bench.entry(f"paper architecture: images/s plain {batch / plain:.1f}, every site hooked "
                            f"{batch / hooked_s:.1f} (ratio = 1 / overhead)", plain, hooked_s, device, config,
                            target=1 / 1.15))
    rows.append(bench.entry(f"paper architecture: images/s fp32 {batch / plain:.1f}, bf16 autocast "
                            f"{batch / bf16:.1f}", plain, bf16, device, config))
    n = 2 * batch if not device.startswith("cuda") else 4 * batch
    fns = passes(hooked, device, batch)
    for name in fns:
        small, large = peak_mb(fns, name, n, device, batch), peak_mb(fns, name, 2 * n, device, batch)
        rows.append(bench.entry(f"peak memory: {name}, {n} vs {2 * n} images (MB)", small, large, device,
                                {**config, "images": [n, 2 * n]}, target=0.8, unit="MB"))
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["--peak"]:
        print(_peak_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
        sys.exit(0)
    for row in benchmarks(sys.argv[1] if len(sys.argv) > 1 else "cpu"):
        print(bench.format_row(row), row["config"])
