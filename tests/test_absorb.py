import json

import pytest
import torch
from helpers import PROMPT, logits_of, run_cli

from llmsurgery.arch import decoder_layers
from llmsurgery.calibration import CalibConfig, calibration_batches
from llmsurgery.model_io import load_model, save_model
from llmsurgery.passes import Absorb
from llmsurgery.passes.absorb.maths import absorb_decompose_, absorb_vo_group, v_input_covariances

CALIB = CalibConfig(source="pydoc", samples=3, seq_len=48, seed=0)


def _absorbed(folder, **knobs):
    loaded = load_model(str(folder))
    cfg = Absorb(calib=CALIB, **knobs)
    covs = (
        v_input_covariances(loaded.model, calibration_batches(loaded.tokenizer, CALIB))
        if cfg.needs_calibration
        else None
    )
    report = absorb_decompose_(loaded.model, cfg, covs=covs)
    return loaded, report


def _kl(p_logits, q_logits) -> float:
    p = p_logits.log_softmax(-1)
    return float((p.exp() * (p - q_logits.log_softmax(-1))).sum(-1).mean())


def test_group_refactorisation_is_exact_and_whitened_span_is_kept():
    torch.manual_seed(0)
    a, b = torch.randn(40, 8, dtype=torch.float64), torch.randn(8, 3 * 40, dtype=torch.float64)
    x = torch.randn(500, 40, dtype=torch.float64) * torch.linspace(2, 0.1, 40)
    chol = torch.linalg.cholesky(x.T @ x / 500)
    for factor in (None, chol):
        s, left, right = absorb_vo_group(a, b, factor)
        torch.testing.assert_close(left @ right, a @ b)
        assert (s[:-1] >= s[1:]).all()
        # left stays in span(a): projecting onto span(a) changes nothing
        proj = a @ torch.linalg.pinv(a)
        torch.testing.assert_close(proj @ left, left)


@pytest.mark.parametrize("criterion", ["whitened", "weight"])
def test_keeping_every_direction_leaves_logits_unchanged(tiny_model, criterion, tmp_path):
    expected = logits_of(load_model(str(tiny_model)).model)
    loaded, report = _absorbed(tiny_model, criterion=criterion)
    assert report["exact"]
    # float64 maths on float32 weights: observed max |diff| ~1e-6 on logits of magnitude ~1
    torch.testing.assert_close(logits_of(loaded.model), expected, rtol=0, atol=1e-4)
    save_model(loaded, tmp_path / "out", new_passes=[])
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", trust_remote_code=True, dtype=torch.float32
    ).eval()
    torch.testing.assert_close(logits_of(reloaded), expected, rtol=0, atol=1e-4)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = reloaded.generate(PROMPT[:, :6], use_cache=True, **kw)
        uncached = reloaded.generate(PROMPT[:, :6], use_cache=False, **kw)
    assert torch.equal(cached, uncached)


def _make_rank_deficient_(model, lost: int) -> None:
    """Every KV head's value weights get `lost` rows that repeat combinations of the others."""
    d = (
        model.config.head_dim
        if getattr(model.config, "head_dim", None)
        else model.config.hidden_size // model.config.num_attention_heads
    )
    with torch.no_grad():
        for layer in decoder_layers(model):
            w = layer.self_attn.v_proj.weight  # [G*d, D]
            for g in range(model.config.num_key_value_heads):
                for j in range(lost):
                    w[g * d + d - 1 - j] = 0.5 * w[g * d + j] - 0.25 * w[g * d + j + 1]


