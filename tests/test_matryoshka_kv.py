import json

import pytest
import torch
from helpers import PROMPT, logits_of, run_cli

from llmsurgery.calibration import CalibConfig, calibration_batches
from llmsurgery.model_io import load_model, save_model
from llmsurgery.passes import KVCompress
from llmsurgery.passes.kv_compress.maths import (
    cayley,
    kv_compress_,
    principal_basis,
    rotary_pair_basis,
    window_positions,
)

PCA = CalibConfig(source="pydoc", samples=3, seq_len=48, seed=0)
TRAIN = CalibConfig(source="pydoc", samples=6, seq_len=32, seed=1)
SEARCH = CalibConfig(source="pydoc", samples=1, seq_len=32, seed=2)
CALIB_ARGS = (
    "--calib",
    "pydoc",
    "--calib-samples",
    "3",
    "--calib-seq-len",
    "48",
    "--train-samples",
    "6",
    "--train-seq-len",
    "32",
    "--search-samples",
    "1",
    "--search-seq-len",
    "32",
)


def _compressed(folder, **knobs):
    loaded = load_model(str(folder))
    cfg = KVCompress(
        calib=PCA, train_samples=6, train_seq_len=32, search_samples=1, search_seq_len=32, **knobs
    )
    tok = loaded.tokenizer
    batches = {
        "pca": calibration_batches(tok, PCA),
        "train": calibration_batches(tok, TRAIN),
        "search": calibration_batches(tok, SEARCH),
    }
    report = kv_compress_(loaded.model, cfg, batches)
    return loaded, report


def _kl(p_logits, q_logits) -> float:
    p = p_logits.log_softmax(-1)
    return float((p.exp() * (p - q_logits.log_softmax(-1))).sum(-1).mean())


def test_cayley_is_orthogonal_and_pca_basis_is_proper():
    x = torch.randn(8, 8, dtype=torch.float64)
    u = cayley(x)
    torch.testing.assert_close(u.T @ u, torch.eye(8, dtype=torch.float64))
    assert torch.det(u) > 0
    data = torch.randn(300, 8, dtype=torch.float64) * torch.linspace(3, 0.1, 8) + 2
    mean = data.mean(0)
    basis = principal_basis(data.T @ data / 300, mean)
    assert torch.det(basis) > 0
    variances = ((data - mean) @ basis).var(0)
    assert (variances[:-1] >= variances[1:]).all()


