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
    return out