def test_exact_mode_removes_exactly_the_redundant_directions(tiny_models, tmp_path):
    loaded = load_model(str(tiny_models["llama"]))
    _make_rank_deficient_(loaded.model, lost=2)
    save_model(loaded, tmp_path / "deficient", new_passes=[])
    expected = logits_of(loaded.model)
    config = loaded.model.config
    d, groups, layers = (
        config.hidden_size // config.num_attention_heads,
        config.num_key_value_heads,
        config.num_hidden_layers,
    )
    for criterion in ("weight", "whitened"):
        absorbed, report = _absorbed(tmp_path / "deficient", criterion=criterion)
        assert all(row["v_after"] == [d - 2] * groups for row in report["layers"])
        # Each dropped direction removes one v_proj row (D inputs) and one o_proj column per query head reading it.
        n_rep = config.num_attention_heads // groups
        removed = layers * groups * 2 * (config.hidden_size + n_rep * config.hidden_size)
        assert report["attention_params_before"] - report["attention_params_after"] == removed
        torch.testing.assert_close(logits_of(absorbed.model), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("criterion", ["whitened", "weight", "norm"])
def test_error_grows_as_fewer_directions_are_kept(tiny_models, criterion):
    expected = logits_of(load_model(str(tiny_models["qwen2"])).model)
    kls = [
        _kl(expected, logits_of(_absorbed(tiny_models["qwen2"], criterion=criterion, keep_ratio=r)[0].model))
        for r in (0.9, 0.6, 0.3)
    ]
    assert 0 < kls[0] < kls[1] < kls[2], kls


def test_whitened_beats_weight_only_and_vanilla_on_calibration_like_text(tiny_models):
    expected = logits_of(load_model(str(tiny_models["llama"])).model)
    kl = {
        c: _kl(expected, logits_of(_absorbed(tiny_models["llama"], criterion=c, keep_ratio=0.5)[0].model))
        for c in ("whitened", "weight", "norm")
    }
    assert kl["whitened"] < kl["norm"] and kl["weight"] < kl["norm"], kl


def test_qk_pair_dropping_is_lossy_and_grows_with_the_knob(tiny_models, tmp_path):
    folder = tiny_models["mistral"]
    expected = logits_of(load_model(str(folder)).model)
    kls = []
    for ratio in (0.75, 0.5, 0.25):
        loaded, report = _absorbed(folder, pairs=("qk",), keep_ratio=ratio)
        assert report["lossy_qk"] and not report["exact"]
        kls.append(_kl(expected, logits_of(loaded.model)))
    assert 0 < kls[0] < kls[1] < kls[2], kls
    save_model(loaded, tmp_path / "qk", new_passes=[])
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "qk", trust_remote_code=True, dtype=torch.float32
    ).eval()
    torch.testing.assert_close(logits_of(reloaded), logits_of(loaded.model), rtol=0, atol=1e-5)
    with torch.no_grad():
        out = reloaded.generate(PROMPT[:, :6], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.shape[1] == 14


def test_cache_holds_the_reduced_widths(tiny_models, tmp_path):
    from llmsurgery.inspection import describe

    out = tmp_path / "small"
    assert (
        run_cli(
            "absorb",
            tiny_models["llama"],
            "--output",
            out,
            "--keep-ratio",
            "0.5",
            "--pairs",
            "vo,qk",
            "--calib",
            "pydoc",
            "--calib-samples",
            "3",
            "--calib-seq-len",
            "48",
        ).exit_code
        == 0
    )
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=PROMPT, cache=cache, use_cache=True)
    cached = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers) * 4 // PROMPT.shape[1]
    full = describe(str(tiny_models["llama"]))["kv_cache_bytes_per_token"]
    assert cached == describe(str(out))["kv_cache_bytes_per_token"] == full // 2


def test_cli_dry_run_writes_nothing_and_absorb_composes_with_prune(tiny_models, tmp_path):
    calib = ("--calib", "pydoc", "--calib-samples", "3", "--calib-seq-len", "48")
    result = run_cli(
        "absorb",
        tiny_models["llama"],
        "--output",
        tmp_path / "dry",
        "--threshold",
        "0.5",
        "--dry-run",
        "--plot",
        tmp_path / "spectra.png",
        *calib,
    )
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "dry").exists() and (tmp_path / "spectra.png").stat().st_size > 1000
    assert "v dropped" in result.output and "%)" in result.output
    assert (
        run_cli(
            "prune", tiny_models["llama"], "--remove", "2", "--output", tmp_path / "pruned", *calib
        ).exit_code
        == 0
    )
    assert (
        run_cli(
            "absorb", tmp_path / "pruned", "--output", tmp_path / "both", "--rank", "12", *calib
        ).exit_code
        == 0
    )
    history = json.loads((tmp_path / "both" / "llmsurgery_history.json").read_text())
    assert [p["pass"] for p in history["passes"]] == ["prune-bi", "absorb"]
    config = json.loads((tmp_path / "both" / "config.json").read_text())
    assert len(config["attention_layout"]) == 4 and all(
        layout["v"] == [12, 12] for layout in config["attention_layout"]
    )
    # ... and an absorbed model can be pruned further, its layout kept in step.
    assert (
        run_cli("prune", tmp_path / "both", "--remove", "1", "--output", tmp_path / "again", *calib).exit_code
        == 0
    )
    again = load_model(str(tmp_path / "again"))
    assert len(again.model.config.attention_layout) == 3
    assert torch.isfinite(logits_of(again.model)).all()


@pytest.mark.parametrize(
    "args, message",
    [
        (("--keep-ratio", "0"), "--keep-ratio"),
        (("--keep-ratio", "0.5", "--rank", "4"), "one of"),
        (("--threshold", "2"), "threshold"),
        (("--pairs", "vo,xx"), "pairs"),
        (("--criterion", "magic"), "criterion"),
    ],
)
def test_cli_rejects_bad_options(tiny_models, tmp_path, args, message):
    result = run_cli("absorb", tiny_models["llama"], "--output", tmp_path / "o", *args)
    assert result.exit_code == 2 and message in result.output and not (tmp_path / "o").exists()


def test_qk_refused_for_per_head_qk_norms(tiny_models, tmp_path):
    result = run_cli(
        "absorb", tiny_models["qwen3"], "--output", tmp_path / "o", "--pairs", "qk", "--keep-ratio", "0.5"
    )
    assert result.exit_code == 2 and "normalises q and k" in result.output and not (tmp_path / "o").exists()
