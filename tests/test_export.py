"""`llmsurgery export --format gguf` on tiny models of every architecture.

Read back with gguf-py's `GGUFReader` (keys, llama.cpp's tensor names from gguf-py's own name map, shapes, storage
types, the stored conventions), and loaded with transformers' GGUF reader (`gguf_file=`), whose logits must equal
the safetensors model's at f32. transformers keeps its defaults for what its GGUF reader does not read (qwen3's
head_dim, gemma3's query_pre_attn_scalar), so those tiny models use the default values there.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tokenizer, tiny_config
from helpers import logits_of, run_cli, stock_load

from llmsurgery.arch import ARCHITECTURES
from llmsurgery.export.tensors import interleave_rope_rows

TEXTS = [
    "The cat sat on the mat.",
    "def f(x):\n    return x ** 2  # 12345",
    "  Spaces  and\ttabs, 'quotes' we've!",
]
TINY = ["--calib-samples", "2", "--calib-seq-len", "32"]


def _build(arch: str, folder: Path, layers: int = 6, **config) -> Path:
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch, layers)
    for key, value in config.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # random norms: a missing norm offset or permutation cannot pass by luck
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(0.1 * torch.randn_like(param) + (0.0 if "gemma" in arch else 1.0))
    model.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


GEMMA_TYPES = ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(12)]


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export_models")
    found = {arch: tiny_models[arch] for arch in ("llama", "qwen2")}
    # general.name is the folder's name; transformers' GGUF reader takes a file whose name is exactly "mistral" for
    # its mistral class and then finds no gguf-py mapping for it, so the tiny mistral gets another folder name.
    found["mistral"] = Path(shutil.copytree(tiny_models["mistral"], root / "tiny-mistral"))
    found["qwen3"] = _build("qwen3", root / "qwen3", head_dim=128)
    found["gemma3_text"] = _build(
        "gemma3_text",
        root / "gemma3",
        layers=12,
        head_dim=256,
        query_pre_attn_scalar=256,
        layer_types=GEMMA_TYPES,
        tie_word_embeddings=True,
    )
    return found


def _export(model: Path, out: Path, *options: str) -> Path:
    result = run_cli("export", model, "--output", out, *options)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exported")
    return {
        arch: _export(folder, root / f"{arch}.gguf", "--outtype", "f32") for arch, folder in models.items()
    }


def _reader(path: Path):
    import gguf

    return gguf.GGUFReader(path)


def _state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_gguf_holds_llama_cpp_names_shapes_and_keys(arch, models, exported):
    import gguf

    spec, state = ARCHITECTURES[arch], _state(models[arch])
    reader = _reader(exported[arch])
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == spec.gguf_arch
    n_layers = json.loads((models[arch] / "config.json").read_text())["num_hidden_layers"]
    assert field(f"{spec.gguf_arch}.block_count") == n_layers
    # Names from gguf-py's own HF -> GGUF map (what llama.cpp's converter uses), not from our table.
    model_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == spec.gguf_arch)
    name_map = gguf.get_tensor_name_map(model_arch, n_layers)
    expected = {name_map.get_name(name, try_suffixes=(".weight", ".bias")): name for name in state}
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == set(expected)
    for gguf_name, hf_name in expected.items():
        assert tuple(reversed(tensors[gguf_name].shape.tolist())) == tuple(state[hf_name].shape)
        assert tensors[gguf_name].tensor_type == gguf.GGMLQuantizationType.F32
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == state[f"{spec.embed}.weight"].shape[0]
    assert ("output.weight" in tensors) == (
        f"{spec.lm_head}.weight" in state
    )  # tied: llama.cpp reuses token_embd
    assert not list(exported[arch].parent.glob(".*tmp-*"))


def _stored(reader, name: str) -> torch.Tensor:
    tensor = next(t for t in reader.tensors if t.name == name)
    return torch.from_numpy(np.array(tensor.data)).reshape(tuple(reversed(tensor.shape.tolist())))


def test_llama_q_k_rows_are_interleaved_and_gemma_norms_offset(models, exported):
    state, reader = _state(models["llama"]), _reader(exported["llama"])
    for proj, gguf_name, heads in (("q_proj", "attn_q", 4), ("k_proj", "attn_k", 2)):
        hf = state[f"model.layers.1.self_attn.{proj}.weight"]
        stored = _stored(reader, f"blk.1.{gguf_name}.weight")
        d = hf.shape[0] // heads
        for h in range(heads):
            for j in range(d // 2):  # llama.cpp's rotation pairs (2j, 2j+1) = HF's (j, j + d/2)
                assert torch.equal(stored[h * d + 2 * j], hf[h * d + j])
                assert torch.equal(stored[h * d + 2 * j + 1], hf[h * d + d // 2 + j])
        assert not torch.equal(stored, hf)
    qwen_state, qwen = _state(models["qwen2"]), _reader(exported["qwen2"])  # NeoX-style there: untouched
    assert torch.equal(
        _stored(qwen, "blk.1.attn_q.weight"), qwen_state["model.layers.1.self_attn.q_proj.weight"]
    )
    gemma_state, gemma = _state(models["gemma3_text"]), _reader(exported["gemma3_text"])
    for hf_name, gguf_name in (
        ("model.layers.2.input_layernorm.weight", "blk.2.attn_norm.weight"),
        ("model.layers.2.post_feedforward_layernorm.weight", "blk.2.post_ffw_norm.weight"),
        ("model.layers.2.self_attn.q_norm.weight", "blk.2.attn_q_norm.weight"),
        ("model.norm.weight", "output_norm.weight"),
    ):
        assert torch.equal(_stored(gemma, gguf_name), gemma_state[hf_name] + 1)


def _rotate_half_rope(x: torch.Tensor, pos: int, base: float = 10000.0) -> torch.Tensor:
    d = x.shape[-1]
    theta = pos * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = torch.cos(theta).repeat(2), torch.sin(theta).repeat(2)
    return x * cos + torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1) * sin


def _interleaved_rope(x: torch.Tensor, pos: int, base: float = 10000.0) -> torch.Tensor:
    """llama.cpp's LLAMA_ROPE_TYPE_NORM: rotate (x_2j, x_2j+1) by pos * base^(-2j/d)."""
    d = x.shape[-1]
    theta = pos * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * torch.cos(theta) - odd * torch.sin(theta)
    out[..., 1::2] = even * torch.sin(theta) + odd * torch.cos(theta)
    return out


