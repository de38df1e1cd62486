"""A kv-compress model run with project_context_only: the prefill attends exactly and stores its keys
projected; later tokens read those projected keys and keep their own exact. With --exact-values the values do
the same; without, every value is projected.

The reference is the stock model (its cache made without a config: every layer holds every token) with an
attention function that projects what the packed model projects: each KV head's keys of the first `narrow`
cached tokens onto mu + B B^T (k - mu), and every value onto its value basis (with --exact-values, the values of
those tokens only).
"""

import pytest
import torch
from helpers import PROMPT
from test_matryoshka_kv import _compressed
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.llama.modeling_llama import eager_attention_forward

from llmsurgery.inspection import describe
from llmsurgery.kv_presses import copy_cache
from llmsurgery.model_io import load_model
from llmsurgery.modeling.modeling_llmsurgery import copy_exact_tail_, exact_tail_bytes, press_maps

PREFILL, QUESTION = 8, 5


def _project(x: torch.Tensor, maps, upto: int | None) -> torch.Tensor:
    """x [B, KV heads, T, d] with the first `upto` tokens (None: all) of each head projected on its map."""
    x = x.clone()
    for g, (basis, mean) in enumerate(maps):
        rows = x[:, g, :upto]
        x[:, g, :upto] = mean + ((rows - mean) @ basis) @ basis.T
    return x


def _reference(stock, packed, narrow: dict):
    """Point `stock` at an attention that projects as `packed` does; narrow["tokens"]: the projected key prefix."""
    layers = packed.model.layers

    def attend(module, query, key, value, attention_mask, **kwargs):
        attn = layers[module.layer_idx].self_attn
        sliding = getattr(module, "sliding_window", None)
        upto = narrow["sliding" if sliding and "sliding" in narrow else "tokens"]
        key = _project(key, press_maps(attn, "keys"), upto)
        value = _project(value, press_maps(attn, "values"), upto if "v_exact" in attn._modules else None)
        return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("llmsurgery_test_projected", attend)
    AttentionMaskInterface.register("llmsurgery_test_projected", eager_mask)
    stock.set_attn_implementation("llmsurgery_test_projected")


@torch.no_grad()
def _steps(model, cache, *chunks):
    """Logits of each chunk of PROMPT fed in turn through `cache`."""
    out, at = [], 0
    for n in chunks:
        out.append(_step(model, cache, at, n))
        at += n
    return out


def _pair(tiny_models, arch: str):
    """(kv-compress model at budget 0.5, stock model); arch "NAME+exact-values": folded with --exact-values."""
    name, _, exact = arch.partition("+")
    knobs = {"exact_values": True} if exact else {}
    packed = _compressed(tiny_models[name], budget=0.5, train=False, uniform=True, **knobs)[0].model.eval()
    packed.config.project_context_only = True
    kept = ["v_exact" in layer.self_attn._modules for layer in packed.model.layers]
    assert kept == [bool(exact)] * len(kept)  # what the reference projects follows it
    return packed, load_model(str(tiny_models[name])).model.eval()


@pytest.fixture(
    scope="module",
    params=["llama", "qwen3", "gemma3_text", "llama+exact-values", "gemma3_text+exact-values"],
)
def pair(request, tiny_models):
    return _pair(tiny_models, request.param)


@pytest.fixture(scope="module", params=["llama", "qwen3", "llama+exact-values"])
def full_attention_pair(request, tiny_models):
    """Models whose every layer attends fully: their caches can be cropped and copied token for token."""
    return _pair(tiny_models, request.param)


def test_later_tokens_keep_exact_keys(pair, tmp_path):
    packed, stock = pair
    narrow = {"tokens": 0}
    _reference(stock, packed, narrow)
    cache = DynamicCache()  # its layers are made on their first update
    got = _steps(packed, cache, PREFILL, QUESTION, 1, 1)
    reference = DynamicCache()
    want = [_step(stock, reference, 0, PREFILL)]
    narrow["tokens"] = PREFILL
    want += [_step(stock, reference, PREFILL, QUESTION), _step(stock, reference, PREFILL + QUESTION, 1)]
    want += [_step(stock, reference, PREFILL + QUESTION + 1, 1)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-4)
    # The question and the two tokens after it keep d exact key dims per KV head in every layer (and with
    # --exact-values d exact value dims).
    config = packed.config
    exact_values = "v_exact" in packed.model.layers[0].self_attn._modules
    per_token = (
        config.num_key_value_heads * config.head_dim * 4 * config.num_hidden_layers * (1 + exact_values)
    )
    assert exact_tail_bytes(cache) == (QUESTION + 2) * per_token
    expected = describe(_saved(packed, tmp_path))
    assert expected["kv_cache_bytes_per_later_token"] == expected["kv_cache_bytes_per_token"] + per_token
    # By default every token is projected, the prefill's own attention too.
    narrow["tokens"] = None
    config.project_context_only = False
    try:
        off = _steps(packed, DynamicCache(config=config), PREFILL, QUESTION, 1, 1)
    finally:
        config.project_context_only = True
    ref = _steps(stock, DynamicCache(config=stock.config), PREFILL, QUESTION, 1, 1)
    for g, w in zip(off, ref):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-4)
    assert min(float((a - b).abs().max()) for a, b in zip(got, off)) > 1e-3


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text"])
def test_exact_recent_keeps_the_contexts_last_keys_exact(tiny_models, arch):
    """exact_recent=R: the prefill's last R tokens keep their keys exact for the later forwards too (their
    residuals beside the cache, d per KV head and token), the earlier ones projected; R covering the whole
    prefill leaves no context key projected. An --exact-values model ignores it (its values' tail starts after
    the prefill)."""
    packed, stock = _pair(tiny_models, arch)
    config = packed.config
    per_token = config.num_key_value_heads * config.head_dim * 4 * config.num_hidden_layers
    narrow = {"tokens": 0}
    _reference(stock, packed, narrow)
    try:
        for recent in (3, PREFILL):
            config.exact_recent = recent
            cache = DynamicCache()
            got = _steps(packed, cache, PREFILL, QUESTION, 1)
            narrow["tokens"] = 0
            reference = DynamicCache()
            want = [_step(stock, reference, 0, PREFILL)]
            narrow["tokens"] = PREFILL - recent
            want += [
                _step(stock, reference, PREFILL, QUESTION),
                _step(stock, reference, PREFILL + QUESTION, 1),
            ]
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=0, atol=1e-4)
            assert exact_tail_bytes(cache) == (recent + QUESTION + 1) * per_token
        config.exact_recent = 0  # without it the question reads those keys projected: other logits
        plain = _steps(packed, DynamicCache(), PREFILL, QUESTION)
        assert float((plain[1] - got[1]).abs().max()) > 1e-3
    finally:
        config.exact_recent = 0
    exact_values, _ = _pair(tiny_models, "llama+exact-values")
    exact_values.config.exact_recent = 3
    cache = DynamicCache()
    _steps(exact_values, cache, PREFILL, QUESTION)
    per_token_ev = 2 * per_token
    assert exact_tail_bytes(cache) == QUESTION * per_token_ev


