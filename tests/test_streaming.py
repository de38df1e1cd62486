"""Layer-streamed prune-bi: the same scores, tensors and config as the in-memory pass, one layer at a time."""

import json

import pytest
import torch
from helpers import logits_of, run_cli, stock_load
from safetensors.torch import load_file

from llmsurgery.streaming import LazyCheckpoint, ShardWriter

ARGS = ("--remove", "2", "--calib", "pydoc", "--calib-samples", "3", "--calib-seq-len", "48")


def _tensors(folder) -> dict[str, torch.Tensor]:
    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        found |= load_file(path)
    return found


def _run(out, stream: str, *command) -> dict:
    """`llmsurgery COMMAND --output OUT --stream STREAM`: it succeeds; its --json results."""
    result = run_cli(*command, "--output", out, "--stream", stream, "--json", out.with_suffix(".json"))
    assert result.exit_code == 0, result.output
    return json.loads(out.with_suffix(".json").read_text())


def _prune(model, out, stream: str, *extra):
    return _run(out, stream, "prune", "--bi", model, *ARGS, *extra)


def test_streamed_prune_is_the_in_memory_prune(tiny_model, tmp_path):
    whole = _prune(tiny_model, tmp_path / "whole", "off")
    streamed = _prune(tiny_model, tmp_path / "streamed", "on")
    assert streamed["scores"] == whole["scores"] and streamed["removed_layers"] == whole["removed_layers"]
    a, b = _tensors(tmp_path / "whole"), _tensors(tmp_path / "streamed")
    assert sorted(a) == sorted(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    config = [json.loads((tmp_path / f / "config.json").read_text()) for f in ("whole", "streamed")]
    assert config[0] == config[1]
    assert torch.equal(
        logits_of(stock_load(tmp_path / "whole")), logits_of(stock_load(tmp_path / "streamed"))
    )
    history = json.loads((tmp_path / "streamed" / "llmsurgery_history.json").read_text())
    assert [p["pass"] for p in history["passes"]] == ["prune-bi"]


def _streamed_equals_whole(folder, *command) -> tuple[dict, dict]:
    """`command` with --stream off and on: the same report, tensors, config.json and logits; (config, report)."""
    from transformers import AutoModelForCausalLM

    calib = ("--calib", "pydoc", "--calib-samples", "3", "--calib-seq-len", "48")
    reports = {stream: _run(folder / stream, stream, *command, *calib) for stream in ("off", "on")}
    reports = {stream: {k: v for k, v in found.items() if k != "config"} for stream, found in reports.items()}
    assert reports["off"] == reports["on"]
    a, b = _tensors(folder / "off"), _tensors(folder / "on")
    assert sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    config = [json.loads((folder / f / "config.json").read_text()) for f in ("off", "on")]
    assert config[0] == config[1]
    models = [AutoModelForCausalLM.from_pretrained(folder / f, trust_remote_code=True) for f in ("off", "on")]
    assert torch.equal(logits_of(models[0]), logits_of(models[1]))
    return config[1], reports["on"]


@pytest.mark.parametrize("knobs", [["--keep-ratio", "0.5"], ["--criterion", "weight", "--rank", "3"], []])
def test_streamed_absorb_is_the_in_memory_absorb(tiny_model, tmp_path, knobs):
    """Absorb one layer at a time: the same report, tensors and config as in memory; the output loads and runs."""
    config, _ = _streamed_equals_whole(tmp_path, "absorb", tiny_model, *knobs)
    assert "auto_map" in config


@pytest.mark.parametrize("method", ["larosa", "magnitude"])
def test_streamed_rotate_sparsify_is_the_in_memory_one(tiny_models, tmp_path, method, monkeypatch):
    """LaRoSA one layer at a time: the same report, tensors and config; the output runs the same."""
    monkeypatch.setattr(
        "llmsurgery.passes.rotate_sparsify.maths.FOLD_ROWS", 7
    )  # the head and embedding folds in several blocks
    for arch in ("llama", "qwen2", "qwen3"):
        (tmp_path / arch).mkdir()
        config, _ = _streamed_equals_whole(
            tmp_path / arch, "rotate-sparsify", tiny_models[arch], "--sparsity", "0.4", "--method", method
        )
        assert config["sparsity_in"] == pytest.approx(0.32)


@pytest.mark.parametrize("extra", [(), ("--exact-values",)])
def test_streamed_kv_compress_is_the_in_memory_one(tiny_model, tmp_path, extra):
    """kv-compress --no-train --uniform one layer at a time: the same report, tensors, config and logits (with
    --exact-values, v_proj/o_proj as they were too)."""
    config, report = _streamed_equals_whole(
        tmp_path, "kv-compress", tiny_model, "--budget", "0.5", "--no-train", "--uniform", *extra
    )
    assert report["budget_reached"] == 0.5
    assert all(bool(layout.get("v_exact")) == bool(extra) for layout in config["attention_layout"])


@pytest.mark.parametrize("k_init", ["pca", "rotary-pairs"])
def test_streamed_keys_only_kv_compress_is_the_in_memory_one(tiny_models, tmp_path, k_init):
    _, report = _streamed_equals_whole(
        tmp_path, "kv-compress", tiny_models["llama"], "--budget", "0.75", "--no-train", "--keys-only",
        "--k-init", k_init,
    )  # fmt: skip
    assert report["budget_reached"] == 0.75 and report["values_share"] == 1.0


def test_streamed_kv_compress_places_the_windows_as_in_memory(tiny_models, tmp_path):
    """--positions: the streamed walk takes its windows at the same positions as the whole model, and they move
    the bases (the output differs from one with every window at position 0)."""
    command = ("kv-compress", tiny_models["llama"], "--budget", "0.75", "--no-train", "--keys-only")
    (tmp_path / "placed").mkdir()
    _streamed_equals_whole(tmp_path / "placed", *command, "--positions", "1024")
    _streamed_equals_whole(tmp_path, *command)
    placed, first = _tensors(tmp_path / "placed" / "on"), _tensors(tmp_path / "on")
    moved = [k for k in first if not torch.equal(first[k], placed[k])]
    assert moved and all(".self_attn." in k for k in moved), moved


def test_streamed_full_attention_only_kv_compress_is_the_in_memory_one(tiny_models, tmp_path):
    """--layers full-attention one layer at a time (tiny Gemma3: 2 of 6 layers full attention, 4 kept whole)."""
    _, report = _streamed_equals_whole(
        tmp_path, "kv-compress", tiny_models["gemma3_text"], "--budget", "0.5", "--no-train", "--uniform",
        "--layers", "full-attention",
    )  # fmt: skip
    assert report["budget_reached"] == 0.5 and report["keys_share"] == pytest.approx((2 * 0.5 + 4) / 6)


def test_dtype_auto_keeps_a_bfloat16_checkpoint_bfloat16(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.bfloat16).save_pretrained(source)
    AutoTokenizer.from_pretrained(tiny_models["llama"]).save_pretrained(source)
    for stream in ("off", "on"):
        _prune(source, tmp_path / stream, stream)
        assert {t.dtype for t in _tensors(tmp_path / stream).values()} == {torch.bfloat16}
        assert json.loads((tmp_path / stream / "config.json").read_text())["dtype"] == "bfloat16"
    a, b = _tensors(tmp_path / "off"), _tensors(tmp_path / "on")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    _prune(source, tmp_path / "f32", "on", "--dtype", "float32")  # an explicit --dtype still decides
    assert {t.dtype for t in _tensors(tmp_path / "f32").values()} == {torch.float32}


def test_shard_writer_splits_and_indexes(tiny_models, tmp_path):
    ckpt = LazyCheckpoint(tiny_models["qwen2"])
    out = tmp_path / "sharded"
    out.mkdir()
    writer = ShardWriter(out, max_bytes=50_000)
    for name in ckpt.names():
        writer.add(name, ckpt.get(name))
    writer.close()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and set(index["weight_map"]) == set(ckpt.names())
    again = LazyCheckpoint(out)
    assert all(torch.equal(again.get(n), ckpt.get(n)) for n in ckpt.names())


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["kv-compress", "{model}", "--budget", "0.5", "--stream", "on"],
            "run layer by layer so far; kv-compress needs",
        ),
        (
            ["prune", "--bi", "{model}", "--remove", "1", "--stream", "sometimes"],
            "--stream: unknown stream 'sometimes'",
        ),
    ],
)
def test_stream_refusals(tiny_models, tmp_path, args, message):
    out = tmp_path / "out"
    result = run_cli(*[a.replace("{model}", str(tiny_models["llama"])) for a in args], "--output", out)
    assert result.exit_code == 2 and message in result.output and not out.exists()