def test_interleaved_rope_on_permuted_rows_gives_the_same_attention_scores():
    """q.k after RoPE is the same in HF's layout and in llama.cpp's on the permuted projections: the permutation
    changes no attention score."""
    torch.manual_seed(0)
    heads, d, dim = 3, 16, 24
    wq, wk, x = (
        torch.randn(heads * d, dim).double(),
        torch.randn(heads * d, dim).double(),
        torch.randn(5, dim),
    )
    q, k = (x.double() @ wq.T).view(5, heads, d), (x.double() @ wk.T).view(5, heads, d)
    qp = (x.double() @ interleave_rope_rows(wq, heads).T).view(5, heads, d)
    kp = (x.double() @ interleave_rope_rows(wk, heads).T).view(5, heads, d)
    for i in range(5):
        for j in range(i + 1):
            hf = (_rotate_half_rope(q[i], i) * _rotate_half_rope(k[j], j)).sum(-1)
            cpp = (_interleaved_rope(qp[i], i) * _interleaved_rope(kp[j], j)).sum(-1)
            assert torch.allclose(hf, cpp, atol=1e-10)


def _gguf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_transformers_reads_the_export_with_equal_logits_and_tokens(arch, models, exported):
    from transformers import AutoTokenizer

    original, loaded = stock_load(models[arch]), _gguf_model(exported[arch])
    assert loaded.config.num_hidden_layers == original.config.num_hidden_layers
    diff = (logits_of(loaded) - logits_of(original)).abs().max().item()
    assert diff <= 1e-5, diff
    if arch in ("qwen2", "qwen3"):
        return  # transformers rebuilds a qwen2 GGUF tokenizer with Qwen2's own pre-tokenizer, whatever the file says
    ours = AutoTokenizer.from_pretrained(models[arch])
    theirs = AutoTokenizer.from_pretrained(exported[arch].parent, gguf_file=exported[arch].name)
    for text in TEXTS:
        assert theirs(text)["input_ids"] == ours(text)["input_ids"], text


