"""`llmsurgery inspect FILE.gguf`: what a GGUF file holds, read from its header (no weights dequantized, nothing
converted): architecture and its keys, layers, tensor count and storage types, bytes, tokenizer, general.* keys."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..errors import UserError, first_line

_LONG = 200  # a string value longer than this is shown by its length (chat templates)


def describe_gguf(path: Path) -> dict:
    """A JSON-ready description of a .gguf file, in the shape `inspection.describe` gives folders."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        fields = {key: _value(f) for key, f in reader.fields.items() if not key.startswith("GGUF.")}
    except Exception as exc:  # noqa: BLE001 - any parse failure of a user file is bad input
        raise UserError(f"could not read GGUF {path}: {first_line(exc)}") from None
    arch = fields.get("general.architecture")
    if not isinstance(arch, str):
        raise UserError(f"could not read GGUF {path}: no general.architecture")
    types = Counter(t.tensor_type.name for t in reader.tensors)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    return {
        "model": str(path),
        "format": "gguf",
        "architecture": arch,
        "layers": fields.get(f"{arch}.block_count"),
        "hidden_size": fields.get(f"{arch}.embedding_length"),
        "intermediate_size": fields.get(f"{arch}.feed_forward_length"),
        "attention_heads": fields.get(f"{arch}.attention.head_count"),
        "kv_heads": fields.get(f"{arch}.attention.head_count_kv"),
        "context_length": fields.get(f"{arch}.context_length"),
        "tensors": len(reader.tensors),
        "tensor_types": dict(sorted(types.items())),
        "parameters": int(sum(int(t.n_elements) for t in reader.tensors)),
        "bytes_on_disk": path.stat().st_size,
        "tokenizer": fields.get("tokenizer.ggml.model"),
        "pre_tokenizer": fields.get("tokenizer.ggml.pre"),
        "vocab_size": len(tokens.data) if tokens is not None else None,
        "chat_template": "yes" if "tokenizer.chat_template" in fields else "no",
        **{key: value for key, value in fields.items() if key.startswith((f"{arch}.", "general."))},
        "history": None,
    }


def _value(field):
    """A reader field as a JSON value; token lists and other long arrays by their length."""
    import gguf

    if field.types and field.types[0] == gguf.GGUFValueType.ARRAY and len(field.data) > 16:
        return f"[{len(field.data)} values]"
    value = field.contents()
    if isinstance(value, str) and len(value) > _LONG:
        return f"({len(value)} characters)"
    return value
