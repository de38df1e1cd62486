"""What `export --format gguf` refuses, before any byte is written: each a UserError of one line.

A GGUF file is only as good as the runtime's reading of it: llama.cpp hard-codes parts of each architecture
(gemma3's attention pattern and attention scale, the activation, which biases exist). A model that would run
differently there than in transformers is refused with the reason, rather than exported to give wrong tokens.
"""

from __future__ import annotations

import math

from ..errors import UserError
from ..gguf_rules import SERVE, gemma3_break, llama_cpp_gemma3_types, runtime_need
from .tensors import OUTTYPES, head_dim_of, rope_parameters

FORMATS = ("gguf",)
# Biases llama.cpp's graphs read, by GGUF architecture (the loaders' optional `.bias` tensors).
_BIASES = {
    "llama": ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"),
    "qwen2": ("attn_q", "attn_k", "attn_v"),
    "qwen3": ("attn_q", "attn_k", "attn_v"),
    "gemma3": ("attn_q", "attn_k", "attn_v"),
}
_ACTIVATION = {"llama": "silu", "qwen2": "silu", "qwen3": "silu", "gemma3": "gelu_pytorch_tanh"}


def check_format(format: str) -> None:
    if format not in FORMATS:
        raise UserError(f"unknown --format '{format}'; choose {', '.join(FORMATS)}")


def check_outtype(outtype: str) -> None:
    if outtype not in OUTTYPES:
        raise UserError(f"unknown --outtype '{outtype}'; choose one of {', '.join(OUTTYPES)}")


def check_runtime_free(spec: str, config: dict, history: dict | None) -> None:
    """Outputs of absorb, kv-compress and rotate-sparsify need llmsurgery's modeling code: llama.cpp has no form
    for them (its graphs assert equal K and V head widths and have no Top-K inputs)."""
    need = runtime_need(config)
    if need is None:
        return
    passes = [p["pass"] for p in (history or {}).get("passes", [])]
    made_by = f" (made by {', '.join(passes)})" if passes else ""
    raise UserError(
        f"{spec}{made_by} needs llmsurgery's runtime for {need}, which llama.cpp cannot run; {SERVE}"
    )


def check_architecture(spec_name: str, config, arch, shapes: dict[str, tuple[int, ...]]) -> None:
    """What llama.cpp would compute differently from transformers for this config and these tensors."""
    activation = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if activation != _ACTIVATION[arch.gguf_arch]:
        raise UserError(
            f"{spec_name}: llama.cpp's {arch.gguf_arch} uses {_ACTIVATION[arch.gguf_arch]}, "
            f"this model {activation}; it cannot be exported faithfully"
        )
    _check_biases(spec_name, arch, shapes)
    _check_rope(spec_name, config, arch)
    if arch.gguf_arch in ("qwen2", "qwen3") and getattr(config, "use_sliding_window", False):
        raise UserError(
            f"{spec_name} uses a sliding window, which llama.cpp's {arch.gguf_arch} does not run; "
            "it cannot be exported faithfully"
        )
    if arch.gguf_arch == "gemma3":
        _check_gemma3(spec_name, config)


def _check_biases(spec_name: str, arch, shapes) -> None:
    from .tensors import gguf_names

    names = gguf_names(arch, _layers_in(shapes, arch))
    allowed = _BIASES[arch.gguf_arch]
    for source in shapes:
        target = names.get(source)
        if target is None:
            raise UserError(f"{spec_name}: tensor '{source}' has no place in llama.cpp's {arch.gguf_arch}")
        if target.endswith(".bias") and target.split(".")[-2] not in allowed:
            raise UserError(
                f"{spec_name}: llama.cpp's {arch.gguf_arch} has no bias for {target.split('.')[-2]} "
                f"(tensor '{source}'); it cannot be exported faithfully"
            )


def _layers_in(shapes, arch) -> int:
    prefix = arch.layers + "."
    held = {int(n[len(prefix) :].split(".")[0]) for n in shapes if n.startswith(prefix)}
    return max(held) + 1 if held else 0


def _check_rope(spec_name: str, config, arch) -> None:
    allowed = ("default", "linear", "llama3") if arch.gguf_arch == "llama" else ("default", "linear")
    layer_types = (
        ("full_attention", "sliding_attention") if arch.gguf_arch == "gemma3" else ("full_attention",)
    )
    for layer_type in layer_types:
        rope = rope_parameters(config, layer_type)
        kind = rope.get("rope_type", "default")
        if kind not in allowed or (layer_type == "sliding_attention" and kind != "default"):
            raise UserError(
                f"{spec_name}: RoPE scaling '{kind}' is not exported (supported: {', '.join(allowed)})"
            )


def _check_gemma3(spec_name: str, config) -> None:
    n = config.num_hidden_layers
    kept = list(getattr(config, "layer_types", None) or llama_cpp_gemma3_types(n))
    wrong = gemma3_break(kept)
    if wrong is not None:
        raise UserError(
            f"{spec_name}: its layers break the sliding/full attention pattern llama.cpp assumes for gemma3 "
            f"(every 6th layer full): layer {wrong} is {kept[wrong].split('_')[0]} here, llama.cpp would run it "
            f"{'full' if kept[wrong] == 'sliding_attention' else 'sliding'} with the wrong attention span and "
            "RoPE base; prune a contiguous block of 6 layers (`prune --bi --block --remove 6`) to keep the pattern"
        )
    # llama.cpp scales queries by 1/sqrt(head_dim), or by 1/sqrt(hidden/heads) for the 62-layer (27B) model.
    per_head = config.hidden_size / config.num_attention_heads if n == 62 else head_dim_of(config)
    if not math.isclose(float(config.query_pre_attn_scalar), per_head, rel_tol=1e-6):
        raise UserError(
            f"{spec_name}: query_pre_attn_scalar {config.query_pre_attn_scalar}, but llama.cpp's gemma3 with "
            f"{n} layers scales queries by 1/sqrt({per_head:g}); it cannot be exported faithfully"
        )
    if getattr(config, "attn_logit_softcapping", None):
        raise UserError(f"{spec_name}: llama.cpp's gemma3 has no attention logit soft-capping")
    if getattr(config, "use_bidirectional_attention", False):
        raise UserError(f"{spec_name}: bidirectional attention is not llama.cpp's gemma3")