def _rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """rotate_half RoPE of x [..., d] by per-pair angles [d/2]."""
    half = x.shape[-1] // 2
    cos, sin = angles.cos().repeat(2), angles.sin().repeat(2)
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def test_rotary_pair_basis_keeps_whole_pairs_in_score_order_and_turns_with_rope():
    d = 16
    queries, keys = torch.rand(d, dtype=torch.float64), torch.rand(d, dtype=torch.float64)
    basis = rotary_pair_basis(queries, keys)
    assert torch.det(basis) > 0
    torch.testing.assert_close(basis.T @ basis, torch.eye(d, dtype=torch.float64))
    dims = basis.abs().argmax(0)  # every column is one dim (up to sign)
    assert torch.equal(dims[1::2], dims[::2] + d // 2)  # i and i + d/2 side by side
    pair_scores = [float((queries * keys)[i] + (queries * keys)[i + d // 2]) for i in dims[::2]]
    assert pair_scores == sorted(pair_scores, reverse=True)
    # the first r columns (r even) span a subspace RoPE turns within itself: projecting and rotating commute at any
    # position, so a far key loses what a near one does; a PCA basis of the same keys does not
    x = torch.randn(5, d, dtype=torch.float64)
    angles = torch.rand(d // 2, dtype=torch.float64) * 1000
    kept = basis[:, :6]
    torch.testing.assert_close(_rope(x @ kept @ kept.T, angles), _rope(x, angles) @ kept @ kept.T)
    data = torch.randn(200, d, dtype=torch.float64) @ torch.randn(d, d, dtype=torch.float64)
    pca = principal_basis(data.T @ data / 200, data.mean(0))[:, :6]
    assert not torch.allclose(_rope(x @ pca @ pca.T, angles), _rope(x, angles) @ pca @ pca.T)


@pytest.mark.parametrize("v_init", ["pca", "vo"])
def test_full_budget_reproduces_logits_before_and_after_training(tiny_model, v_init, tmp_path):
    expected = logits_of(load_model(str(tiny_model)).model)
    for train in (False, True):
        loaded, report = _compressed(
            tiny_model, budget=1.0, train=train, train_steps=3, uniform=True, v_init=v_init
        )
        assert report["budget_reached"] == 1.0
        # float64 folding of float32 weights; trained U stays orthogonal: observed max |diff| ~1e-6
        torch.testing.assert_close(logits_of(loaded.model), expected, rtol=0, atol=2e-4)
    save_model(loaded, tmp_path / "full", new_passes=[])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "full", trust_remote_code=True, dtype=torch.float32
    ).eval()
    torch.testing.assert_close(logits_of(model), expected, rtol=0, atol=2e-4)
    with torch.no_grad():
        cached = model.generate(
            PROMPT[:, :6], max_new_tokens=10, do_sample=False, pad_token_id=0, use_cache=True
        )
        uncached = model.generate(
            PROMPT[:, :6], max_new_tokens=10, do_sample=False, pad_token_id=0, use_cache=False
        )
    assert torch.equal(cached, uncached)


def test_rotary_pairs_full_budget_is_exact_and_training_keeps_the_pairs(tiny_models):
    expected = logits_of(load_model(str(tiny_models["llama"])).model)
    loaded, report = _compressed(
        tiny_models["llama"], budget=1.0, train=True, train_steps=3, uniform=True, k_init="rotary-pairs"
    )
    assert report["budget_reached"] == 1.0 and len(report["loss_curve"]) == 3
    torch.testing.assert_close(logits_of(loaded.model), expected, rtol=0, atol=2e-4)
    for name, p in loaded.model.named_parameters():
        if name.endswith("key_basis"):  # still one dim per column after training: the pairs, not a rotation
            assert torch.equal(p.detach().abs().amax(0), torch.ones(p.shape[1])), name


def test_rotary_pairs_error_grows_as_the_key_budget_shrinks(tiny_models):
    expected = logits_of(load_model(str(tiny_models["llama"])).model)
    kls = [
        _kl(
            expected,
            logits_of(
                _compressed(
                    tiny_models["llama"], budget=b, train=False, keys_only=True, k_init="rotary-pairs"
                )[0].model
            ),
        )
        for b in (0.875, 0.75, 0.625)
    ]
    assert 0 < kls[0] < kls[1] < kls[2], kls


def test_window_positions_place_each_window_whole_below_the_span():
    windows = torch.zeros(50, 48, dtype=torch.long)
    at = window_positions(windows, 1024, seed=3)
    assert at.shape == (50, 48) and int(at.min()) >= 0 and int(at.max()) <= 1023
    assert torch.equal(at[:, 1:] - at[:, :-1], torch.ones(50, 47, dtype=torch.long))  # each window in order
    assert len(set(at[:, 0].tolist())) > 40  # each its own offset
    assert torch.equal(at, window_positions(windows, 1024, seed=3))
    assert not torch.equal(at, window_positions(windows, 1024, seed=4))
    assert window_positions(windows, 48, seed=3) is None and window_positions(None, 1024, seed=3) is None


def test_a_window_at_another_offset_gives_the_same_logits_and_other_keys(tiny_models):
    """What --positions rests on: RoPE attention sees only distances, so moving a window leaves its logits; the
    post-RoPE keys (what the bases are fitted to) turn."""
    from transformers import DynamicCache

    model = load_model(str(tiny_models["llama"])).model
    caches = [DynamicCache(), DynamicCache()]
    with torch.no_grad():
        near, far = (
            model(
                input_ids=PROMPT,
                position_ids=torch.arange(start, start + 20)[None],
                cache=cache,
                use_cache=True,
            )
            for start, cache in zip((0, 900), caches)
        )
    torch.testing.assert_close(far.logits, near.logits, atol=1e-4, rtol=1e-4)
    assert (caches[1].layers[0].keys - caches[0].layers[0].keys).abs().max() > 0.1


def _post_rope_keys(model, start: int) -> list[torch.Tensor]:
    """Per layer, the cached keys [KV heads, T, d] of PROMPT placed at `start`."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        model(
            input_ids=PROMPT, position_ids=torch.arange(start, start + 20)[None], cache=cache, use_cache=True
        )
    return [layer.keys[0] for layer in cache.layers]


def test_positions_fit_the_key_bases_to_keys_far_into_a_context(tiny_models):
    """Key bases (PCA, half the dims) from windows at position 0 lose more of a far window's keys than bases
    from the same windows placed within --positions (`window_positions`), and less of a window at 0."""
    from llmsurgery.passes.kv_compress.maths import MatryoshkaState, attach_, detach_, init_from_pca_

    loaded = load_model(str(tiny_models["llama"]))
    model, windows = (
        loaded.model,
        calibration_batches(loaded.tokenizer, PCA.model_copy(update={"samples": 8})),
    )
    lost = {}
    for span in (0, 1024):
        state = MatryoshkaState(16, [[16, 16]] * 6, 2)
        saved = attach_(model, state)
        try:
            init_from_pca_(
                model, state, windows, v_identity=False, positions=window_positions(windows, span, 0)
            )
        finally:
            detach_(saved)
        for start in (0, 900):
            residual = total = 0.0
            for layer, keys in enumerate(_post_rope_keys(model, start)):
                for g in range(2):
                    x = keys[g] - state.mu_k[2 * layer + g].detach()
                    kept = state.init_k[2 * layer + g][:, :8]
                    residual += float((x - x @ kept @ kept.T).pow(2).sum())
                    total += float(x.pow(2).sum())
            lost[span, start] = residual / total
    assert lost[1024, 900] < 0.9 * lost[0, 900], lost  # measured: 0.41 against 0.50
    assert lost[0, 0] < lost[1024, 0], lost


def test_error_grows_as_the_budget_shrinks(tiny_models):
    expected = logits_of(load_model(str(tiny_models["llama"])).model)
    kls = [
        _kl(
            expected,
            logits_of(_compressed(tiny_models["llama"], budget=b, train=False, uniform=True)[0].model),
        )
        for b in (0.75, 0.5, 0.25)
    ]
    assert 0 < kls[0] < kls[1] < kls[2], kls


def test_training_lowers_the_loss_and_search_meets_the_budget(tiny_models):
    loaded, report = _compressed(
        tiny_models["qwen2"], budget=0.5, train=True, train_steps=24, lr=1e-2, batch_size=2
    )
    curve = report["loss_curve"]
    assert len(curve) == 24 and sum(curve[-6:]) < sum(curve[:6])
    assert report["budget_reached"] <= 0.5
    widths = [k + v for ks, vs in zip(report["ranks_k"], report["ranks_v"]) for k, v in zip(ks, vs)]
    assert len(set(widths)) > 1  # the search allocates unevenly
    assert all(r % report["rank_step"] == 0 for row in report["ranks_k"] + report["ranks_v"] for r in row)


def test_search_beats_uniform_ranks_on_held_out_search_windows(tiny_models):
    from llmsurgery.passes.kv_compress.maths import (
        MatryoshkaState,
        _total_kl,
        attach_,
        detach_,
        init_from_pca_,
        search_ranks,
        uniform_ranks,
    )

    loaded = load_model(str(tiny_models["llama"]))
    model, tok = loaded.model, loaded.tokenizer
    with (
        torch.no_grad()
    ):  # make the heads unequal, as in trained models: the first KV head's values matter most
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight[:16] *= 6
    windows = calibration_batches(tok, CalibConfig(source="pydoc", samples=3, seq_len=48, seed=5))
    state = MatryoshkaState(16, [[16, 16]] * 6, 2)
    saved = attach_(model, state)
    init_from_pca_(model, state, calibration_batches(tok, PCA), v_identity=False)
    found = search_ranks(model, state, windows, [0.5])
    with torch.no_grad():
        state.project = False
        teacher = [
            model(input_ids=w.unsqueeze(0), logits_to_keep=24).logits.float().log_softmax(-1)
            for w in windows[1:]
        ]
        state.project = True
        scores = {}
        for name, ranks in (("uniform", uniform_ranks(state, 0.5)), ("searched", found[0.5])):
            state.set_ranks(ranks)
            scores[name] = (_total_kl(model, state, windows[1:], teacher, 24), state.budget())
    detach_(saved)
    assert scores["searched"][1] <= 0.5 and scores["searched"][0] < scores["uniform"][0], scores


def test_cli_cache_bytes_match_the_budget(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM, DynamicCache

    from llmsurgery.inspection import describe

    out = tmp_path / "kv"
    result = run_cli(
        "kv-compress",
        tiny_models["llama"],
        "--budget",
        "0.5",
        "--output",
        out,
        "--train-steps",
        "4",
        *CALIB_ARGS,
    )
    assert result.exit_code == 0, result.output
    history = json.loads((out / "llmsurgery_history.json").read_text())["passes"][-1]
    assert history["pass"] == "kv-compress" and len(history["report"]["loss_curve"]) == 4
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model.generate(PROMPT[:, :6], max_new_tokens=6, do_sample=False, pad_token_id=0, cache=cache)
    tokens = cache.get_seq_length()
    cached = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers) * 4 // tokens
    full = describe(str(tiny_models["llama"]))["kv_cache_bytes_per_token"]
    info = describe(str(out))
    assert (
        cached == info["kv_cache_bytes_per_token"] and info["kv_cache_bytes_per_token_before_surgery"] == full
    )
    assert (
        cached == round(full * history["report"]["budget_reached"])
        and history["report"]["budget_reached"] <= 0.5
    )
    assert run_cli("eval", out, "--tasks", "pydoc_ppl", "--limit", "2").exit_code == 0


@torch.no_grad()
def _prefill_then_later(model) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of PROMPT's first 12 tokens as a prefill into a fresh cache, then of the rest through that cache."""
    from transformers import DynamicCache

    cache = DynamicCache()
    first = model(input_ids=PROMPT[:, :12], past_key_values=cache).logits.double()
    position = torch.arange(12, PROMPT.shape[1])[None]
    return first, model(
        input_ids=PROMPT[:, 12:], past_key_values=cache, position_ids=position
    ).logits.double()


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_keys_only_keeps_values_whole_and_its_prefill_is_the_stock_models(tiny_models, tmp_path, arch):
    """--keys-only: one key rank (2 budget - 1) d, every value whole (an exact rotation). Loaded with
    project_context_only, its prefill attends as the stock model does (sliding-window layers too); the error of
    what reads the cache grows as the budget shrinks."""
    from transformers import AutoModelForCausalLM

    stock = load_model(str(tiny_models[arch])).model.eval()
    expected = logits_of(stock)
    _, later = _prefill_then_later(stock)
    errors = []
    for budget in (0.875, 0.75, 0.625):
        out = tmp_path / f"k{budget}"
        result = run_cli(
            "kv-compress", tiny_models[arch], "--budget", budget, "--keys-only", "--no-train",
            *CALIB_ARGS[:6], "--output", out,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        report = json.loads((out / "llmsurgery_history.json").read_text())["passes"][-1]["report"]
        rank = int((2 * budget - 1) * 16)
        assert report["ranks_k"] == [[rank] * 2] * 6 and report["ranks_v"] == [[16] * 2] * 6
        assert report["budget_reached"] == (rank + 16) / 32
        card = (out / "README.md").read_text()
        assert "project_context_only=True" in card and "exact_recent=16" in card  # the model card says how
        first, got = _prefill_then_later(
            AutoModelForCausalLM.from_pretrained(
                out, trust_remote_code=True, dtype=torch.float32, project_context_only=True
            ).eval()
        )
        torch.testing.assert_close(first, expected[:, :12], rtol=0, atol=1e-4)
        errors.append(_kl(later, got))
    assert 0 < errors[0] < errors[1] < errors[2], errors


def test_exact_values_prefill_is_the_stock_models_and_the_fold_is_unchanged(tiny_models, tmp_path):
    """--exact-values: the folded tensors are those of the same run without it, plus v_proj/o_proj as they were.
    Loaded with project_context_only, the prefill attends over exact keys and values, as the stock model does;
    the error of the later tokens, which read the context's projected keys and values, grows as the budget
    shrinks."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    stock = load_model(str(tiny_models["llama"])).model.eval()
    expected = logits_of(stock)
    _, later = _prefill_then_later(stock)
    errors = []
    for budget in (0.75, 0.5, 0.25):
        outs = {flag: tmp_path / f"{budget}{flag}" for flag in ("", "--exact-values")}
        for flag, out in outs.items():
            result = run_cli(
                "kv-compress", tiny_models["llama"], "--budget", budget, "--uniform", "--no-train",
                *CALIB_ARGS[:6], "--output", out, *([flag] if flag else []),
            )  # fmt: skip
            assert result.exit_code == 0, result.output
        plain, kept = (load_file(outs[f] / "model.safetensors") for f in ("", "--exact-values"))
        assert all(torch.equal(plain[name], kept[name]) for name in plain)
        extra = {name.rsplit(".", 2)[-2] for name in set(kept) - set(plain)}
        assert extra == {"v_exact", "o_exact"} and len(set(kept) - set(plain)) == 6 * 4
        card = (outs["--exact-values"] / "README.md").read_text()
        assert "--exact-values" in card  # the model card says so
        assert "--exact-values" not in (outs[""] / "README.md").read_text()
        first, got = _prefill_then_later(
            AutoModelForCausalLM.from_pretrained(
                outs["--exact-values"], trust_remote_code=True, dtype=torch.float32, project_context_only=True
            ).eval()
        )
        torch.testing.assert_close(first, expected[:, :12], rtol=0, atol=1e-4)
        errors.append(_kl(later, got))
    assert 0 < errors[0] < errors[1] < errors[2], errors


def test_the_summary_names_the_exact_values_only_where_the_fold_kept_them(tiny_models, tmp_path):
    """--exact-values keeps v_proj/o_proj only in layers whose value ranks are cut: at budget 1.0 (every rank
    whole) none, and the summary says nothing of them; at 0.5 every layer, and it says how many."""
    import re

    for budget in (1.0, 0.5):
        result = run_cli(
            "kv-compress", tiny_models["llama"], "--budget", budget, "--uniform", "--no-train", *CALIB_ARGS[:6],
            "--output", tmp_path / str(budget), "--exact-values",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        layouts = json.loads((tmp_path / str(budget) / "config.json").read_text())["attention_layout"]
        kept = sum(bool(layout.get("v_exact")) for layout in layouts)
        said = re.sub(
            r"[\s│┃]+", " ", result.output
        )  # the summary table's text, however the terminal wraps it
        if budget == 1.0:
            assert kept == 0 and "v_proj/o_proj" not in said
        else:
            assert kept == len(layouts) > 0
            assert said.count("v_proj/o_proj kept") == 1 and f"kept in {kept} of {kept} layers" in said, said


def test_full_attention_layers_only_keeps_the_sliding_layers_exact(tiny_models, tmp_path):
    """--layers full-attention on Gemma3 (tiny: layers 2 and 5 full attention): the sliding-window layers keep every
    dim, so the hidden states up to the first full-attention layer are the stock model's; the budget counts the
    full-attention layers, and their error grows as it shrinks. A model without sliding layers is refused."""
    stock = load_model(str(tiny_models["gemma3_text"])).model.eval()
    with torch.no_grad():
        expected = stock(input_ids=PROMPT, output_hidden_states=True)
    errors = []
    for budget in (0.75, 0.5, 0.25):
        out = tmp_path / f"f{budget}"
        result = run_cli(
            "kv-compress", tiny_models["gemma3_text"], "--budget", budget, "--layers", "full-attention",
            "--uniform", "--no-train", *CALIB_ARGS[:6], "--output", out,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        report = json.loads((out / "llmsurgery_history.json").read_text())["passes"][-1]["report"]
        rank = int(budget * 16)
        ranks = [[rank] * 2 if i in (2, 5) else [16] * 2 for i in range(6)]
        assert (
            report["ranks_k"] == ranks and report["ranks_v"] == ranks and report["budget_reached"] == budget
        )
        model = load_model(str(out)).model.eval()
        with torch.no_grad():
            got = model(input_ids=PROMPT, output_hidden_states=True)
        for i in (1, 2):  # after layers 0 and 1, both sliding
            torch.testing.assert_close(got.hidden_states[i], expected.hidden_states[i], rtol=0, atol=1e-5)
        errors.append(_kl(expected.logits.double(), got.logits.double()))
    assert 0 < errors[0] < errors[1] < errors[2], errors
    refused = run_cli(
        "kv-compress", tiny_models["llama"], "--budget", "0.5", "--layers", "full-attention", "--uniform",
        "--output", tmp_path / "llama",
    )  # fmt: skip
    assert refused.exit_code == 2 and "needs a model with sliding-window layers" in refused.output
    searched = run_cli(
        "kv-compress", tiny_models["gemma3_text"], "--budget", "0.5", "--layers", "full-attention",
        "--output", tmp_path / "searched",
    )  # fmt: skip
    assert searched.exit_code == 2 and "takes --uniform or --keys-only" in searched.output
    assert not (tmp_path / "llama").exists() and not (tmp_path / "searched").exists()


def test_inspect_gives_the_windowed_cache_growth_past_the_window(tiny_models, tmp_path):
    """On a model with sliding-window layers, `inspect`'s bytes per token past the window is what a windowed cache
    (DynamicCache(config=...)) grows by per token once the context is longer than the window (tiny Gemma3: window
    8), measured on the stock model and on a --layers full-attention output, which shrinks it; None on llama."""
    from transformers import DynamicCache

    from llmsurgery.inspection import describe

    out = tmp_path / "full"
    result = run_cli(
        "kv-compress", tiny_models["gemma3_text"], "--budget", "0.75", "--layers", "full-attention", "--keys-only",
        "--no-train", *CALIB_ARGS[:6], "--output", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    ids = torch.randint(0, 100, (1, 40), generator=torch.Generator().manual_seed(0))
    growth = {}
    for folder in (tiny_models["gemma3_text"], out):
        model = load_model(str(folder)).model.eval()
        held = []
        for length in (24, 40):
            cache = DynamicCache(config=model.config)
            with torch.no_grad():
                model(input_ids=ids[:, :length], past_key_values=cache, use_cache=True)
            held.append(sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers) * 4)
        growth[folder] = (held[1] - held[0]) / 16
        assert growth[folder] == describe(str(folder))["kv_cache_bytes_per_token_past_window"]
    # the 2 full-attention layers of 2 KV heads: keys at d/2 (8 of 16 dims), values whole, float32
    assert growth[out] == 2 * 2 * (8 + 16) * 4 < growth[tiny_models["gemma3_text"]] == 2 * 2 * 32 * 4
    assert describe(str(tiny_models["llama"]))["kv_cache_bytes_per_token_past_window"] is None


def test_full_attention_layers_only_training_samples_ranks_there_only(tiny_models, tmp_path, monkeypatch):
    """Matryoshka training under --layers full-attention draws lower ranks on the full-attention layers (2 and 5)
    only: the sliding-window layers, kept whole in the output, are run whole at every step."""
    from llmsurgery.passes.kv_compress.maths import MatryoshkaState

    drawn = []
    sample = MatryoshkaState.sample_ranks_

    def recorded(state, generator):
        sample(state, generator)
        drawn.append(state.ranks())

    monkeypatch.setattr(MatryoshkaState, "sample_ranks_", recorded)
    result = run_cli(
        "kv-compress", tiny_models["gemma3_text"], "--budget", "0.75", "--layers", "full-attention", "--keys-only",
        "--train-steps", "6", *CALIB_ARGS, "--output", tmp_path / "trained",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "keys only, values whole" in result.output  # not "searched"
    assert len(drawn) == 6
    for layer in range(6):
        seen = {tuple(r["k"][layer]) for r in drawn} | {tuple(r["v"][layer]) for r in drawn}
        assert (len(seen) > 1) if layer in (2, 5) else (seen == {(16, 16)}), (layer, seen)


@pytest.mark.parametrize(
    "args, message",
    [
        (("--budget", "0"), "budget"),
        (("--budget", "1.5"), "budget"),
        (("--budget", "0.5", "--v-init", "svd"), "v-init"),
        (("--budget", "0.5", "--rank-step", "0"), "rank-step"),
        (("--budget", "0.5", "--keys-only"), "--keys-only keeps every value dim"),
        (("--budget", "0.75", "--keys-only", "--k-init", "rotary-pairs", "--rank-step", "1"), "must be even"),
        (("--budget", "0.75", "--keys-only", "--exact-values"), "--keys-only projects none"),
        (("--budget", "0.5", "--positions", "100"), "is shorter than the 512-token calibration windows"),
        (("--budget", "0.5", "--positions", "4096"), "beyond the model's context of 1024 tokens"),
    ],
)
def test_cli_rejects_bad_options(tiny_models, tmp_path, args, message):
    result = run_cli("kv-compress", tiny_models["llama"], "--output", tmp_path / "o", *args)
    assert result.exit_code == 2 and message in result.output and not (tmp_path / "o").exists()


def test_step_gates_reproduce_the_ranks_and_their_gradients_are_the_kl_slope(tiny_models):
    """The search's first-order profile: gates at the current ranks give the truncated model exactly, and
    the estimate for each step is minus the KL's derivative along its gate (checked by central differences)."""
    from llmsurgery.passes.kv_compress.maths import (
        MatryoshkaState,
        _step_gradients,
        _total_kl,
        attach_,
        detach_,
        init_from_pca_,
        rank_options,
        uniform_ranks,
    )

    loaded = load_model(str(tiny_models["qwen2"]))
    model, tok = loaded.model, loaded.tokenizer
    model.double()
    windows = calibration_batches(tok, CalibConfig(source="pydoc", samples=2, seq_len=40, seed=5))
    state = MatryoshkaState(16, [[16, 16]] * 6, 4).double()
    saved = attach_(model, state)
    init_from_pca_(model, state, calibration_batches(tok, PCA), v_identity=False)
    state.init_k, state.init_v = [u.double() for u in state.init_k], [u.double() for u in state.init_v]
    with torch.no_grad():
        state.project = False
        teacher = [
            model(input_ids=w.unsqueeze(0), logits_to_keep=20).logits.double().log_softmax(-1)
            for w in windows
        ]
        state.project = True
    ranks = uniform_ranks(state, 0.5)
    ranks["k"][2][1], ranks["v"][4][0] = 4, 12
    state.set_ranks(ranks)
    gains, losses = _step_gradients(model, state, windows, teacher, 20)
    assert state.ranks() == ranks and state.gates is None and all(p.requires_grad for p in model.parameters())
    assert (
        len(gains) == 2 * 6 * 2 and len(losses) == len(gains) - 1
    )  # K of layer 2, head 1 sits at the lowest rank

    def kl_with_gates(kind=None, layer=None, g=None, step=None, value=None) -> float:
        gates = {}
        for k, table in (("k", ranks["k"]), ("v", ranks["v"])):
            for i, row in enumerate(table):
                for j, r in enumerate(row):
                    gates[k, i, j] = (torch.arange(len(rank_options(16, 4))) < r // 4).double()
        if kind:
            gates[kind, layer, g][step] = value
        state.set_ranks({"k": [[16, 16]] * 6, "v": [[16, 16]] * 6})
        state.gates = gates
        try:
            with torch.no_grad():
                return _total_kl(model, state, windows, teacher, 20)
        finally:
            state.gates = None
            state.set_ranks(ranks)

    with torch.no_grad():
        assert kl_with_gates() == pytest.approx(_total_kl(model, state, windows, teacher, 20), rel=1e-10)
    eps = 1e-3
    for direction, (estimate, kind, layer, g) in (
        ("up", gains[0]),
        ("up", gains[-1]),
        ("down", losses[0]),
        ("down", losses[-1]),
    ):
        on = (
            ranks[kind][layer][g] // 4
        )  # steps kept; up opens step `on` (gate 0), down closes step `on - 1` (gate 1)
        step, at = (on, 0.0) if direction == "up" else (on - 1, 1.0)
        slope = (
            kl_with_gates(kind, layer, g, step, at + eps) - kl_with_gates(kind, layer, g, step, at - eps)
        ) / (2 * eps)
        assert estimate == pytest.approx(
            -slope, rel=1e-3
        )  # the RMS norms compute in float32 even in a float64 model
    assert gains[0][0] > gains[-1][0] and losses[0][0] < losses[-1][0]
    detach_(saved)
