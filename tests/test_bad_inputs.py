"""Bad input on every command: exit 2, one `error:` line naming the problem, no traceback, nothing written,
inputs untouched.

One table, CASES: (command, arguments, words expected in the line). Arguments name fixtures in braces ({model},
{out}, ...), built once in `places`. `test_every_command_is_in_the_table` fails when a command has no case, so a
new command cannot skip this file. Each case runs the real entry point (`llmsurgery.cli.run`) in-process.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import folder_digest
from safetensors.torch import load_file, save_file

from llmsurgery.modeling import REMOTE_CODE

TINY = ["--calib-samples", "2", "--calib-seq-len", "32"]
MARKER = "FOREIGN_CODE_RAN"  # a file the foreign modeling code writes when it is imported

CASES = [
    # ---------------------------------------------------------------- the model argument, on every command
    ("inspect", ["{missing}"], "no such file or folder"),
    ("inspect", ["{a_file}"], "not a .gguf"),
    ("inspect", ["{empty_dir}"], "no config.json"),
    ("inspect", ["{config_not_json}"], "not valid JSON"),
    ("inspect", ["{config_binary}"], "not valid JSON"),
    ("inspect", ["{config_list}"], "JSON object"),
    ("inspect", ["{no_heads}"], "num_attention_heads should be a positive integer"),
    ("inspect", ["{zero_heads}"], "num_attention_heads should be a positive integer"),
    ("inspect", ["{bad_kv_heads}"], "not a multiple of num_key_value_heads"),
    ("inspect", ["{unsupported}"], "unsupported architecture 'gpt2'"),
    ("inspect", ["{truncated}"], "truncated"),
    ("inspect", ["{garbage}"], "corrupt"),
    ("inspect", ["{weights_dir}"], "is not a file"),
    ("inspect", ["{no_offsets}"], "data_offsets"),
    ("inspect", ["{bad_dtype}"], "unknown dtype"),
    ("inspect", ["{missing_tensor}"], "tensor 'model.layers.1.mlp.up_proj.weight' is missing"),
    ("inspect", ["{extra_tensor}"], "unexpected tensor 'model.layers.0.mlp.extra.weight'"),
    ("inspect", ["{wrong_shape}"], "tensor 'model.layers.2.self_attn.k_proj.weight' has shape"),
    (
        "inspect",
        ["{more_layers}"],
        "tensors 'model.layers.6.*' are missing: config.json says 7 decoder layers, the weights hold 6",
    ),
    ("inspect", ["{fewer_layers}"], "unexpected tensor 'model.layers.5."),
    ("inspect", ["{layer_gap}"], "tensors 'model.layers.2.*' are missing"),
    ("inspect", ["{wider_config}"], "has shape"),
    ("inspect", ["{shard_missing}"], "missing shard"),
    ("inspect", ["{shard_misplaced}"], "does not hold it"),
    ("inspect", ["{corrupt_history}"], "llmsurgery_history.json is corrupt"),
    ("convert", ["{missing_tensor}", "-o", "{out}"], "is missing"),
    ("convert", ["{foreign}", "-o", "{out}"], "--trust-remote-code"),
    ("convert", ["{model}", "-o", "{model}"], "overwrite the input"),
    ("convert", ["{model}", "-o", "{a_file}/out"], "is a file, not a folder"),
    ("convert", ["{model}", "-o", "{existing}"], "already exists"),
    ("convert", ["{model}", "-o", "{out}", "--dtype", "int3"], "unknown dtype"),
    ("eval", ["{missing_tensor}", "--tasks", "news_ppl", "--limit", "1"], "is missing"),
    ("eval", ["{model}", "--tasks", "news_ppl,no_such_task_xyz"], "unknown task(s): no_such_task_xyz"),
    ("eval", ["{model}", "--tasks", "news_ppl", "--baseline", "{missing}"], "no such file or folder"),
    ("eval", ["{model}", "--tasks", "news_ppl", "--json", "{missing}/r.json"], "does not exist"),
    ("eval", ["{model}", "--tasks", "news_ppl", "--json", "{empty_dir}"], "is a folder"),
    ("eval", ["{model}", "--tasks", "news_ppl", "--load-in-8bit", "--load-in-4bit"], "choose one of"),
    ("eval", ["{model}", "--tasks", "news_ppl", "--limit", "0"], "--limit"),
    ("eval", ["{model}", "--tasks", "news_ppl", "--device", "cuda"], "CUDA"),
    ("eval", ["{model}", "--tasks", "news_ppl", "--backend", "tgi"], "--backend: unknown backend 'tgi'"),
    ("eval", ["{model}", "--tasks", "news_ppl", "--tensor-parallel", "0"], "--tensor-parallel"),
    ("eval", ["{model}", "--tasks", "news_ppl", "--data-parallel", "2"], "are for --backend vllm"),
    # ---------------------------------------------------------------- prune
    ("prune", ["--bi", "{foreign}", "-o", "{out}", "--remove", "1", *TINY], "--trust-remote-code"),
    ("prune", ["--bi", "{forged}", "-o", "{out}", "--remove", "1", *TINY], "--trust-remote-code"),
    (
        "prune",
        ["--bi", "{tampered}", "-o", "{out}", "--remove", "1", *TINY],
        "differs from the one this llmsurgery installs",
    ),
    ("prune", ["--bi", "{more_layers}", "-o", "{out}", "--remove", "1", *TINY], "are missing"),
    (
        "prune",
        ["--bi", "{model}", "-o", "{out}", "--ratio", "nan", *TINY],
        "--ratio: Input should be a finite number",
    ),
    ("prune", ["--bi", "{model}", "-o", "{out}", "--ratio", "inf", *TINY], "finite"),
    ("prune", ["--bi", "{model}", "-o", "{out}", "--remove", "6", *TINY], "cannot remove 6 of 6 layers"),
    ("prune", ["--bi", "{model}", "-o", "{out}", "--remove", "abc"], "Invalid value for '--remove'"),
    ("prune", ["--bi", "{model}", "-o", "{out}", "--remove", "1", "--calib-samples", "0"], "--calib-samples"),
    (
        "prune",
        ["--bi", "{model}", "-o", "{out}", "--remove", "1", "--calib", "{binary_txt}", *TINY],
        "binary",
    ),
    (
        "prune",
        ["--bi", "{model}", "-o", "{out}", "--remove", "1", "--calib", "{random_txt}", *TINY],
        "not UTF-8 text",
    ),
    (
        "prune",
        ["--bi", "{model}", "-o", "{out}", "--remove", "1", "--calib", "{empty_txt}", *TINY],
        "holds no text",
    ),
    (
        "prune",
        ["--bi", "{model}", "-o", "{out}", "--remove", "1", "--calib", "{bad_jsonl}", *TINY],
        "not valid JSON",
    ),
    (
        "prune",
        ["--bi", "{model}", "-o", "{out}", "--remove", "1", "--calib", "{a_file}", *TINY],
        "calibration source",
    ),
    (
        "prune",
        ["--bi", "{model}", "-o", "{out}", "--remove", "1", "--calib", "{short_txt}", *TINY],
        "fewer than the 2 asked for",
    ),
    (
        "prune",
        ["--bi", "{model}", "-o", "{out}", "--remove", "1", "--plot", "{missing}/p.png", *TINY],
        "--plot",
    ),
    ("prune", ["--bi", "{model}", "-o", "{out}", "--remove", "1", "--json", "{empty_dir}", *TINY], "--json"),
    (
        "prune",
        ["--bi", "{model}", "-o", "{out}", "--remove", "1", "--json", "{out}", *TINY],
        "is the output folder",
    ),
    (
        "prune",
        ["--bi", "{model}", "-o", "{out}", "--remove", "1", "--plot", "{out}/scores.png", *TINY],
        "--plot",
    ),
    ("prune", ["--bi", "{model}", "-o", "{a_file}/x/y", "--remove", "1", *TINY], "is a file, not a folder"),
    ("prune", ["--bi", "{model}", "-o", "{model}/sub", "--remove", "1", *TINY], "overwrite the input"),
    (
        "prune",
        ["--bi", "{model}", "-o", "{out}", "--remove", "1", "--heal", "--heal-steps", "0", *TINY],
        "--heal-steps",
    ),
    (
        "prune",
        ["--bi", "{model}", "-o", "{out}", "--remove", "1", "--heal", "--heal-lr", "nan", *TINY],
        "finite",
    ),
    # ---------------------------------------------------------------- rotate-sparsify
    (
        "rotate-sparsify",
        ["{model}", "--sparsity", "0.4", "-o", "{out}", "--split", "nan,nan", *TINY],
        "--split: Input should be a finite",
    ),
    (
        "rotate-sparsify",
        ["{model}", "--sparsity", "0.4", "-o", "{out}", "--split", "1", *TINY],
        "--split: wants two numbers",
    ),
    (
        "rotate-sparsify",
        ["{model}", "--sparsity", "0.4", "-o", "{out}", "--split", "a,b", *TINY],
        "--split: wants two numbers",
    ),
    (
        "rotate-sparsify",
        ["{model}", "--sparsity", "0.9", "-o", "{out}", "--split", "1,2", *TINY],
        "outside [0, 1)",
    ),
    ("rotate-sparsify", ["{model}", "--sparsity", "nan", "-o", "{out}", *TINY], "finite"),
    ("rotate-sparsify", ["{model}", "--sparsity", "1", "-o", "{out}", *TINY], "less than 1"),
    ("rotate-sparsify", ["{model}", "--sparsity", "0.4", "-o", "{out}", "--damp", "-1", *TINY], "--damp"),
    ("rotate-sparsify", ["{foreign}", "--sparsity", "0.4", "-o", "{out}", *TINY], "--trust-remote-code"),
    (
        "rotate-sparsify",
        ["{model}", "--sparsity", "0.4", "-o", "{out}", "--json", "{missing}/r.json", *TINY],
        "--json",
    ),
    # ---------------------------------------------------------------- absorb
    ("absorb", ["{model}", "-o", "{out}", "--keep-ratio", "nan", *TINY], "finite"),
    ("absorb", ["{model}", "-o", "{out}", "--keep-ratio", "1.5", *TINY], "--keep-ratio"),
    ("absorb", ["{model}", "-o", "{out}", "--rank", "0", *TINY], "--rank"),
    ("absorb", ["{model}", "-o", "{out}", "--pairs", "xx", *TINY], "--pairs"),
    ("absorb", ["{model}", "-o", "{out}", "--plot", "{empty_dir}", *TINY], "--plot"),
    ("absorb", ["{model}", "-o", "{out}", "--plot", "{empty_dir}/spectra.txt", *TINY], "should end in .png"),
    ("inspect", ["{bad_gguf}"], "could not read GGUF"),
    ("absorb", ["{wrong_shape}", "-o", "{out}", *TINY], "has shape"),
    # ---------------------------------------------------------------- kv-compress
    ("kv-compress", ["{model}", "--budget", "0", "-o", "{out}", *TINY], "--budget"),
    ("kv-compress", ["{model}", "--budget", "nan", "-o", "{out}", *TINY], "finite"),
    ("kv-compress", ["{model}", "--budget", "1.5", "-o", "{out}", *TINY], "--budget"),
    (
        "kv-compress",
        ["{model}", "--budget", "0.5", "-o", "{out}", "--rank-step", "64", *TINY],
        "rank step 64 is larger than head_dim 16",
    ),
    ("kv-compress", ["{model}", "--budget", "0.5", "-o", "{out}", "--lr", "inf", *TINY], "finite"),
    (
        "kv-compress",
        ["{model}", "--budget", "0.5", "-o", "{out}", "--fsdp", *TINY],
        "start the command with torchrun",
    ),
    ("kv-compress", ["{model}", "--budget", "0.5", "-o", "{out}", "--v-init", "zz", *TINY], "--v-init"),
    (
        "kv-compress",
        ["{model}", "--budget", "0.5", "-o", "{out}", "--train-samples", "5000", *TINY],
        "fewer than the 5000 asked for",
    ),
    ("kv-compress", ["{model}", "--budget", "0.5", "-o", "{out}", "--json", "{empty_dir}", *TINY], "--json"),
    # ---------------------------------------------------------------- heal
    ("heal", ["{model}", "-o", "{out}", *TINY], "give --teacher"),
    ("heal", ["{model}", "-o", "{out}", "--teacher", "{missing}", *TINY], "teacher"),
    ("heal", ["{model}", "-o", "{out}", "--teacher", "{missing_tensor}", *TINY], "is missing"),
    ("heal", ["{model}", "-o", "{out}", "--teacher", "{unsupported}", *TINY], "unsupported architecture"),
    ("heal", ["{model}", "-o", "{out}", "--teacher", "{model}", "--removed", "x,y", *TINY], "--removed"),
    (
        "heal",
        ["{model}", "-o", "{out}", "--teacher", "{model_copy}", "--removed", "9", *TINY],
        "--removed should name distinct layers",
    ),
    (
        "heal",
        ["{model}", "-o", "{out}", "--teacher", "{model_copy}", "--removed", "1", *TINY],
        "does not match",
    ),
    (
        "heal",
        ["{model}", "-o", "{out}", "--teacher", "{model_copy}", "--train", "nothing", *TINY],
        "train takes",
    ),
    ("heal", ["{model}", "-o", "{out}", "--teacher", "{model_copy}", "--lr", "nan", *TINY], "finite"),
    # ---------------------------------------------------------------- run / recipe validate (same refusals)
    ("run", ["{missing}"], "does not exist"),
    ("run", ["{empty_dir}"], "is not a file"),
    ("run", ["{recipe_binary}"], "not a text file"),
    ("run", ["{recipe_not_yaml}"], "not valid YAML"),
    ("run", ["{recipe_list}"], "YAML mapping"),
    ("run", ["{recipe_duplicate}"], "appears twice"),
    ("run", ["{recipe_no_pass_key}"], "no `pass:` key"),
    ("run", ["{recipe_unknown_pass}"], "unknown pass 'prune-bo'"),
    ("run", ["{recipe_typo}"], "passes[0].remvoe"),
    ("run", ["{recipe_nan}"], "finite"),
    ("run", ["{recipe_gate_metric}"], "reports word_perplexity, byte_perplexity, bits_per_byte"),
    ("run", ["{recipe_gate_task}"], "not in eval.tasks"),
    ("run", ["{recipe_device}"], "unknown device 'tpu'"),
    ("run", ["{recipe_into_input}"], "overwrite the input"),
    ("run", ["{recipe_calib}"], "binary"),
    ("run", ["{recipe_ok}", "--set", "[0]=3"], "--set"),
    ("run", ["{recipe_ok}", "--set", "eval.limit=[unclosed"], "not valid YAML"),
    ("run", ["{recipe_ok}", "--set", "novalue"], "KEY=VALUE"),
    ("run", ["{recipe_ok}", "--set", "passes[9].remove=1"], "no such place"),
    ("run", ["{recipe_ok}", "--json", "{missing}/r.json"], "--json"),
    ("recipe validate", ["{recipe_gate_metric}"], "reports word_perplexity"),
    ("recipe validate", ["{recipe_duplicate}"], "appears twice"),
    ("recipe validate", ["{recipe_no_pass_key}"], "no `pass:` key"),
    ("recipe validate", ["{recipe_device}"], "unknown device"),
    ("recipe validate", ["{recipe_into_input}"], "overwrite the input"),
    ("recipe validate", ["{recipe_calib}"], "binary"),
    ("recipe validate", ["{recipe_nan}"], "finite"),
    ("recipe validate", ["{recipe_ok}", "--output", "{existing}"], "already exists"),
    ("recipe validate", ["{recipe_binary}"], "not a text file"),
    ("recipe validate", ["{recipe_no_output}"], "give an output folder"),
    ("recipe validate", ["{recipe_heal_removed}"], "--removed should name distinct layers"),
    ("run", ["{recipe_heal_removed}"], "--removed should name distinct layers"),
    ("run", ["{recipe_prune_all}"], "passes[1] (prune-bi): cannot remove 3 of 3 layers"),
    ("recipe validate", ["{recipe_prune_all}"], "cannot remove 3 of 3 layers"),
    (
        "recipe validate",
        ["{recipe_kv_twice}"],
        "passes[1] (kv-compress): this model's KV cache is already compressed",
    ),
    (
        "recipe validate",
        ["{recipe_rotate_twice}"],
        "passes[1] (rotate-sparsify): rotate-sparsify needs a dense model",
    ),
    ("run", ["{recipe_qk_then_kv}"], "passes[1] (kv-compress): kv-compress needs full q/k heads"),
    ("run", ["{recipe_kv_then_qk}"], "passes[1] (absorb): qk pairs cannot be dropped after kv-compress"),
    ("run", ["{recipe_heal_after_two}"], "passes[2] (heal): the teacher has 6 layers, the student 4"),
    ("inspect", ["{config_type_list}"], "unsupported architecture"),
    ("inspect", ["{million_layers}"], "config.json says 1000000 decoder layers, the weights hold 6"),
    ("convert", ["{nan_weights}", "-o", "{out}"], "holds NaN or infinite values"),
    ("prune", ["--bi", "{model}", "-o", "{out}", "--remove", "1", "--seed", "-1", *TINY], "--seed"),
    (
        "prune",
        ["--bi", "{model}", "-o", "{out}", "--remove", "1", "--seed", "99999999999999999999", *TINY],
        "--seed",
    ),
    ("absorb", ["{model}", "-o", "{out}", "--rank", "99999999999999999999", *TINY], "--rank"),
    (
        "heal",
        ["{model}", "-o", "{out}", "--teacher", "{model_copy}", "--batch-size", "99999999999", *TINY],
        "--batch-size",
    ),
    (
        "heal",
        ["{model}", "-o", "{out}", "--teacher", "{model_copy}", "--steps", "9223372036854775808", *TINY],
        "--steps",
    ),
    ("heal", ["{model}", "-o", "{out}", "--teacher", "{model}", *TINY], "is the model being healed"),
    ("kv-compress", ["{model}", "--budget", "1e-300", "-o", "{out}", *TINY], "below the smallest reachable"),
    (
        "kv-compress",
        ["{model}", "--budget", "0.5", "-o", "{out}", "--rank-step", "3", *TINY],
        "does not divide head_dim 16",
    ),
    (
        "kv-compress",
        ["{model}", "--budget", "0.5", "-o", "{out}", "--train-steps", "9223372036854775808", *TINY],
        "--train-steps",
    ),
    ("eval", ["{model}", "--tasks", "news_ppl", "--limit", "99999999999999"], "--limit"),
    (
        "eval",
        ["{model}", "--tasks", "news_ppl", "--json", "{model}/config.json"],
        "would overwrite the input model",
    ),
    (
        "prune",
        ["--bi", "{model}", "-o", "{out}", "--remove", "1", "--json", "{model}/config.json", *TINY],
        "would overwrite",
    ),
    (
        "prune",
        ["--bi", "{model}", "-o", "{out}", "--remove", "1", "--json", "{out}.x", "--plot", "{out}.x", *TINY],
        "same file",
    ),
    (
        "prune",
        [
            "--bi",
            "{model}",
            "-o",
            "{calib_dir}",
            "--force",
            "--remove",
            "1",
            "--calib",
            "{calib_dir}/c.txt",
            *TINY,
        ],
        "would overwrite an input",
    ),
    (
        "prune",
        [
            "--bi",
            "{model}",
            "-o",
            "{calib_dir}",
            "--force",
            "--remove",
            "1",
            "--calib",
            "pydoc+{calib_dir}/c.txt",
            *TINY,
        ],
        "would overwrite an input",
    ),
    (
        "heal",
        ["{model}", "-o", "{model_copy}", "--force", "--teacher", "{model_copy}", *TINY],
        "would overwrite an input",
    ),
    ("run", ["{recipe_dir}/ok.yaml", "-o", "{recipe_dir}", "--force"], "would overwrite an input"),
    ("run", ["{recipe_ok}", "--json", "{recipe_ok}"], "would overwrite an input"),
    ("recipe schema", ["extra-argument"], "unexpected extra argument"),
    # ---------------------------------------------------------------- export --format gguf
    ("export", ["{missing}", "-o", "{out}.gguf"], "no such file or folder"),
    ("export", ["someorg/somemodel", "-o", "{out}.gguf"], "export reads local weights: download"),
    ("export", ["{unsupported}", "-o", "{out}.gguf"], "unsupported architecture 'gpt2'"),
    ("export", ["{missing_tensor}", "-o", "{out}.gguf"], "is missing"),
    ("export", ["{model}", "-o", "{out}"], "give a file name ending in .gguf"),
    ("export", ["{model}", "-o", "{out}.gguf", "--outtype", "q4_k"], "unknown --outtype 'q4_k'"),
    ("export", ["{model}", "-o", "{out}.gguf", "--format", "onnx"], "unknown --format 'onnx'"),
    ("export", ["{model}", "-o", "{existing_gguf}"], "already exists; pass --force"),
    ("export", ["{model}", "-o", "{gguf_dir}", "--force"], "is a folder"),
    ("export", ["{model}", "-o", "{model}/m.gguf"], "would overwrite the input model"),
    ("export", ["{model}", "-o", "{a_file}/m.gguf"], "is a file, not a folder"),
    ("export", ["{sparse}", "-o", "{out}.gguf"], "needs llmsurgery's runtime for rotate-sparsify"),
    ("export", ["{kv_layout}", "-o", "{out}.gguf"], "`llmsurgery eval --backend hf`"),
    ("export", ["{gemma_pattern}", "-o", "{out}.gguf"], "break the sliding/full attention pattern"),
    ("export", ["{gemma_scale}", "-o", "{out}.gguf"], "query_pre_attn_scalar 32"),
    ("export", ["{gelu_llama}", "-o", "{out}.gguf"], "llama.cpp's llama uses silu, this model gelu"),
    ("export", ["{rope_yarn}", "-o", "{out}.gguf"], "RoPE scaling 'yarn' is not exported"),
    ("export", ["{no_tokenizer}", "-o", "{out}.gguf"], "has no tokenizer.json"),
    ("export", ["{odd_pre_tokenizer}", "-o", "{out}.gguf"], "not one llama.cpp implements"),
    ("inspect", ["{bad_gguf}", "--json"], "could not read GGUF"),
]


def _safetensors_with_header(path: Path, edit) -> None:
    """Rewrite a safetensors file's JSON header through `edit(header)`, keeping its data."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def _variant(root: Path, src: Path, name: str, *, config=None, tensors=None) -> Path:
    folder = root / name
    shutil.copytree(src, folder)
    if config is not None:
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(config(cfg) or cfg))
    if tensors is not None:
        state = load_file(folder / "model.safetensors")
        tensors(state)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _recipe(root: Path, name: str, text: str) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def places(tiny_models, tmp_path_factory) -> dict[str, Path]:
    from pydoc_data.topics import topics

    import torch

    root = tmp_path_factory.mktemp("bad")
    src = tiny_models["llama"]
    p: dict[str, Path] = {"model": src, "missing": root / "nope", "a_file": root / "a_file.bin"}
    p["a_file"].write_bytes(b"not a model")
    p["empty_dir"] = root / "empty_dir"
    p["empty_dir"].mkdir()
    p["existing"] = root / "existing"
    p["existing"].mkdir()
    (p["existing"] / "keep.txt").write_text("mine")
    for name, body in (("config_not_json", "{not json"), ("config_list", "[1, 2]")):
        p[name] = _variant(root, src, name)
        (p[name] / "config.json").write_text(body)
    p["config_binary"] = _variant(root, src, "config_binary")
    (p["config_binary"] / "config.json").write_bytes(os.urandom(300))
    p["no_heads"] = _variant(root, src, "no_heads", config=lambda c: c.pop("num_attention_heads") and None)
    p["zero_heads"] = _variant(root, src, "zero_heads", config=lambda c: c.update(num_attention_heads=0))
    p["bad_kv_heads"] = _variant(root, src, "bad_kv_heads", config=lambda c: c.update(num_key_value_heads=3))
    p["unsupported"] = _variant(
        root,
        src,
        "unsupported",
        config=lambda c: c.update(model_type="gpt2", architectures=["GPT2LMHeadModel"]),
    )
    p["more_layers"] = _variant(root, src, "more_layers", config=lambda c: c.update(num_hidden_layers=7))
    p["fewer_layers"] = _variant(root, src, "fewer_layers", config=lambda c: c.update(num_hidden_layers=5))
    p["layer_gap"] = _variant(
        root,
        src,
        "layer_gap",
        tensors=lambda s: [s.pop(k) for k in list(s) if k.startswith("model.layers.2.")],
    )
    p["wider_config"] = _variant(root, src, "wider_config", config=lambda c: c.update(intermediate_size=256))
    p["truncated"] = _variant(root, src, "truncated")
    weights = p["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    p["garbage"] = _variant(root, src, "garbage")
    (p["garbage"] / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    p["weights_dir"] = _variant(root, src, "weights_dir")
    (p["weights_dir"] / "model.safetensors").unlink()
    (p["weights_dir"] / "model.safetensors").mkdir()
    p["no_offsets"] = _variant(root, src, "no_offsets")
    _safetensors_with_header(
        p["no_offsets"] / "model.safetensors", lambda h: h["model.norm.weight"].pop("data_offsets")
    )
    p["bad_dtype"] = _variant(root, src, "bad_dtype")
    _safetensors_with_header(
        p["bad_dtype"] / "model.safetensors", lambda h: h["model.norm.weight"].update(dtype="F33")
    )
    p["missing_tensor"] = _variant(
        root, src, "missing_tensor", tensors=lambda s: s.pop("model.layers.1.mlp.up_proj.weight")
    )
    p["extra_tensor"] = _variant(
        root,
        src,
        "extra_tensor",
        tensors=lambda s: s.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}),
    )
    p["wrong_shape"] = _variant(
        root,
        src,
        "wrong_shape",
        tensors=lambda s: s.update(
            {
                "model.layers.2.self_attn.k_proj.weight": s["model.layers.2.self_attn.k_proj.weight"][
                    :16
                ].clone()
            }
        ),
    )
    for name in ("shard_missing", "shard_misplaced"):
        folder = p[name] = _variant(root, src, name)
        state = load_file(folder / "model.safetensors")
        (folder / "model.safetensors").unlink()
        keys = sorted(state)
        halves = {
            "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
            "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
        }
        for shard, names in halves.items():
            save_file({k: state[k] for k in names}, folder / shard, metadata={"format": "pt"})
        weight_map = {k: shard for shard, names in halves.items() for k in names}
        if name == "shard_missing":
            (folder / "model-00002-of-00002.safetensors").unlink()
        else:
            weight_map[keys[0]] = "model-00002-of-00002.safetensors"
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    p["bad_gguf"] = root / "broken.gguf"
    p["bad_gguf"].write_bytes(b"GGUF" + os.urandom(200))
    p["calib_dir"] = root / "calib_dir"
    p["calib_dir"].mkdir()
    (p["calib_dir"] / "c.txt").write_text("\n\n".join(topics[k] for k in sorted(topics)[:40]))
    p["model_copy"] = _variant(root, src, "model_copy")
    p["config_type_list"] = _variant(
        root, src, "config_type_list", config=lambda c: c.update(model_type=["llama"])
    )
    p["million_layers"] = _variant(
        root, src, "million_layers", config=lambda c: c.update(num_hidden_layers=1_000_000)
    )
    p["nan_weights"] = _variant(
        root,
        src,
        "nan_weights",
        tensors=lambda s: s["model.layers.3.mlp.up_proj.weight"].__setitem__((0, 0), float("nan")),
    )
    p["corrupt_history"] = _variant(root, src, "corrupt_history")
    (p["corrupt_history"] / "llmsurgery_history.json").write_text('{"source": 3}')
    # Foreign modeling code: importing it leaves a marker file, so a test can tell whether it ran.
    marker = root / MARKER
    code = (
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaForCausalLM\n\nclass XForCausalLM(LlamaForCausalLM):\n    pass\n"
    )
    p["foreign"] = _variant(
        root,
        src,
        "foreign",
        config=lambda c: c.update(auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"}),
    )
    (p["foreign"] / "modeling_x.py").write_text(code)
    p["forged"] = _variant(root, p["foreign"], "forged")
    (p["forged"] / "llmsurgery_history.json").write_text(
        json.dumps({"format": "llmsurgery-history/1", "source": {"id": "x", "kind": "folder"}, "passes": []})
    )
    p["tampered"] = _variant(
        root,
        src,
        "tampered",
        config=lambda c: c.update(
            architectures=["LlmsurgeryLlamaForCausalLM"],
            auto_map={"AutoModelForCausalLM": "modeling_llmsurgery.LlmsurgeryLlamaForCausalLM"},
        ),
    )
    for shipped in (REMOTE_CODE, REMOTE_CODE.with_name("llmsurgery_sparse_kernel.py")):
        shutil.copyfile(shipped, p["tampered"] / shipped.name)
    with (p["tampered"] / REMOTE_CODE.name).open("a") as handle:
        handle.write(code.split("from transformers")[0])
    # Calibration files that are not usable text.
    p["binary_txt"] = root / "binary.txt"
    p["binary_txt"].write_bytes(b"\x00\x01\x02" * 500)
    p["random_txt"] = root / "random.txt"
    p["random_txt"].write_bytes(bytes(range(128, 256)) * 40)  # 5,120 bytes that are not UTF-8
    p["empty_txt"] = root / "empty.txt"
    p["empty_txt"].write_text("\n\n  \n")
    p["bad_jsonl"] = root / "bad.jsonl"
    p["bad_jsonl"].write_text('{"text": "fine"}\n{oops\n')
    p["short_txt"] = root / "short.txt"
    p["short_txt"].write_text("A few words only.")
    # Recipes.
    head = (
        f"version: 1\nmodel: {src}\noutput: {root / 'recipe_out'}\ncalibration: {{samples: 2, seq-len: 32}}\n"
    )
    prune = "passes:\n  - pass: prune-bi\n    remove: 1\n"
    gate = "eval:\n  tasks: [news_ppl]\n  limit: 1\n  gates:\n    news_ppl.{}: {{max_ratio: 2}}\n"
    p["recipe_ok"] = _recipe(root, "ok", head + prune)
    p["recipe_dir"] = root / "recipe_dir"
    p["recipe_dir"].mkdir()
    shutil.copyfile(p["recipe_ok"], p["recipe_dir"] / "ok.yaml")
    p["recipe_binary"] = root / "binary.yaml"
    p["recipe_binary"].write_bytes(os.urandom(400) + b"\x00")
    p["recipe_not_yaml"] = _recipe(root, "not_yaml", "version: 1\nmodel: [unclosed\n")
    p["recipe_list"] = _recipe(root, "list", "- 1\n- 2\n")
    p["recipe_duplicate"] = _recipe(root, "duplicate", head + prune + "    remove: 2\n")
    p["recipe_no_pass_key"] = _recipe(root, "no_pass_key", head + "passes:\n  - prune-bi: {remove: 2}\n")
    p["recipe_unknown_pass"] = _recipe(
        root, "unknown_pass", head + "passes:\n  - pass: prune-bo\n    remove: 1\n"
    )
    p["recipe_typo"] = _recipe(root, "typo", head + "passes:\n  - pass: prune-bi\n    remvoe: 1\n")
    p["recipe_nan"] = _recipe(root, "nan", head + "passes:\n  - pass: prune-bi\n    ratio: .nan\n")
    p["recipe_gate_metric"] = _recipe(root, "gate_metric", head + prune + gate.format("acc"))
    p["recipe_gate_task"] = _recipe(
        root, "gate_task", head + prune + gate.format("word_perplexity").replace("news_ppl.", "pydoc_ppl.")
    )
    p["recipe_device"] = _recipe(root, "device", head + "device: tpu\n" + prune)
    p["recipe_into_input"] = _recipe(
        root, "into_input", head.replace(str(root / "recipe_out"), str(src)) + prune
    )
    p["recipe_no_output"] = _recipe(
        root, "no_output", head.replace(f"output: {root / 'recipe_out'}\n", "") + prune
    )
    p["recipe_heal_removed"] = _recipe(
        root, "heal_removed", head + prune + "  - pass: heal\n    steps: 2\n    removed: [99]\n"
    )
    kv = "  - pass: kv-compress\n    budget: 0.5\n    train: false\n    uniform: true\n"
    p["recipe_prune_all"] = _recipe(
        root, "prune_all", head + "passes:\n" + "  - pass: prune-bi\n    remove: 3\n" * 2
    )
    p["recipe_kv_twice"] = _recipe(root, "kv_twice", head + "passes:\n" + kv * 2)
    p["recipe_rotate_twice"] = _recipe(
        root, "rotate_twice", head + "passes:\n" + "  - pass: rotate-sparsify\n    sparsity: 0.3\n" * 2
    )
    p["recipe_qk_then_kv"] = _recipe(
        root, "qk_then_kv", head + "passes:\n  - pass: absorb\n    pairs: [vo, qk]\n" + kv
    )
    p["recipe_kv_then_qk"] = _recipe(
        root, "kv_then_qk", head + "passes:\n" + kv + "  - pass: absorb\n    pairs: [vo, qk]\n"
    )
    p["recipe_heal_after_two"] = _recipe(
        root,
        "heal_after_two",
        head
        + "passes:\n"
        + "  - pass: prune-bi\n    remove: 1\n" * 2
        + "  - pass: heal\n    steps: 2\n    removed: [0, 1, 2]\n",
    )
    p["recipe_calib"] = _recipe(
        root, "calib", head.replace("{samples", f"{{source: {p['binary_txt']}, samples") + prune
    )
    # Export: targets, and models llama.cpp would run differently (refused before anything is written).
    p["existing_gguf"] = root / "existing.gguf"
    p["existing_gguf"].write_bytes(b"mine")
    p["gguf_dir"] = root / "a_dir.gguf"
    p["gguf_dir"].mkdir()
    p["sparse"] = _variant(root, src, "sparse", config=lambda c: c.update(sparsity_in=0.4))
    (p["sparse"] / "llmsurgery_history.json").write_text(
        json.dumps(
            {
                "format": "llmsurgery-history/1",
                "source": {"id": "x", "kind": "folder"},
                "passes": [{"pass": "rotate-sparsify", "config": {}, "seconds": 1.0}],
            }
        )
    )
    p["kv_layout"] = _variant(
        root, src, "kv_layout", config=lambda c: c.update(attention_layout=[{"k": [8, 8]}] * 6)
    )
    gemma = tiny_models["gemma3_text"]  # layer types with a period of 3, not llama.cpp's 6
    p["gemma_pattern"] = _variant(root, gemma, "gemma_pattern")
    six = ["sliding_attention"] * 5 + ["full_attention"]
    p["gemma_scale"] = _variant(
        root, gemma, "gemma_scale", config=lambda c: c.update(layer_types=six, query_pre_attn_scalar=32)
    )
    p["gelu_llama"] = _variant(root, src, "gelu_llama", config=lambda c: c.update(hidden_act="gelu"))
    yarn = {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 256,
    }
    p["rope_yarn"] = _variant(root, src, "rope_yarn", config=lambda c: c.update(rope_parameters=yarn))
    p["no_tokenizer"] = _variant(root, src, "no_tokenizer")
    (p["no_tokenizer"] / "tokenizer.json").unlink()
    p["odd_pre_tokenizer"] = _variant(root, src, "odd_pre_tokenizer")
    spec = json.loads((p["odd_pre_tokenizer"] / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [{"type": "Whitespace"}, spec["pre_tokenizer"]],
    }
    (p["odd_pre_tokenizer"] / "tokenizer.json").write_text(json.dumps(spec))
    return p


def _fill(args: list[str], places: dict[str, Path]) -> list[str]:
    return [a.format(**{k: str(v) for k, v in places.items()}) for a in args]


def _run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    from llmsurgery.cli import run

    capsys.readouterr()
    old = sys.argv
    sys.argv = ["llmsurgery", *argv]
    try:
        run()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
    finally:
        sys.argv = old
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _inputs(places: dict[str, Path]) -> dict[str, dict[str, bytes]]:
    return {name: folder_digest(path) for name, path in places.items() if path.is_dir()}


@pytest.mark.parametrize("command,args,words", CASES, ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_bad_input_is_one_line_and_exit_2(places, capsys, command, args, words):
    out = places["missing"].parent / "out"
    shutil.rmtree(out, ignore_errors=True)
    places = places | {"out": out}
    before = _inputs(places)
    code, stdout, stderr = _run_main([*command.split(), *_fill(args, places)], capsys)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, stderr or stdout
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    assert words in lines[0], lines[0]
    assert "Traceback" not in stderr + stdout
    assert not out.exists() and not (places["missing"].parent / "recipe_out").exists()
    assert not Path(f"{out}.gguf").exists() and (places["existing_gguf"].read_bytes() == b"mine")
    assert not [p for p in out.parent.rglob(".*tmp-*")], "a temporary folder was left behind"
    assert not (out.parent / MARKER).exists(), "foreign modeling code ran"
    assert _inputs(places) == before, "an input changed"
    assert (places["existing"] / "keep.txt").read_text() == "mine"


def test_json_may_go_into_the_output_folder(tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, stderr = _run_main(
        [
            "prune",
            "--bi",
            str(tiny_models["llama"]),
            "-o",
            str(out),
            "--remove",
            "1",
            "--json",
            str(out / "report.json"),
            *TINY,
        ],
        capsys,
    )
    assert code == 0, stderr
    assert json.loads((out / "report.json").read_text())["removed_layers"]


def test_every_command_is_in_the_table():
    from llmsurgery.cli import app, recipe_app

    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    commands |= {f"recipe {c.name or c.callback.__name__}" for c in recipe_app.registered_commands}
    covered = {command for command, _, _ in CASES}
    assert commands - covered == set(), f"commands without a bad-input case: {sorted(commands - covered)}"


def test_foreign_code_runs_only_with_the_flag(places, tmp_path, capsys):
    """The forged history grants nothing; --trust-remote-code is what lets the folder's own code run."""
    marker = places["missing"].parent / MARKER
    code, _, stderr = _run_main(["convert", str(places["forged"]), "-o", str(tmp_path / "a")], capsys)
    assert code == 2 and "--trust-remote-code" in stderr and not marker.exists()
    code, _, stderr = _run_main(
        ["convert", str(places["forged"]), "-o", str(tmp_path / "b"), "--trust-remote-code"], capsys
    )
    assert code == 0, stderr
    assert marker.exists()  # the flag, and only the flag, ran it
    marker.unlink()
    code, _, stderr = _run_main(
        ["inspect", str(tmp_path / "b")], capsys
    )  # the output still carries foreign code ...
    assert code == 0
    code, _, stderr = _run_main(["convert", str(tmp_path / "b"), "-o", str(tmp_path / "c")], capsys)
    assert (
        code == 2 and "--trust-remote-code" in stderr and not marker.exists()
    )  # ... so it needs the flag again


def test_llmsurgery_outputs_load_without_the_flag_and_run_no_folder_code(tiny_models, tmp_path, capsys):
    """A genuine absorb output loads with the installed classes; an edited copy of its modeling file is refused."""
    out = tmp_path / "absorbed"
    code, _, stderr = _run_main(
        ["absorb", str(tiny_models["llama"]), "-o", str(out), "--criterion", "weight"], capsys
    )
    assert code == 0, stderr
    code, _, stderr = _run_main(
        ["prune", "--bi", str(out), "-o", str(tmp_path / "pruned"), "--remove", "1", *TINY], capsys
    )
    assert code == 0, stderr
    with (out / "llmsurgery_sparse_kernel.py").open("a") as handle:
        handle.write("\n# edited\n")
    code, _, stderr = _run_main(["convert", str(out), "-o", str(tmp_path / "c")], capsys)
    assert code == 2 and "llmsurgery_sparse_kernel.py that differs" in stderr


def test_valid_sharded_checkpoint_passes_the_check(places, tmp_path, capsys):
    folder = tmp_path / "sharded"
    shutil.copytree(places["shard_misplaced"], folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = sorted(index["weight_map"])[0]
    index["weight_map"][first] = "model-00001-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    code, stdout, stderr = _run_main(["inspect", str(folder), "--json"], capsys)
    assert code == 0, stderr
    assert json.loads(stdout)["parameters"] > 0


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_kill_during_save_leaves_nothing(tiny_models, tmp_path, signame):
    """The signal arrives after the weights are in the temporary folder: no output, no temporary folder, exit 130."""
    out = tmp_path / "out"
    script = (
        "import os, signal, sys\n"
        # Ctrl-C's handler, as a terminal's foreground job has it (a job started with `&` by a shell without job
        # control inherits SIGINT ignored, and so would never see the signal)
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from transformers import PreTrainedTokenizerBase\n"
        f"PreTrainedTokenizerBase.save_pretrained = lambda *a, **k: os.kill(os.getpid(), signal.{signame})\n"
        "from llmsurgery.cli import run\n"
        f"sys.argv = ['llmsurgery', 'convert', {str(tiny_models['qwen2'])!r}, '-o', {str(out)!r}]\n"
        "run()\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130, proc.stderr
    assert "interrupted; nothing was written" in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_stale_temporary_folders_of_dead_runs_are_removed(tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    stale = tmp_path / f".out.tmp-{_dead_pid()}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    mine = tmp_path / ".other.tmp-1"  # another target's, and pid 1 is alive: left alone
    mine.mkdir()
    code, _, stderr = _run_main(["convert", str(tiny_models["llama"]), "-o", str(out)], capsys)
    assert code == 0, stderr
    assert not stale.exists() and mine.exists() and (out / "config.json").is_file()


def test_debug_shows_the_traceback(places, capsys):
    code, _, stderr = _run_main(["--debug", "inspect", str(places["missing_tensor"])], capsys)
    assert code == 2 and "Traceback" in stderr and "is missing" in stderr


def test_a_full_disk_during_save_is_one_line_and_leaves_nothing(tiny_models, tmp_path, capsys, monkeypatch):
    import errno

    from transformers import PreTrainedModel

    def full(self, folder, **kwargs):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    code, _, stderr = _run_main(["convert", str(tiny_models["llama"]), "-o", str(tmp_path / "out")], capsys)
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("✓")]
    assert code == 2 and len(lines) == 1 and "No space left on device" in lines[0], stderr
    assert list(tmp_path.iterdir()) == []
