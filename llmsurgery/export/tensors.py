"""Which tensors a GGUF file holds, under llama.cpp's names, in llama.cpp's conventions and storage types.

Names: the roles of `ArchSpec` (embedding, norms, q/k/v/o, gate/up/down, gemma3's post-norms) map to gguf-py's
`MODEL_TENSOR` names (`token_embd`, `blk.N.attn_q`, ...), the ones llama.cpp's loader asks for.

Conventions, as llama.cpp's `convert_hf_to_gguf.py` writes them:
- llama/mistral: q_proj and k_proj rows permuted from HF's rotate-half layout to interleaved pairs
  (`LlamaModel.permute`), since llama.cpp's llama graph rotates (x0, x1), (x2, x3), ... Exact (a permutation).
- gemma: RMSNorm weights stored as the scale they apply, w + 1 (`Gemma3Model.modify_tensors`); HF's
  Gemma3RMSNorm computes x * (1 + w) in float32, llama.cpp x * stored, so both round 1 + w once.
- llama3-style RoPE scaling: a `rope_freqs` tensor of per-frequency divisors (`LlamaModel.generate_extra_tensors`).
- Storage: 1-D tensors and norms always F32; the rest in the asked type; Q8_0 needs rows that are a multiple of
  32 long, otherwise the tensor falls back to F16 as in the converter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..arch import ArchSpec

# outtype -> (GGMLQuantizationType name, LlamaFileType name): what `--outtype` writes and announces.
OUTTYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
}


@dataclass
class TensorPlan:
    """One tensor of the file: its GGUF name and type, where it comes from, and what is done to it on the way."""

    name: str
    shape: tuple[int, ...]  # numpy order, as in the checkpoint (llama.cpp's ne[] is the reverse)
    qtype: str  # GGMLQuantizationType name
    source: str | None  # the checkpoint tensor, or None for a computed one (rope_freqs)
    steps: list[Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=list)
    compute: Callable[[], torch.Tensor] | None = None

    @property
    def nbytes(self) -> int:
        import gguf

        qtype = gguf.GGMLQuantizationType[self.qtype]
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        return math.prod(self.shape[:-1]) * self.shape[-1] // block * size

    def load(self, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """The tensor as llama.cpp expects it, float32."""
        tensor = self.compute() if self.compute is not None else read(self.source).to(torch.float32)
        for step in self.steps:
            tensor = step(tensor)
        return tensor

    def encode(self, tensor: torch.Tensor) -> np.ndarray:
        """The bytes of the tensor in its storage type (gguf-py's quantizers: F16 rounds to nearest, BF16 and Q8_0
        as ggml does)."""
        import gguf

        data = tensor.detach().contiguous().numpy()
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType[self.qtype])


def interleave_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows (or bias entries) from HF's rotate-half layout to interleaved pairs.

    HF rotates (x_j, x_{j + d/2}); llama.cpp's llama graph rotates (x_{2j}, x_{2j+1}). Row j of the first half goes
    to 2j, row j of the second half to 2j + 1 (llama.cpp `LlamaModel.permute`).
    """
    rows = weight.shape[0]
    half = rows // n_heads // 2
    # weight: [H * 2 * half, ...] -> [H, 2, half, ...] -> [H, half, 2, ...]
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def shift_norm(offset: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Store the scale an offset RMSNorm applies: w + offset (gemma: x * (1 + w))."""

    def step(weight: torch.Tensor) -> torch.Tensor:
        return (weight.double() + offset).to(torch.float32)

    return step


def llama3_rope_divisors(head_dim: int, rope: dict) -> torch.Tensor:
    """Per-frequency divisors of llama3-style RoPE scaling (llama.cpp's `rope_freqs`): 1 for high frequencies,
    `factor` for low ones, smoothly between; computed in float64 from the HF rope parameters."""
    base = float(rope["rope_theta"])
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    between = 1.0 / ((1 - smooth) / factor + smooth)
    divisors = torch.where(
        wavelen < old_context / high,
        torch.ones_like(freqs),
        torch.where(wavelen > old_context / low, factor, between),
    )
    return divisors.to(torch.float32)


def _roles(spec: ArchSpec) -> list[tuple[str, str]]:
    """(module path inside a decoder layer, gguf-py MODEL_TENSOR name) for this architecture."""
    roles = [
        (spec.attn_norm, "ATTN_NORM"),
        (spec.q_proj, "ATTN_Q"),
        (spec.k_proj, "ATTN_K"),
        (spec.v_proj, "ATTN_V"),
        (spec.o_proj, "ATTN_OUT"),
        (spec.mlp_norm, "FFN_NORM"),
        (spec.gate_proj, "FFN_GATE"),
        (spec.up_proj, "FFN_UP"),
        (spec.down_proj, "FFN_DOWN"),
    ]
    if spec.qk_norm:
        roles += [(spec.q_norm, "ATTN_Q_NORM"), (spec.k_norm, "ATTN_K_NORM")]
    if spec.attn_out_norm:
        roles.append((spec.attn_out_norm, "ATTN_POST_NORM"))
    if spec.mlp_out_norm:
        roles.append((spec.mlp_out_norm, "FFN_POST_NORM"))
    return roles


def gguf_names(spec: ArchSpec, n_layers: int) -> dict[str, str]:
    """Checkpoint tensor name -> GGUF tensor name, weights and biases, for every tensor the architecture may hold."""
    import gguf

    def named(kind: str, bid: int | None = None) -> str:
        return gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[kind]].format(bid=bid)

    names = {
        f"{spec.embed}.weight": f"{named('TOKEN_EMBD')}.weight",
        f"{spec.final_norm}.weight": f"{named('OUTPUT_NORM')}.weight",
        f"{spec.lm_head}.weight": f"{named('OUTPUT')}.weight",
    }
    for i in range(n_layers):
        for path, kind in _roles(spec):
            for suffix in ("weight", "bias"):
                names[f"{spec.layers}.{i}.{path}.{suffix}"] = f"{named(kind, i)}.{suffix}"
    return names


def _storage(gguf_name: str, shape: tuple[int, ...], qtype: str) -> str:
    """The storage type of one tensor: F32 for 1-D tensors and norms, else the asked type (Q8_0 -> F16 when rows
    are not a multiple of 32)."""
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight"):
        return "F32"
    if qtype == "Q8_0" and shape[-1] % 32:
        return "F16"
    return qtype


def plan_tensors(
    spec: ArchSpec, config, shapes: dict[str, tuple[int, ...]], outtype: str
) -> list[TensorPlan]:
    """Every tensor of the GGUF file, in the checkpoint's order of roles (embedding, layers, norm, head).

    config: the transformers config (heads, head_dim, rope parameters). A checkpoint tensor without a GGUF name
    is an error here (refusals.py refuses such models first, with a reason).
    """
    names = gguf_names(spec, config.num_hidden_layers)
    unknown = sorted(set(shapes) - set(names))
    if unknown:
        raise ValueError(f"no GGUF name for tensor {unknown[0]}")
    qtype = OUTTYPES[outtype][0]
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    permute = {
        f".{spec.q_proj}.": heads,
        f".{spec.k_proj}.": kv_heads,
    }
    plans = []
    for source, gguf_name in names.items():
        if source not in shapes:
            continue
        shape = tuple(shapes[source])
        plan = TensorPlan(gguf_name, shape, _storage(gguf_name, shape, qtype), source)
        if spec.gguf_interleaved_rope:
            for marker, n in permute.items():
                if marker in source:
                    plan.steps.append(lambda t, n=n: interleave_rope_rows(t, n))
        if spec.norm_weight_offset and gguf_name.endswith("norm.weight"):
            plan.steps.append(shift_norm(spec.norm_weight_offset))
        plans.append(plan)
    rope = rope_parameters(config)
    if rope.get("rope_type") == "llama3":
        head_dim = head_dim_of(config)
        plans.insert(
            0,
            TensorPlan(
                "rope_freqs.weight",
                (head_dim // 2,),
                "F32",
                None,
                compute=lambda: llama3_rope_divisors(head_dim, rope),
            ),
        )
    return plans


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_parameters(config, layer_type: str = "full_attention") -> dict:
    """The RoPE parameters of one layer type (gemma3 has one set per type), as transformers 5 normalises them;
    from transformers 4's `rope_theta` and `rope_scaling` (gemma3: `rope_local_base_freq`) where it has none."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:  # transformers 4.x
        if layer_type == "sliding_attention" and getattr(config, "rope_local_base_freq", None):
            return {"rope_type": "default", "rope_theta": config.rope_local_base_freq}
        scaling = dict(getattr(config, "rope_scaling", None) or {})
        kind = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
        scaling.pop("type", None)
        return {"rope_type": kind, **scaling, "rope_theta": getattr(config, "rope_theta", None)}
    if layer_type in params or "full_attention" in params:
        params = dict(params.get(layer_type) or {})
    return params


class CheckpointReader:
    """Tensors of a checkpoint's weight files, read one at a time (safetensors: memory-mapped)."""

    def __init__(self, files: list[Path]):
        self.files = files
        self._where: dict[str, int] = {}
        self._handles: dict[int, object] = {}

    def __enter__(self) -> CheckpointReader:
        from .. import checkpoint

        for i, path in enumerate(self.files):
            for name in checkpoint.checkpoint_shapes([path]):
                self._where[name] = i
        return self

    def __exit__(self, *exc) -> None:
        self._handles.clear()

    def __call__(self, name: str) -> torch.Tensor:
        i = self._where[name]
        if i not in self._handles:
            path = self.files[i]
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                self._handles[i] = safe_open(str(path), framework="pt")
            else:
                self._handles[i] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        handle = self._handles[i]
        return handle[name] if isinstance(handle, dict) else handle.get_tensor(name)