@pytest.mark.parametrize(
    "command",
    [
        ["heal", "{pruned}", "--teacher", "{model}", "--steps", "2"],
        ["kv-compress", "{model}", "--budget", "0.5"],
        ["prune", "--bi", "{model}", "--remove", "1", "--stream", "off"],
    ],
)
def test_whole_model_passes_refuse_when_memory_is_short(tiny_models, tmp_path, monkeypatch, command):
    """Before loading: one line with the estimate and the remedy, exit 2, nothing written (memory made short)."""
    import llmsurgery.memory

    pruned = tmp_path / "pruned"
    _prune(tiny_models["llama"], pruned, "on")
    monkeypatch.setattr(llmsurgery.memory, "available_memory", lambda: 1000)
    out = tmp_path / "out"
    args = [a.replace("{model}", str(tiny_models["llama"])).replace("{pruned}", str(pruned)) for a in command]
    result = run_cli(
        *args, "--calib", "pydoc", "--calib-samples", "2", "--calib-seq-len", "32", "--output", out
    )
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and not out.exists(), result.output
    assert "would hold the whole model in memory: about" in lines[0] and "GiB is available" in lines[0]
    assert lines[0].endswith("run it with --stream on" if command[0] == "prune" else "or a bigger machine")


def test_whole_model_pass_on_gpus_refuses_when_they_are_short(tiny_models, tmp_path, monkeypatch):
    """--device cuda: the estimate is held against the GPUs' free memory (a GPU is faked here: none exists)."""
    import llmsurgery.memory

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(llmsurgery.memory, "gpu_memory", lambda: 1000)
    out = tmp_path / "out"
    result = run_cli(
        "kv-compress", tiny_models["llama"], "--budget", "0.5", "--device", "cuda", "--calib", "pydoc",
        "--output", out,
    )  # fmt: skip
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and not out.exists(), result.output
    assert "GiB is free on the GPU; use a larger GPU" in lines[0]
    assert "--v-init pca with --uniform or --keys-only (runs layer by layer)" in lines[0]


