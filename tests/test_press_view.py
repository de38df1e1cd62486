"""A packed KV cache seen at full width by forward hooks (how kvpress's presses read it), without kvpress.

A hand-made eviction hook stands in for a press here: it reads ``cache.layers[i].keys/.values`` as
[B, KV heads, T, head_dim], keeps a different set of tokens in every KV head and writes them back, as kvpress's
ScorerPress does. tests/test_kv_presses.py runs kvpress's own presses (kvpress extra).
"""

import json

import pytest
import torch
from helpers import PROMPT, run_cli
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.cache_utils import DynamicLayer

from llmsurgery.modeling.modeling_llmsurgery import PressView, key_cache_widths

CALIB = ("--calib", "pydoc", "--calib-samples", "3", "--calib-seq-len", "48")
CONTEXT = torch.randint(3, 400, (1, 64), generator=torch.Generator().manual_seed(0))
NEXT = torch.tensor([[5, 77, 120]])


def _kv_output(folder, budget, out):
    result = run_cli(
        "kv-compress", folder, "--budget", str(budget), "--no-train", "--uniform", *CALIB, "--output", out
    )
    assert result.exit_code == 0, result.output
    return AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()


def _keep(layers: int, heads: int, length: int, count: int) -> torch.Tensor:
    """[layers, heads, count]: a different sorted set of token indices per layer and KV head."""
    g = torch.Generator().manual_seed(1)
    return torch.stack(
        [
            torch.stack([torch.randperm(length, generator=g)[:count].sort().values for _ in range(heads)])
            for _ in range(layers)
        ]
    )


def _evicting_hook(keep: torch.Tensor, seen: list):
    """A forward hook doing what a kvpress ScorerPress does to the layer's cache, with fixed indices."""

    def hook(module, args, kwargs, output):
        cache = kwargs.get("past_key_values", kwargs.get("cache"))  # transformers 5.3+ names it `cache`
        layer = cache.layers[module.layer_idx]
        keys, values = layer.keys, layer.values  # [B, KV heads, T, head_dim]
        seen.append((tuple(keys.shape), tuple(values.shape)))
        index = keep[module.layer_idx][None, :, :, None]
        layer.keys = keys.gather(2, index.expand(*keys.shape[:2], -1, keys.shape[-1]))
        layer.values = values.gather(2, index.expand(*values.shape[:2], -1, values.shape[-1]))
        return output

    return hook


@torch.no_grad()
def _prefill(model, keep=None, seen=None):
    cache = DynamicCache()
    hooks = (
        []
        if keep is None
        else [
            layer.self_attn.register_forward_hook(_evicting_hook(keep, seen), with_kwargs=True)
            for layer in model.model.layers
        ]
    )
    model(CONTEXT, past_key_values=cache)
    for hook in hooks:
        hook.remove()
    return cache


@torch.no_grad()
def _next_logits(model, cache) -> torch.Tensor:
    position = torch.arange(CONTEXT.shape[1], CONTEXT.shape[1] + NEXT.shape[1])[None]
    return model(NEXT, past_key_values=cache, position_ids=position).logits.double()


