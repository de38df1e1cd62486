import json

import pytest
import torch
from conftest import folder_digest
from helpers import logits_of, stock_load

from llmsurgery.errors import UserError
from llmsurgery.model_io import HISTORY_FILE, load_model, save_model
from llmsurgery.sources import resolve_source


def test_save_unchanged_reloads_with_same_logits(tiny_model, tmp_path):
    before = folder_digest(tiny_model)
    loaded = load_model(str(tiny_model))
    out = save_model(loaded, tmp_path / "out")
    torch.testing.assert_close(logits_of(stock_load(out)), logits_of(loaded.model), rtol=0, atol=0)
    history = json.loads((out / HISTORY_FILE).read_text())
    assert history["source"]["kind"] == "folder" and len(history["source"]["sha256"]) == 64
    assert history["passes"] == []
    assert (out / "README.md").is_file() and (out / "tokenizer.json").is_file()
    assert folder_digest(tiny_model) == before  # the input is never touched


def test_existing_output_refused_unless_force(tiny_models, tmp_path):
    loaded = load_model(str(tiny_models["llama"]))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        save_model(loaded, out)
    assert (out / "keep.txt").read_text() == "mine"
    save_model(loaded, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_output_inside_input_refused(tiny_models):
    loaded = load_model(str(tiny_models["llama"]))
    with pytest.raises(UserError, match="overwrite the input"):
        save_model(loaded, tiny_models["llama"] / "sub", force=True)


def test_interrupted_save_leaves_nothing(tiny_models, tmp_path, monkeypatch):
    loaded = load_model(str(tiny_models["qwen2"]))

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loaded.tokenizer, "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        save_model(loaded, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_history_appends_and_keeps_source(tiny_models, tmp_path):
    loaded = load_model(str(tiny_models["llama"]))
    first = save_model(
        loaded, tmp_path / "a", new_passes=[{"pass": "p1", "config": {"k": 1}, "seconds": 0.1}]
    )
    again = load_model(str(first))
    second = save_model(
        again, tmp_path / "b", new_passes=[{"pass": "p2", "config": {"k": 2}, "seconds": 0.2}]
    )
    h1 = json.loads((first / HISTORY_FILE).read_text())
    h2 = json.loads((second / HISTORY_FILE).read_text())
    assert [p["pass"] for p in h2["passes"]] == ["p1", "p2"]
    assert h2["source"] == h1["source"] and h1["source"]["id"] == str(tiny_models["llama"].resolve())


@pytest.mark.parametrize(
    "spec,kind",
    [("smollm2-135m", "builtin"), ("gemma3-270m", "builtin"), ("org/model", "hub"), ("gpt2", "hub")],
)
def test_resolve_source_kinds(spec, kind):
    assert resolve_source(spec).kind == kind


@pytest.mark.parametrize("spec", ["/no/such/folder", "./missing", "missing.gguf", "a/b/c"])
def test_missing_paths_are_user_errors(spec):
    with pytest.raises(UserError, match="no such file or folder"):
        resolve_source(spec)


def test_hub_id_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="Hugging Face hub"):
        load_model("someorg/some-model-that-is-not-cached")


def test_dtype_and_device_choices(tiny_models):
    loaded = load_model(str(tiny_models["llama"]), dtype="bfloat16", device="auto")
    assert loaded.model.dtype == torch.bfloat16
    with pytest.raises(UserError, match="unknown dtype"):
        load_model(str(tiny_models["llama"]), dtype="int3")


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_bitsandbytes_loading_for_eval(tiny_models, tmp_path, bits):
    loaded = load_model(str(tiny_models["llama"]), **{f"load_in_{bits}": True})
    assert loaded.quantized
    assert torch.isfinite(logits_of(loaded.model)).all()
    with pytest.raises(UserError, match="evaluation only"):
        save_model(loaded, tmp_path / "q")
