"""The architecture metadata of a GGUF file: the `{arch}.*` keys llama.cpp's loader reads.

Follows `TextModel.set_gguf_parameters` in llama.cpp's convert_hf_to_gguf.py (and `LlamaModel`, `Gemma3Model`):
block_count is the number of layers the checkpoint holds (after pruning: the layers kept), key/value lengths are
the head dim, llama also writes vocab_size and rope.dimension_count, gemma3 the sliding window, the sliding
layers' RoPE base (`rope.freq_base_swa`, read by llama.cpp's gemma3 loader) and the final logit soft-cap.
"""

from __future__ import annotations

from .tensors import OUTTYPES, head_dim_of, rope_parameters


def write_hparams(writer, config, spec, outtype: str, name: str, n_vocab: int) -> list[str]:
    """Write the architecture keys; returns notes for the user (e.g. a context capped at a sliding window)."""
    import gguf

    notes = []
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    context = config.max_position_embeddings
    window = _mistral_window(config, spec)
    if window is not None and window < context:
        # llama.cpp's llama graph attends to every earlier token; HF mistral to the last `window`. Up to the window
        # they agree, so the file announces the window as its trained context.
        context = window
        notes.append(
            f"context_length set to the sliding window ({window}): llama.cpp's llama has no sliding window"
        )
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(context)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_key_length(head_dim_of(config))
    writer.add_value_length(head_dim_of(config))
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if spec.gguf_arch == "llama":
        writer.add_vocab_size(n_vocab)
        writer.add_rope_dimension_count(head_dim_of(config))
    if spec.gguf_arch == "gemma3":
        if any(t == "sliding_attention" for t in _layer_types(config)):
            writer.add_sliding_window(config.sliding_window)
            writer.add_rope_freq_base_swa(float(rope_parameters(config, "sliding_attention")["rope_theta"]))
        if getattr(config, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    writer.add_file_type(int(gguf.LlamaFileType[OUTTYPES[outtype][1]]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return notes


def _layer_types(config) -> list[str]:
    return list(getattr(config, "layer_types", None) or [])


def _mistral_window(config, spec) -> int | None:
    if spec.model_type != "mistral":
        return None
    return getattr(config, "sliding_window", None)
