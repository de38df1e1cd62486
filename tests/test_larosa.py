import copy
import json

import pytest
import torch
from helpers import PROMPT, logits_of, run_cli

from llmsurgery.arch import arch_for, decoder_layers, get_submodule
from llmsurgery.calibration import CalibConfig, calibration_batches
from llmsurgery.model_io import load_model
from llmsurgery.modeling.modeling_llmsurgery import keep_top_k
from llmsurgery.passes import RotateSparsify
from llmsurgery.passes.rotate_sparsify.maths import (
    normed_input_covariances,
    principal_rotation,
    rotate_sparsify_,
)

CALIB = CalibConfig(source="pydoc", samples=3, seq_len=48, seed=0)
FOLDABLE = ["llama", "mistral", "qwen2", "qwen3"]


@pytest.fixture(params=FOLDABLE)
def foldable(request, tiny_models):
    loaded = load_model(str(tiny_models[request.param]))
    return loaded, calibration_batches(loaded.tokenizer, CALIB)


@pytest.mark.parametrize("method", ["larosa", "magnitude"])
def test_sparsity_zero_is_exact(foldable, method):
    loaded, batches = foldable
    expected = logits_of(loaded.model)
    report = rotate_sparsify_(loaded.model, batches, RotateSparsify(sparsity=0.0, method=method, calib=CALIB))
    # float32 weights, float64 folding: observed max |diff| ~5e-7 on logits of magnitude ~1
    torch.testing.assert_close(logits_of(loaded.model), expected, rtol=0, atol=1e-5)
    # magnitude never rotates, also when handed windows
    assert (
        report["rotated"] == (method == "larosa") == hasattr(loaded.model.model.layers[0], "rotation_adapter")
    )


def test_rotations_are_orthogonal_and_descending():
    x = torch.randn(500, 16, dtype=torch.float64) * torch.linspace(3, 0.1, 16)
    q = principal_rotation(x.T @ x, damp=0.01)
    torch.testing.assert_close(q.T @ q, torch.eye(16, dtype=torch.float64))
    variances = ((x @ q) ** 2).sum(0)
    assert (variances[:-1] >= variances[1:] - 1e-9).all()


def _runtime_reference_(model, rotations, s_in, s_out):
    """Rotate online, Top-K on (x / rms) Q, rotate back, apply the norm scale: the same definition, unfolded."""
    spec = arch_for(model)
    eps = model.config.rms_norm_eps
    selections = []

    def normed_hook(q, norm):
        def hook(module, args, output):
            x = args[0].double()
            rotated = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)) @ q
            kept = keep_top_k(rotated, s_in)
            selections.append(kept != 0)
            return ((kept @ q.T) * (spec.norm_weight_offset + norm.weight.double())).to(output.dtype)

        return hook

    for layer, q in zip(decoder_layers(model), rotations):
        for path in (spec.attn_norm, spec.mlp_norm):
            norm = get_submodule(layer, path)
            norm.register_forward_hook(normed_hook(q, norm))
        for path in (spec.o_proj, spec.down_proj):
            get_submodule(layer, path).register_forward_pre_hook(
                lambda m, args: (keep_top_k(args[0], s_out),)
            )
    return selections


def _folded_selections(model):
    spec = arch_for(model)
    selections = []
    for layer in decoder_layers(model):
        for path in (
            spec.attn_norm,
            spec.mlp_norm,
        ):  # registered after the sparsity hook: sees the Top-K'd output
            get_submodule(layer, path).register_forward_hook(lambda m, args, out: selections.append(out != 0))
    return selections


def test_folded_form_selects_what_the_runtime_reference_selects(foldable):
    loaded, batches = foldable
    cfg = RotateSparsify(sparsity=0.5, split=(1.0, 1.0), calib=CALIB)
    reference = copy.deepcopy(loaded.model)
    rotations = [principal_rotation(c, cfg.damp) for c in normed_input_covariances(reference, batches)]
    ref_sel = _runtime_reference_(reference, rotations, cfg.sparsity_in, cfg.sparsity_out)
    expected = logits_of(reference)
    rotate_sparsify_(loaded.model, batches, cfg)
    folded_sel = _folded_selections(loaded.model)
    got = logits_of(loaded.model)
    agree = torch.cat([(a == b).flatten() for a, b in zip(ref_sel, folded_sel)]).double().mean().item()
    assert len(ref_sel) == len(folded_sel) == 2 * len(decoder_layers(loaded.model))
    assert agree > 0.999, agree  # float32 vs float64 rounding may flip a near-tie
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-3)


