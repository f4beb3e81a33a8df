"""The trained-sparse model's L0 projection, run after every optimiser step (1,641 steps in the
default book): the k-th-value threshold of :func:`magnitude_mask` against the stable sort it
replaced (``torch.sort(|W|, stable=True)``; both equal the plain reference, tested), on every
block Linear of the default preset's architecture (seeded random weights), at 70% sparsity.
"""
import torch

from impact_core import bench
from impact_core.config import load_config
from impact_core.methods.pruning import prunable_linears
from impact_core.methods.sparse_training import kept_weights, magnitude_mask
from impact_core.models import build_model

SPARSITY = 0.7


def sort_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The projection's mask by a full stable sort (the eager path before the threshold)."""
    k = kept_weights(weight.numel(), sparsity)
    order = torch.sort(weight.abs().flatten(), descending=True, stable=True).indices[:k]
    keep = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
    keep[order] = True
    return keep.view_as(weight)


def benchmarks(device: str) -> list[dict]:
    cfg = load_config("default")
    torch.manual_seed(0)
    weights = [lin.weight.detach().to(device) for lin in prunable_linears(build_model(cfg.model)).values()]
    for w in weights:
        assert torch.equal(sort_mask(w, SPARSITY), magnitude_mask(w, SPARSITY))
    ref = bench.best_time(lambda: [sort_mask(w, SPARSITY) for w in weights], repeat=5)
    fast = bench.best_time(lambda: [magnitude_mask(w, SPARSITY) for w in weights], repeat=5)
    return [bench.entry(f"sparse training: L0 projection of {len(weights)} matrices, k-th value vs stable sort "
                        "(default architecture, 70%)", ref, fast, device,
                        {"matrices": len(weights), "sparsity": SPARSITY, "threads": torch.get_num_threads()})]
