"""The tokenizer of a GGUF file (`tokenizer.*` keys), from the model's source GGUF or from its tokenizer.json.

- A model that came from a GGUF file (the built-ins, a .gguf given as MODEL, anything made from those: the
  history's source says which) gets the source file's `tokenizer.*` keys copied byte for byte. This is the
  faithful way: transformers' GGUF reader rebuilds an approximate tokenizer.json (it drops SmolLM2's digit
  splitting, for one), so re-deriving from the folder would lose what the source file says.
- A Hugging Face folder is read from tokenizer.json (a "fast" tokenizer), as llama.cpp's converter does:
  byte-level BPE becomes `tokenizer.ggml.model = "gpt2"` with tokens, token types and merges, and a
  pre-tokenizer name; SentencePiece-style BPE (byte fallback, "▁" for spaces: llama-2, mistral, gemma)
  becomes `"llama"` with tokens, scores and types. Special token ids, add_bos/add_eos and the chat template
  come from gguf-py's `SpecialVocab` (tokenizer_config.json, config.json).
- The pre-tokenizer name (`tokenizer.ggml.pre`) tells llama.cpp how to split text before BPE. llama.cpp's
  converter recognises it by hashing the tokenizer's output on a fixed text, which only knows published
  vocabularies; here it is read from tokenizer.json's pre_tokenizer, compared with the regular expressions
  llama.cpp implements for each name (src/llama-vocab.cpp). Anything else is refused: llama.cpp would split
  text differently and the model would see other tokens.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import UserError, first_line

# Regular expressions of tokenizer.json Split pre-tokenizers, as llama-vocab.cpp quotes them for its names.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_SPACE = "\u2581"  # SentencePiece's visible space
TOKEN_TYPES = {"NORMAL": 1, "UNKNOWN": 2, "CONTROL": 3, "USER_DEFINED": 4, "UNUSED": 5, "BYTE": 6}


@dataclass
class Vocabulary:
    """What goes into the file's tokenizer keys, and where it came from (for the summary and the tests)."""

    origin: str
    n_tokens: int
    write: Callable = field(repr=False)  # write(GGUFWriter)


def source_gguf(history: dict | None) -> tuple[Path | None, str | None]:
    """(the GGUF file the model was converted from, None) if it is still there and unchanged; else (None, why)."""
    from ..sources import BUILTINS, sha256_files

    source = (history or {}).get("source") or {}
    if source.get("kind") != "gguf":
        return None, None
    ident = str(source.get("id"))
    try:
        path = BUILTINS[ident].locate_gguf() if ident in BUILTINS else Path(ident)
    except UserError as exc:
        return None, str(exc)
    if not path.is_file():
        return None, f"its source GGUF {path} is gone"
    if source.get("sha256") and sha256_files([path]) != source["sha256"]:
        return None, f"its source GGUF {path} changed since the conversion"
    return path, None