def test_error_grows_with_sparsity(tiny_models):
    loaded = load_model(str(tiny_models["llama"]))
    batches = calibration_batches(loaded.tokenizer, CALIB)
    dense = torch.log_softmax(logits_of(loaded.model), -1)
    kls = []
    for s in (0.2, 0.4, 0.6, 0.8):
        model = copy.deepcopy(loaded.model)
        rotate_sparsify_(model, batches, RotateSparsify(sparsity=s, split=(1.0, 1.0), calib=CALIB))
        kls.append(
            torch.nn.functional.kl_div(
                torch.log_softmax(logits_of(model), -1), dense, log_target=True, reduction="batchmean"
            ).item()
        )
    assert kls == sorted(kls) and kls[0] > 0, kls


def test_cli_writes_a_model_that_loads_with_remote_code(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sparse"
    result = run_cli(
        "rotate-sparsify",
        tiny_models["qwen2"],
        "--sparsity",
        "0.4",
        "--output",
        out,
        "--calib",
        "pydoc",
        "--calib-samples",
        "3",
        "--calib-seq-len",
        "48",
        "--json",
        tmp_path / "r.json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["sparsity_in"] == pytest.approx(0.32) and report["sparsity_out"] == pytest.approx(0.48)
    assert 0.32 < report["effective_sparsity"] < 0.48
    assert (out / "modeling_llmsurgery.py").is_file()
    sparse = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    in_memory = load_model(str(out))  # llmsurgery trusts its own models without the flag
    torch.testing.assert_close(logits_of(sparse), logits_of(in_memory.model))
    dense_again = AutoModelForCausalLM.from_pretrained(
        out, trust_remote_code=True, sparsity_in=0.0, sparsity_out=0.0
    )
    original = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"])
    torch.testing.assert_close(logits_of(dense_again), logits_of(original), rtol=0, atol=1e-5)
    generated = sparse.generate(PROMPT, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert generated.shape[1] == PROMPT.shape[1] + 6


def test_gemma3_is_refused_with_one_line(tiny_models, tmp_path):
    result = run_cli(
        "rotate-sparsify", tiny_models["gemma3_text"], "--sparsity", "0.4", "--output", tmp_path / "o"
    )
    assert result.exit_code == 2 and "cannot fold rotations into 'gemma3_text'" in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--sparsity", "1.0"], "less than 1"),
        (["--sparsity", "-0.1"], "greater than or equal to 0"),
        (["--sparsity", "0.6", "--split", "0.8,1.8"], "outside [0, 1)"),
        (["--sparsity", "0.4", "--split", "abc"], "--split: wants two numbers"),
        (["--sparsity", "0.4", "--method", "random"], "--method: Input should be 'larosa' or 'magnitude'"),
    ],
)
def test_bad_options(tiny_models, tmp_path, args, message):
    result = run_cli("rotate-sparsify", tiny_models["llama"], "--output", tmp_path / "o", *args)
    assert result.exit_code == 2 and message in result.output and not (tmp_path / "o").exists()


def test_folds_by_blocks_equal_whole_matrices(monkeypatch):
    """Weights are folded block by block (rows for inputs, columns for outputs); the blocks add up to the whole."""
    import torch.nn as nn

    from llmsurgery.arch import arch_for_model_type
    from llmsurgery.passes.rotate_sparsify import maths as larosa

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(50, 16, generator=gen)
    wide = torch.randn(16, 50, generator=gen)
    scale = torch.linspace(0.5, 1.5, 16, dtype=torch.float64)
    q = torch.linalg.qr(torch.randn(16, 16, generator=gen, dtype=torch.float64))[0]
    results = []
    for rows in (7, 10**6):
        monkeypatch.setattr(larosa, "FOLD_ROWS", rows)
        norm = nn.Module()
        norm.weight = nn.Parameter(scale.float())
        head = larosa.fold_head(weight, norm, arch_for_model_type("llama"), q)
        assert torch.equal(norm.weight, torch.ones(16))
        in_place = weight.clone()
        larosa.folded_input(in_place, q=q, out=in_place)
        results.append((head, larosa.folded_input(weight, scale), in_place, larosa.folded_output(wide, q)))
    for blocked, whole in zip(*results):
        assert torch.allclose(blocked, whole, atol=1e-6)
    head, scaled, rotated, output = results[1]
    assert torch.allclose(head, (weight.double() * scale @ q).float(), atol=1e-6)
    assert torch.equal(scaled, (weight.double() * scale).float())
    assert torch.allclose(rotated, (weight.double() @ q).float(), atol=1e-6)
    assert torch.allclose(output, (q.T @ wide.double()).float(), atol=1e-6)
