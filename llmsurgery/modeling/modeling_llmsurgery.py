"""Run-time code for models transformed by llmsurgery; written next to their weights.

``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` runs such a model without
llmsurgery installed. One class per architecture wraps the stock transformers class and switches
features on from config.json:

* ``attention_layout`` (Absorb-Decompose, CLOVER arXiv 2411.17426): per decoder layer, the value
  width of every KV head (``"v"``) and, where Q-K frequency pairs were dropped, the RoPE frequency
  indices each KV head keeps (``"qk"``). q/k/v/o are built at those widths; keys and values are
  cached at those widths (one packed cache head per layer, no padding, no expansion to query heads).
* ``sparsity_in`` / ``sparsity_out`` (+ ``rotated``) (LaRoSA arXiv 2507.01299, TEAL-style
  magnitude): each decoder layer (1) moves the residual stream from the previous layer's basis into
  its own with ``rotation_adapter`` when rotated, (2) keeps the ``1 - sparsity_in`` largest-magnitude
  entries of the normed input to q/k/v and to gate/up, (3) the ``1 - sparsity_out`` largest of the
  inputs to o_proj and down_proj, every token. Change them with ``from_pretrained`` keyword arguments.
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn
from transformers import Gemma3ForCausalLM, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

# ----------------------------------------------------------------------------- Top-K sparsity


def keep_top_k(x: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero all but the round((1 - sparsity) * D) largest-magnitude entries of each token. x: [..., D]."""
    if sparsity <= 0:
        return x
    keep = x.shape[-1] - int(round(sparsity * x.shape[-1]))
    idx = x.abs().topk(keep, dim=-1).indices
    return torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx))


def add_rotation_adapters_(model: nn.Module) -> None:
    """One [D, D] parameter per decoder layer (identity until loaded) mapping the incoming basis to the layer's."""
    size = model.config.hidden_size
    for layer in model.model.layers:
        if not hasattr(layer, "rotation_adapter"):
            layer.register_parameter("rotation_adapter", nn.Parameter(torch.eye(size), requires_grad=False))


def install_sparsity_hooks_(model: nn.Module) -> list:
    """Adapters and Top-K on the four inputs of every decoder layer, reading the config at call time."""
    config, handles = model.config, []

    def adapter_hook(layer, args, kwargs):
        if not hasattr(layer, "rotation_adapter"):
            return None
        if args:
            return (args[0] @ layer.rotation_adapter.to(args[0].dtype), *args[1:]), kwargs
        kwargs["hidden_states"] = kwargs["hidden_states"] @ layer.rotation_adapter.to(kwargs["hidden_states"].dtype)
        return args, kwargs

    def topk_output(module, args, output):  # normed input of q/k/v or gate/up
        return keep_top_k(output, config.sparsity_in)

    def topk_input(module, args):  # input of o_proj or down_proj
        return (keep_top_k(args[0], config.sparsity_out), *args[1:])

    for layer in model.model.layers:
        handles.append(layer.register_forward_pre_hook(adapter_hook, with_kwargs=True))
        handles.append(layer.input_layernorm.register_forward_hook(topk_output))
        handles.append(layer.post_attention_layernorm.register_forward_hook(topk_output))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(topk_input))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(topk_input))
    return handles


# ----------------------------------------------------------------------------- absorbed attention


def key_cache_widths(layout: dict, head_dim: int) -> list[int]:
    """Per KV head, the width of its cached keys (MatryoshkaKV projection, else the q/k width)."""
    return list(layout["k"]) if layout.get("k") else qk_widths(layout, head_dim)


def full_layout(config) -> dict:
    """The layout of an untouched attention layer: every KV head at head_dim, every frequency pair."""
    return {"v": [_head_dim(config)] * config.num_key_value_heads, "qk": None}


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def qk_widths(layout: dict, head_dim: int) -> list[int]:
    """Per KV head, the q/k width: two dims per kept frequency pair (all of head_dim when none dropped)."""
    n = len(layout["v"])
    return [2 * len(pairs) for pairs in layout["qk"]] if layout.get("qk") else [head_dim] * n


