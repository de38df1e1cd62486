"""The one loop over decoder layers: every per-layer pass, in memory and streamed, walks through here.

The loop runs over layers outside and calibration windows inside. What enters layer 0 and what every layer
receives besides its input (masks, position embeddings) is recorded once from the model's own forward with
the layers replaced by recorders; then, per layer: load it (from memory, or lazily from the checkpoint),
let the pass run the windows through it (observing what it likes), let the pass transform it, write it,
free it. A model in memory (`ModelLayers`) and a checkpoint read layer by layer (`streaming.StreamedModel`)
answer the same four questions, so the whole-model path is the streamed one over layers already in memory,
and both give the same bits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from .arch import arch_for, decoder_layers, get_submodule, set_decoder_layers_
from .console import track

# visit(i, layer, run): run(each=None) sends every window through `layer` as it is now (each(x, y) sees each
# input and output); afterwards the pass may change the layer in place.
Visit = Callable[[int, nn.Module, Callable[..., None]], None]


class Recorder(nn.Module):
    """Stands in for decoder layer i: records what the model hands the layer, returns its input unchanged."""

    def __init__(self, index: int, sink: list, attention_type: str | None) -> None:
        super().__init__()
        self.index, self.sink = index, sink
        if attention_type is not None:
            self.attention_type = attention_type

    def forward(self, hidden_states, *args, **kwargs):
        self.sink.append((self.index, hidden_states if self.index == 0 else None, args, kwargs))
        return hidden_states


def recorders(n_layers: int, sink: list, config) -> nn.ModuleList:
    types = getattr(config, "layer_types", None) or [None] * n_layers
    return nn.ModuleList([Recorder(i, sink, types[i]) for i in range(n_layers)])


@torch.no_grad()
def record_layer_inputs(
    base: nn.Module, sink: list, windows: torch.Tensor, device, positions: torch.Tensor | None = None
) -> tuple[list, list]:
    """(hidden states entering layer 0 per window, per window and layer the other arguments the layer gets).

    `base` is the decoder stack (no LM head) whose layers are recorders writing into `sink`. positions: the
    windows' position ids [N, T] (None: 0 to T - 1), which the rotary embeddings the layers get are taken at.
    """
    hidden, arguments = [], []
    for w, window in enumerate(windows):
        sink.clear()
        at = None if positions is None else positions[w : w + 1].to(device)
        base(input_ids=window.unsqueeze(0).to(device), position_ids=at, use_cache=False)
        hidden.append(sink[0][1])
        arguments.append([(args, kwargs) for _, _, args, kwargs in sink])
    sink.clear()
    return hidden, arguments


class ModelLayers:
    """A model in memory, seen one decoder layer at a time (what `streaming.StreamedModel` is for a checkpoint)."""

    streamed = False

    def __init__(self, model: nn.Module) -> None:
        self.model, self.spec, self.config = model, arch_for(model), model.config
        self.n_layers = len(decoder_layers(model))
        self.layer_prefix = self.spec.layers + "."
        self.device = next(model.parameters()).device

    def layer_inputs(self, windows: torch.Tensor, positions: torch.Tensor | None = None) -> tuple[list, list]:
        layers, sink = decoder_layers(self.model), []
        base = get_submodule(self.model, self.spec.layers.rpartition(".")[0])
        set_decoder_layers_(self.model, recorders(len(layers), sink, self.config))
        try:
            return record_layer_inputs(base, sink, windows, self.device, positions)
        finally:
            set_decoder_layers_(self.model, layers)

    def load_layer(self, i: int) -> nn.Module:
        return decoder_layers(self.model)[i]

    def free_layer(self, i: int) -> None:
        """The layer stays: it is the model's."""

    def drop_embedding(self) -> None:
        """The embedding stays: it is the model's."""


def as_layers(model):
    """A `ModelLayers` for a model in memory; a `streaming.StreamedModel` (or `ModelLayers`) as it is."""
    return ModelLayers(model) if isinstance(model, nn.Module) else model


@torch.no_grad()
def walk_layers(
    layers,
    windows: torch.Tensor | None,
    visit: Visit,
    description: str,
    writer=None,
    keep_embedding=False,
    positions: torch.Tensor | None = None,
) -> None:
    """Every decoder layer of `layers` (`ModelLayers` or `streaming.StreamedModel`) in order, through `visit`.

    windows: calibration token windows [N, T] (None: the pass reads weights only, `run` does nothing), at
    `positions` ([N, T] position ids; None: each window from 0). With a `writer` (`streaming.ShardWriter`), each
    layer's tensors are written once its visit is done. The embedding is freed after the windows are embedded
    unless `keep_embedding` (a pass that folds into it).
    """
    hidden, arguments = layers.layer_inputs(windows, positions) if windows is not None else (None, None)
    if not keep_embedding:
        layers.drop_embedding()
    suffix = " (streamed)" if layers.streamed else ""
    for i in track(range(layers.n_layers), description + suffix, total=layers.n_layers):
        layer = layers.load_layer(i)

        def run(each: Callable | None = None, i: int = i, layer: nn.Module = layer) -> None:
            if hidden is not None:
                _run_windows(layer, hidden, [per_window[i] for per_window in arguments], each)

        visit(i, layer, run)
        if writer is not None:
            for name, tensor in layer.state_dict().items():
                writer.add(f"{layers.layer_prefix}{i}.{name}", tensor)
            writer.settle()  # a large layer is written now: the next one is read beside nothing pending
        layers.free_layer(i)


def _run_windows(layer: nn.Module, hidden: list, arguments: list, each: Callable | None) -> None:
    """Every window through one layer (`hidden` updated in place); `each(x, y)` sees each input and output."""
    for w, x in enumerate(hidden):
        args, kwargs = arguments[w]
        out = layer(x, *args, **kwargs)
        hidden[w] = out[0] if isinstance(out, tuple) else out
        if each is not None:
            each(x, hidden[w])


@contextmanager
def watching(module: nn.Module, on_input: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """Inside the block, `on_input` sees the first input of every call of `module` (a pre-hook, removed after)."""
    handle = module.register_forward_pre_hook(lambda _m, args: on_input(args[0]))
    try:
        yield
    finally:
        handle.remove()