def test_pruned_models_export_the_layers_they_keep(models, tmp_path):
    for arch, args in (("llama", ["--remove", "2"]), ("gemma3_text", ["--block", "--remove", "6"])):
        pruned = tmp_path / f"{arch}-pruned"
        result = run_cli("prune", "--bi", models[arch], "--output", pruned, *args, *TINY)
        assert result.exit_code == 0, result.output
        out = _export(pruned, tmp_path / f"{arch}.gguf", "--outtype", "f32")
        spec = ARCHITECTURES[arch]
        kept = json.loads((pruned / "config.json").read_text())["num_hidden_layers"]
        assert kept == (4 if arch == "llama" else 6)
        assert _reader(out).fields[f"{spec.gguf_arch}.block_count"].contents() == kept
        diff = (logits_of(_gguf_model(out)) - logits_of(stock_load(pruned))).abs().max().item()
        assert diff <= 1e-5, (arch, diff)


def test_half_and_q8_0_store_what_they_claim(models, tmp_path):
    import gguf

    folder, state = models["llama"], _state(models["llama"])
    hf_q = state["model.layers.0.self_attn.q_proj.weight"]
    for outtype, dtype in (("f16", torch.float16), ("bf16", torch.bfloat16)):
        out = _export(folder, tmp_path / f"{outtype}.gguf", "--outtype", outtype)
        reader = _reader(out)
        kinds = {t.name: t.tensor_type.name for t in reader.tensors}
        assert kinds["blk.0.attn_q.weight"] == outtype.upper() and kinds["blk.0.attn_norm.weight"] == "F32"
        loaded = _gguf_model(out).state_dict()
        assert torch.equal(loaded["model.layers.0.self_attn.q_proj.weight"], hf_q.to(dtype).float())
        assert torch.equal(
            loaded["model.layers.0.input_layernorm.weight"], state["model.layers.0.input_layernorm.weight"]
        )
    out = _export(folder, tmp_path / "q8.gguf", "--outtype", "q8_0")
    reader = _reader(out)
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    stored = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    assert stored.tensor_type == gguf.GGMLQuantizationType.Q8_0
    deq = torch.from_numpy(gguf.quants.dequantize(stored.data, stored.tensor_type)).reshape(hf_q.shape)
    blocks = interleave_rope_rows(hf_q, 4).reshape(-1, 32)
    step = blocks.abs().amax(1, keepdim=True) / 127  # Q8_0: one scale per 32 values (float16), 8-bit integers
    assert ((deq.reshape(-1, 32) - blocks).abs() <= step * (0.5 + 127 * 2**-11) + 1e-7).all()
    original, loaded = logits_of(stock_load(folder)), logits_of(_gguf_model(out))
    assert (loaded - original).abs().max() <= 0.05 * original.abs().max()  # 6 random layers of block noise
    assert out.stat().st_size < (tmp_path / "f16.gguf").stat().st_size


def test_llama3_rope_scaling_writes_llama_cpp_frequency_divisors(tmp_path):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    folder = _build("llama", tmp_path / "llama3", rope_parameters=rope)
    out = _export(folder, tmp_path / "llama3.gguf", "--outtype", "f32")
    stored = _stored(_reader(out), "rope_freqs.weight").double()
    config = AutoConfig.from_pretrained(folder)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / 500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    assert torch.allclose(stored, plain / scaled.double(), rtol=1e-5)
    assert stored.min() == 1.0 and stored.max() == 8.0


def test_linear_rope_scaling_and_a_mistral_window_are_announced(tmp_path):
    linear = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    out = _export(_build("llama", tmp_path / "linear", rope_parameters=linear), tmp_path / "linear.gguf")
    fields = _reader(out).fields
    assert fields["llama.rope.scaling.type"].contents() == "linear"
    assert fields["llama.rope.scaling.factor"].contents() == 2.0
    windowed = _build("mistral", tmp_path / "windowed", sliding_window=16)
    result = run_cli("export", windowed, "--output", tmp_path / "windowed.gguf")
    assert result.exit_code == 0 and "sliding window (16)" in result.output
    assert _reader(tmp_path / "windowed.gguf").fields["llama.context_length"].contents() == 16