def from_source_gguf(path: Path, n_rows: int) -> Vocabulary:
    """Copy every `tokenizer.*` key of the source file; the token list must fit the embedding's rows."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 - a damaged source file is bad input
        raise UserError(f"could not read GGUF {path}: {first_line(exc)}") from None
    fields = {k: f for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    if "tokenizer.ggml.tokens" not in fields:
        raise UserError(f"{path} holds no tokenizer (tokenizer.ggml.tokens)")
    n_tokens = len(fields["tokenizer.ggml.tokens"].data)
    if n_tokens != n_rows:
        raise UserError(
            f"{path} lists {n_tokens} tokens but the model's embedding has {n_rows} rows; "
            "the source tokenizer does not fit this model"
        )
    copied = [(key, *_field_value(f)) for key, f in fields.items()]

    def write(writer) -> None:
        for key, value, vtype, sub_type in copied:
            writer.add_key_value(key, value, vtype, sub_type=sub_type)

    return Vocabulary(f"copied from {path.name}", n_tokens, write)


def _field_value(f):
    """(value, type, sub_type) of a reader field, strings as raw bytes (copied, never re-encoded)."""
    import gguf

    kind = f.types[0]
    if kind == gguf.GGUFValueType.ARRAY:
        sub = f.types[-1]
        if sub == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i].tobytes()) for i in f.data], kind, sub
        return list(f.contents()), kind, sub
    if kind == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]].tobytes()), kind, None
    return f.contents(), kind, None


def from_tokenizer_json(folder: Path, n_rows: int) -> Vocabulary:
    """The folder's tokenizer.json as llama.cpp's "gpt2" (byte-level BPE) or "llama" (SentencePiece BPE) vocabulary."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise UserError(
            f"{folder} has no tokenizer.json; export reads fast (tokenizers) vocabularies: save the tokenizer with "
            "transformers (AutoTokenizer.from_pretrained(...).save_pretrained(folder)) first"
        )
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        model = spec["model"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise UserError(f"{path} is not a readable tokenizers file") from None
    if model.get("type") != "BPE":
        raise UserError(f"{path}: a {model.get('type')} vocabulary cannot be exported (BPE only)")
    tokens, types = _tokens_by_id(spec, n_rows, path)
    if _is_byte_level(spec):
        pre = pre_tokenizer_name(spec)
        return _gpt2_vocabulary(folder, tokens, types, pre, n_rows)
    if model.get("byte_fallback") and _escapes_spaces(spec):
        return _llama_vocabulary(folder, spec, tokens, types, n_rows)
    raise UserError(
        f"{path}: neither byte-level BPE nor SentencePiece-style BPE (byte fallback, '\u2581' for spaces); "
        "llama.cpp would tokenize it differently"
    )


def _tokens_by_id(spec: dict, n_rows: int, path: Path) -> tuple[list[str], list[int]]:
    """Tokens in id order, padded to the embedding's rows with unused entries (as llama.cpp's converter does)."""
    by_id = {int(i): t for t, i in spec["model"]["vocab"].items()}
    added = {int(a["id"]): a for a in spec.get("added_tokens") or []}
    by_id |= {i: a["content"] for i, a in added.items()}
    if by_id and max(by_id) >= n_rows:
        raise UserError(
            f"{path}: token id {max(by_id)} is past the model's {n_rows} embedding rows; the tokenizer does not "
            "fit this model"
        )
    tokens, types = [], []
    for i in range(n_rows):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_TYPES["UNUSED"])
        elif i in added:
            looks_special = by_id[i].startswith("<|") and by_id[i].endswith("|>")
            special = added[i].get("special") or looks_special
            tokens.append(by_id[i])
            types.append(TOKEN_TYPES["CONTROL" if special else "USER_DEFINED"])
        else:
            tokens.append(by_id[i])
            types.append(TOKEN_TYPES["NORMAL"])
    return tokens, types


def _is_byte_level(spec: dict) -> bool:
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return any(p.get("type") == "ByteLevel" for p in parts)


def pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE tokenizer.json, or a UserError when none matches."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    normalizer = (spec.get("normalizer") or {}).get("type")
    byte_level = parts[-1] if kinds and kinds[-1] == "ByteLevel" else None
    name = None
    if byte_level is not None and not byte_level.get("add_prefix_space", False):
        regex = byte_level.get("use_regex", True)
        if kinds == ["ByteLevel"] and regex:
            name = "gpt-2"
        elif kinds == ["Digits", "ByteLevel"] and regex and parts[0].get("individual_digits"):
            name = "smollm"
        elif kinds == ["Split", "ByteLevel"] and not regex and parts[0].get("behavior") == "Isolated":
            pattern = (parts[0].get("pattern") or {}).get("Regex")
            name = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}.get(pattern)
    ignore_merges = bool(spec["model"].get("ignore_merges"))
    if name is not None and ignore_merges != (name == "llama-bpe"):
        name = None  # llama.cpp ties ignore_merges to the pre-tokenizer name
    if name is not None and normalizer not in (None, "NFC" if name == "qwen2" else None):
        name = None
    if name is None:
        shown = "+".join(k or "?" for k in kinds) or "none"
        raise UserError(
            f"tokenizer.json's pre-tokenizer ({shown}) is not one llama.cpp implements the same way "
            "(gpt-2, smollm, llama-bpe, qwen2); it cannot be exported faithfully"
        )
    return name


