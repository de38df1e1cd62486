import copy
import math

import pytest
import torch
from helpers import PROMPT, logits_of, run_cli, stock_load

from llmsurgery.arch import arch_for, decoder_layers, get_submodule
from llmsurgery.calibration import CalibConfig, calibration_batches
from llmsurgery.model_io import load_model
from llmsurgery.passes.prune_bi.maths import choose_layers, remove_layers_, residual_stats, score_layers

CALIB = CalibConfig(source="pydoc", samples=3, seq_len=48, seed=0)


def _independent_residuals(model, batches):
    """x_0..x_L per window from output_hidden_states, with the final norm disabled."""
    plain = copy.deepcopy(model)
    spec = arch_for(plain)
    parent, _, name = spec.final_norm.rpartition(".")
    setattr(get_submodule(plain, parent), name, torch.nn.Identity())
    with torch.no_grad():
        return [plain(input_ids=w.unsqueeze(0), output_hidden_states=True).hidden_states for w in batches]


def test_scores_match_the_definition(tiny_model):
    loaded = load_model(str(tiny_model))
    batches = calibration_batches(loaded.tokenizer, CALIB)
    scores, removed = score_layers(loaded.model, batches, 2)
    states = _independent_residuals(loaded.model, batches)
    n_layers = len(states[0]) - 1
    expected = []
    for i in range(n_layers):
        cos = torch.cat(
            [
                torch.nn.functional.cosine_similarity(hs[i][0].double(), hs[i + 1][0].double(), dim=-1)
                for hs in states
            ]
        )
        expected.append(1 - cos.mean().item())
    assert scores == pytest.approx(expected, abs=1e-6)
    assert removed == sorted(sorted(range(n_layers), key=lambda i: expected[i])[:2])


def test_angular_block_matches_definition(tiny_models):
    loaded = load_model(str(tiny_models["llama"]))
    batches = calibration_batches(loaded.tokenizer, CALIB)
    scores, removed = score_layers(loaded.model, batches, 2, metric="angular", block=True)
    states = _independent_residuals(loaded.model, batches)
    expected = []
    for start in range(len(states[0]) - 2):
        a = torch.stack([hs[start][0, -1].double() for hs in states])
        b = torch.stack([hs[start + 2][0, -1].double() for hs in states])
        expected.append(
            (torch.arccos(torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1, 1)) / math.pi)
            .mean()
            .item()
        )
    assert scores == pytest.approx(expected, abs=1e-6)
    start = min(range(len(expected)), key=expected.__getitem__)
    assert removed == [start, start + 1]


def test_bi_block_is_contiguous(tiny_models):
    loaded = load_model(str(tiny_models["llama"]))
    capture = residual_stats(loaded.model, calibration_batches(loaded.tokenizer, CALIB))
    _, removed = choose_layers(capture, 3, block=True)
    assert removed == list(range(removed[0], removed[0] + 3))


def _skip_layers(model, skipped):
    """The unpruned model with `skipped` layers turned into identities (via hooks)."""
    handles = []
    for i in skipped:
        layer = decoder_layers(model)[i]
        handles.append(
            layer.register_forward_hook(
                lambda m, args, kwargs, out: args[0] if args else kwargs["hidden_states"], with_kwargs=True
            )
        )
    return handles


def test_removal_equals_skipping_and_reloads(tiny_model, tmp_path):
    loaded = load_model(str(tiny_model))
    original = copy.deepcopy(loaded.model)
    remove = [1, 4]
    remove_layers_(loaded.model, remove)
    handles = _skip_layers(original, remove)
    expected = logits_of(original)
    for h in handles:
        h.remove()
    torch.testing.assert_close(logits_of(loaded.model), expected, rtol=1e-5, atol=1e-5)
    config = loaded.model.config
    assert config.num_hidden_layers == 4 and len(decoder_layers(loaded.model)) == 4
    if getattr(original.config, "layer_types", None):
        kept = [t for i, t in enumerate(original.config.layer_types) if i not in remove]
        assert config.layer_types == kept
    loaded.model.save_pretrained(tmp_path / "m")
    reloaded = stock_load(tmp_path / "m")
    torch.testing.assert_close(logits_of(reloaded), expected, rtol=1e-5, atol=1e-5)
    generated = reloaded.generate(
        PROMPT, max_new_tokens=12, min_new_tokens=12, do_sample=False, use_cache=True
    )
    no_cache = reloaded.generate(
        PROMPT, max_new_tokens=12, min_new_tokens=12, do_sample=False, use_cache=False
    )
    assert generated.shape[1] == PROMPT.shape[1] + 12 and torch.equal(generated, no_cache)


