"""Numerical precision of the forward-only passes: fp32 (default) or bf16 autocast.

``precision: bf16`` in a preset runs these passes under ``torch.autocast(dtype=bfloat16)``
(on a GPU the matrix products then use the bf16 tensor cores; on a CPU it works, but on
one without bf16 instructions, like the 2-core project machine, the DeiT-III B/16 forward
is about 4x slower than fp32: ``make bench``):

    accuracy evaluation          models.evaluate
    Wanda calibration norms      pruning.input_norms     (sums kept in float64)
    dataset means                sites.compute_site_means (sums kept in float64)
    SAE activation streaming     sae.activation_chunks   (activations returned as float32)

Everything that takes gradients or thresholds them stays fp32: training and fine-tuning,
circuit mask training (Heaviside masks), neuron attribution patching and ablation, and the
attribution maps (LRP relevance). Tolerances of bf16 against fp32, asserted by
tests/test_precision.py on a small seeded model:

    top-1 accuracy               within 1 point; >= 98 % of predictions identical
    calibration norms            relative error <= 1e-2 per feature
    Wanda masks                  >= 99 % of weights get the same keep / prune decision
    dataset means                |error| <= 2e-2 x the site's largest |mean|
    SAE activations              relative Frobenius error <= 1e-2

With bf16 every cache key also records the precision, so fp32 and bf16 results never mix.
"""
from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def autocast(device, precision: str = "fp32"):
    """``torch.autocast`` to bfloat16 on ``device`` for ``precision == 'bf16'``, else nothing."""
    if check_precision(precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
