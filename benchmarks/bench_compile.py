"""``torch.compile`` (inductor) against the eager model, on the default preset's architecture
(seeded random weights), for the two compute-heavy loops of the default book:

* a training step (forward, backward, AdamW; batch ``train.batch_size``): the dense and the
  trained-sparse runs, 1,641 steps each, and every fine-tuning;
* the forward of the insertion / deletion curves (batch 119 = 7 images x 17 steps): most of the
  model chapter's time.

Besides the speed, each row records what compiling does to the numbers: the largest difference of
the outputs from the eager ones after one step (``max_abs_diff``; 0 means the same to the bit) and
the compile time. The book only adopts a fast path that leaves its numbers unchanged, so a compiled
path that pays but changes the last bits is measured here and not used (see docs/benchmarks.md).
"""
import time

import torch
import torch.nn.functional as F

from impact_core import bench
from impact_core.config import load_config
from impact_core.models import build_model


def _model(cfg, device, train: bool):
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    return model.train() if train else model.eval()


def training_rows(device: str) -> list[dict]:
    cfg = load_config("default")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.train.batch_size, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size,
                    generator=g).to(device)
    y = torch.randint(0, cfg.model.num_classes, (cfg.train.batch_size,), generator=g).to(device)

    def make(compiled: bool):
        model = _model(cfg, device, train=True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        forward = torch.compile(model) if compiled else model

        def step():
            loss = F.cross_entropy(forward(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.detach()

        return model, step

    eager_model, eager_step = make(False)
    compiled_model, compiled_step = make(True)
    start = time.perf_counter()
    compiled_step()  # the first call compiles
    compile_s = time.perf_counter() - start
    eager_step()
    diff = max((a - b).abs().max().item() for a, b in zip(eager_model.parameters(), compiled_model.parameters()))
    ref = bench.best_time(eager_step, repeat=5)
    fast = bench.best_time(compiled_step, repeat=5)
    return [bench.entry("compile: training step, batch 128 (default architecture), inductor vs eager", ref, fast,
                        device, {"max_abs_diff_after_one_step": diff, "compile_s": compile_s,
                                 "threads": torch.get_num_threads()})]


def forward_rows(device: str) -> list[dict]:
    cfg = load_config("default")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(119, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size, generator=g).to(device)
    model = _model(cfg, device, train=False)
    compiled = torch.compile(model)
    with torch.no_grad():
        start = time.perf_counter()
        out = compiled(x)
        compile_s = time.perf_counter() - start
        diff = (out - model(x)).abs().max().item()
        ref = bench.best_time(lambda: model(x), repeat=5)
        fast = bench.best_time(lambda: compiled(x), repeat=5)
    return [bench.entry("compile: insertion / deletion forward, 119 images (default architecture), inductor vs eager",
                        ref, fast, device, {"max_abs_diff": diff, "compile_s": compile_s,
                                            "threads": torch.get_num_threads()})]


def benchmarks(device: str) -> list[dict]:
    return training_rows(device) + forward_rows(device)
