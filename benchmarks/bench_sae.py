"""BatchTopK SAE training throughput (activations per second), one full optimiser step each.

Reference: the plain step (decoder as a dense ``f @ W_dec`` over all latents; aux-k loss by
gathering the dead latents). Fast: the same step with the sparse decoder (``embedding_bag`` over
the ``k * B`` kept latents only) and the aux-k loss as an ``embedding_bag`` over the chosen rows. Same seeded inputs and initial weights for both. Shapes: the default
preset's SAE (64-d residual, x8, k=16, batch 256) and the paper's (768-d CLS residual,
x32 = 24,576 latents, k=128; batch 4096 on a GPU, 256 and 2 steps on the CPU to keep the
run short). On the shared 2-core CPU (noisy): dense wins at the default shape (512 latents,
k=16), sparse mostly wins at the paper's (24,576 latents, k=128); ``sae.choose_decode_impl``
follows that. No target is set: the entry reports throughput.
"""
import torch

from impact_core.methods import sae as S
from impact_core.bench import best_time, entry
from impact_core.config import load_config

STEPS = 5  # steps per timed call (2 for the paper shape on the CPU)


def _throughput(d, expansion, k, batch, device, impl, steps):
    torch.manual_seed(0)
    sae = S.BatchTopKSAE(d, d * expansion, k, decode_impl=impl).to(device)
    x = torch.randn(batch, d, device=device)
    sae.init_from_batch(x, True)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)

    def run():
        for _ in range(steps):
            S.train_step(sae, opt, x, aux_coefficient=1 / 32, aux_k=min(4 * k, d * expansion), dead_after_steps=2)

    return best_time(run, repeat=3)


def benchmarks(device: str) -> list[dict]:
    default = load_config("default").sae
    paper = load_config("paper", {"data.root": "/tmp", "model.checkpoint": None}).sae
    shapes = [("default preset", load_config("default").model.embed_dim, default.expansion, default.k,
               default.batch_size),
              ("paper", 768, paper.expansion, paper.k, paper.batch_size if device.startswith("cuda") else 256)]
    out = []
    for label, d, expansion, k, batch in shapes:
        steps = STEPS if label != "paper" or device.startswith("cuda") else 2
        ref = _throughput(d, expansion, k, batch, device, "dense", steps)
        fast = _throughput(d, expansion, k, batch, device, "sparse", steps)
        config = {"d": d, "latents": d * expansion, "k": k, "batch": batch, "steps_timed": steps,
                  "activations_per_s_reference": steps * batch / ref,
                  "activations_per_s_fast": steps * batch / fast,
                  "train_sae_uses": S.choose_decode_impl(d * expansion, k),
                  "aux": "latents silent for 2 steps count as dead, so the aux-k path is timed too"}
        out.append(entry(f"sae: train step, sparse vs dense decoder ({label})", ref / steps, fast / steps,
                         device, config))
    out.append(_floor_row(device, shapes[0]))
    return out


def _floor_row(device, shape, steps: int = 50) -> dict:
    """BatchTopK ranking only the entries above ``TOPK_FLOOR`` x the last step's smallest kept one (the
    training path) against ranking the whole batch (``floor_factor=None``); the same SAE to the bit
    (tests/test_sae.py). Seeded activations drawn afresh each step, the decoder ``train_sae`` uses."""
    label, d, expansion, k, batch = shape
    rows = torch.randn(20 * batch, d, generator=torch.Generator().manual_seed(0)).to(device)

    def timed(floor_factor):
        sae = S.BatchTopKSAE(d, d * expansion, k, seed=0, decode_impl=S.choose_decode_impl(d * expansion, k)).to(device)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
        batches = S.buffered_batches(rows, batch, seed=0)
        sae.init_from_batch(next(batches), True)

        def run():
            for _ in range(steps):
                S.train_step(sae, opt, next(batches), aux_coefficient=1 / 32, aux_k=4 * k, dead_after_steps=50,
                             floor_factor=floor_factor)

        return best_time(run, repeat=3)

    ref, fast = timed(None), timed(S.TOPK_FLOOR)
    config = {"d": d, "latents": d * expansion, "k": k, "batch": batch, "steps_timed": steps,
              "floor_factor": S.TOPK_FLOOR}
    return entry(f"sae: train step, BatchTopK above the last step's floor vs the whole batch ({label})",
                 ref / steps, fast / steps, device, config)
