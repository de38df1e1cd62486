"""What the trained passes (kv-compress, heal) share: the learning-rate schedule and the batch order."""

from __future__ import annotations

import math

import torch


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
