"""Block-Influence layer removal (ShortGPT, Men et al. 2024, arXiv 2403.03853).

``BI_i = 1 - mean_t cos(x_i[t], x_{i+1}[t])`` where x_i is the residual stream entering decoder
layer i and x_{i+1} the stream leaving it, seen by the layer walker (not the final-normed
``hidden_states[-1]``), accumulated in float64 over every calibration token. The N layers with the
lowest BI are removed at once.

Peer variant (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers"):
``--metric angular --block`` removes the contiguous block of n layers starting at the l that
minimises ``arccos(cos(x_l[-1], x_{l+n}[-1])) / pi`` on each window's last token.

Lossy. What it preserves: every kept layer is untouched; the output is a standard checkpoint
(fewer layers, ``num_hidden_layers`` and per-layer config lists rewritten, layer indices renumbered).
All indices are 0-based.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ...arch import ArchSpec, arch_for, decoder_layers, set_decoder_layers_
from ...layer_walk import as_layers, walk_layers


def cosine_per_token(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """cos(x[t], y[t]) for every token, in float64. x, y: [..., D] -> [...]."""
    x, y = x.double(), y.double()
    return (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1)).clamp_min(1e-300)


class ResidualStats:
    """Running BI sums and each window's last-token residuals, fed one (layer input, layer output) pair at a time.

    After `n` windows: ``cos_sum[i]`` = sum over tokens of cos(x_i, x_{i+1}); ``last[i]`` holds the
    last-token residual x_i of each window for i = 0..L (x_L = stream leaving the last layer).
    """

    def __init__(self, n_layers: int):
        self.n = n_layers
        self.cos_sum = torch.zeros(n_layers, dtype=torch.float64)
        self.tokens = 0
        self.last: list[list[torch.Tensor]] = [[] for _ in range(n_layers + 1)]

    def add(self, i: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Layer i turned x into y (both [B, T, D])."""
        self.last[i].append(x[:, -1].double().cpu())
        self.cos_sum[i] += cosine_per_token(x, y).sum().cpu()
        if i == 0:
            self.tokens += x.shape[0] * x.shape[1]
        if i == self.n - 1:
            self.last[i + 1].append(y[:, -1].double().cpu())


def block_influence_scores(capture: ResidualStats) -> torch.Tensor:
    """BI per layer: 1 - mean cosine between the layer's input and output residual streams."""
    return 1.0 - capture.cos_sum / capture.tokens


def angular_block_scores(capture: ResidualStats, n: int) -> torch.Tensor:
    """Mean angular distance between x_l and x_{l+n} (last token), for each start l = 0..L-n."""
    states = [torch.cat(chunks) for chunks in capture.last]  # each [N, D]
    scores = [
        torch.arccos(cosine_per_token(states[s], states[s + n]).clamp(-1, 1)).mean() / math.pi
        for s in range(len(states) - n)
    ]
    return torch.stack(scores)


def residual_stats(model, windows: torch.Tensor) -> ResidualStats:
    """The BI statistics of every layer over the windows: a model in memory or a `streaming.StreamedModel`."""
    layers = as_layers(model)
    stats = ResidualStats(layers.n_layers)
    walk_layers(layers, windows, lambda i, layer, run: run(lambda x, y: stats.add(i, x, y)), "Scoring layers")
    return stats


def choose_layers(stats: ResidualStats, n: int, metric: str = "bi", block: bool = False) -> tuple[list, list]:
    """(scores as printed, the n 0-based layers to remove): lowest BI (`block`: the contiguous block of lowest
    summed BI), or with metric "angular" the block whose ends are closest (Gromov et al.)."""
    n_layers = stats.n
    if metric == "angular":
        scores = angular_block_scores(stats, n)
        start = int(scores.argmin())
        return scores.tolist(), list(range(start, start + n))
    scores = block_influence_scores(stats)
    if block:
        sums = torch.stack([scores[s : s + n].sum() for s in range(n_layers - n + 1)])
        start = int(sums.argmin())
        return scores.tolist(), list(range(start, start + n))
    return scores.tolist(), sorted(torch.argsort(scores)[:n].tolist())


def score_layers(model, windows: torch.Tensor, n: int, metric: str = "bi", block: bool = False):
    """Scores (per layer for bi, per block start for angular) and the 0-based layers to remove."""
    return choose_layers(residual_stats(model, windows), n, metric, block)


def keep_layer_entries_(config, spec: ArchSpec, kept: list[int], n_layers: int) -> None:
    """config.json after pruning: the per-layer lists keep the kept layers' entries, the layer count drops."""
    for key in spec.per_layer_config_lists:
        values = getattr(config, key, None)
        if isinstance(values, list) and len(values) == n_layers:
            setattr(config, key, [values[i] for i in kept])
    config.num_hidden_layers = len(kept)


def remove_layers_(model: nn.Module, remove: list[int]) -> None:
    """Delete decoder layers in place; renumber the rest and rewrite the config to match."""
    layers = decoder_layers(model)
    keep = [i for i in range(len(layers)) if i not in set(remove)]
    kept = nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    set_decoder_layers_(model, kept)
    keep_layer_entries_(model.config, arch_for(model), keep, len(layers))


def write_kept_layers(streamed, writer, remove: list[int]) -> None:
    """A streamed prune's output: every tensor but the removed layers', renumbered; config.json to match."""
    n_layers = streamed.n_layers
    kept = [i for i in range(n_layers) if i not in set(remove)]
    renumber, prefix = {old: new for new, old in enumerate(kept)}, streamed.layer_prefix

    def rename(name: str) -> str | None:
        if not name.startswith(prefix):
            return None
        index, _, rest = name[len(prefix) :].partition(".")
        return f"{prefix}{renumber[int(index)]}.{rest}" if int(index) in renumber else None

    streamed.copy_tensors(writer, rename)
    keep_layer_entries_(streamed.config, streamed.spec, kept, n_layers)
