"""Data parallelism of the training stages over processes (``accelerate launch``, ``torchrun``).

Every process runs the whole recipe on its own copy of the model with the same seed, so each
makes the same choices (which calibration batch, which rows, which timestep); only the rows of
each gradient step are split between them and the gradients summed (the losses of docs/methods.md are means
over rows: each process weights its loss by its share of the rows, so the sum of the gradients
is the gradient of the whole batch, equal to the one-process run up to the order of the sums).
Statistics (calibration recording, activation scales, sensitivity) are computed whole by every
process: they are cheap beside training, and identical inputs give identical results without
a broadcast. Only the main process writes the run directory (runner.py).

One process (no ``WORLD_SIZE`` above 1 in the environment): every function here is a no-op.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: torch.device) -> bool:
    """Join the process group the launcher describes (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``,
    ``MASTER_PORT``): NCCL on CUDA, gloo on the CPU. False when launched as one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def local_device(device: torch.device) -> torch.device:
    """``cuda`` becomes this process's own GPU (``LOCAL_RANK``) under a multi-process launch."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


_step_share = 1.0


def step_share() -> float:
    """This process's share of the rows of the current training step (1.0 for one process).

    LSQ scales its step-size gradient by ``1 / sqrt(values per scale)``, counted over the batch:
    a process holding half the rows divides its count by its share, so its gradient is the one
    of the whole batch (quant/nn/quantizers.py)."""
    return _step_share


def row_share(n: int) -> tuple[torch.Tensor | None, float]:
    """This process's rows of a batch of ``n`` (every ``world``-th, from its rank) and their share
    of the batch; ``(None, 1.0)`` for one process.

    Raises:
        ValueError: fewer rows than processes (a process would have none).
    """
    global _step_share
    world = world_size()
    if world == 1:
        _step_share = 1.0
        return None, 1.0
    if n < world:
        raise ValueError(f"a training batch of {n} rows cannot be split over {world} processes; "
                         f"raise the stage's batch_size to at least {world}")
    idx = torch.arange(rank(), n, world)
    _step_share = idx.numel() / n
    return idx, _step_share


def sum_gradients(params: Any) -> None:
    """Sum each parameter's gradient over the processes (the losses are already weighted by
    their row shares, so the sum is the whole batch's gradient)."""
    if world_size() == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def sum_value(value: float) -> float:
    """``value`` summed over the processes (a share-weighted loss becomes the batch's loss)."""
    if world_size() == 1:
        return value
    on_gpu = dist.get_backend() == "nccl"  # NCCL reduces CUDA tensors only
    t = torch.tensor([value], dtype=torch.float64, device=f"cuda:{torch.cuda.current_device()}" if on_gpu else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t)


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