def test_error_grows_with_layers_removed(tiny_models):
    """Lossy knob: the final hidden state drifts further from the dense one as more layers go."""
    loaded = load_model(str(tiny_models["llama"]))
    spec = arch_for(loaded.model)
    with torch.no_grad():  # residual-dominated, as trained models are: each layer adds a small update
        for layer in decoder_layers(loaded.model):
            for path in (spec.o_proj, spec.down_proj):
                get_submodule(layer, path).weight.mul_(0.1)
    batches = calibration_batches(loaded.tokenizer, CALIB)
    capture = residual_stats(loaded.model, batches)

    def final_hidden(model):
        with torch.no_grad():
            return model(input_ids=batches, output_hidden_states=True).hidden_states[-1].double()

    dense = final_hidden(loaded.model)
    errors = []
    for n in (1, 3, 5):
        _, removed = choose_layers(capture, n)
        pruned = copy.deepcopy(loaded.model)
        remove_layers_(pruned, removed)
        errors.append(((final_hidden(pruned) - dense).norm() / dense.norm()).item())
    assert errors[0] < errors[1] < errors[2], errors


def test_prune_cli_writes_standard_checkpoint(tiny_models, tmp_path):
    out, plot = tmp_path / "pruned", tmp_path / "bi.png"
    result = run_cli(
        "prune",
        "--bi",
        tiny_models["gemma3_text"],
        "--remove",
        "2",
        "--output",
        out,
        "--calib",
        "pydoc",
        "--calib-samples",
        "3",
        "--calib-seq-len",
        "48",
        "--plot",
        plot,
        "--json",
        tmp_path / "r.json",
    )
    assert result.exit_code == 0, result.output
    assert plot.stat().st_size > 1000
    import json

    history = json.loads((out / "llmsurgery_history.json").read_text())
    report = history["passes"][0]["report"]
    assert report["layers_after"] == 4 and len(report["scores"]) == 6
    assert report["removed_layers"] == sorted(sorted(range(6), key=report["scores"].__getitem__)[:2])
    model = stock_load(out)
    assert model.config.num_hidden_layers == 4 and len(model.config.layer_types) == 4
    assert torch.isfinite(logits_of(model)).all()


def test_scores_only_writes_nothing(tiny_models, tmp_path):
    result = run_cli(
        "prune",
        "--bi",
        tiny_models["llama"],
        "--ratio",
        "0.34",
        "--scores-only",
        "--calib",
        "pydoc",
        "--calib-samples",
        "2",
        "--calib-seq-len",
        "32",
    )
    assert result.exit_code == 0, result.output
    assert "layers to remove (0-based)" in result.output and "block influence" in result.output
    assert list(tmp_path.iterdir()) == []


def test_prune_with_eval_compares_to_original(tiny_models, tmp_path):
    import json

    result = run_cli(
        "prune",
        "--bi",
        tiny_models["qwen2"],
        "--remove",
        "1",
        "--output",
        tmp_path / "p",
        "--calib",
        "pydoc",
        "--calib-samples",
        "2",
        "--calib-seq-len",
        "32",
        "--eval",
        "pydoc_ppl",
        "--eval-limit",
        "2",
    )
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "p" / "llmsurgery_history.json").read_text())["passes"][0]["eval"]
    ppl = next(r for r in rows if r["metric"] == "word_perplexity")
    assert (
        ppl["baseline"] > 1
        and ppl["value"] > 1
        and ppl["ratio"] == pytest.approx(ppl["value"] / ppl["baseline"])
    )
