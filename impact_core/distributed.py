"""Data parallelism for the passes over a data set, under ``torchrun``.

With ``WORLD_SIZE > 1`` in the environment (``torchrun --nproc_per_node N ...``), each
process takes every N-th image of a split (:func:`shard`) or of each global batch
(:func:`local_rows`), and partial sums are added across processes with
:func:`all_reduce_sum` (gloo on CPU, NCCL on GPUs). Sum-reducible passes (Wanda
calibration norms, dataset means, accuracy counts) therefore give the single-process
result up to floating-point summation order; per-image passes (neuron attribution
patching, SAE activation streaming, attribution over the validation set) compute their
rows and put the batch back together with :func:`gather_rows`; fine-tuning wraps the model in
DistributedDataParallel, whose averaged gradient of equal local halves equals the
full-batch gradient. Without torchrun every function here is a no-op.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: torch.device | str = "cpu") -> bool:
    """Start the process group when launched by torchrun; return whether it is distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def shard(indices: np.ndarray) -> np.ndarray:
    """This process's share of a list of image indices (every world_size-th one)."""
    return indices[rank()::world_size()]


def local_rows(x: torch.Tensor) -> torch.Tensor:
    """This process's rows of a global batch."""
    return x[rank()::world_size()]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes in place (no-op when not distributed)."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_rows(local: torch.Tensor, total: int) -> torch.Tensor:
    """The global rows back from every process's :func:`local_rows` share, in the original order.

    ``local`` is this process's ``x[rank::world]`` of a ``total``-row tensor (or anything
    computed row by row from it); every process gets the full ``(total, ...)`` tensor.
    """
    W = world_size()
    if W == 1:
        return local
    sizes = [len(range(r, total, W)) for r in range(W)]
    if local.shape[0] != sizes[rank()]:
        raise ValueError(f"gather_rows: rank {rank()} has {local.shape[0]} rows, expected {sizes[rank()]}")
    pad = torch.zeros((sizes[0], *local.shape[1:]), dtype=local.dtype, device=local.device)
    pad[:local.shape[0]] = local
    parts = [torch.empty_like(pad) for _ in range(W)]
    dist.all_gather(parts, pad.contiguous())
    out = torch.empty((total, *local.shape[1:]), dtype=local.dtype, device=local.device)
    for r, part in enumerate(parts):
        out[r::W] = part[:sizes[r]]
    return out


def gather_objects(obj) -> list:
    """Every process's ``obj`` (picklable, e.g. CPU tensors), in rank order; ``[obj]`` alone."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