def rope_dims(pairs: list[int], head_dim: int) -> list[int]:
    """Dims of a head kept with frequency pairs `pairs` (rotate-half layout: pair f = dims f, f + d/2)."""
    return list(pairs) + [p + head_dim // 2 for p in pairs]


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x: [B, H, T, w] with cos/sin: [B, 1, T, w] (w = 2 x kept pairs)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def reshape_attention_(attn: nn.Module, layout: dict, q=None, k=None, v=None, o=None, key_projection=None) -> None:
    """Give an attention module the widths of `layout` and the forward that runs them.

    q/k/v/o: optional (weight, bias) pairs to load; otherwise the old linear if its shape fits, else a fresh one.
    key_projection: optional (basis [d, sum of key widths], mean [KV heads, d]) when layout has "k".
    """
    config, d = attn.config, attn.head_dim
    n_rep = attn.num_key_value_groups
    kw, vw = qk_widths(layout, d), list(layout["v"])
    qw = [kw[h // n_rep] for h in range(config.num_attention_heads)]
    ow = [vw[h // n_rep] for h in range(config.num_attention_heads)]
    hidden = config.hidden_size
    shapes = {"q_proj": (hidden, sum(qw), q), "k_proj": (hidden, sum(kw), k), "v_proj": (hidden, sum(vw), v),
              "o_proj": (sum(ow), hidden, o)}
    for name, (fan_in, fan_out, given) in shapes.items():
        old = getattr(attn, name)
        bias = old.bias is not None or bool(layout.get(f"{name[0]}_bias"))
        if given is None and old.weight.shape == (fan_out, fan_in) and (old.bias is not None) == bias:
            continue
        new = nn.Linear(fan_in, fan_out, bias=bias, device=old.weight.device, dtype=old.weight.dtype)
        if given is not None:
            weight, given_bias = given
            new.weight.data = weight.to(old.weight.dtype).contiguous()
            if bias:
                new.bias.data = (given_bias if given_bias is not None else torch.zeros(fan_out)).to(old.weight.dtype).contiguous()
        new.weight.requires_grad_(old.weight.requires_grad)
        setattr(attn, name, new)
    attn.attention_layout = {key: value for key, value in layout.items()}
    attn.attention_layout["qk"] = [list(p) for p in layout["qk"]] if layout.get("qk") else None
    if layout.get("k"):
        like = attn.q_proj.weight
        basis = torch.zeros(d, sum(layout["k"]), dtype=like.dtype, device=like.device)
        mean = torch.zeros(len(layout["k"]), d, dtype=like.dtype, device=like.device)
        if key_projection is not None:
            basis, mean = (t.to(like.dtype).to(like.device).contiguous() for t in key_projection)
        attn.key_basis = nn.Parameter(basis, requires_grad=False)
        attn.key_mean = nn.Parameter(mean, requires_grad=False)
    attn._rope_index = {}
    attn.forward = types.MethodType(absorbed_attention_forward, attn)


def _rope_index(attn: nn.Module, group: int, device) -> torch.Tensor | None:
    pairs = attn.attention_layout["qk"]
    if pairs is None:
        return None
    key = (group, str(device))
    if key not in attn._rope_index:
        attn._rope_index[key] = torch.tensor(rope_dims(pairs[group], attn.head_dim), device=device)
    return attn._rope_index[key]


def absorbed_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
    """Attention with per-KV-head q/k, key-cache and v widths; the cache holds [B, 1, T, sum of widths] per layer."""
    cache = cache if cache is not None else kwargs.pop("past_key_values", None)
    kwargs.pop("past_key_values", None)
    batch, length = hidden_states.shape[:-1]
    n_rep, layout = self.num_key_value_groups, self.attention_layout
    kw, vw = qk_widths(layout, self.head_dim), layout["v"]
    queries, keys = self.q_proj(hidden_states), self.k_proj(hidden_states)  # [B, T, sum qw], [B, T, sum kw]
    values = self.v_proj(hidden_states).unsqueeze(1)  # [B, 1, T, sum vw]
    cos, sin = position_embeddings  # [B, T, d]
    q_groups, k_groups, q_at, k_at = [], [], 0, 0
    for g, width in enumerate(kw):
        qg = queries[..., q_at : q_at + n_rep * width].view(batch, length, n_rep, width)
        kg = keys[..., k_at : k_at + width].view(batch, length, 1, width)
        q_at, k_at = q_at + n_rep * width, k_at + width
        if hasattr(self, "q_norm"):  # qwen3 / gemma3: per-head RMSNorm before RoPE (full widths only)
            qg, kg = self.q_norm(qg), self.k_norm(kg)
        index = _rope_index(self, g, cos.device)
        c, s = (cos, sin) if index is None else (cos[..., index], sin[..., index])
        c, s = c.unsqueeze(1), s.unsqueeze(1)
        qg, kg = _rope(qg.transpose(1, 2), c, s), _rope(kg.transpose(1, 2), c, s)  # [B, n_rep, T, w], [B, 1, T, w]
        if layout.get("k"):  # MatryoshkaKV: post-RoPE keys and queries in the key basis, keys centred
            basis = self.key_basis[:, sum(layout["k"][:g]) : sum(layout["k"][: g + 1])]  # [d, r_k]
            qg, kg = qg @ basis, (kg - self.key_mean[g]) @ basis
        q_groups.append(qg)
        k_groups.append(kg)
    keys = torch.cat(k_groups, dim=-1)  # [B, 1, T, sum of key widths]
    kw = layout.get("k") or kw
    if cache is not None:
        keys, values = cache.update(keys, values, self.layer_idx, kwargs=kwargs)
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
    extra = {"sliding_window": self.sliding_window} if getattr(self, "sliding_window", None) else {}
    outputs, k_at, v_at = [], 0, 0
    for g, (qg, width, v_width) in enumerate(zip(q_groups, kw, vw)):
        out, _ = attend(self, qg, keys[..., k_at : k_at + width], values[..., v_at : v_at + v_width], attention_mask,
                        dropout=0.0, scaling=self.scaling, **extra, **kwargs)  # out: [B, T, n_rep, v_width]
        outputs.append(out.reshape(batch, length, n_rep * v_width))
        k_at, v_at = k_at + width, v_at + v_width
    return self.o_proj(torch.cat(outputs, dim=-1)), None


def install_attention_layout_(model: nn.Module) -> None:
    """Rebuild every attention module at the widths in ``config.attention_layout`` (before weights load)."""
    for layer, layout in zip(model.model.layers, model.config.attention_layout):
        if layout != full_layout(model.config):
            reshape_attention_(layer.self_attn, layout)


# ----------------------------------------------------------------------------- model classes


class _SurgeryMixin:
    """Put first in the bases: builds the wrapped causal LM, then switches on what config.json asks for."""

    def __init__(self, config):
        super().__init__(config)
        if getattr(config, "attention_layout", None):
            install_attention_layout_(self)
        if getattr(config, "sparsity_in", None) is not None:
            if getattr(config, "rotated", False):
                add_rotation_adapters_(self)
            install_sparsity_hooks_(self)


class LlmsurgeryLlamaForCausalLM(_SurgeryMixin, LlamaForCausalLM):
    pass


class LlmsurgeryMistralForCausalLM(_SurgeryMixin, MistralForCausalLM):
    pass


class LlmsurgeryQwen2ForCausalLM(_SurgeryMixin, Qwen2ForCausalLM):
    pass


class LlmsurgeryQwen3ForCausalLM(_SurgeryMixin, Qwen3ForCausalLM):
    pass


class LlmsurgeryGemma3ForCausalLM(_SurgeryMixin, Gemma3ForCausalLM):
    pass


SURGERY_CLASSES = {
    "llama": "LlmsurgeryLlamaForCausalLM",
    "mistral": "LlmsurgeryMistralForCausalLM",
    "qwen2": "LlmsurgeryQwen2ForCausalLM",
    "qwen3": "LlmsurgeryQwen3ForCausalLM",
    "gemma3_text": "LlmsurgeryGemma3ForCausalLM",
}
