"""kvpress's own presses on llmsurgery outputs (kvpress extra: scripts/test.sh runs these in a second venv).

Tiny models: at budget 1 a press leaves the same cache, and the same next-token logits, on a kv-compress output
as on the stock model; the benchmark's replay of one recorded prefill equals kvpress's live hook. SmolLM2: every
listed press runs through kvpress's context manager and its pipeline on a budget-0.5 kv-compress output; the
live cache bytes after prefill are (1 - compression ratio) x budget x dense to one token per layer, and the kept
tokens' narrow rows (so the attention output) are those of the narrow cache.
"""

import json

import pytest
import torch
from conftest import tiny_config
from helpers import run_cli, stock_load
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from llmsurgery.errors import UserError
from llmsurgery.kv_presses import (
    cache_elements,
    make_press,
    projection_maps,
    projection_press,
    record_prefill,
    replay,
    require_kvpress,
    stored_widths,
    think_press,
    window_safe,
)

# Needs the kvpress extra; scripts/test.sh runs `-m kvpress` in a second venv that has it and `-m "not kvpress"`
# in the main one. Run here without it, these fail (no kvpress), they do not skip.
pytestmark = pytest.mark.kvpress
CALIB = ("--calib", "pydoc", "--calib-samples", "3", "--calib-seq-len", "48")
CONTEXT = torch.randint(3, 400, (1, 120), generator=torch.Generator().manual_seed(0))
NEXT = torch.tensor([[5, 77, 120]])


def _presses(arch: str) -> dict:
    presses = {
        "snapkv": make_press("snapkv", 0.5, window_size=16),
        "streamingllm": make_press("streamingllm", 0.5),
        "tova": make_press("tova", 0.5),
        "knorm": make_press("knorm", 0.5),
        "composed": require_kvpress().ComposedPress(
            [make_press("snapkv", 0.3, window_size=16), make_press("knorm", 0.3)]
        ),
        "snapkv+think": think_press(0.25, evict=0.3),
    }
    if arch != "gemma3_text":  # kvpress 0.5.5 calls Gemma3's rotary embedding without its layer type
        presses["expected_attention"] = make_press("expected_attention", 0.5, n_future_positions=32)
    return presses


def _kv_output(folder, budget, out, *extra, **load):
    result = run_cli(
        "kv-compress",
        folder,
        "--budget",
        str(budget),
        "--no-train",
        "--uniform",
        *CALIB,
        "--output",
        out,
        *extra,
    )
    assert result.exit_code == 0, result.output
    return AutoModelForCausalLM.from_pretrained(
        out, trust_remote_code=True, dtype=torch.float32, **load
    ).eval()


@torch.no_grad()
def _pressed_logits(model, press) -> tuple[torch.Tensor, DynamicCache]:
    cache = DynamicCache()
    with press(model):
        model(CONTEXT, past_key_values=cache)
    position = torch.arange(CONTEXT.shape[1], CONTEXT.shape[1] + NEXT.shape[1])[None]
    return model(NEXT, past_key_values=cache, position_ids=position).logits.double(), cache


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_full_budget_output_takes_every_press_like_the_stock_model(tiny_models, tmp_path, arch):
    stock, model = stock_load(tiny_models[arch]), _kv_output(tiny_models[arch], 1.0, tmp_path / "kv")
    for name, press in _presses(arch).items():
        expected, stock_cache = _pressed_logits(stock, press)
        got, cache = _pressed_logits(model, press)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5, msg=name)
        assert [layer.keys.shape[-2] for layer in cache.layers] == [
            layer.keys.shape[-2] for layer in stock_cache.layers
        ], name
        assert all(
            layer.keys.shape[1] == 1 for layer in cache.layers
        )  # still packed: one cache head per layer


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_replaying_a_recorded_prefill_gives_the_live_hooks_cache(tiny_models, tmp_path, arch):
    packed = _kv_output(tiny_models[arch], 0.5, tmp_path / "kv")
    context_only = AutoModelForCausalLM.from_pretrained(
        tmp_path / "kv", trust_remote_code=True, dtype=torch.float32, project_context_only=True
    ).eval()
    for model in (stock_load(tiny_models[arch]), packed, context_only):
        record = record_prefill(model, CONTEXT)
        for name, press in _presses(arch).items():
            live = DynamicCache()
            with torch.no_grad(), press(model):
                model.model(CONTEXT, past_key_values=live)
            replayed = replay(model, press, record)
            for a, b in zip(live.layers, replayed.layers):
                assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values), name
            hooks = [h for layer in model.model.layers for h in layer.self_attn._forward_hooks]
            assert not hooks, name  # replay runs no forward: it removes the view's one-shot hooks itself


