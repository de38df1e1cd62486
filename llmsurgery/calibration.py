"""Calibration batches: text documents -> fixed-length token windows, reproducible by seed."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from .arch import arch_for, get_submodule
from .console import track
from .corpora import source_documents
from .errors import UserError
from .passes.base import CalibConfig


def token_stream(tokenizer, docs: list[str]) -> torch.Tensor:
    """All documents tokenized and joined, each followed by the EOS token (if any)."""
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        ids.extend(sep)
    return torch.tensor(ids, dtype=torch.long)


def check_window_count(tokenizer, cfg: CalibConfig, stream: torch.Tensor) -> int:
    """The window body length (tokens after BOS), or a UserError when the stream holds fewer windows than asked."""
    body = cfg.seq_len - (1 if tokenizer.bos_token_id is not None else 0)
    n_windows = len(stream) // body
    if n_windows < cfg.samples:
        raise UserError(
            f"calibration source '{cfg.source}' has {len(stream)} tokens: only {n_windows} windows of "
            f"{cfg.seq_len} tokens, fewer than the {cfg.samples} asked for"
        )
    return body


def check_calibration_sizes(tokenizer, configs: list[CalibConfig]) -> None:
    """Before any model loads: every source holds the windows asked of it (each source tokenized once)."""
    streams: dict[str, torch.Tensor] = {}
    for cfg in configs:
        if cfg.source not in streams:
            streams[cfg.source] = token_stream(tokenizer, source_documents(cfg.source))
        check_window_count(tokenizer, cfg, streams[cfg.source])


def calibration_batches(tokenizer, cfg: CalibConfig) -> torch.Tensor:
    """`cfg.samples` non-overlapping windows of `cfg.seq_len` tokens, chosen by `cfg.seed`.

    Returns input ids of shape [samples, seq_len]. A BOS token, when the tokenizer has one,
    starts every window, as the model saw it in training.
    """
    stream = token_stream(tokenizer, source_documents(cfg.source))
    bos = tokenizer.bos_token_id
    body = check_window_count(tokenizer, cfg, stream)
    n_windows = len(stream) // body
    gen = torch.Generator().manual_seed(cfg.seed)
    starts = torch.randperm(n_windows, generator=gen)[: cfg.samples].sort().values * body
    windows = torch.stack([stream[s : s + body] for s in starts.tolist()])  # [N, body]
    if bos is not None:
        windows = torch.cat([torch.full((cfg.samples, 1), bos, dtype=torch.long), windows], dim=1)
    return windows  # [N, seq_len]


class Calibration:
    """Draws a pass's token windows with the model's tokenizer (what `PassConfig.apply_` is handed)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def windows(self, cfg: CalibConfig) -> torch.Tensor:
        return calibration_batches(self.tokenizer, cfg)


@torch.no_grad()
def observe_inputs(
    model: nn.Module,
    batches: torch.Tensor,
    modules: list[nn.Module],
    on_input: Callable[[int, torch.Tensor], None],
    description: str,
) -> None:
    """Run the base model (no LM head) over each window; `on_input(i, x)` sees the first input of `modules[i]`.

    The hooks are removed afterwards, also when a window fails. With no modules, this only runs the
    windows (for passes whose patched modules collect statistics themselves).
    """
    handles = [
        module.register_forward_pre_hook(lambda _m, args, i=i: on_input(i, args[0]))
        for i, module in enumerate(modules)
    ]
    base = get_submodule(model, arch_for(model).layers.rpartition(".")[0])
    device = next(model.parameters()).device
    try:
        for window in track(batches, description, total=len(batches)):
            base(input_ids=window.unsqueeze(0).to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
