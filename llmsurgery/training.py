"""What the trained passes (kv-compress, heal) share: the learning-rate schedule, the batch order, the step."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from . import data_parallel


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over the first 10% of `steps`, then cosine decay to zero; call `.step()` once per step."""
    warmup = max(1, steps // 10)

    def factor(s: int) -> float:
        return min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def cycled_batch(windows: torch.Tensor, step: int, batch_size: int) -> torch.Tensor:
    """The windows of one step, taken in order and cycling through all of them ([batch_size, T])."""
    start = (step * batch_size) % len(windows)
    return windows[torch.arange(start, start + batch_size) % len(windows)]


def take_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    summed: Iterable[torch.Tensor],
) -> float:
    """Backward, the gradients of `summed` added over the processes, one optimizer and schedule step.

    `loss` is this process's share-weighted loss; returns the global batch's loss (the sum over processes).
    Tensors FSDP shards are left out of `summed`: it sums their gradients itself.
    """
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    data_parallel.sum_gradients_(summed)
    optimizer.step()
    schedule.step()
    return data_parallel.sum_float(loss.item())
