"""Calibration batches: text documents -> fixed-length token windows, reproducible by seed."""

from __future__ import annotations

import torch

from .corpora import CalibConfig, source_documents
from .errors import UserError


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


def draw_windows(tokenizer, cfg: CalibConfig, stream: torch.Tensor) -> torch.Tensor:
    """`cfg.samples` non-overlapping windows of `cfg.seq_len` tokens of `stream`, chosen by `cfg.seed`.

    Returns input ids of shape [samples, seq_len]. A BOS token, when the tokenizer has one,
    starts every window, as the model saw it in training.
    """
    bos = tokenizer.bos_token_id
    body = check_window_count(tokenizer, cfg, stream)
    n_windows = len(stream) // body
    gen = torch.Generator().manual_seed(cfg.seed)
    starts = torch.randperm(n_windows, generator=gen)[: cfg.samples].sort().values * body
    windows = torch.stack([stream[s : s + body] for s in starts.tolist()])  # [N, body]
    if bos is not None:
        windows = torch.cat([torch.full((cfg.samples, 1), bos, dtype=torch.long), windows], dim=1)
    return windows  # [N, seq_len]


class TokenStreams:
    """The calibration text of each source, tokenized once with the model's tokenizer; draws the passes' windows.

    The runner makes one per job: the checks count the windows each source holds with it, and the passes draw
    their windows from the same streams, so no source is read or tokenized twice.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._streams: dict[str, torch.Tensor] = {}

    def stream(self, source: str) -> torch.Tensor:
        if source not in self._streams:
            self._streams[source] = token_stream(self.tokenizer, source_documents(source))
        return self._streams[source]

    def check(self, configs: list[CalibConfig]) -> None:
        """Before any model loads: every source holds the windows asked of it."""
        for cfg in configs:
            check_window_count(self.tokenizer, cfg, self.stream(cfg.source))

    def windows(self, cfg: CalibConfig) -> torch.Tensor:
        """The token windows [samples, seq_len] that `cfg` names (see `draw_windows`)."""
        return draw_windows(self.tokenizer, cfg, self.stream(cfg.source))


def calibration_batches(tokenizer, cfg: CalibConfig) -> torch.Tensor:
    """The windows `cfg` names, from a tokenizer alone (`TokenStreams` keeps the tokenized text for more)."""
    return TokenStreams(tokenizer).windows(cfg)
