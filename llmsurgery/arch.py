"""The one place that knows module and config names of each supported architecture.

Passes never spell out `model.layers` or `q_proj` themselves: they ask an `ArchSpec`.
An architecture that is not listed here gets a clear error instead of a guess.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from .errors import UserError


@dataclass(frozen=True)
class ArchSpec:
    """Dotted module paths (relative to the causal-LM model or to one decoder layer)."""

    model_type: str
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    # Inside one decoder layer.
    attn: str = "self_attn"
    q_proj: str = "self_attn.q_proj"
    k_proj: str = "self_attn.k_proj"
    v_proj: str = "self_attn.v_proj"
    o_proj: str = "self_attn.o_proj"
    gate_proj: str = "mlp.gate_proj"
    up_proj: str = "mlp.up_proj"
    down_proj: str = "mlp.down_proj"
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    # Norms applied to a sub-block's output before it joins the residual (gemma3).
    attn_out_norm: str | None = None
    mlp_out_norm: str | None = None
    # Per-head RMSNorm on q and k before RoPE (qwen3, gemma3).
    qk_norm: bool = False
    q_norm: str = "self_attn.q_norm"
    k_norm: str = "self_attn.k_norm"
    # RMSNorm stores w but scales by (1 + w) (gemma family).
    norm_weight_offset: float = 0.0
    # Config entries holding one value per decoder layer; kept in step when layers go.
    per_layer_config_lists: tuple[str, ...] = ("layer_types", "attention_layout")
    # llama.cpp's name for the architecture (`general.architecture` of a GGUF file; mistral runs as llama there).
    gguf_arch: str = "llama"
    # llama.cpp's llama graph rotates interleaved pairs (x0, x1), (x2, x3), ...; HF llama rotates halves, so the
    # GGUF converter permutes q/k rows (`LlamaModel.permute` in llama.cpp's convert_hf_to_gguf.py). qwen2, qwen3
    # and gemma3 run NeoX-style rotation there, like HF: no permutation.
    gguf_interleaved_rope: bool = False


_LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")

ARCHITECTURES: dict[str, ArchSpec] = {
    name: ArchSpec(
        model_type=name,
        qk_norm=name == "qwen3",
        gguf_arch="llama" if name in ("llama", "mistral") else name,
        gguf_interleaved_rope=name in ("llama", "mistral"),
    )
    for name in _LLAMA_LIKE
}
ARCHITECTURES["gemma3_text"] = ArchSpec(
    model_type="gemma3_text",
    mlp_norm="pre_feedforward_layernorm",
    attn_out_norm="post_attention_layernorm",
    mlp_out_norm="post_feedforward_layernorm",
    norm_weight_offset=1.0,
    qk_norm=True,
    gguf_arch="gemma3",
)

SUPPORTED = ", ".join(sorted(ARCHITECTURES))


def arch_for_model_type(model_type: str | None) -> ArchSpec:
    """The spec for a config's `model_type`, or a UserError naming the supported ones."""
    spec = ARCHITECTURES.get(model_type) if isinstance(model_type, str) else None
    if spec is None:
        shown = model_type if isinstance(model_type, str) or model_type is None else repr(model_type)
        raise UserError(f"unsupported architecture '{shown}'; supported: {SUPPORTED}")
    return spec


def arch_for(model: nn.Module) -> ArchSpec:
    return arch_for_model_type(getattr(model.config, "model_type", None))


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = get_submodule(model, arch_for(model).layers)
    assert isinstance(layers, nn.ModuleList)
    return layers


def set_decoder_layers_(model: nn.Module, layers: nn.ModuleList) -> None:
    """Replace the decoder-layer list in place (used by layer removal)."""
    parent_path, _, name = arch_for(model).layers.rpartition(".")
    setattr(get_submodule(model, parent_path) if parent_path else model, name, layers)
