"""Layer-streamed execution for checkpoints larger than memory: one decoder layer in memory at a time.

The loop runs over layers outside and calibration windows inside. The activations entering layer l (a few MB)
stay in memory; layer l's tensors are read lazily from the safetensors files, run over every window, and freed.
Embedding, norm and rotary tables are built for real (small); the decoder layers come from a skeleton on the
meta device. What each layer receives besides its input (masks, position embeddings) is recorded once from
the model's own forward with every layer replaced by a recorder, so streamed layers see exactly what they see
in the whole model, and the scores are the same bit for bit.

`ShardWriter` writes the output tensor by tensor into safetensors shards, so the output is never whole in
memory either. prune-bi, rotate-sparsify, absorb and kv-compress (PCA at uniform ranks) stream; the passes
that train through the whole network (kv-compress training and search, heal) load the whole model.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn as nn

from .errors import UserError
from .layer_walk import record_layer_inputs, recorders

INDEX_FILE = "model.safetensors.index.json"
STREAM_SHARD_BYTES = 512 << 20  # a shard is built in memory before it is written: 512 MiB at most
SETTLE_BYTES = 64 << 20  # after a layer, a pending shard larger than this is written (small layers share one)


class LazyCheckpoint:
    """The tensors of a safetensors checkpoint folder by name, each read from disk only when asked for."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        self.folder = folder
        index = folder / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (folder / "model.safetensors").is_file():
            with safe_open(folder / "model.safetensors", "pt") as handle:
                weight_map = {name: "model.safetensors" for name in handle.keys()}
        else:
            raise UserError(
                f"{folder}: streaming needs safetensors weights (model.safetensors or a shard index)"
            )
        self.weight_map: dict[str, str] = weight_map
        self._open: dict[str, object] = {}

    def names(self) -> list[str]:
        return list(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read now; NaN or inf is refused as a corrupt checkpoint (as when a model loads whole)."""
        from safetensors import safe_open

        file = self.weight_map[name]
        if file not in self._open:
            self._open[file] = safe_open(self.folder / file, "pt")
        tensor = self._open[file].get_tensor(name)
        if tensor.is_floating_point() and not all(
            torch.isfinite(part).all() for part in tensor.view(-1).split(1 << 24)
        ):
            raise UserError(
                f"could not load {self.folder}: tensor '{name}' holds NaN or infinite values "
                "(a corrupt checkpoint)"
            )
        return tensor

    def close(self) -> None:
        self._open.clear()

    def state(self, prefix: str, skip: str | None = None) -> dict[str, torch.Tensor]:
        """The tensors under `prefix` (but those under `skip`), names relative to it; only those are read."""
        return {
            name[len(prefix) :]: self.get(name)
            for name in self.weight_map
            if name.startswith(prefix) and not (skip and name.startswith(skip))
        }

    def dtype(self) -> torch.dtype:
        return self.get(next(iter(self.weight_map))).dtype


class StreamedModel:
    """A checkpoint run layer by layer: `layer_inputs` records the windows' arguments, `load_layer(i)` builds layer i.

    `config` is the output's config: streamed passes change it as they change the layers. `layer_walk.walk_layers`
    walks it as it walks a model in memory (`layer_walk.ModelLayers`).
    """

    streamed = True

    def __init__(self, folder: Path, config, dtype: torch.dtype, device: str = "cpu") -> None:
        from transformers import AutoModel

        from .arch import arch_for_model_type

        self.ckpt, self.dtype, self.device, self.config = LazyCheckpoint(folder), dtype, device, config
        self.spec = arch_for_model_type(config.model_type)
        self.n_layers = config.num_hidden_layers
        prefix = self.spec.layers.rpartition(".")[0]  # "model"
        self.layer_prefix = self.spec.layers + "."  # "model.layers."
        small = copy.deepcopy(config)
        small.num_hidden_layers = 0  # embedding, norm and rotary tables for real; no layers
        self.base = AutoModel.from_config(small, dtype=dtype).eval()
        self.base.config.num_hidden_layers = self.n_layers
        self.base.load_state_dict(self.ckpt.state(prefix + ".", skip=self.layer_prefix), strict=False)
        with torch.device("meta"):
            self.skeleton = AutoModel.from_config(copy.deepcopy(config), dtype=dtype)
        self.base.to(device)
        self.sink: list = []
        self.base.layers = recorders(self.n_layers, self.sink, config)

    def layer_inputs(
        self, windows: torch.Tensor, positions: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], list[list[tuple]]]:
        """(hidden states entering layer 0 per window, per window and layer the other arguments the layer gets)."""
        return record_layer_inputs(self.base, self.sink, windows, self.device, positions)

    def load_layer(self, i: int) -> nn.Module:
        """Decoder layer i with its weights read from the checkpoint, on the device, in the compute dtype."""
        layer = self.skeleton.layers[i]
        state = {k: v.to(self.dtype) for k, v in self.ckpt.state(f"{self.layer_prefix}{i}.").items()}
        layer.to_empty(device=self.device)
        missing, unexpected = layer.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise UserError(
                f"layer {i}: the checkpoint's tensors do not match the model (missing {missing[:3]})"
            )
        return layer.to(self.device).eval()

    def drop_embedding(self) -> None:
        """Free the embedding once the windows are embedded (passes that do not fold into it)."""
        embed = self.base.get_input_embeddings()
        embed.weight = nn.Parameter(embed.weight.detach().to("meta"), requires_grad=False)

    def free_layer(self, i: int) -> None:
        self.skeleton.layers[i].to("meta")
        release_free_memory()

    def copy_tensors(self, writer, rename=lambda name: name) -> None:
        """Every checkpoint tensor `rename` keeps (None drops it) and the writer lacks, in the compute dtype."""
        for name in self.ckpt.names():
            target = rename(name)
            if target is not None and target not in writer.written:
                writer.add(target, self.ckpt.get(name).to(self.dtype))

    def close(self) -> None:
        """Drop the embedding, the recorded arguments and the open checkpoint files."""
        self.base = None
        self.sink.clear()
        self.ckpt.close()


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim; nothing elsewhere).

    A layer's many small temporaries (activations, per-window float64 copies) come from malloc's arenas, and
    freed arena memory is not returned by itself: without this the process grows by tens of MB per 7B layer.
    """
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - glibc only
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


class ShardWriter:
    """Writes tensors into safetensors shards of at most `max_bytes` as they come; `close()` writes the index."""

    def __init__(self, folder: Path, max_bytes: int = STREAM_SHARD_BYTES) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes, self.shards, self.total = 0, [], 0
        self.written: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.written:
            raise ValueError(f"tensor {name} written twice")
        self.written.add(name)
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total += size

    def flush(self) -> None:
        """Write the pending tensors as a shard now (nothing when none is pending)."""
        if self.pending:
            self._flush()

    def settle(self) -> None:
        """After a layer: write the pending shard if it is large (SETTLE_BYTES), so the next layer is read
        beside nothing pending, while the layers of a small model still share shards."""
        if self.pending_bytes > SETTLE_BYTES:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.folder / f"shard-{len(self.shards):05d}.safetensors"
        save_file(self.pending, path, metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.shards:
            self._flush()
        if len(self.shards) == 1:
            self.shards[0][0].rename(self.folder / "model.safetensors")
            return
        weight_map, n = {}, len(self.shards)
        for k, (path, names) in enumerate(self.shards):
            final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.folder / final)
            weight_map |= dict.fromkeys(names, final)
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