def _gather_packed(cache, model, keep) -> DynamicCache:
    """The narrow cache of the kept tokens, gathered per KV head straight from the packed tensors."""
    out = DynamicCache()
    for i, (layer, attn) in enumerate(zip(cache.layers, (layer.self_attn for layer in model.model.layers))):
        parts = []
        key_widths = key_cache_widths(attn.attention_layout, attn.head_dim)
        for tensor, widths in ((layer.keys, key_widths), (layer.values, attn.attention_layout["v"])):
            slices = tensor.split(list(widths), dim=-1)
            parts.append(torch.cat([s[:, :, keep[i, g]] for g, s in enumerate(slices)], dim=-1))
        out.update(*parts, i)
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text"])
def test_eviction_through_the_view_keeps_the_narrow_rows_and_the_attention_output(
    tiny_models, tmp_path, arch
):
    model = _kv_output(tiny_models[arch], 0.5, tmp_path / "kv")
    groups, d = model.config.num_key_value_heads, model.model.layers[0].self_attn.head_dim
    full = _prefill(model)
    keep, seen = _keep(len(model.model.layers), groups, CONTEXT.shape[1], 24), []
    evicted = _prefill(model, keep, seen)
    assert seen == [((1, groups, 64, d), (1, groups, 64, d))] * len(
        model.model.layers
    )  # the press saw full width
    direct = _gather_packed(full, model, keep)
    for a, b, layout in zip(evicted.layers, direct.layers, model.config.attention_layout):
        assert type(a) is not DynamicLayer  # a view was swapped in, and is closed now: reads are narrow
        assert a.keys.shape == (1, 1, 24, sum(layout["k"])) and a.values.shape == (1, 1, 24, sum(layout["v"]))
        torch.testing.assert_close(a.keys, b.keys, rtol=0, atol=2e-6)  # re-projected: the same narrow rows
        torch.testing.assert_close(a.values, b.values, rtol=0, atol=2e-6)
    torch.testing.assert_close(_next_logits(model, evicted), _next_logits(model, direct), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_at_full_budget_a_hook_sees_and_leaves_what_it_would_on_the_stock_model(tiny_models, tmp_path, arch):
    from helpers import stock_load

    stock, model = stock_load(tiny_models[arch]), _kv_output(tiny_models[arch], 1.0, tmp_path / "kv")
    keep = _keep(len(model.model.layers), model.config.num_key_value_heads, CONTEXT.shape[1], 40)
    on_stock, on_packed = _prefill(stock, keep, []), _prefill(model, keep, [])
    # budget 1: every basis is square, so the rebuilt keys and values are the stock model's
    for layer, attn in zip(_prefill(model).layers, (layer.self_attn for layer in model.model.layers)):
        view, stock_layer = PressView(attn), _prefill(stock).layers[attn.layer_idx]
        torch.testing.assert_close(view.widen("keys", layer.keys), stock_layer.keys, rtol=0, atol=1e-5)
        torch.testing.assert_close(view.widen("values", layer.values), stock_layer.values, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        _next_logits(model, on_packed), _next_logits(stock, on_stock), rtol=0, atol=1e-5
    )


def test_without_a_hook_nothing_changes(tiny_models, tmp_path):
    model = _kv_output(tiny_models["llama"], 0.5, tmp_path / "kv")
    cache = _prefill(model)
    assert all(type(layer) is DynamicLayer for layer in cache.layers)
    with torch.no_grad():
        cached = model.generate(PROMPT[:, :6], max_new_tokens=6, do_sample=False, pad_token_id=0)
        uncached = model.generate(
            PROMPT[:, :6], max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=False
        )
    assert torch.equal(cached, uncached)


def test_outputs_without_stored_value_bases_still_load_run_and_evict(tiny_models, tmp_path):
    """Outputs of earlier releases store no value bases: values are handed to hooks as their narrow coordinates,
    zero-padded to head_dim (exact round trip); keys still go through the stored key basis."""
    out = tmp_path / "kv"
    model = _kv_output(tiny_models["llama"], 0.5, out)
    expected = _next_logits(model, _prefill(model))
    config = json.loads((out / "config.json").read_text())
    for layout in config["attention_layout"]:
        assert layout.pop("v_basis") is True
    (out / "config.json").write_text(json.dumps(config))
    weights = load_file(out / "model.safetensors")
    assert any(name.endswith("value_basis") for name in weights)
    save_file(
        {k: v for k, v in weights.items() if "value_" not in k}, out / "model.safetensors", {"format": "pt"}
    )
    old = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    assert not hasattr(old.model.layers[0].self_attn, "value_basis")
    torch.testing.assert_close(_next_logits(old, _prefill(old)), expected, rtol=0, atol=0)
    keep = _keep(len(old.model.layers), 2, CONTEXT.shape[1], 24)
    evicted, direct = _prefill(old, keep, []), _gather_packed(_prefill(old), old, keep)
    for a, b in zip(evicted.layers, direct.layers):
        torch.testing.assert_close(a.values, b.values, rtol=0, atol=0)  # zero padding: exact
        torch.testing.assert_close(a.keys, b.keys, rtol=0, atol=2e-6)
    attn = old.model.layers[0].self_attn
    narrow = _prefill(old).layers[0].values
    wide = PressView(attn).widen("values", narrow)
    width = attn.attention_layout["v"][0]
    assert torch.equal(wide[:, 0, :, :width], narrow[:, 0, :, :width]) and not wide[:, 0, :, width:].any()


def test_absorb_after_kv_compress_drops_the_value_bases(tiny_models, tmp_path):
    out = tmp_path / "kv"
    _kv_output(tiny_models["llama"], 0.75, out)
    result = run_cli(
        "absorb", out, "--keep-ratio", "0.75", "--pairs", "vo", *CALIB, "--output", tmp_path / "ab"
    )
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "ab", trust_remote_code=True, dtype=torch.float32
    ).eval()
    assert not any(layout.get("v_basis") for layout in model.config.attention_layout)
    assert not any(hasattr(layer.self_attn, "value_basis") for layer in model.model.layers)
    keep = _keep(len(model.model.layers), 2, CONTEXT.shape[1], 24)
    evicted, direct = _prefill(model, keep, []), _gather_packed(_prefill(model), model, keep)
    torch.testing.assert_close(_next_logits(model, evicted), _next_logits(model, direct), rtol=0, atol=1e-5)


def test_asking_for_a_press_without_the_extra_says_how_to_install_it(monkeypatch):
    from llmsurgery.errors import UserError
    from llmsurgery.kv_presses import make_press

    monkeypatch.setitem(__import__("sys").modules, "kvpress", None)  # as if the extra were not installed
    with pytest.raises(UserError) as caught:
        make_press("snapkv", 0.5)
    assert str(caught.value) == "kvpress presses need the kvpress extra: pip install -e .[kvpress]"


def test_absorbed_outputs_take_hooks_too(tiny_models, tmp_path):
    """Absorb alone (V widths and RoPE pairs dropped, no bases): hooks see the kept dims in place, zeros elsewhere."""
    out = tmp_path / "ab"
    result = run_cli(
        "absorb", tiny_models["llama"], "--keep-ratio", "0.75", "--pairs", "vo,qk", *CALIB, "--output", out
    )
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    assert model.config.attention_layout[0]["qk"] and not model.config.attention_layout[0].get("k")
    keep, seen = _keep(len(model.model.layers), 2, CONTEXT.shape[1], 24), []
    evicted, direct = _prefill(model, keep, seen), _gather_packed(_prefill(model), model, keep)
    assert seen[0] == ((1, 2, 64, 16), (1, 2, 64, 16))
    for a, b in zip(evicted.layers, direct.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)  # selections: exact
    torch.testing.assert_close(_next_logits(model, evicted), _next_logits(model, direct), rtol=0, atol=1e-5)
