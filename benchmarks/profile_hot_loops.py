"""Where the time of the default book's hot loops goes (issue "Performance": find the time first).

``python benchmarks/profile_hot_loops.py [cpu|cuda]`` runs a few steps of each hot loop on the
default preset's architecture (seeded random weights) under ``torch.profiler`` and prints, per
loop, the time per step and the share of the five most expensive operators, and the share of
time in matrix products and attention: a loop dominated by them is compute-bound (a compiler can
win little there); one spread over many small operators is overhead-bound (fusing, batching or
compiling pays). Not a benchmark with a target (``make bench`` holds those): a map for choosing
the levers.
"""
from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

HERE = __import__("pathlib").Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # bench_circuits' set-up; the package

COMPUTE = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product", "aten::linear", "aten::matmul")


def profile(name: str, step, steps: int = 5, warmup: int = 2) -> dict:
    for _ in range(warmup):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - start) / steps
    rows = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
    total = sum(t for _, t in rows) or 1.0
    rows.sort(key=lambda r: -r[1])
    compute = sum(t for k, t in rows if k.startswith(COMPUTE)) / total
    calls = sum(e.count for e in prof.key_averages()) / steps
    out = {"loop": name, "ms_per_step": 1000 * wall, "compute_share": compute, "ops_per_step": calls,
           "top": [(k, t / total) for k, t in rows[:5]]}
    print(f"\n== {name}: {out['ms_per_step']:.0f} ms per step, {calls:.0f} operator calls per step, "
          f"{compute:.0%} of operator time in matrix products / attention")
    for k, share in out["top"]:
        print(f"   {share:6.1%}  {k}")
    return out


def dense_training_step(device: str):
    from impact_core.config import load_config
    from impact_core.models import build_model

    cfg = load_config("default")
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(cfg.train.batch_size, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size, device=device)
    y = torch.randint(0, cfg.model.num_classes, (cfg.train.batch_size,), device=device)

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def circuit_epoch(device: str):
    import bench_circuits

    from impact_core.methods import circuits

    _, hooked, means, data, kwargs = bench_circuits.setup(device)
    return lambda: circuits.train_masks(hooked, means, data, **kwargs)


def chefer_batch(device: str):
    from impact_core.config import load_config
    from impact_core.methods import attribution
    from impact_core.models import build_model

    cfg = load_config("default")
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).eval()
    x = torch.randn(cfg.attribution.batch_size, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size,
                    device=device)
    return lambda: attribution.attribute(model, x, "chefer", batch_size=cfg.attribution.batch_size)


def insertion_deletion_batch(device: str):
    from impact_core.config import load_config
    from impact_core.methods import perturbation
    from impact_core.models import build_model

    cfg = load_config("default")
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).eval()
    n = cfg.attribution.batch_size
    x = torch.randn(n, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size, device=device)
    maps = torch.rand(n, cfg.model.img_size, cfg.model.img_size, device=device)
    target = torch.zeros(n, dtype=torch.long, device=device)
    start, fill = perturbation.substitutes(x, cfg.model.mean, cfg.model.std, "black")
    return lambda: perturbation.insertion_deletion(model, x, maps, target, cfg.attribution.steps, fill,
                                                   batch_size=4 * n, insertion_start=start)


LOOPS = {"dense training step (batch 128)": dense_training_step,
         "circuit masks, one epoch (10 classes, 64 images each)": circuit_epoch,
         "Chefer attribution, one batch of 32": chefer_batch,
         "insertion + deletion curves, 32 images": insertion_deletion_batch}


if __name__ == "__main__":
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    print(f"{torch.get_num_threads()} threads, device {device}")
    for name, make in LOOPS.items():
        profile(name, make(device), steps=3 if "epoch" in name else 5)