@pytest.mark.parametrize("arch", ["gemma3_text", "gemma3_text+exact-values"])
def test_a_windowed_sliding_layer_keeps_each_later_forward_exact(tiny_models, arch):
    """DynamicCache(config=...) windows Gemma3's sliding layers (the last window - 1 = 7 tokens): after a prefill
    that fills the window, each later forward's own keys are exact there, the earlier ones projected; the
    full-attention layers keep the whole tail."""
    packed, stock = _pair(tiny_models, arch)
    assert packed.config.sliding_window - 1 < PREFILL
    narrow = {"tokens": 0}
    _reference(stock, packed, narrow)
    got = _steps(packed, DynamicCache(config=packed.config), PREFILL, QUESTION, 1, 1)
    reference = DynamicCache()
    want = [_step(stock, reference, 0, PREFILL)]
    narrow["tokens"] = PREFILL
    for at, n in ((PREFILL, QUESTION), (PREFILL + QUESTION, 1), (PREFILL + QUESTION + 1, 1)):
        narrow["sliding"] = at  # everything before this forward
        want.append(_step(stock, reference, at, n))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-4)
    whole = _steps(packed, DynamicCache(), PREFILL, QUESTION, 1, 1)  # every layer keeps the whole tail
    assert float((got[-1] - whole[-1]).abs().max()) > 1e-3


def test_a_rewritten_cache_never_reads_a_stale_tail(full_attention_pair):
    """A crop keeps the residuals of the tokens it keeps; a cache rebuilt from the layers' tensors (a copy, a
    press, a reorder) starts its exact tail at its current length, unless copy_exact_tail_ carries it over."""
    packed, stock = full_attention_pair
    narrow = {"tokens": 0}
    _reference(stock, packed, narrow)
    cache = DynamicCache(config=packed.config)
    _steps(packed, cache, PREFILL, QUESTION)
    cache.crop(-2)  # the last two question tokens again: exact
    again = _step(packed, cache, PREFILL + QUESTION - 2, 2)
    reference = DynamicCache()
    _step(stock, reference, 0, PREFILL)
    narrow["tokens"] = PREFILL
    want = _step(stock, reference, PREFILL, QUESTION)[:, -2:]
    torch.testing.assert_close(again, want, rtol=0, atol=1e-4)

    copies = [DynamicCache(config=packed.config) for _ in range(2)]
    for copy in copies:
        for i, layer in enumerate(cache.layers):
            copy.update(layer.keys, layer.values, i)
    copy_exact_tail_(cache, copies[0], torch.tensor([0]), PREFILL + QUESTION)
    carried = _step(packed, copies[0], PREFILL + QUESTION, 2)
    plain = _step(packed, copies[1], PREFILL + QUESTION, 2)
    fork = copy_cache(reference)
    torch.testing.assert_close(carried, _step(stock, fork, PREFILL + QUESTION, 2), rtol=0, atol=1e-4)
    narrow["tokens"] = PREFILL + QUESTION  # the plain copy holds the question's keys projected
    torch.testing.assert_close(plain, _step(stock, reference, PREFILL + QUESTION, 2), rtol=0, atol=1e-4)

    # a crop into the prefill, before any residual: the two tokens fed again keep exact keys, and so does a copy
    cache = DynamicCache(config=packed.config)
    _step(packed, cache, 0, PREFILL)
    cache.crop(-2)
    _step(packed, cache, PREFILL - 2, 2)
    copy = DynamicCache(config=packed.config)
    for i, layer in enumerate(cache.layers):
        copy.update(layer.keys, layer.values, i)
    copy_exact_tail_(cache, copy, torch.tensor([0]), PREFILL)
    assert exact_tail_bytes(copy) == exact_tail_bytes(cache) > 0
    torch.testing.assert_close(
        _step(packed, copy, PREFILL, 2), _step(packed, cache, PREFILL, 2), rtol=0, atol=1e-6
    )


@torch.no_grad()
def _step(model, cache, at: int, n: int):
    ids, positions = PROMPT[:, at : at + n], torch.arange(at, at + n)[None]
    return model(input_ids=ids, past_key_values=cache, position_ids=positions).logits.double()


def _saved(model, folder) -> str:
    """config.json of `model` in `folder` with one empty weight file: what `describe` reads."""
    from safetensors.torch import save_file

    model.config.save_pretrained(folder)
    save_file({}, folder / "model.safetensors")
    return str(folder)
