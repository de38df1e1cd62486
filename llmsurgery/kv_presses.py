"""NVIDIA kvpress token-eviction presses on llmsurgery models, and one dense prefill replayed under many presses.

kvpress is an optional extra (``pip install -e .[kvpress]``; it pins transformers<5.3). Its presses run on every
model llmsurgery saves exactly as on a stock one (``with press(model): ...`` and its
``kv-press-text-generation`` pipeline): a packed cache layer (kv-compress, absorb) hands a press full-width keys
and values while it scores the layer and projects back what it keeps (``modeling_llmsurgery.PressView``).
`window_safe` makes a press fit for sliding-window layers (Gemma3): kvpress's own leaves the kept tokens out of
order and the windows reading tokens they never reach; every press `make_press` gives is window-safe.

Eviction presses compress a layer's cache after its attention has run, so they never change the prefill's hidden
states. `record_prefill` therefore runs one prefill with the cache dense and keeps what kvpress's forward hook
reads (the attention module's keyword arguments); `replay` then calls each press's own ``forward_hook`` on a copy
of that cache, layer by layer, and gives the cache that ``with press(model): model(...)`` would have left
(tested equal). Presses: SnapKV (arXiv 2404.14469), StreamingLLM (2309.17453), TOVA (2401.06104),
ExpectedAttention (kvpress), Knorm (2406.11430), ThinK (2407.21018, key channels only). `projection_press`
applies a kv-compress output's bases (MatryoshkaKV, arXiv 2410.14731) to a stock model's prefill cache the same
way: context only, the later tokens exact.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn

from .arch import arch_for, decoder_layers, get_submodule
from .errors import UserError

INSTALL_HINT = "pip install -e .[kvpress]"
EVICTION_PRESSES = ("snapkv", "streamingllm", "tova", "expected_attention", "knorm")


def require_kvpress():
    """The kvpress module, or a UserError that says in one line how to install it."""
    try:
        import kvpress
    except ImportError:
        raise UserError(f"kvpress presses need the kvpress extra: {INSTALL_HINT}") from None
    return kvpress


def make_press(name: str, ratio: float, **options):
    """A kvpress eviction press by name (EVICTION_PRESSES) evicting `ratio` of the context's tokens per layer,
    made safe for sliding-window layers (`window_safe`)."""
    kvpress = require_kvpress()
    classes = {
        "snapkv": kvpress.SnapKVPress,
        "streamingllm": kvpress.StreamingLLMPress,
        "tova": kvpress.TOVAPress,
        "expected_attention": kvpress.ExpectedAttentionPress,
        "knorm": kvpress.KnormPress,
    }
    if name not in classes:
        raise UserError(f"unknown press '{name}'; choose from {', '.join(EVICTION_PRESSES)}")
    return window_safe(classes[name](compression_ratio=ratio, **options))


def think_press(channel_ratio: float, evict: float = 0.0, evictor: str = "snapkv"):
    """ThinK zeroing `channel_ratio` of each key head's channels (no memory saved), after an eviction if evict > 0."""
    kvpress = require_kvpress()
    think = kvpress.ThinKPress(key_channel_compression_ratio=channel_ratio)
    return think if evict <= 0 else kvpress.ComposedPress([make_press(evictor, evict), think])


def window_safe(press):
    """`press` with its score-based evictions (kvpress ScorerPress, also inside a ComposedPress) made safe for
    sliding-window layers; returned for chaining. Two changes, neither of which alters a full-attention layer's
    output:

    - the kept tokens stay in their original order. kvpress gathers the top-k indices unsorted; full attention
      does not mind (keys carry their positions), but a sliding-window layer masks by place in the cache;
    - on a sliding-window layer the tokens its window reads (the last window - 1) are kept first, the press's
      scores ranking them and then the older ones. While it keeps at least the window, the layer's output is
      unchanged; the older tokens it keeps sit outside the window.

    Without these, every kvpress press scored 0 on long-range recall on Gemma3-270M (5 of its 6 layers slide):
    the windows read tokens from anywhere in the context at distances they never saw in training."""
    kvpress = require_kvpress()
    for inner in getattr(press, "presses", None) or ():
        window_safe(inner)
    if isinstance(press, kvpress.ScorerPress):
        press.compress = functools.partial(_compress_window_safe, press)
    return press


