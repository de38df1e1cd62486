"""Token-level held-out perplexity: one window per document, for benchmarks and quick checks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def document_windows(tokenizer, docs: list[str], max_tokens: int = 1024) -> list[torch.Tensor]:
    """One window per document: BOS (if any) + its tokens, at most `max_tokens` long. Each [1, T]."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = [(bos + tokenizer(doc, add_special_tokens=False)["input_ids"])[:max_tokens] for doc in docs]
    return [torch.tensor([w], dtype=torch.long) for w in ids if len(w) > 1]


@torch.no_grad()
def token_perplexity(model: torch.nn.Module, windows: list[torch.Tensor]) -> float:
    """exp(total NLL / total predicted tokens) over all windows, NLL summed in float64."""
    nll, count = 0.0, 0
    for ids in windows:
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].double()  # [T-1, V]
        nll += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return math.exp(nll / count)
