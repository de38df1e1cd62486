"""What config.json alone says about a model in llama.cpp: whether it needs llmsurgery's runtime, and the
attention pattern llama.cpp assumes for gemma3. Read by `export` (its refusals) and by the model card, which
cannot import `export` (that reads models through model_io, which writes the cards).
"""

from __future__ import annotations

# Features of config.json that only llmsurgery's own modeling code runs, and the pass that writes each.
RUNTIME_FEATURES = (
    ("sparsity_in", "rotate-sparsify's Top-K activation sparsity"),
    ("sparsity_out", "rotate-sparsify's Top-K activation sparsity"),
    ("attention_layout", "per-head attention widths (absorb, kv-compress)"),
    ("auto_map", "its own modeling code (auto_map)"),
)
GEMMA3_PERIOD = 6  # llama.cpp: `load_swa_pattern(ml, 6)` in src/models/gemma3.cpp; ollama hard-codes the same


def runtime_need(config: dict) -> str | None:
    return next((why for key, why in RUNTIME_FEATURES if config.get(key)), None)


SERVE = "serve it with transformers: `llmsurgery eval --backend hf`, or from_pretrained(..., trust_remote_code=True)"


def export_blocker(config: dict) -> str | None:
    """Why config.json alone says a model cannot become a faithful GGUF file (for the model card); None if it can
    (`export` checks the rest: activation, biases, RoPE, attention scale)."""
    need = runtime_need(config)
    if need is not None:
        return f"it needs llmsurgery's runtime for {need}, which llama.cpp cannot run; {SERVE}"
    kept = config.get("layer_types") if config.get("model_type") == "gemma3_text" else None
    if kept and gemma3_break(kept) is not None:
        return (
            "its kept layers break the sliding/full attention pattern llama.cpp assumes for gemma3 (every 6th "
            "layer full); serve it with transformers"
        )
    return None


def gemma3_break(kept: list[str]) -> int | None:
    """The first layer whose attention type llama.cpp would get wrong (None: the pattern holds, or all full)."""
    expected = llama_cpp_gemma3_types(len(kept))
    if set(kept) == {"full_attention"} or kept == expected:
        return None
    return next(i for i, (a, b) in enumerate(zip(kept, expected)) if a != b)


def llama_cpp_gemma3_types(n_layers: int) -> list[str]:
    """The attention type llama.cpp gives each gemma3 layer: full when il % 6 == 5, sliding otherwise."""
    return [
        "full_attention" if i % GEMMA3_PERIOD == GEMMA3_PERIOD - 1 else "sliding_attention"
        for i in range(n_layers)
    ]