def _special_vocab(folder: Path, n_rows: int, merges: bool):
    """gguf-py's special tokens, merges and chat template of the folder, with add_bos / add_eos set to what the
    folder's tokenizer does (it is run on a word: llama.cpp's defaults differ per vocabulary type)."""
    import gguf
    from transformers import AutoTokenizer

    from ..console import quiet_transformers

    special = gguf.SpecialVocab(folder, load_merges=merges, n_vocab=n_rows)
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - a tokenizer that does not load is bad input
        raise UserError(f"could not load the tokenizer of {folder}: {first_line(exc)}") from None
    with_specials = tokenizer("word")["input_ids"]
    plain = tokenizer("word", add_special_tokens=False)["input_ids"]
    extra = len(with_specials) - len(plain)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    special.add_special_token["bos"] = extra > 0 and bos is not None and with_specials[0] == bos
    special.add_special_token["eos"] = extra > 0 and eos is not None and with_specials[-1] == eos
    return special


def _gpt2_vocabulary(folder: Path, tokens: list[str], types: list[int], pre: str, n_rows: int) -> Vocabulary:
    special = _special_vocab(folder, n_rows, merges=True)
    if not special.merges:
        raise UserError(f"{folder / 'tokenizer.json'} holds no merges; a BPE vocabulary needs them")

    def write(writer) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special.add_to_gguf(writer, quiet=True)

    return Vocabulary(f"tokenizer.json (byte-level BPE, pre-tokenizer {pre})", len(tokens), write)


def _escapes_spaces(spec: dict) -> bool:
    """Spaces become '▁' (a Replace normalizer, or a Metaspace pre-tokenizer that does not split)."""
    normalizer = spec.get("normalizer") or {}
    steps = (
        normalizer.get("normalizers", [normalizer]) if normalizer.get("type") == "Sequence" else [normalizer]
    )
    replaces = any(
        s.get("type") == "Replace"
        and (s.get("pattern") or {}).get("String") == " "
        and s.get("content") == _SPACE
        for s in steps
    )
    pre = spec.get("pre_tokenizer") or {}
    metaspace = pre.get("type") == "Metaspace" and not pre.get("split", True)
    splits_spaces = pre.get("type") == "Split" and (pre.get("pattern") or {}).get("String") == " "
    no_op_pre = (
        not pre or metaspace or (splits_spaces and replaces)
    )  # after Replace there is no " " left to split
    return (replaces or metaspace) and no_op_pre


def _adds_space_prefix(spec: dict) -> bool:
    normalizer = spec.get("normalizer") or {}
    steps = (
        normalizer.get("normalizers", [normalizer]) if normalizer.get("type") == "Sequence" else [normalizer]
    )
    prepends = any(s.get("type") == "Prepend" and s.get("prepend") == _SPACE for s in steps)
    pre = spec.get("pre_tokenizer") or {}
    metaspace = pre.get("type") == "Metaspace" and pre.get("prepend_scheme", "always") in ("first", "always")
    return prepends or metaspace


def merge_scores(spec: dict, tokens: list[str], types: list[int]) -> list[float]:
    """SentencePiece scores whose order is the BPE merge order: llama.cpp's SPM tokenizer merges the pair with the
    highest score first, HF's BPE the pair with the lowest merge rank, so a merged token scores -rank.
    Tokens no merge makes score below every merge (by id), bytes 0, control and unused tokens -1000 (as in
    SentencePiece-converted GGUF files)."""
    merges = spec["model"].get("merges") or []
    rank: dict[str, int] = {}
    for i, merge in enumerate(merges):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        rank.setdefault(left + right, i)
    scores = []
    for i, (token, kind) in enumerate(zip(tokens, types)):
        if kind == TOKEN_TYPES["BYTE"]:
            scores.append(0.0)
        elif kind != TOKEN_TYPES["NORMAL"]:
            scores.append(-1000.0)
        else:
            scores.append(-float(rank[token]) if token in rank else -float(len(merges) + i))
    return scores


def _llama_vocabulary(
    folder: Path, spec: dict, tokens: list[str], types: list[int], n_rows: int
) -> Vocabulary:
    types = [
        TOKEN_TYPES["BYTE"]
        if kind == TOKEN_TYPES["NORMAL"] and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", tok)
        else kind
        for tok, kind in zip(tokens, types)
    ]
    scores = merge_scores(spec, tokens, types)
    special = _special_vocab(folder, n_rows, merges=False)
    prefix = _adds_space_prefix(spec)

    def write(writer) -> None:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_add_space_prefix(prefix)
        special.add_to_gguf(writer, quiet=True)

    return Vocabulary("tokenizer.json (SentencePiece-style BPE)", len(tokens), write)