def _compress_window_safe(press, module, hidden_states, keys, values, attentions, kwargs):
    """kvpress's ScorerPress.compress, the window's tokens first on a sliding-window layer, kept indices sorted."""
    from kvpress.utils import compute_n_kept

    if press.compression_ratio == 0:
        return keys, values
    scores = press.score(module, hidden_states, keys, values, attentions, kwargs)
    tokens, window = keys.shape[2], getattr(module, "sliding_window", None)
    n_kept = compute_n_kept(tokens, press.compression_ratio)
    if window:  # the window's tokens first: only they, or all of them and the best of the rest
        seen = torch.arange(tokens, device=scores.device) >= tokens - (window - 1)
        inside = n_kept <= int(seen.sum())
        scores = scores.masked_fill(~seen if inside else seen, float("-inf") if inside else float("inf"))
    kept = scores.topk(n_kept, dim=-1).indices.sort(dim=-1).values
    kept = kept.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
    return keys.gather(2, kept).contiguous(), values.gather(2, kept).contiguous()


@functools.cache
def _projection_press_class():
    kvpress = require_kvpress()

    @dataclass
    class ProjectionPress(kvpress.BasePress):
        """MatryoshkaKV's projection applied by kvpress to the prefill's cache only: each KV head's context keys
        (and values, where a value basis is given) replaced by their projection ``mu + (x - mu) B B^T`` onto the
        first r basis columns, but for the last `recent` tokens' keys (a kv-compress model's ``exact_recent``); the
        tokens after the prefill (question, answer) stay exact, as with every kvpress press. Like kvpress's
        ThinK, the cache keeps full-width tensors: the memory a narrow store of the r coordinates would save is
        counted, not realized. `maps[layer]` = per KV head ((B_k, mu_k), (B_v, mu_v) or
        None)."""

        maps: list = None
        stored_fraction: float = 1.0
        recent: int = 0  # the context's last tokens, kept exact

        def compress(self, module, hidden_states, keys, values, attentions, kwargs):
            heads = self.maps[module.layer_idx]
            keys, values = keys.clone(), values.clone()
            end = keys.shape[2] - min(self.recent, keys.shape[2])  # the recent tokens' keys stay exact
            for g, (key_map, value_map) in enumerate(heads):
                for x, found, upto in ((keys, key_map, end), (values, value_map, None)):
                    if found is not None:
                        basis, mean = (t.to(x.device, x.dtype) for t in found)
                        x[:, g, :upto] = mean + ((x[:, g, :upto] - mean) @ basis) @ basis.T
            return keys, values

        @property
        def compression_ratio(self):
            return 1 - self.stored_fraction

        @compression_ratio.setter
        def compression_ratio(self, value):
            raise AttributeError("a ProjectionPress's compression ratio is set by its bases")

    return ProjectionPress


def projection_maps(packed: nn.Module, keys_only: bool = False) -> list[list[tuple]]:
    """Per layer, per KV head: ((key basis [d, r_k], key mean [d]), (value basis, mean) or None) of a kv-compress
    output (a packed model), as float32 copies on the CPU."""
    from .modeling.modeling_llmsurgery import press_maps

    def copies(attn, kind):
        return [(b.detach().float().cpu(), m.detach().float().cpu()) for b, m in press_maps(attn, kind)]

    maps = []
    for attn in _attention_modules(packed):
        layout = getattr(attn, "attention_layout", None) or {}
        if not layout.get("k"):
            raise UserError("a projection press needs a kv-compress output: this model stores no key bases")
        keys = copies(attn, "keys")
        values = copies(attn, "values") if not keys_only and layout.get("v_basis") else [None] * len(keys)
        maps.append(list(zip(keys, values)))
    return maps


def projection_press(maps: list[list[tuple]], evict: float = 0.0, evictor: str = "tova", recent: int = 0):
    """A kvpress press for the *stock* model that projects its prefill cache onto `maps` (`projection_maps` of a
    kv-compress output of that model), after evicting `evict` of the tokens with `evictor` if evict > 0; the last
    `recent` tokens it keeps stay exact, as a kv-compress model run with ``exact_recent`` keeps them. What it
    stores is counted as the r coordinates of each head: (sum of r_k + r_v) / (2 L H d), and d more per head for
    each of the `recent` tokens (the residuals such a model keeps; not in the ratio, which has no length)."""
    dense = 2 * maps[0][0][0][0].shape[0] * sum(map(len, maps))  # 2 d per KV head and layer
    press = _projection_press_class()(
        maps=maps, stored_fraction=sum(stored_widths(maps)) / dense, recent=recent
    )
    return press if evict <= 0 else require_kvpress().ComposedPress([make_press(evictor, evict), press])


def stored_widths(maps: list[list[tuple]]) -> list[int]:
    """Per layer, the elements a projection press counts per token: the sum over KV heads of r_k + r_v."""
    return [
        sum(k[0].shape[1] + (v[0].shape[1] if v is not None else k[0].shape[0]) for k, v in layer)
        for layer in maps
    ]


