"""Block-Influence layer removal (ShortGPT, Men et al. 2024, arXiv 2403.03853).

``BI_i = 1 - mean_t cos(x_i[t], x_{i+1}[t])`` where x_i is the residual stream entering decoder
layer i and x_{i+1} the stream leaving it, captured with hooks (not the final-normed
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

from ..arch import arch_for, decoder_layers, get_submodule, set_decoder_layers_
from ..console import track
from .prune_bi import PruneBI


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


class ResidualCapture(ResidualStats):
    """`ResidualStats` fed by hooks on every decoder layer of a model in memory."""

    def __init__(self, layers: nn.ModuleList):
        super().__init__(len(layers))
        self._inputs: dict[int, torch.Tensor] = {}
        self._handles = []
        for i, layer in enumerate(layers):
            self._handles.append(layer.register_forward_pre_hook(self._pre_hook(i), with_kwargs=True))
            self._handles.append(layer.register_forward_hook(self._post_hook(i)))

    def _pre_hook(self, i: int):
        def hook(module, args, kwargs):
            self._inputs[i] = args[0] if args else kwargs["hidden_states"]  # x: [B, T, D]

        return hook

    def _post_hook(self, i: int):
        def hook(module, args, output):
            self.add(i, self._inputs.pop(i), output[0] if isinstance(output, tuple) else output)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


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


@torch.no_grad()
def capture_residuals(model: nn.Module, batches: torch.Tensor) -> ResidualCapture:
    """Run the decoder stack (not the LM head) over the batches with capture hooks attached."""
    spec = arch_for(model)
    base = get_submodule(model, spec.layers.rpartition(".")[0])
    capture = ResidualCapture(decoder_layers(model))
    device = next(model.parameters()).device
    try:
        for window in track(batches, "Scoring layers", total=len(batches)):
            base(input_ids=window.unsqueeze(0).to(device), use_cache=False)
    finally:
        capture.remove()
    return capture


def choose_layers(cfg: PruneBI, capture: ResidualStats, n_layers: int) -> tuple[list[float], list[int]]:
    """(scores as printed, 0-based layers to remove) for the configured metric."""
    n = cfg.n_remove(n_layers)
    if cfg.metric == "angular":
        scores = angular_block_scores(capture, n)
        start = int(scores.argmin())
        return scores.tolist(), list(range(start, start + n))
    scores = block_influence_scores(capture)
    if cfg.block:
        sums = torch.stack([scores[s : s + n].sum() for s in range(n_layers - n + 1)])
        start = int(sums.argmin())
        return scores.tolist(), list(range(start, start + n))
    return scores.tolist(), sorted(torch.argsort(scores)[:n].tolist())


@torch.no_grad()
def streamed_residuals(streamed, batches: torch.Tensor) -> ResidualStats:
    """The same statistics as `capture_residuals`, one decoder layer in memory at a time (`streaming.StreamedModel`)."""
    hidden, arguments = streamed.layer_inputs(batches)
    streamed.drop_embedding()
    stats = ResidualStats(streamed.n_layers)
    for i in track(range(streamed.n_layers), "Scoring layers (streamed)", total=streamed.n_layers):
        streamed.run_windows(
            i, streamed.load_layer(i), hidden, arguments, lambda x, y, i=i: stats.add(i, x, y)
        )
        streamed.free_layer(i)
    return stats


def remove_layers_(model: nn.Module, remove: list[int]) -> None:
    """Delete decoder layers in place; renumber the rest and rewrite the config to match."""
    spec = arch_for(model)
    layers = decoder_layers(model)
    keep = [i for i in range(len(layers)) if i not in set(remove)]
    kept = nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    set_decoder_layers_(model, kept)
    config = model.config
    for key in spec.per_layer_config_lists:
        values = getattr(config, key, None)
        if isinstance(values, list) and len(values) == len(layers):
            setattr(config, key, [values[i] for i in keep])
    config.num_hidden_layers = len(keep)


def score_layers(model: nn.Module, batches: torch.Tensor, cfg: PruneBI) -> tuple[list[float], list[int]]:
    """Scores (per layer for bi, per block start for angular) and the 0-based layers to remove."""
    n_layers = len(decoder_layers(model))
    cfg.n_remove(n_layers)  # fail on a bad amount before the forward passes
    return choose_layers(cfg, capture_residuals(model, batches), n_layers)