def test_recipe_stream_setting_is_checked_by_validate(tiny_models, tmp_path):
    import yaml

    recipe = tmp_path / "r.yaml"
    passes = [
        {"pass": "kv-compress", "budget": 0.5, "calib": "pydoc", "calib-samples": 2, "calib-seq-len": 32}
    ]
    recipe.write_text(
        yaml.safe_dump({"version": 1, "model": str(tiny_models["llama"]), "stream": "on", "passes": passes})
    )
    result = run_cli("recipe", "validate", recipe, "--output", tmp_path / "out")
    assert result.exit_code == 2 and "kv-compress needs the whole model in memory" in result.output
    passes[0] |= {"train": False, "uniform": True}
    recipe.write_text(
        yaml.safe_dump({"version": 1, "model": str(tiny_models["llama"]), "stream": "on", "passes": passes})
    )
    assert run_cli("recipe", "validate", recipe, "--output", tmp_path / "out").exit_code == 0
    assert run_cli("run", recipe, "--output", tmp_path / "out").exit_code == 0
    history = json.loads((tmp_path / "out" / "llmsurgery_history.json").read_text())
    assert history["passes"][0]["report"]["budget_reached"] == 0.5


def test_streamed_pass_refuses_nan_weights(tiny_models, tmp_path):
    from safetensors.torch import save_file

    source = tmp_path / "nan"
    import shutil

    shutil.copytree(tiny_models["llama"], source)
    tensors = load_file(source / "model.safetensors")
    tensors["model.layers.3.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    result = run_cli("prune", "--bi", source, *ARGS, "--output", out, "--stream", "on")
    assert result.exit_code == 2 and "holds NaN or infinite values" in result.output and not out.exists()
