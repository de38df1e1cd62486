"""`export --format gguf` on the real built-in models: SmolLM2 dense and pruned, Gemma3 pruned keeping its pattern.

Each export is read back (block_count, the source GGUF's tensor names and tokenizer keys) and loaded with
transformers (`gguf_file=`): its float32 logits equal the safetensors model's. llama.cpp itself runs them in
benchmarks/serving.py (it needs llama.cpp compiled).
"""

import json

import pytest
import torch
from helpers import logits_of, run_cli, stock_load

from llmsurgery.sources import BUILTINS, local_folder, resolve_source

pytestmark = pytest.mark.real
PROMPT = "The prime minister said on Tuesday that the government"


@pytest.fixture(scope="module")
def smollm2_pruned(module_tmp):
    out = module_tmp / "smol23"
    result = run_cli("prune", "--bi", "smollm2-135m", "--remove", "7", "--output", out)
    assert result.exit_code == 0, result.output
    return out


def _reader(path):
    import gguf

    return gguf.GGUFReader(path)


def _tokenizer_bytes(reader) -> dict[str, list[bytes]]:
    return {k: [bytes(p) for p in f.parts] for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def _check_export(model, out, source_gguf, layers: int, tolerance: float) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = run_cli("export", model, "--outtype", "f32", "--output", out)
    assert result.exit_code == 0, result.output
    reader, source = _reader(out), _reader(source_gguf)
    arch = reader.fields["general.architecture"].contents()
    assert reader.fields[f"{arch}.block_count"].contents() == layers
    ours = {t.name: t.shape.tolist() for t in reader.tensors}
    theirs = {
        t.name: t.shape.tolist()
        for t in source.tensors
        if not t.name.startswith("blk.") or int(t.name.split(".")[1]) < layers
    }
    assert ours == theirs  # llama.cpp's own file, renumbered: the same names and shapes for the kept blocks
    assert _tokenizer_bytes(reader) == _tokenizer_bytes(source)
    folder = local_folder(resolve_source(str(model)))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    loaded = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    original = stock_load(folder)
    expected = logits_of(original, ids)
    gap = (logits_of(loaded, ids) - expected).abs().max().item()
    assert gap <= tolerance * expected.abs().max().item(), gap


def test_smollm2_dense_and_pruned_exports_give_the_safetensors_logits(smollm2_pruned, tmp_path):
    source = BUILTINS["smollm2-135m"].locate_gguf()
    _check_export("smollm2-135m", tmp_path / "dense.gguf", source, 30, 1e-6)
    _check_export(smollm2_pruned, tmp_path / "pruned.gguf", source, 23, 1e-6)


def test_pruned_gemma3_keeping_its_pattern_exports_with_the_safetensors_logits(tmp_path):
    pruned = tmp_path / "gemma12"
    result = run_cli("prune", "--bi", "gemma3-270m", "--block", "--remove", "6", "--output", pruned)
    assert result.exit_code == 0, result.output
    kept = json.loads((pruned / "config.json").read_text())["layer_types"]
    assert kept == ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(12)]
    # gemma's norms go through 1 + w and back in transformers' reader: float32 rounding, not exactness
    _check_export(pruned, tmp_path / "gemma12.gguf", BUILTINS["gemma3-270m"].locate_gguf(), 12, 1e-4)
