"""The tokenizers llmsurgery converts the built-in GGUF models with, against reference token ids.

`tests/data/gguf_token_ids.json` holds, per built-in model and text, the ids of transformers' own GGUF tokenizer as
built from transformers 5.3 on, and its special tokens (written with transformers 5.25.0 by
`python tests/test_gguf_tokenizer.py`). In the test venv (the newest transformers) that build is checked against
the file as well; in the kvpress venv (transformers 5.2, whose own build cuts Gemma3's text into characters and
gives SmolLM2's a BOS and a wrong EOS) llmsurgery's conversion must give the same, after a save and a reload as
the model cache does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from llmsurgery.corpora import evaluation_documents
from llmsurgery.gguf_tokenizer import gguf_tokenizer, merges_in_file_order
from llmsurgery.sources import BUILTINS, CONVERSION, SOURCE_FILE, _current

REFERENCE = Path(__file__).parent / "data" / "gguf_token_ids.json"
MODELS = ("smollm2-135m", "gemma3-270m")
SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")


def texts() -> dict[str, str]:
    return {
        "news": "\n\n".join(evaluation_documents("news")[:5]),
        "gemma chat": "<start_of_turn>user\nHi  there,\tfriend!<end_of_turn>\n<start_of_turn>model\n",
        "smollm2 chat": "<|im_start|>user\nHi  there<|im_end|>\n<|im_start|>assistant\n",
        "spaces and unicode": "   leading spaces, ünïcödé 日本語 🙂\r\n",
        "empty": "",
    }


def _ids(tokenizer) -> dict:
    """Per text its token ids, and the special tokens."""
    ids = {name: tokenizer(text)["input_ids"] for name, text in texts().items()}
    return ids | {"special": {key: getattr(tokenizer, key) for key in SPECIAL}}


def _converted_ids(name: str, tmp_path: Path) -> dict:
    from transformers import AutoTokenizer

    gguf_tokenizer(BUILTINS[name].locate_gguf()).save_pretrained(tmp_path)
    return _ids(AutoTokenizer.from_pretrained(tmp_path))


def _check_conversion(name: str, tmp_path: Path) -> None:
    expected = json.loads(REFERENCE.read_text())[name]
    got = _converted_ids(name, tmp_path)
    for text, ids in expected.items():
        assert got[text] == ids, (name, text, got[text][:12], ids[:12])


@pytest.mark.parametrize("name", MODELS)
def test_conversion_tokenizes_as_the_reference(name, tmp_path):
    """In the test venv: transformers' own build is the reference's, and llmsurgery's conversion gives it too."""
    from transformers import AutoTokenizer

    gguf = BUILTINS[name].locate_gguf()
    own = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    assert _ids(own) == json.loads(REFERENCE.read_text())[name]
    _check_conversion(name, tmp_path)


@pytest.mark.kvpress
@pytest.mark.parametrize("name", MODELS)
def test_conversion_on_the_kvpress_transformers_tokenizes_as_the_reference(name, tmp_path):
    """In the kvpress venv (transformers 5.2): the conversion still gives the reference ids."""
    _check_conversion(name, tmp_path)


def test_merges_follow_the_file_order_longer_left_piece_first():
    tokens = ["a", "b", "c", "ab", "bc", "abc"]
    assert merges_in_file_order(tokens) == [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]


def test_a_cached_conversion_of_another_number_is_made_again(tmp_path):
    assert not _current(tmp_path)  # nothing there
    (tmp_path / SOURCE_FILE).write_text(json.dumps({"id": "gemma3-270m", "kind": "gguf"}))
    assert not _current(tmp_path)  # made before the conversion was numbered
    (tmp_path / SOURCE_FILE).write_text(json.dumps({"id": "gemma3-270m", "conversion": CONVERSION}))
    assert _current(tmp_path)


if __name__ == "__main__":  # write the reference from transformers' own build (it must be 5.3 or later)
    import transformers
    from transformers import AutoTokenizer

    if tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (5, 3):
        sys.exit(f"transformers {transformers.__version__} builds these tokenizers wrong; use 5.3 or later")
    reference = {}
    for name in MODELS:
        gguf = BUILTINS[name].locate_gguf()
        reference[name] = _ids(AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name))
    REFERENCE.write_text(json.dumps(reference) + "\n")
    print(f"wrote {REFERENCE} (transformers {transformers.__version__})")