def test_pre_tokenizer_is_read_from_tokenizer_json_structure():
    from llmsurgery.errors import UserError
    from llmsurgery.export.vocab import _LLAMA3_SPLIT, _QWEN2_SPLIT, pre_tokenizer_name

    def spec(pre, normalizer=None, ignore_merges=False):
        return {"pre_tokenizer": pre, "normalizer": normalizer, "model": {"ignore_merges": ignore_merges}}

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    split = lambda regex: {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated"}  # noqa: E731
    no_regex = byte_level | {"use_regex": False}
    assert pre_tokenizer_name(spec(byte_level)) == "gpt-2"
    digits = {"type": "Digits", "individual_digits": True}
    assert pre_tokenizer_name(spec({"type": "Sequence", "pretokenizers": [digits, byte_level]})) == "smollm"
    llama3 = {"type": "Sequence", "pretokenizers": [split(_LLAMA3_SPLIT), no_regex]}
    assert pre_tokenizer_name(spec(llama3, ignore_merges=True)) == "llama-bpe"
    qwen = {"type": "Sequence", "pretokenizers": [split(_QWEN2_SPLIT), no_regex]}
    assert pre_tokenizer_name(spec(qwen, {"type": "NFC"})) == "qwen2"
    for unknown in (
        spec(llama3),  # llama.cpp's llama-bpe ignores merges; this tokenizer does not
        spec(byte_level | {"add_prefix_space": True}),
        spec({"type": "Sequence", "pretokenizers": [digits | {"individual_digits": False}, byte_level]}),
        spec(byte_level, {"type": "Lowercase"}),
    ):
        with pytest.raises(UserError, match="not one llama.cpp implements"):
            pre_tokenizer_name(unknown)


def _sentencepiece_style_tokenizer():
    """The llama-2 / mistral tokenizer.json form: specials, the 256 byte pieces, then BPE pieces in the vocabulary;
    byte fallback; spaces as '▁' with a prefix space. 400 tokens, like the tiny models' embedding."""
    from pydoc_data.topics import topics

    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    trained = Tokenizer(models.BPE())
    trained.normalizer = normalizer
    trained.train_from_iterator(
        list(topics.values()), trainers.BpeTrainer(vocab_size=141, limit_alphabet=60, show_progress=False)
    )
    state = json.loads(trained.to_str())["model"]
    pieces = sorted(state["vocab"], key=state["vocab"].get)
    vocab = {
        t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces])
    }
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizer
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    assert tok.get_vocab_size() == 400
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_sentencepiece_style_vocabulary_round_trips(models, tmp_path):
    import gguf

    folder = tmp_path / "spm"
    shutil.copytree(models["llama"], folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    _sentencepiece_style_tokenizer().save_pretrained(folder)
    out = _export(folder, tmp_path / "spm.gguf", "--outtype", "f32")
    reader = _reader(out)
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.add_space_prefix"].contents() is True
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types.count(int(gguf.TokenType.BYTE)) == 256 and types[1] == int(gguf.TokenType.CONTROL)
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(folder)
    theirs = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    # Texts that do not start with a space: transformers rebuilds the prefix space as a Metaspace, which adds none
    # before a leading space, where the folder's Prepend normalizer (and llama.cpp) add one.
    for text in [*(t.lstrip() for t in TEXTS), "naïve café – 東京 x\u00a0y"]:
        assert theirs(text)["input_ids"] == ours(text)["input_ids"], text


def test_a_model_from_a_gguf_file_gets_that_file_s_tokenizer_and_same_tensors(exported, tmp_path):
    """GGUF -> safetensors (transformers, cached) -> GGUF: the tokenizer keys are copied byte for byte and the f32
    tensors come back bit for bit."""
    first = tmp_path / "first.gguf"
    shutil.copyfile(exported["llama"], first)
    again = _export(first, tmp_path / "again.gguf", "--outtype", "f32")
    a, b = _reader(first), _reader(again)
    keys = sorted(k for k in a.fields if k.startswith("tokenizer."))
    assert keys == sorted(k for k in b.fields if k.startswith("tokenizer.")) and keys
    for key in keys:
        assert [bytes(p) for p in a.fields[key].parts] == [bytes(p) for p in b.fields[key].parts], key
    assert "copied from first.gguf" in run_cli("export", first, "-o", tmp_path / "x.gguf").output
    for ta, tb in zip(a.tensors, b.tensors):
        assert ta.name == tb.name and np.array_equal(np.array(ta.data), np.array(tb.data)), ta.name


def test_inspect_describes_a_gguf_file_without_converting_it(exported, tmp_path, monkeypatch):
    import llmsurgery.sources

    monkeypatch.setattr(
        llmsurgery.sources, "_convert_gguf", lambda *a: pytest.fail("inspect converted the file")
    )
    result = run_cli("inspect", exported["gemma3_text"], "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["architecture"] == "gemma3" and info["layers"] == 12 and info["tokenizer"] == "gpt2"
    assert info["tensors"] == len(_reader(exported["gemma3_text"]).tensors) and info["tensor_types"] == {
        "F32": info["tensors"]
    }
    assert info["gemma3.attention.sliding_window"] == 8 and info["vocab_size"] == 400


@pytest.mark.parametrize(
    "command",
    [
        ["absorb", "--criterion", "weight"],
        ["kv-compress", "--budget", "0.5", "--no-train", "--uniform", *TINY],
        ["rotate-sparsify", "--sparsity", "0.3", "--method", "magnitude"],
    ],
)
def test_outputs_that_need_llmsurgery_s_runtime_are_refused(models, tmp_path, command):
    made = tmp_path / "made"
    result = run_cli(command[0], models["llama"], "--output", made, *command[1:])
    assert result.exit_code == 0, result.output
    result = run_cli("export", made, "--output", tmp_path / "x.gguf")
    assert (
        result.exit_code == 2
        and "needs llmsurgery's runtime" in result.output
        and "--backend hf" in result.output
    )
    assert f"made by {command[0]}" in result.output and not (tmp_path / "x.gguf").exists()
    card = (made / "README.md").read_text()
    assert "cannot be exported to GGUF" in card and "trust_remote_code=True" in card


@pytest.mark.parametrize("stream", [[], ["--stream", "on"]], ids=["whole", "streamed"])
def test_model_card_names_passes_settings_evaluation_and_export(models, tmp_path, stream):
    """Streamed runs score the saved model: the scores reach its history and card afterwards."""
    out = tmp_path / "p"
    result = run_cli(
        "prune",
        "--bi",
        models["qwen2"],
        "--remove",
        "1",
        "--output",
        out,
        "--calib",
        "pydoc",
        *TINY,
        "--eval",
        "pydoc_ppl",
        "--eval-limit",
        "2",
        *stream,
    )
    assert result.exit_code == 0, result.output
    card = (out / "README.md").read_text()
    history = json.loads((out / "llmsurgery_history.json").read_text())
    record = history["passes"][0]
    assert "| 1 | prune-bi |" in card and "remove=1" in card and "calib_source=pydoc" in card
    assert f"removed_layers={record['report']['removed_layers']}" in card
    ppl = next(r for r in record["eval"] if r["metric"] == "word_perplexity")
    assert f"| pydoc_ppl | word_perplexity | {ppl['value']:.4g} | {ppl['baseline']:.4g} |" in card
    assert str(history["source"]["id"]) in card
    assert "AutoModelForCausalLM.from_pretrained(path)" in card and "llmsurgery export" in card
    assert "FROM ./model.gguf" in card and "llama-cli -m model.gguf" in card


def test_rope_parameters_of_a_transformers_4_config():
    """transformers 4.x (inside the declared range) has no rope_parameters: rope_theta and rope_scaling stand in."""
    from types import SimpleNamespace

    from llmsurgery.export.tensors import rope_parameters

    config = SimpleNamespace(
        rope_theta=1e6, rope_scaling={"type": "linear", "factor": 2.0}, rope_local_base_freq=1e4
    )
    assert rope_parameters(config) == {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}
    assert rope_parameters(config, "sliding_attention") == {"rope_type": "default", "rope_theta": 1e4}
    assert rope_parameters(SimpleNamespace(rope_theta=5e5)) == {"rope_type": "default", "rope_theta": 5e5}