def _raw(name: str, ratio: float):
    """kvpress's press as kvpress makes it (not window_safe)."""
    kvpress = require_kvpress()
    classes = {"tova": kvpress.TOVAPress, "snapkv": kvpress.SnapKVPress, "knorm": kvpress.KnormPress}
    return classes[name](compression_ratio=ratio)


def _all_sliding_gemma3():
    config = tiny_config("gemma3_text")
    config.layer_types = ["sliding_attention"] * config.num_hidden_layers
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", ["tova", "snapkv", "knorm"])
def test_window_safe_press_keeps_what_sliding_windows_read(name):
    """Every layer slides over 8 tokens: a window-safe press keeping half of 120 keeps all that the windows read,
    so the next tokens' logits are the dense ones; kvpress's own press leaves the windows reading other tokens."""
    model = _all_sliding_gemma3()
    dense, _ = _pressed_logits(model, require_kvpress().StreamingLLMPress(compression_ratio=0.0))
    safe, cache = _pressed_logits(model, window_safe(_raw(name, 0.5)))
    assert [layer.keys.shape[-2] for layer in cache.layers] == [60 + NEXT.shape[1]] * len(cache.layers)
    torch.testing.assert_close(safe, dense, rtol=0, atol=1e-5)
    raw, _ = _pressed_logits(model, _raw(name, 0.5))
    assert not torch.allclose(raw, dense, rtol=0, atol=1e-3)


@pytest.mark.parametrize("name", ["tova", "snapkv", "knorm"])
def test_window_safe_press_on_full_attention_keeps_the_same_tokens_in_order(tiny_models, name):
    model = stock_load(tiny_models["llama"])
    record = record_prefill(model, CONTEXT)
    raw, safe = replay(model, _raw(name, 0.6), record), replay(model, window_safe(_raw(name, 0.6)), record)
    for dense, a, b in zip(record.cache.layers, raw.layers, safe.layers):
        for head in range(dense.keys.shape[1]):
            rows = dense.keys[0, head]
            where = lambda kept: (kept[0, head][:, None] == rows[None]).all(-1).int().argmax(-1)  # noqa: E731
            raw_at, safe_at = where(a.keys), where(b.keys)
            assert torch.equal(safe_at, raw_at.sort().values), name
            assert (safe_at.diff() > 0).all(), name
            torch.testing.assert_close(b.keys[0, head], rows[safe_at], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["tova", "snapkv", "knorm"])
