"""`llmsurgery inspect`: shapes, sizes and history of a model, read without loading its weights."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import parameter_count
from .model_io import check_model, read_history, read_json_record
from .modeling import foreign_code
from .modeling.modeling_llmsurgery import key_cache_widths
from .sources import SOURCE_FILE, resolve_source

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def _kv_heads_and_head_dim(config: dict) -> tuple[int, int]:
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return config.get("num_key_value_heads") or heads, head_dim


def _layer_widths(config: dict) -> list[int]:
    """Per layer, the K and V elements a cached token takes (absorbed and projected widths counted)."""
    kv_heads, head_dim = _kv_heads_and_head_dim(config)
    layouts = config.get("attention_layout")
    if not layouts:
        return [2 * kv_heads * head_dim] * config["num_hidden_layers"]
    return [sum(layout["v"]) + sum(key_cache_widths(layout, head_dim)) for layout in layouts]


def kv_bytes_per_token(config: dict, dtype_bytes: int) -> int:
    """Bytes the K and V caches grow by per token, every layer keeping its full cache (absorbed widths counted)."""
    return sum(_layer_widths(config)) * dtype_bytes


def kv_bytes_per_token_past_window(config: dict, dtype_bytes: int) -> int | None:
    """On a model with sliding-window layers (Gemma3), the bytes a cache that windows them (transformers'
    DynamicCache(config=...)) grows by per token once the context is longer than the window: the full-attention
    layers' alone. None for a model without sliding layers."""
    types = config.get("layer_types") or []
    if "sliding_attention" not in types:
        return None
    widths = _layer_widths(config)
    return sum(w for w, kind in zip(widths, types) if kind != "sliding_attention") * dtype_bytes


def kv_bytes_per_later_token(config: dict, dtype_bytes: int) -> int | None:
    """Bytes per token cached after the prefill of a kv-compress model run with project_context_only, whose
    layers with a key basis keep those tokens' exact keys beside their coordinates (and, with --exact-values,
    their exact values: the unprojected widths of "v_exact"; a windowed sliding layer, once full, only those of
    the current forward); None when no layer keeps them."""
    layouts = config.get("attention_layout") or []
    if config.get("project_context_only") is not True or not any(layout.get("k") for layout in layouts):
        return None
    kv_heads, head_dim = _kv_heads_and_head_dim(config)
    exact = sum(kv_heads * head_dim for layout in layouts if layout.get("k"))
    exact += sum(sum(layout.get("v_exact") or []) for layout in layouts if layout.get("k"))
    return kv_bytes_per_token(config, dtype_bytes) + exact * dtype_bytes


def describe(spec: str) -> dict:
    """A JSON-ready description of a model folder, .gguf, built-in name or hub id.

    A .gguf file is described as it is (its header: `export.describe`), not converted.
    """
    source = resolve_source(spec)
    if source.kind == "gguf":
        from .export.describe import describe_gguf

        return describe_gguf(source.path)
    checked = check_model(spec, read_only=True)
    config, folder, files = checked.config, checked.folder, checked.weights
    history = read_history(Path(folder)) if folder is not None else None
    if (
        history is None and folder is not None and (Path(folder) / SOURCE_FILE).is_file()
    ):  # a cached GGUF conversion
        history = {"source": read_json_record(Path(folder) / SOURCE_FILE, ("id",)), "passes": []}
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    size = _DTYPE_BYTES.get(dtype, 4)
    heads = config["num_attention_heads"]
    layer_types = config.get("layer_types")
    return {
        "model": spec,
        "folder": str(folder) if folder else None,
        "architecture": config.get("model_type"),
        "class": (config.get("architectures") or [None])[0],
        "layers": config["num_hidden_layers"],
        "hidden_size": config["hidden_size"],
        "intermediate_size": config.get("intermediate_size"),
        "attention_heads": heads,
        "kv_heads": config.get("num_key_value_heads") or heads,
        "head_dim": config.get("head_dim") or config["hidden_size"] // heads,
        "vocab_size": config.get("vocab_size"),
        "layer_types": ({t: layer_types.count(t) for t in sorted(set(layer_types))} if layer_types else None),
        "sliding_window": config.get("sliding_window") if layer_types else None,
        "parameters": parameter_count(checked.shapes) if files else None,
        "bytes_on_disk": sum(p.stat().st_size for p in files) if files else None,
        "dtype": dtype,
        "kv_cache_bytes_per_token": kv_bytes_per_token(config, size),
        "kv_cache_bytes_per_token_past_window": kv_bytes_per_token_past_window(config, size),
        "kv_cache_bytes_per_later_token": kv_bytes_per_later_token(config, size),
        "kv_cache_bytes_per_token_before_surgery": (
            kv_bytes_per_token({k: v for k, v in config.items() if k != "attention_layout"}, size)
            if config.get("attention_layout")
            else None
        ),
        "sparse_decode": _sparse_decode_path(config),
        "modeling_code": _modeling_code(config, folder),
        "history": history,
    }


def _modeling_code(config: dict, folder) -> str | None:
    """Whose code a load runs: none of its own (stock transformers), llmsurgery's as installed, or the folder's."""
    if not config.get("auto_map"):
        return None
    if folder is None:
        return "the hub repository's own (needs --trust-remote-code)"
    why = foreign_code(config, Path(folder))
    return (
        "llmsurgery's, as installed (no flag needed)"
        if why is None
        else f"the folder's own: it {why} (needs --trust-remote-code)"
    )


def _sparse_decode_path(config: dict) -> str | None:
    """For Top-K sparse models: which one-token decode path this machine runs (compiled kernel or fallback)."""
    if not config.get("sparsity_in") and not config.get("sparsity_out"):
        return None
    from .modeling.llmsurgery_sparse_kernel import kernel_status

    if config.get("sparse_decode") is False:
        return "off (sparse_decode is false in config.json): dense products on masked inputs"
    return kernel_status()


def description_table(spec: str, info: dict) -> list:
    """What `llmsurgery inspect` prints: the description as a table, then the source and each pass."""
    from rich.table import Table

    table = Table(title=f"{spec}", show_header=False)
    for key, value in info.items():
        if key != "history" and value is not None:
            table.add_row(key.replace("_", " "), f"{value:,}" if isinstance(value, int) else str(value))
    lines: list = [table]
    history = info["history"]
    if history:
        src = history["source"]
        lines.append(f"source: {src.get('id')} sha256={src.get('sha256', src.get('revision'))}")
        passes = history.get("passes", [])
        lines += [
            f"  pass {i}: {p['pass']} {p['config']} ({p['seconds']} s)" for i, p in enumerate(passes, 1)
        ]
        lines += [] if passes else ["  no passes (converted only)"]
    return lines