@dataclass
class PrefillRecord:
    """What kvpress's hook reads after each attention module during one prefill, and the dense cache it left."""

    kwargs: list[dict]  # per decoder layer: the attention module's keyword arguments (hidden_states, ...)
    cache: object  # the transformers DynamicCache after the prefill, every layer dense
    last_logits: torch.Tensor  # [B, V]: the prediction after the last token (no press changes it)
    # per decoder layer: the exact keys a press reads instead of the projected ones (a kv-compress model run with
    # project_context_only), or None
    exact_keys: list = None


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    spec = arch_for(model)
    return [get_submodule(layer, spec.attn) for layer in decoder_layers(model)]


def window_caps(model: nn.Module) -> list[int | None]:
    """Per decoder layer, the past tokens a sliding-window layer reads (window - 1; what a windowed cache holds),
    None for a full-attention layer."""
    windows = [getattr(attn, "sliding_window", None) for attn in _attention_modules(model)]
    return [w - 1 if w else None for w in windows]


@torch.no_grad()
def record_prefill(model: nn.Module, input_ids: torch.Tensor) -> PrefillRecord:
    """One dense prefill of `input_ids` [B, T], keeping each attention module's keyword arguments."""
    from transformers import DynamicCache

    kept: list[dict] = []
    exact: list = []

    def keep(module, args, kwargs, output):
        kept.append(dict(kwargs))
        view = cache.layers[module.layer_idx].__dict__.get("_press_view")
        exact.append(getattr(view, "exact_keys", None))

    cache = DynamicCache()
    hooks = [attn.register_forward_hook(keep, with_kwargs=True) for attn in _attention_modules(model)]
    try:
        logits = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    finally:
        for hook in hooks:
            hook.remove()
    return PrefillRecord(kept, cache, logits[:, -1], exact)


def _rotary_for(model: nn.Module, attn: nn.Module):
    """The model's rotary embedding as presses call it, ``rotary(x, position_ids)``: Gemma3's takes the layer
    type as well, which kvpress 0.5.5 does not pass (its ExpectedAttention fails on a stock Gemma3 there)."""
    rotary = model.model.rotary_emb
    types = getattr(model.config, "layer_types", None)
    if types and "layer_type" in inspect.signature(rotary.forward).parameters:
        return functools.partial(rotary, layer_type=types[attn.layer_idx])
    return rotary


def copy_cache(cache):
    """A new DynamicCache holding copies of `cache`'s tensors (each layer's keys/values as the model stored them),
    with the exact-key residuals a kv-compress model keeps beside them (`modeling_llmsurgery.copy_exact_tail_`)."""
    from transformers import DynamicCache

    from .modeling.modeling_llmsurgery import copy_exact_tail_

    fresh = DynamicCache()
    for i, layer in enumerate(cache.layers):
        fresh.update(layer.keys, layer.values, i)  # concatenated onto an empty tensor: a copy
    if fresh.layers:  # every layer's tail within the longest layer (a windowed one restarts its own anyway)
        keys = fresh.layers[0].keys
        copy_exact_tail_(
            cache, fresh, torch.arange(keys.shape[0]), max(x.keys.shape[-2] for x in fresh.layers)
        )
    return fresh


@torch.no_grad()
def replay(model: nn.Module, press, record: PrefillRecord):
    """The cache `press` leaves after the recorded prefill: kvpress's own forward hook, run layer by layer on a
    copy of the dense cache (packed layers through a PressView, as in the live route)."""
    from .modeling.modeling_llmsurgery import close_press_views_, open_press_view_

    cache = copy_cache(record.cache)
    if press is None:
        return cache
    press.post_init_from_model(model)
    exact = record.exact_keys or [None] * len(record.kwargs)
    for attn, kwargs, keys in zip(_attention_modules(model), record.kwargs, exact):
        attn._modules.pop("rotary_emb", None)  # kvpress's context manager leaves the model's module here
        attn.__dict__["rotary_emb"] = _rotary_for(model, attn)  # what it sets, fixed for Gemma3
        view = open_press_view_(cache, attn, keys) if "attention_layout" in attn.__dict__ else None
        press.forward_hook(attn, (), dict(kwargs, past_key_values=cache), (None, None))
        if view is not None:  # no forward runs here to fire the one-shot hook: close and remove it now
            close_press_views_(cache, attn.layer_idx)
            view.remove()
    return cache


def cache_elements(cache) -> int:
    """Key and value elements the cache holds now (its stored tensors, packed or not)."""
    from .modeling.modeling_llmsurgery import close_press_views_

    close_press_views_(cache)
    return sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers)