def test_with_project_context_only_a_press_scores_the_exact_keys(tiny_models, tmp_path, name):
    """Layer 0 sees the embeddings, so its exact keys are the stock model's: a press on a project_context_only
    model keeps there the tokens it keeps on the stock model (their keys projected); by default it scores the
    projected keys."""
    stock = stock_load(tiny_models["llama"])
    _kv_output(tiny_models["llama"], 0.25, tmp_path / "kv")
    kept = {}
    for context_only in (True, False):
        model = AutoModelForCausalLM.from_pretrained(
            tmp_path / "kv", trust_remote_code=True, dtype=torch.float32, project_context_only=context_only
        ).eval()
        kept[context_only] = (
            replay(model, _presses("llama")[name], record_prefill(model, CONTEXT)).layers[0].keys
        )
    on_stock = replay(stock, _presses("llama")[name], record_prefill(stock, CONTEXT)).layers[0].keys
    from llmsurgery.modeling.modeling_llmsurgery import PressView

    expected = PressView(model.model.layers[0].self_attn).narrow("keys", on_stock)
    torch.testing.assert_close(kept[True], expected, rtol=0, atol=1e-5)
    assert not torch.allclose(kept[False], expected, rtol=0, atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_projection_press_is_exact_at_full_rank_and_loses_more_as_ranks_shrink(tiny_models, tmp_path, arch):
    """A kv-compress output's bases as a press on the stock model: at full rank the stock model's next-token
    logits are unchanged; lower ranks change the pressed context keys and the logits more; the counted widths
    are the bases' ranks; the question tokens (after the prefill) stay exact."""
    stock = stock_load(tiny_models[arch])
    plain, plain_cache = _pressed_logits(stock, make_press("tova", 0.0))
    errors = []
    for budget in (1.0, 0.75, 0.5):
        maps = projection_maps(_kv_output(tiny_models[arch], budget, tmp_path / f"kv{budget}"))
        widths = stored_widths(maps)
        d = stock.config.head_dim
        assert sum(widths) / (2 * d * stock.config.num_key_value_heads * len(widths)) == pytest.approx(
            budget, 0.02
        )
        got, cache = _pressed_logits(stock, projection_press(maps))
        errors.append(float((got - plain).abs().max()))
        if budget == 1.0:
            torch.testing.assert_close(got, plain, rtol=0, atol=1e-5)
        context, (first, plain_first) = CONTEXT.shape[1], (cache.layers[0], plain_cache.layers[0])
        # layer 0's keys depend on the tokens alone: the prefill's rows are projected, the question's are exact
        assert torch.equal(first.keys[:, :, context:], plain_first.keys[:, :, context:])
        assert (budget == 1.0) == torch.allclose(
            first.keys[:, :, :context], plain_first.keys[:, :, :context], atol=1e-5
        )
    assert errors[0] < 1e-5 < errors[1] < errors[2], errors
    with pytest.raises(UserError, match="needs a kv-compress output"):
        projection_maps(stock)


def test_projection_press_composed_evicts_then_projects(tiny_models, tmp_path):
    stock = stock_load(tiny_models["llama"])
    maps = projection_maps(_kv_output(tiny_models["llama"], 0.5, tmp_path / "kv"), keys_only=True)
    assert all(v is None for layer in maps for _, v in layer)  # keys only: the values are left whole
    press = projection_press(maps, evict=0.5)
    cache = replay(stock, press, record_prefill(stock, CONTEXT))
    assert {layer.keys.shape[-2] for layer in cache.layers} == {CONTEXT.shape[1] // 2}
    d = stock.config.head_dim
    key_share = sum(k[0].shape[1] for layer in maps for k, _ in layer) / (d * sum(map(len, maps)))
    assert press.presses[1].compression_ratio == pytest.approx(1 - (key_share + 1) / 2)
    assert key_share < 0.75  # the budget-0.5 ranks: fewer key coordinates than the head has


@pytest.mark.parametrize("evict", [0.0, 0.5])
def test_an_exact_values_model_under_a_press_is_its_projection_press_on_the_stock_model(
    tiny_models, tmp_path, evict
):
    """kv-compress --exact-values loaded with project_context_only, under TOVA (or none), gives the next-token
    logits of its own bases as a projection press on the stock model (after the same TOVA): the prefill attends
    exactly, the kept tokens are cached projected, the later tokens exact. Folded without --exact-values, the
    prefill attends over projected values and the logits differ."""
    stock = stock_load(tiny_models["llama"])
    models = {
        name: _kv_output(tiny_models["llama"], 0.5, tmp_path / name, *flags, project_context_only=True)
        for name, flags in (("exact", ("--exact-values",)), ("folded", ()))
    }
    want, _ = _pressed_logits(stock, projection_press(projection_maps(models["exact"]), evict=evict))
    got = {name: _pressed_logits(model, make_press("tova", evict))[0] for name, model in models.items()}
    torch.testing.assert_close(got["exact"], want, rtol=0, atol=1e-4)
    assert float((got["folded"] - want).abs().max()) > 1e-2


@pytest.mark.parametrize("evict", [0.0, 0.5])
def test_a_keys_only_model_with_exact_recent_under_a_press_is_its_projection_press(
    tiny_models, tmp_path, evict
):
    """kv-compress --keys-only loaded with project_context_only and exact_recent=R, under TOVA (or none), gives the
    next-token logits of its bases as a projection press on the stock model that keeps the last R context keys
    exact (after the same TOVA): the press's write-back keeps the last R kept tokens' residuals, as the prefill
    does. Without exact_recent they differ; its residuals are the only extra the cache holds."""
    from llmsurgery.modeling.modeling_llmsurgery import exact_tail_bytes

    stock, recent = stock_load(tiny_models["llama"]), 8
    out = tmp_path / "kv"
    model = _kv_output(
        tiny_models["llama"], 0.75, out, "--keys-only", project_context_only=True, exact_recent=recent
    )
    assert model.config.exact_recent == recent  # the from_pretrained keyword
    maps = projection_maps(model, keys_only=True)
    got = {}
    for r in (0, recent):
        model.config.exact_recent = r
        got[r], cache = _pressed_logits(model, make_press("tova", evict))
        config = model.config
        per_token = config.num_key_value_heads * config.head_dim * 4 * config.num_hidden_layers
        assert exact_tail_bytes(cache) == (r + NEXT.shape[1]) * per_token
    want, _ = _pressed_logits(stock, projection_press(maps, evict, "tova", recent=recent))
    torch.testing.assert_close(got[recent], want, rtol=0, atol=1e-4)
    unrecent, _ = _pressed_logits(stock, projection_press(maps, evict, "tova"))
    torch.testing.assert_close(got[0], unrecent, rtol=0, atol=1e-4)
    assert float((got[recent] - got[0]).abs().max()) > 2e-4  # beyond the tolerance of the equalities
    # kvpress's own TOVA keeps its tokens best first: no exact tail then, every context key projected
    if evict:
        raw = {}
        for r in (0, recent):
            model.config.exact_recent = r
            raw[r], cache = _pressed_logits(model, require_kvpress().TOVAPress(compression_ratio=evict))
        assert exact_tail_bytes(cache) == NEXT.shape[1] * per_token
        torch.testing.assert_close(raw[recent], raw[0], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm2_kv(module_tmp):
    out = module_tmp / "kv"
    result = run_cli(
        "kv-compress", "smollm2-135m", "--budget", "0.5", "--no-train", "--uniform",
        "--calib-samples", "4", "--calib-seq-len", "256", "--output", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def _listed_presses():
    return {
        "snapkv": make_press("snapkv", 0.5),
        "streamingllm": make_press("streamingllm", 0.5),
        "tova": make_press("tova", 0.5),
        "expected_attention": make_press("expected_attention", 0.5),
        "knorm": make_press("knorm", 0.5),
        "composed": require_kvpress().ComposedPress([make_press("snapkv", 0.5), make_press("knorm", 0.5)]),
    }


def _ratio(press) -> float:
    kept = 1.0
    for p in getattr(press, "presses", [press]):
        kept *= 1 - p.compression_ratio
    return 1 - kept


def _news(tokenizer, tokens: int) -> str:
    from llmsurgery.corpora import evaluation_documents

    ids = tokenizer(" ".join(evaluation_documents("news")), add_special_tokens=False)["input_ids"][:tokens]
    return tokenizer.decode(ids)


@pytest.mark.real
def test_smollm2_output_takes_the_listed_presses_and_its_cache_stays_narrow(smollm2_kv):
    import llmsurgery

    report = json.loads((smollm2_kv / "llmsurgery_history.json").read_text())["passes"][-1]["report"]
    budget, layers = report["budget_reached"], 30
    dense_per_token = layers * 2 * 3 * 64  # K+V elements per token of the original SmolLM2 cache
    widths = [sum(lay["k"]) + sum(lay["v"]) for lay in json.loads((smollm2_kv / "config.json").read_text())[
        "attention_layout"]]  # fmt: skip
    remote = AutoModelForCausalLM.from_pretrained(smollm2_kv, trust_remote_code=True).eval()
    loaded = llmsurgery.load(str(smollm2_kv))
    ids = loaded.tokenizer(_news(loaded.tokenizer, 400), return_tensors="pt")["input_ids"][:, :400]
    tokens = ids.shape[1]
    for model in (remote, loaded.model):
        for name, press in _listed_presses().items():
            cache = DynamicCache()
            with torch.no_grad(), press(model):
                model(ids, past_key_values=cache)
            live = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers)
            expected = (1 - _ratio(press)) * budget * dense_per_token * tokens
            assert abs(live - expected) <= sum(widths), (name, live, expected)  # one token per layer
            assert all(layer.keys.shape[1] == 1 for layer in cache.layers)


@pytest.mark.real
def test_smollm2_pipeline_runs_every_listed_press(smollm2_kv):
    from transformers import pipeline

    require_kvpress()  # importing kvpress registers its pipeline

    model = AutoModelForCausalLM.from_pretrained(smollm2_kv, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_kv)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)
    context = _news(tokenizer, 300) + " The secret code word is tangerine."
    question = "What is the secret code word?"
    dense = DynamicCache()
    pipe(context, question=question, max_new_tokens=6, cache=dense)
    tokens, dense_elements = dense.get_seq_length(), cache_elements(dense)
    for name, press in _listed_presses().items():
        cache = DynamicCache()
        answer = pipe(context, question=question, press=press, max_new_tokens=6, cache=cache)["answer"]
        assert isinstance(answer, str) and answer.strip(), name
        kept = cache.get_seq_length()  # the pipeline leaves the compressed context in the cache
        assert abs(kept - (1 - _ratio(press)) * tokens) <= 1 + (name == "composed"), (name, kept, tokens)
        assert cache_elements(cache) == dense_elements // tokens * kept, name
    # Loaded with project_context_only (the prefill exact, the question's and answer's keys exact): the same
    # pipeline, and the context it leaves in the cache as narrow.
    model = AutoModelForCausalLM.from_pretrained(
        smollm2_kv, trust_remote_code=True, project_context_only=True
    )
    pipe = pipeline("kv-press-text-generation", model=model.eval(), tokenizer=tokenizer)
    for name in ("tova", "snapkv"):
        cache = DynamicCache()
        press = _listed_presses()[name]
        answer = pipe(context, question=question, press=press, max_new_tokens=6, cache=cache)["answer"]
        assert isinstance(answer, str) and answer.strip(), name
        kept = cache.get_seq_length()
        assert (
            abs(kept - (1 - _ratio(press)) * tokens) <= 1
            and cache_elements(cache) == dense_elements // tokens * kept
        )


@pytest.mark.real
def test_smollm2_kept_tokens_are_the_narrow_caches_rows(smollm2_kv):
    """SnapKV through the view keeps, per KV head, rows of the narrow cache (matched exactly), and decoding
    from it gives the logits of the narrow cache gathered at those rows."""
    model = AutoModelForCausalLM.from_pretrained(smollm2_kv, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_kv)
    ids = tokenizer(_news(tokenizer, 300), return_tensors="pt")["input_ids"][:, :300]
    record = record_prefill(model, ids)
    evicted = replay(model, make_press("snapkv", 0.5), record)
    gathered = DynamicCache()
    for i, (full, kept) in enumerate(zip(record.cache.layers, evicted.layers)):
        layout = model.config.attention_layout[i]
        full_k, kept_k = full.keys.split(list(layout["k"]), -1), kept.keys.split(list(layout["k"]), -1)
        full_v, kept_v = full.values.split(list(layout["v"]), -1), kept.values.split(list(layout["v"]), -1)
        # keys carry their position (RoPE), so each kept key row names its token; values of repeated tokens can tie
        index = [(k[0, 0, :, None] - f[0, 0, None]).abs().amax(-1).argmin(-1) for k, f in zip(kept_k, full_k)]
        for g, at in enumerate(index):
            assert len(set(at.tolist())) == at.numel()  # distinct tokens
            torch.testing.assert_close(kept_k[g][0, 0], full_k[g][0, 0, at], rtol=0, atol=1e-4)
            torch.testing.assert_close(kept_v[g][0, 0], full_v[g][0, 0, at], rtol=0, atol=1e-4)
        parts = [
            torch.cat([f[:, :, at] for f, at in zip(full_k, index)], dim=-1),
            torch.cat([f[:, :, at] for f, at in zip(full_v, index)], dim=-1),
        ]
        gathered.update(*parts, i)
    position = torch.arange(ids.shape[1], ids.shape[1] + 4)[None]
    nxt = ids[:, :4]
    with torch.no_grad():
        a = model(nxt, past_key_values=evicted, position_ids=position).logits
        b = model(nxt, past_key_values=gathered, position_ids=position).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
