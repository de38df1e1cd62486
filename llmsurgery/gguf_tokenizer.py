"""The tokenizer of a GGUF whose vocabulary is sentencepiece BPE stored without merges (Gemma's), built alike on
every transformers release the project runs on.

Such a file lists its tokens best first and no merges. transformers 5.3 and later rebuild the merges from that
order; 5.2 (what the kvpress extra resolves) builds a Unigram from the file's scores instead. On Gemma3-270M that
Unigram cuts text into single characters (23,258 tokens where the right tokenizer makes 4,631) and adds no BOS;
the model's long-range recall at 1024 tokens fell from 100 and 100 to 56 and 19 (filler, news) with it.
`sentencepiece_bpe` builds the right tokenizer from the file with the `tokenizers` library alone; `gguf_tokenizer`
uses it where transformers built something else, and saves every tokenizer as a plain tokenizer.json with the
file's special tokens (5.2 turns SmolLM2's into a CodeLlamaTokenizer that adds a BOS the file does not ask for
and takes <|im_start|> for its EOS).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types
SPACE = "\u2581"  # sentencepiece's visible space


@dataclass
class Vocabulary:
    """What a GGUF says of its tokenizer (llama.cpp's `tokenizer.ggml.*` keys)."""

    model: str  # "llama" is sentencepiece
    tokens: list[str]
    types: list[int]
    has_merges: bool
    bos: int | None
    eos: int | None
    unk: int | None
    pad: int | None
    add_bos: bool
    add_space_prefix: bool


def read_vocabulary(gguf: Path) -> Vocabulary:
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields

    def value(key: str, default=None):
        """A tokenizer field, decoded by the gguf package itself (as export/describe.py reads a header)."""
        field = fields.get(f"tokenizer.ggml.{key}")
        return default if field is None else field.contents()

    model = value("model")
    return Vocabulary(
        model=model,
        tokens=value("tokens"),
        types=value("token_type", []),
        has_merges="tokenizer.ggml.merges" in fields,
        bos=value("bos_token_id"),
        eos=value("eos_token_id"),
        unk=value("unknown_token_id"),
        pad=value("padding_token_id"),
        add_bos=bool(value("add_bos_token", model == "llama")),  # llama.cpp's default for sentencepiece
        add_space_prefix=bool(value("add_space_prefix", False)),
    )


def built_wrong(tokenizer, vocabulary: Vocabulary) -> bool:
    """Whether transformers built something other than BPE for a sentencepiece-BPE vocabulary with no merges."""
    model = type(tokenizer.backend_tokenizer.model).__name__
    return vocabulary.model == "llama" and not vocabulary.has_merges and model != "BPE"


def merges_in_file_order(tokens: list[str]) -> list[tuple[str, str]]:
    """The BPE merges a vocabulary listed best first implies: for each token in file order, every way to cut it
    into two tokens of the vocabulary, the longer left piece first."""
    known = set(tokens)
    merges = []
    for token in tokens:
        merges += [
            (token[:i], token[i:])
            for i in range(len(token) - 1, 0, -1)
            if token[:i] in known and token[i:] in known
        ]
    return merges


def gguf_tokenizer(gguf: Path):
    """The tokenizer `gguf` describes, as a plain fast tokenizer (its tokenizer.json reloads alike everywhere):
    transformers' own build of it, or `sentencepiece_bpe` where that is wrong, adding BOS exactly when the file
    says to, the special tokens the file names."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocabulary = read_vocabulary(gguf)
    built = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if built_wrong(built, vocabulary):
        backend = sentencepiece_bpe(vocabulary)
    else:  # a copy, wrapped plainly: 5.2 makes SmolLM2's a CodeLlamaTokenizer with CodeLlama's special tokens
        backend = Tokenizer.from_str(built.backend_tokenizer.to_str())
    tokens = vocabulary.tokens
    bos = vocabulary.bos if vocabulary.add_bos else None
    backend.post_processor = _as_is() if bos is None else _bos_first(tokens[bos], bos)
    specials = {"bos_token": vocabulary.bos, "eos_token": vocabulary.eos, "unk_token": vocabulary.unk}
    specials["pad_token"] = vocabulary.pad
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        add_bos_token=vocabulary.add_bos,
        add_eos_token=False,
        **{key: backend.id_to_token(i) for key, i in specials.items() if i is not None},
    )
    tokenizer.chat_template = built.chat_template
    return tokenizer


def _bos_first(bos: str, bos_id: int):
    from tokenizers import processors

    return processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
    )


def _as_is():
    from tokenizers import processors

    return processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])


def sentencepiece_bpe(v: Vocabulary):
    """A sentencepiece-BPE vocabulary as a `tokenizers.Tokenizer`: byte fallback, merges from the file order,
    spaces written as U+2581, control tokens special and user-defined ones kept whole (BOS: `gguf_tokenizer`)."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    # a token of spaces only is stored with real spaces; the normalizer writes them as U+2581
    tokens = [SPACE * len(t) if t and not t.strip(" ") else t for t in v.tokens]
    backend = Tokenizer(
        BPE(
            vocab={token: i for i, token in enumerate(tokens)},
            merges=merges_in_file_order(tokens),
            unk_token=tokens[v.unk] if v.unk is not None else None,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    spaces = [normalizers.Replace(" ", SPACE)]
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend(SPACE), *spaces] if v.add_space_prefix else spaces
    )
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if v.add_space_prefix else []))
    kinds = list(zip(tokens, v.types))
    backend.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t, k in kinds if k == CONTROL]
    )
    backend.add_tokens(
        [AddedToken(t, normalized=False, special=False) for t, k in kinds if k == USER_DEFINED]
    )
    return backend
