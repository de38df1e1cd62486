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
  Decoding one token at a time on CPU, the Top-K and the products after it run in the fused sparse
  kernel of ``llmsurgery_sparse_kernel.py`` (compiled on first use; PyTorch fallback without a
  compiler), reading only the kept weight rows; ``sparse_decode=False`` keeps the dense path.
"""

from __future__ import annotations

import copy
import types

import torch
import torch.nn as nn
from transformers import (
    Gemma3ForCausalLM,
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from .llmsurgery_sparse_kernel import load_kernel

# ----------------------------------------------------------------------------- Top-K sparsity


def keep_top_k(x: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero all but the round((1 - sparsity) * D) largest-magnitude entries of each token. x: [..., D]."""
    if sparsity <= 0:
        return x
    keep = x.shape[-1] - int(round(sparsity * x.shape[-1]))
    idx = x.abs().topk(keep, dim=-1).indices
    return torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx))


def add_rotation_adapters_(model: nn.Module) -> None:
    """One [D, D] parameter per decoder layer (identity until loaded) mapping the incoming basis to the layer's.

    In the layer's dtype and device: the runtime casts it to the stream's dtype anyway, so a bf16 model keeps bf16
    adapters.
    """
    size = model.config.hidden_size
    for layer in model.model.layers:
        if not hasattr(layer, "rotation_adapter"):
            like = next(layer.parameters())
            layer.register_parameter(
                "rotation_adapter",
                nn.Parameter(torch.eye(size, dtype=like.dtype, device=like.device), requires_grad=False),
            )


# Tokens x kept share: the sparse path runs when it reads at most this share of the weight bytes dense reads.
SPARSE_MAX_READ = 0.8


class SparseGroup:
    """Linear layers of one decoder layer that read the same Top-K-masked input: q|k|v, gate|up, o, or down.

    Calls that read few weight bytes sparse (one token, on CPU, no autograd) run the fused kernel once over
    one input-major weight [in, sum of outputs] and hand each member its slice. Building that weight turns the
    members' weights into views of it, so the dense path (prefill, GPU, training) shares the same memory.
    The members stay plain nn.Linear (their forward is patched per instance), so quantizers still replace them;
    a replaced member takes the group back to the dense path.
    """

    def __init__(self, parent: nn.Module, names: tuple[str, ...], config, sparsity_key: str):
        self.parent, self.names, self.config, self.sparsity_key = parent, names, config, sparsity_key
        self.fused: torch.Tensor | None = None
        self._pointers: list[int] = []
        self._cache: tuple | None = None  # (input, outputs), one tuple so that threads never mix the two
        self._taken: torch.Tensor | None = None
        self.kernel_calls = 0
        for slot, name in enumerate(names):
            linear = getattr(parent, name)
            if type(linear) is nn.Linear:
                linear._sparse_group, linear._sparse_slot = self, slot
                linear.forward = types.MethodType(_sparse_linear_forward, linear)
                linear._register_state_dict_hook(_contiguous_weights)

    def __deepcopy__(self, memo):
        """Copies keep no caches: the copy builds its own input-major weight from its own members."""
        new = copy.copy(self)
        memo[id(self)] = new
        new.parent, new.config = copy.deepcopy(self.parent, memo), copy.deepcopy(self.config, memo)
        new.fused, new._pointers, new._cache, new._taken = None, [], None, None
        return new

    def members(self) -> list[nn.Module]:
        return [self.parent._modules[name] for name in self.names]

    def sparsity(self) -> float:
        return float(
            self.config.__dict__.get(self.sparsity_key) or 0
        )  # plain dict reads: this runs several times a layer

    def takes(self, x: torch.Tensor) -> bool:
        """Whether this input goes through the sparse kernel (which then also does the Top-K)."""
        if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
            return self._release()
        s = self.sparsity()
        if (
            s <= 0
            or (x.numel() // x.shape[-1]) * (1 - s) > SPARSE_MAX_READ
            or self.config.__dict__.get("sparse_decode") is False
        ):
            return False
        for m in self.members():
            weight = m._parameters.get("weight") if m.__dict__.get("_sparse_group") is self else None
            if weight is None or weight.dtype != x.dtype or weight.device.type != "cpu":
                return self._release()
            if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
                return False
        if load_kernel() is None:
            return False
        self._taken = x  # the members asked next about this very tensor need not check again
        return True

    def _release(self) -> bool:
        """Drop the input-major weight once the members no longer live in it (moved, cast, replaced). False."""
        if self.fused is not None and self._pointers != [
            m.weight.data_ptr() if hasattr(m, "weight") else None for m in self.members()
        ]:
            self.fused, self._pointers = None, []
        return False

    def output(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        cache = self._cache
        if cache is None or cache[0] is not x:
            cache = self._cache = (x, self._compute(x))
        return cache[1][slot]

    def _weight_in(self) -> torch.Tensor:
        members = self.members()
        if self.fused is None or self._pointers != [m.weight.data_ptr() for m in members]:
            with (
                torch.inference_mode(False),
                torch.no_grad(),
            ):  # ordinary tensors, so that training still works later
                fused = (
                    torch.cat([m.weight.detach() for m in members]).t().contiguous()
                )  # [in, sum of outputs]
                at = 0
                for m in members:
                    rows = m.weight.shape[0]
                    m.weight.data = fused[:, at : at + rows].t()
                    at += rows
            self.fused, self._pointers = fused, [m.weight.data_ptr() for m in members]
        return self.fused

    def _compute(self, x: torch.Tensor) -> tuple:
        weight, members, kernel = self._weight_in(), self.members(), load_kernel()
        self.kernel_calls += 1
        n = x.shape[-1]
        keep = n - int(round(self.sparsity() * n))
        y = torch.stack(
            [kernel.top_k_gemv(row, keep, weight) for row in x.reshape(-1, n)]
        )  # float32 [tokens, outputs]
        if any(m.bias is not None for m in members):
            y += torch.cat(
                [m.bias.float() if m.bias is not None else torch.zeros(m.out_features) for m in members]
            )
        y = y.to(x.dtype).view(*x.shape[:-1], -1)
        return y.split([m.out_features for m in members], dim=-1)


def sparse_kernel_calls(model: nn.Module) -> int:
    """How many kernel calls the model's SparseGroups have made (each group counted once)."""
    groups = {id(m._sparse_group): m._sparse_group for m in model.modules() if "_sparse_group" in m.__dict__}
    return sum(g.kernel_calls for g in groups.values())


def _contiguous_weights(module, state_dict, prefix, local_metadata):
    """Saved weights are standalone [out, in] tensors, not views into a group's input-major weight."""
    key = prefix + "weight"
    if key in state_dict and not state_dict[key].is_contiguous():
        state_dict[key] = state_dict[key].contiguous()


def _sparse_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A group member's forward: its slice of the group's kernel output when the group takes x, else nn.Linear's."""
    group = self._sparse_group
    if group._taken is x or group.takes(x):  # the hook or a sibling already said yes for this very tensor
        return group.output(x, self._sparse_slot)
    return nn.Linear.forward(self, x)


def _adapt_and_rehook(layer, args, kwargs):
    """Decoder-layer pre-hook: hook the Top-K onto o_proj/down_proj if a quantizer replaced them; rotate the
    stream in."""
    for group in layer._sparse_input_groups:
        _hook_input_top_k(group)
    if not hasattr(layer, "rotation_adapter"):
        return None
    if args:
        return (args[0] @ layer.rotation_adapter.to(args[0].dtype), *args[1:]), kwargs
    kwargs["hidden_states"] = kwargs["hidden_states"] @ layer.rotation_adapter.to(
        kwargs["hidden_states"].dtype
    )
    return args, kwargs


def _mask_output(norm, args, output):
    """Norm forward hook: Top-K of the normed input of q/k/v or gate/up, unless the group's kernel does it."""
    group = norm._sparse_feeds
    return output if group.takes(output) else keep_top_k(output, group.sparsity())


def _mask_input(linear, args):
    """o_proj/down_proj forward pre-hook: Top-K of their input, unless the group's kernel does it."""
    group = linear._sparse_input_group
    return args if group.takes(args[0]) else (keep_top_k(args[0], group.sparsity()), *args[1:])


def _hook_input_top_k(group: SparseGroup) -> None:
    linear = group.members()[0]
    if "_sparse_input_group" not in linear.__dict__:
        linear._sparse_input_group = group
        linear.register_forward_pre_hook(_mask_input)


def install_sparsity_hooks_(model: nn.Module) -> None:
    """Adapters and Top-K on the four inputs of every decoder layer, reading the config at call time.

    Inputs that a SparseGroup takes pass unmasked: its kernel does the Top-K itself. The hooks find their
    group through the module they sit on, so a deep copy of the model masks with its own config.
    """
    config = model.config
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        layer.input_layernorm._sparse_feeds = SparseGroup(
            attn, ("q_proj", "k_proj", "v_proj"), config, "sparsity_in"
        )
        layer.post_attention_layernorm._sparse_feeds = SparseGroup(
            mlp, ("gate_proj", "up_proj"), config, "sparsity_in"
        )
        layer._sparse_input_groups = (
            SparseGroup(attn, ("o_proj",), config, "sparsity_out"),
            SparseGroup(mlp, ("down_proj",), config, "sparsity_out"),
        )
        layer.register_forward_pre_hook(_adapt_and_rehook, with_kwargs=True)
        layer.input_layernorm.register_forward_hook(_mask_output)
        layer.post_attention_layernorm.register_forward_hook(_mask_output)
        for group in layer._sparse_input_groups:
            _hook_input_top_k(group)


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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x: [B, H, T, w] with cos/sin: [B, 1, T, w] (w = 2 x kept pairs)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def reshape_attention_(
    attn: nn.Module,
    layout: dict,
    q=None,
    k=None,
    v=None,
    o=None,
    key_projection=None,
    value_projection=None,
    exact_values=None,
) -> None:
    """Give an attention module the widths of `layout` and the forward that runs them.

    q/k/v/o: optional (weight, bias) pairs to load; otherwise the old linear if its shape fits, else a fresh one.
    key_projection: optional (basis [d, sum of key widths], mean [KV heads, d]) when layout has "k".
    value_projection: optional (basis [d, sum of value widths], mean [KV heads, d]) when layout has "v_basis":
    the value bases folded into v_proj/o_proj, kept so that presses can read full-width values (and, with
    "v_exact", the exact values' coordinates).
    exact_values: optional ((weight, bias) of v_proj, (weight, bias) of o_proj) before the fold, when layout has
    "v_exact" (the unprojected value widths per KV head): ``v_exact``/``o_exact``, which project_context_only runs
    (see "exact values after the prefill").
    """
    config, d = attn.config, attn.head_dim
    n_rep = attn.num_key_value_groups
    kw, vw = qk_widths(layout, d), list(layout["v"])
    qw = [kw[h // n_rep] for h in range(config.num_attention_heads)]
    ow = [vw[h // n_rep] for h in range(config.num_attention_heads)]
    hidden = config.hidden_size
    shapes = {
        "q_proj": (hidden, sum(qw), q),
        "k_proj": (hidden, sum(kw), k),
        "v_proj": (hidden, sum(vw), v),
        "o_proj": (sum(ow), hidden, o),
    }
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
                new.bias.data = (
                    (given_bias if given_bias is not None else torch.zeros(fan_out, device=weight.device))
                    .to(old.weight.dtype)
                    .contiguous()
                )
        new.weight.requires_grad_(old.weight.requires_grad)
        setattr(attn, name, new)
    attn.attention_layout = {key: value for key, value in layout.items()}
    attn.attention_layout["qk"] = [list(p) for p in layout["qk"]] if layout.get("qk") else None
    if layout.get("k"):
        attn.key_basis, attn.key_mean = _projection_parameters(attn, layout["k"], d, key_projection)
    if layout.get("v_basis"):
        attn.value_basis, attn.value_mean = _projection_parameters(attn, layout["v"], d, value_projection)
    elif "value_basis" in attn._parameters:  # V-O re-factored after kv-compress: the bases no longer apply
        del attn.value_basis, attn.value_mean
    if layout.get("v_basis") and layout.get("v_exact"):
        _exact_value_linears_(attn, layout["v_exact"], exact_values)
    else:
        attn._modules.pop("v_exact", None)
        attn._modules.pop("o_exact", None)
    attn._rope_index = {}
    attn.forward = types.MethodType(absorbed_attention_forward, attn)


def _exact_value_linears_(attn: nn.Module, widths: list[int], given) -> None:
    """``attn.v_exact`` [hidden -> sum of widths] and ``attn.o_exact`` [heads x widths -> hidden], both with a bias:
    `given` ((v weight, v bias), (o weight, o bias)), a bias None for zeros; else fresh, for a checkpoint to load."""
    like, n_rep = attn.q_proj.weight, attn.num_key_value_groups
    shapes = {"v_exact": (like.shape[1], sum(widths)), "o_exact": (n_rep * sum(widths), like.shape[1])}
    for (name, (fan_in, fan_out)), pair in zip(shapes.items(), given or (None, None)):
        linear = nn.Linear(fan_in, fan_out, bias=True, device=like.device, dtype=like.dtype)
        if pair is not None:
            weight, bias = pair
            linear.weight.data = weight.to(like.device, like.dtype).contiguous()
            linear.bias.data = (
                torch.zeros(fan_out, device=like.device, dtype=like.dtype)
                if bias is None
                else bias.to(like.device, like.dtype).contiguous()
            )
        linear.requires_grad_(False)
        setattr(attn, name, linear)


def _kernel_ready(x: torch.Tensor, align: int = 8) -> torch.Tensor:
    """`x` [..., w] as CUDA's fused attention kernels accept it: width, strides and offset multiples of `align`
    elements. A narrow head (odd rank, a slice of the packed cache) gets a contiguous copy zero-padded to the next
    multiple: zeros add nothing to q . k (the scaling is passed explicitly) and give zero output columns, which
    the caller cuts off. On the CPU, or when already aligned, `x` itself."""
    width = x.shape[-1]
    if not x.is_cuda or all(n % align == 0 for n in (*x.stride()[:-1], x.storage_offset(), width)):
        return x
    return torch.nn.functional.pad(x, (0, -width % align)).contiguous()


def _projection_parameters(attn: nn.Module, widths: list, d: int, given) -> tuple[nn.Parameter, nn.Parameter]:
    """A packed layer's frozen basis [d, sum(widths)] and per-head means [heads, d]: `given` (basis, mean), or zeros
    for the checkpoint's values to load into."""
    like = attn.q_proj.weight
    basis = torch.zeros(d, sum(widths), dtype=like.dtype, device=like.device)
    mean = torch.zeros(len(widths), d, dtype=like.dtype, device=like.device)
    if given is not None:
        basis, mean = (t.to(like.dtype).to(like.device).contiguous() for t in given)
    return nn.Parameter(basis, requires_grad=False), nn.Parameter(mean, requires_grad=False)


def _rope_index(attn: nn.Module, group: int, device) -> torch.Tensor | None:
    pairs = attn.attention_layout["qk"]
    if pairs is None:
        return None
    key = (group, str(device))
    if key not in attn._rope_index:
        attn._rope_index[key] = torch.tensor(rope_dims(pairs[group], attn.head_dim), device=device)
    return attn._rope_index[key]


def absorbed_attention_forward(
    self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs
):
    """Attention with per-KV-head q/k, key-cache and v widths; the cache holds [B, 1, T, sum of widths] per layer.

    While llmsurgery learns MatryoshkaKV projections it sets ``self.kv_projection`` (saved models have none): an
    object whose ``keys(g, q, k)``, ``values(g, v)`` and ``output(g, out)`` map each KV head's tensors.
    """
    found = [
        kwargs.pop(name, None) for name in ("past_key_values", "past_key_value")
    ]  # transformers 5 / 4.56 spelling
    cache = next((c for c in (cache, *found) if c is not None), None)
    projection = getattr(self, "kv_projection", None)
    batch, length = hidden_states.shape[:-1]
    n_rep, layout = self.num_key_value_groups, self.attention_layout
    kw, vw = qk_widths(layout, self.head_dim), layout["v"]
    queries, keys = self.q_proj(hidden_states), self.k_proj(hidden_states)  # [B, T, sum qw], [B, T, sum kw]
    values = self.v_proj(hidden_states).unsqueeze(1)  # [B, 1, T, sum vw]
    cos, sin = position_embeddings  # [B, T, d]
    tail = _keeps_exact_tail(self, cache, projection)
    # kv-compress --exact-values: this call's unprojected values [B, 1, T, sum of their widths]
    exact_values = self.v_exact(hidden_states).unsqueeze(1) if tail and "v_exact" in self._modules else None
    new_values, v_parts, unpack = values, None, None
    q_groups, k_groups, q_at, k_at, exact = [], [], 0, 0, []
    for g, width in enumerate(kw):
        qg = queries[..., q_at : q_at + n_rep * width].view(batch, length, n_rep, width)
        kg = keys[..., k_at : k_at + width].view(batch, length, 1, width)
        q_at, k_at = q_at + n_rep * width, k_at + width
        if hasattr(self, "q_norm"):  # qwen3 / gemma3: per-head RMSNorm before RoPE (full widths only)
            qg, kg = self.q_norm(qg), self.k_norm(kg)
        index = _rope_index(self, g, cos.device)
        c, s = (cos, sin) if index is None else (cos[..., index], sin[..., index])
        c, s = c.unsqueeze(1), s.unsqueeze(1)
        qg, kg = (
            apply_rope(qg.transpose(1, 2), c, s),
            apply_rope(kg.transpose(1, 2), c, s),
        )  # [B, n_rep, T, w], [B, 1, T, w]
        if layout.get("k"):  # MatryoshkaKV: post-RoPE keys and queries in the key basis, keys centred
            basis = self.key_basis[:, sum(layout["k"][:g]) : sum(layout["k"][: g + 1])]  # [d, r_k]
            if tail:
                exact.append((qg, kg - self.key_mean[g], basis))
            qg, kg = qg @ basis, (kg - self.key_mean[g]) @ basis
        if projection is not None:
            qg, kg = projection.keys(g, qg, kg)
        q_groups.append(qg)
        k_groups.append(kg)
    kw = [kg.shape[-1] for kg in k_groups]
    keys = torch.cat(k_groups, dim=-1)  # [B, 1, T, sum of key widths]
    prefill = False
    if cache is not None:
        close_press_views_(cache, self.layer_idx)
        layer = _cache_layer(cache, self.layer_idx) if tail else None
        before = layer.keys if layer is not None else None  # None too where the layer is made on this update
        # Positional cache_kwargs: what 4.56 names `cache_kwargs` and 5.x passes through to its cache layers.
        keys, values = cache.update(
            keys, values, self.layer_idx, {"cache_position": kwargs.get("cache_position")}
        )
        layer = _cache_layer(cache, self.layer_idx) if tail else None
        prefill = layer is not None and (before is None or before.numel() == 0)
        if layer is not None:
            q_groups, keys, kw = _with_exact_tail(self, layer, before, keys, q_groups, exact, prefill)
            if exact_values is not None:
                v_parts, unpack = _with_exact_values(self, layer, values, new_values, exact_values, prefill)
    implementation = self.config._attn_implementation
    attend = (
        eager_attention_forward
        if implementation in (None, "eager")
        else ALL_ATTENTION_FUNCTIONS[implementation]
    )
    extra = {"sliding_window": self.sliding_window} if getattr(self, "sliding_window", None) else {}
    outputs, k_at, v_at = [], 0, 0
    for g, (qg, width, v_width) in enumerate(zip(q_groups, kw, vw)):
        vg = values[..., v_at : v_at + v_width] if v_parts is None else v_parts[g]
        if projection is not None:
            vg = projection.values(g, vg)
        attended = vg.shape[-1]
        out, _ = attend(
            self,
            _kernel_ready(qg),
            _kernel_ready(keys[..., k_at : k_at + width]),
            _kernel_ready(vg),
            attention_mask,
            dropout=0.0,
            scaling=self.scaling,
            **extra,
            **kwargs,
        )  # out: [B, T, n_rep, v width (padded on CUDA)]
        out = out[..., :attended]
        if projection is not None:
            out = projection.output(g, out)
        if unpack is not None:
            out = unpack(g, out)
        outputs.append(out.reshape(batch, length, -1))
        k_at, v_at = k_at + width, v_at + v_width
    if cache is not None and self._forward_hooks and projection is None:  # a hook (kvpress) may read it
        # a prefill that attended exactly shows a press its exact keys (it then scores tokens as on the stock model)
        exact_keys = (
            torch.cat([k + self.key_mean[g] for g, (_, k, _) in enumerate(exact)], 1) if prefill else None
        )
        open_press_view_(cache, self, exact_keys)
    return (self.o_proj if v_parts is None else self.o_exact)(torch.cat(outputs, dim=-1)), None


# ----------------------------------------------------------------------------- exact keys after the prefill

# A MatryoshkaKV layer's cache stores every token's key coordinates k~ = (k - mu) B, and by default every
# attention reads projected keys, its own tokens' too. With ``project_context_only=True`` (a from_pretrained
# keyword or config.json) a layer compresses only what it caches for later, as kvpress's presses
# do: the prefill (a forward into an empty cache) attends over its own keys exactly and stores their
# coordinates; a later forward (the question, each generated token) reads the context's projected keys
# mu + k~ B^T and keeps its own tokens' keys exact, storing their residual (k - mu) - k~ B^T [d per KV head]
# beside the cache (`exact_tail_bytes`), from one attention call over [q~ | q . mu | q] x [k~ | 1 | residual,
# 0 for the context]. Values stay projected (but see --exact-values, below); a forward without a cache projects
# as by default. Projecting only the context keeps long-range recall where projecting the question's keys loses
# it (README, long-range recall). The residuals live in the cache layer's __dict__; anything else that rewrites
# the layer (a press, a reorder, a copy) starts a new tail at its current length, so a stale residual is never
# read (`copy_exact_tail_` carries it into a copy of batch rows). ``exact_recent=R`` (a from_pretrained keyword or
# config.json, with project_context_only; keys-only models) keeps the keys of the context's last R tokens exact as
# well: the prefill stores their residuals too, and so does a press's write-back of the tokens it kept (the last R
# of them), at d more elements per KV head and token. The tokens just before a question carry what reading it
# needs: projecting them lost most of the needles SmolLM2's keys-only projection lost at 2048 tokens (README,
# long-range recall).


def _keeps_exact_tail(attn: nn.Module, cache, projection) -> bool:
    """Whether this call records exact keys: a cache, a key basis, not training, not off."""
    return (
        cache is not None
        and projection is None
        and bool(attn.attention_layout.get("k"))
        and attn.config.__dict__.get("project_context_only") is True
    )


def _cache_layer(cache, index: int):
    """The cache's layer `index` if it is a transformers dynamic layer (it may not exist yet: a DynamicCache made
    without a config adds its layers on their first update), else None. A windowed one (DynamicSlidingWindowLayer,
    what DynamicCache(config=...) makes for a sliding layer) keeps only the last window - 1 tokens: once it is
    full, each later forward finds its keys moved and starts the tail anew, its own tokens exact."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    layer = layers[index] if layers is not None and index < len(layers) else None
    return layer if isinstance(layer, DynamicLayer) else None


def exact_recent(attn: nn.Module) -> int:
    """The context tokens, last first, whose keys a project_context_only layer keeps exact (``exact_recent``); 0
    in a layer folded with --exact-values, whose values' tail starts after the prefill (keys-only models)."""
    return 0 if "v_exact" in attn._modules else max(0, int(attn.config.__dict__.get("exact_recent") or 0))


def _with_exact_tail(attn, layer, before, keys, q_groups, exact, prefill: bool):
    """After the cache update: record this call's key residuals on `layer`; return the queries, keys and key
    widths of one attention call. `exact`: per KV head (query, centred key, basis) before the projection."""
    if prefill:  # the prefill attends over its own keys exactly (the scores
        # shift by q . mu, a constant per query) and leaves them projected in the cache, its last
        # exact_recent tokens' residuals beside them
        recent = min(exact_recent(attn), keys.shape[-2])
        residual = None
        if recent:
            residual = torch.cat(
                [k[..., -recent:, :] - (k[..., -recent:, :] @ b) @ b.T for _, k, b in exact], -1
            )
        layer.__dict__["_exact_tail"] = {"start": keys.shape[-2] - recent, "residual": residual, "keys": keys}
        return (
            [q for q, _, _ in exact],
            torch.cat([k for _, k, _ in exact], dim=-1),
            [q.shape[-1] for q, _, _ in exact],
        )
    state = _tail_state(layer, before)
    new = torch.cat([k - (k @ b) @ b.T for _, k, b in exact], dim=-1)  # [B, 1, T, heads x d]
    state["keys"] = keys
    # per head [B, 1, T, d]
    residual = _grown_residual(state, "residual", new, keys).split(attn.head_dim, dim=-1)
    ones = keys.new_ones(*keys.shape[:-1], 1)
    narrow = keys.split([b.shape[1] for _, _, b in exact], dim=-1)
    queries, key_parts = [], []
    for g, ((q, _, _), q_narrow) in enumerate(zip(exact, q_groups)):
        queries.append(torch.cat([q_narrow, (q * attn.key_mean[g]).sum(-1, keepdim=True), q], dim=-1))
        key_parts.append(torch.cat([narrow[g], ones, residual[g]], dim=-1))
    return queries, torch.cat(key_parts, dim=-1), [q.shape[-1] for q in queries]


# ----------------------------------------------------------------------------- exact values after the prefill

# kv-compress --exact-values keeps v_proj/o_proj as they were before the fold (``v_exact``/``o_exact``, about 10%
# more weights for SmolLM2) beside the folded ones. With project_context_only, the values then follow the keys: the
# prefill attends over its own values exactly and caches their coordinates v~ = (v - mu) B; a later forward reads
# the context's mu + v~ B^T and keeps its own tokens' values exact, storing their residual (v - mu) - v~ B^T beside
# the cache, from one attention call over values [v~ | 1 | residual, 0 for the context], whose output o maps back
# to o[:r] B^T + o[r] mu + o[r+1:] before o_exact. So the later layers see the hidden states of the stock model
# over the prefill, as with a press that projects the cache, where the folded v_proj/o_proj make the prefill
# attend over projected values (which loses long-range recall: README). A forward without a cache, or with the
# default runtime, runs the folded weights.


def _with_exact_values(attn, layer, values, new, exact, prefill: bool):
    """After the cache update and `_with_exact_tail` (which keeps the layer's tail record): per KV head, the values
    of one attention call, and a map (None: the identity) from its output [B, T, n_rep, width] to the exact head's.

    values: the cache's coordinates [B, 1, T, sum of ranks] after the update; new: this call's; exact: this call's
    unprojected values [B, 1, t, sum of widths]."""
    layout = attn.attention_layout
    widths, ranks = layout["v_exact"], layout["v"]
    full = exact.split(widths, dim=-1)
    if prefill:
        return list(full), None
    maps = [(b[:w], m[:w]) for b, m, w in zip(attn.value_basis.split(ranks, dim=1), attn.value_mean, widths)]
    state = layer.__dict__["_exact_tail"]
    residual = torch.cat(
        [x - m - c @ b.T for x, c, (b, m) in zip(full, new.split(ranks, dim=-1), maps)], dim=-1
    )
    residuals = _grown_residual(state, "v_residual", residual, values).split(widths, dim=-1)
    ones = values.new_ones(*values.shape[:-1], 1)
    parts = [torch.cat([c, ones, r], dim=-1) for c, r in zip(values.split(ranks, dim=-1), residuals)]

    def unpack(g: int, out: torch.Tensor) -> torch.Tensor:
        basis, mean = maps[g]
        r = basis.shape[1]
        return out[..., :r] @ basis.T + out[..., r : r + 1] * mean + out[..., r + 1 :]

    return parts, unpack


def _grown_residual(state: dict, name: str, new: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    """Append this call's residuals `new` [B, 1, t, w] to the tail record's `name`; return them over every token
    the layer's `cached` tensor [B, 1, T, .] holds: zeros for the tokens before the tail, [B, 1, T, w]."""
    old = state.get(name)
    state[name] = stored = new if old is None else torch.cat([old, new], dim=-2)
    lead = cached.new_zeros(*cached.shape[:-2], cached.shape[-2] - stored.shape[-2], stored.shape[-1])
    return torch.cat([lead, stored], dim=-2)


def _tail_state(layer, before: torch.Tensor) -> dict:
    """The layer's tail record for the keys it holds now (`before`): kept, cut back after a crop, or started anew
    at the current length when something else rewrote the layer."""
    state = layer.__dict__.get("_exact_tail")
    if state is None or not _continues(state["keys"], before):
        state = {"start": before.shape[-2], "residual": None}
    elif before.shape[-2] < state["keys"].shape[-2]:  # cropped (into the prefill too, before any residual)
        state["start"] = min(state["start"], before.shape[-2])
        for name in _RESIDUALS:
            if state.get(name) is not None:
                state[name] = state[name][..., : before.shape[-2] - state["start"], :]
    layer.__dict__["_exact_tail"] = state
    return state


_RESIDUALS = ("residual", "v_residual")  # a tail record's residuals: the keys', the values' (--exact-values)


def copy_exact_tail_(source, target, rows: torch.Tensor, length: int) -> None:
    """Carry `source`'s exact-key (and value) residuals over to `target`, a cache made of the batch rows `rows` of
    the first `length` tokens of each of its layers (without them, `target` would read those tokens projected)."""
    for old, new in zip(getattr(source, "layers", []), getattr(target, "layers", [])):
        state = old.__dict__.get("_exact_tail")
        if state is None or state["residual"] is None or not _continues(state["keys"], old.keys):
            continue
        start = min(state["start"], length)
        copied = {"start": start, "keys": new.keys}
        for name in _RESIDUALS:
            if state.get(name) is not None:
                copied[name] = state[name][rows.to(state[name].device), :, : length - start]
        new.__dict__["_exact_tail"] = copied


def exact_tail_bytes(cache) -> int:
    """Bytes of the exact-key and exact-value residuals a cache holds beside its packed tensors (the tokens after
    the prefill, and the context's last ``exact_recent`` ones)."""
    states = [layer.__dict__.get("_exact_tail") or {} for layer in getattr(cache, "layers", [])]
    residuals = [state.get(name) for state in states for name in _RESIDUALS]
    return sum(r.numel() * r.element_size() for r in residuals if r is not None)


def _continues(recorded: torch.Tensor, before: torch.Tensor) -> bool:
    """Whether the layer's keys are still those recorded after the last call, or a crop of them."""
    if before is recorded:
        return True
    return (
        before.data_ptr() == recorded.data_ptr()
        and before.shape[:-2] == recorded.shape[:-2]
        and before.shape[-1] == recorded.shape[-1]
        and before.shape[-2] <= recorded.shape[-2]
        and before.stride() == recorded.stride()
    )


# ----------------------------------------------------------------------------- presses on the packed cache

# Token-eviction presses (NVIDIA kvpress) read and write ``cache.layers[i].keys/.values`` as [B, KV heads, T,
# head_dim] in a forward hook after each attention module. A packed layer hands them that shape while a hook may
# run: each KV head's cached slice x~ = (x - mu) B (B: d x r with orthonormal columns) is rebuilt as
# x~ B^T + mu, and what the press writes back is projected again, (x - mu) B. For kept tokens the round trip
# gives x~ back exactly (B^T B = I) in float32, so the cache the model reads stays the narrow one (tested); in
# bf16/fp16 the full-width view is rounded to the cache's dtype, so kept rows come back within that rounding. B is the
# MatryoshkaKV key basis (value basis: stored by kv-compress since this release) or, where no basis is
# stored, the selection of the dims the head keeps (absorbed widths, kept RoPE pairs; zeros elsewhere).


def _selection(dims: list[int], d: int, like: torch.Tensor) -> torch.Tensor:
    """[d, len(dims)]: the columns of the identity at `dims` (orthonormal)."""
    basis = torch.zeros(d, len(dims), dtype=like.dtype, device=like.device)
    basis[dims, range(len(dims))] = 1
    return basis


def press_maps(attn: nn.Module, kind: str) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Per KV head of a packed attention module, (B [d, r], mean [d] or None) of its cached keys or values."""
    layout, d = attn.attention_layout, attn.head_dim
    like = attn.q_proj.weight
    if kind == "keys" and layout.get("k"):
        bases, means = attn.key_basis.split(list(layout["k"]), dim=1), list(attn.key_mean)
    elif kind == "values" and layout.get("v_basis"):
        bases, means = attn.value_basis.split(list(layout["v"]), dim=1), list(attn.value_mean)
    elif kind == "keys" and layout.get("qk"):
        bases = [_selection(rope_dims(p, d), d, like) for p in layout["qk"]]
        means = [None] * len(bases)
    else:
        widths = layout["v"] if kind == "values" else qk_widths(layout, d)
        bases, means = [_selection(list(range(w)), d, like) for w in widths], [None] * len(widths)
    return list(zip(bases, means))


class PressView:
    """The lens through which a press sees one packed cache layer: full-width reads, narrow writes.

    exact_keys [B, KV heads, T, d]: what a press reads as the layer's keys while they are the T tokens of a
    prefill that attended over them exactly (project_context_only), instead of their projection."""

    def __init__(self, attn: nn.Module, exact_keys: torch.Tensor | None = None):
        self.attn, self._maps, self.exact_keys = attn, {}, exact_keys
        self.read_exact = False  # whether the last keys read returned exact_keys

    def _maps_for(self, kind: str, device, dtype) -> list:
        if kind not in self._maps:
            self._maps[kind] = [
                (b.to(device, dtype), None if m is None else m.to(device, dtype))
                for b, m in press_maps(self.attn, kind)
            ]
        return self._maps[kind]

    def widen(self, kind: str, narrow: torch.Tensor) -> torch.Tensor:
        """[B, 1, T, sum of widths] -> [B, KV heads, T, d]: x~ B^T + mu per head (float32 or wider)."""
        exact = self.exact_keys
        if kind == "keys":
            self.read_exact = exact is not None and exact.shape[::2] == narrow.shape[::2]
            if self.read_exact:
                return exact.to(narrow.dtype)
        compute = torch.promote_types(narrow.dtype, torch.float32)
        maps = self._maps_for(kind, narrow.device, compute)
        parts = narrow[:, 0].to(compute).split([b.shape[1] for b, _ in maps], dim=-1)
        wide = [p @ b.T + (0 if m is None else m) for p, (b, m) in zip(parts, maps)]
        return torch.stack(wide, dim=1).to(narrow.dtype)

    def narrow(self, kind: str, wide: torch.Tensor) -> torch.Tensor:
        """[B, KV heads, T, d] -> [B, 1, T, sum of widths]: (x - mu) B per head."""
        compute = torch.promote_types(wide.dtype, torch.float32)
        maps = self._maps_for(kind, wide.device, compute)
        if wide.dim() != 4 or wide.shape[1] != len(maps) or wide.shape[-1] != self.attn.head_dim:
            raise ValueError(
                f"a press wrote {kind} of shape {tuple(wide.shape)}; this packed cache layer takes "
                f"[batch, {len(maps)}, tokens, {self.attn.head_dim}]"
            )
        x = wide.to(compute)
        parts = [(x[:, g] - (0 if m is None else m)) @ b for g, (b, m) in enumerate(maps)]
        return torch.cat(parts, dim=-1).unsqueeze(1).to(wide.dtype)

    def keep_recent_(self, layer, wide: torch.Tensor, narrow: torch.Tensor) -> None:
        """After a press wrote back the prefill's exact keys it kept (`wide`, stored as `narrow`): start the
        layer's exact tail at its last ``exact_recent`` tokens, their residuals against the stored coordinates
        (`_with_exact_tail`), so the press keeps them exact as the prefill did. The press must keep the tokens in
        their order (`kv_presses.make_press`, `window_safe`; kvpress's own gather them best first); where it did
        not, or wrote keys it read projected (a second press of a ComposedPress, a windowed layer), the layer keeps
        no exact tail, its tokens all projected."""
        recent = min(exact_recent(self.attn), wide.shape[-2])
        if not recent:
            return
        exact, read_exact, self.read_exact = self.exact_keys, self.read_exact, False
        if not read_exact or not _kept_in_order(exact, wide[..., -recent:, :]):
            layer.__dict__.pop("_exact_tail", None)
            return
        compute = torch.promote_types(wide.dtype, torch.float32)
        maps = self._maps_for("keys", wide.device, compute)
        coords = narrow[:, 0, -recent:].to(compute).split([b.shape[1] for b, _ in maps], dim=-1)
        x = wide[..., -recent:, :].to(compute)
        residual = [
            x[:, g] - (0 if m is None else m) - c @ b.T for g, (c, (b, m)) in enumerate(zip(coords, maps))
        ]
        tail = torch.cat(residual, dim=-1).unsqueeze(1).to(narrow.dtype)  # [B, 1, recent, KV heads x d]
        start = narrow.shape[-2] - recent
        layer.__dict__["_exact_tail"] = {"start": start, "residual": tail, "keys": narrow}


def _kept_in_order(exact: torch.Tensor, kept: torch.Tensor) -> bool:
    """Whether each row of `kept` [B, H, R, d] is a row of `exact` [B, H, T, d], in increasing order of position
    per head (so the press kept the tokens in their order, and these are its last R)."""
    x, y = exact.float(), kept.float()
    distance = (y * y).sum(-1, keepdim=True) - 2 * y @ x.transpose(-1, -2) + (x * x).sum(-1).unsqueeze(-2)
    found = distance.argmin(-1)  # [B, H, R]
    same = torch.equal(exact.gather(2, found.unsqueeze(-1).expand_as(kept)), kept)
    return same and bool((found.diff(dim=-1) > 0).all())


def _read(layer, kind: str):
    narrow, view = layer.__dict__.get("_narrow_" + kind), layer.__dict__.get("_press_view")
    return narrow if view is None or narrow is None or narrow.numel() == 0 else view.widen(kind, narrow)


def _write(layer, kind: str, value) -> None:
    view = layer.__dict__.get("_press_view")
    if view is not None and value is not None and value.numel():
        wide, value = value, view.narrow(kind, value)
        if kind == "keys":
            view.keep_recent_(layer, wide, value)
    layer.__dict__["_narrow_" + kind] = value


# Swapped in as the class of a transformers DynamicLayer of a packed cache (a subclass with these two properties
# and nothing else, so that the instance layout stays the same): keys/values read and write through the open
# PressView, and are the stored narrow tensors otherwise.
_VIEW_PROPERTIES = {
    "__slots__": (),
    "keys": property(lambda self: _read(self, "keys"), lambda self, value: _write(self, "keys", value)),
    "values": property(lambda self: _read(self, "values"), lambda self, value: _write(self, "values", value)),
}
_VIEW_CLASSES: dict[type, type] = {}


def open_press_view_(cache, attn: nn.Module, exact_keys: torch.Tensor | None = None):
    """Let the forward hooks of `attn` (kvpress presses) read its cache layer at full width until they have run.

    Called at the end of `attn`'s forward: a one-shot hook registered now runs after every hook registered
    before (torch calls them in order), closes the view and removes itself; the next forward of `attn` closes it
    too, should a hook have raised. Only transformers' dynamic layers take a view. Returns the one-shot hook's
    handle (None: no view), for a caller that runs the presses' hooks itself rather than through a forward."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    layers = getattr(cache, "layers", None)
    if layers is None or attn.layer_idx >= len(layers):
        return None
    layer = layers[attn.layer_idx]
    if type(layer) not in _VIEW_CLASSES.values():
        kind = type(layer)
        if kind not in (DynamicLayer, DynamicSlidingWindowLayer):
            return None
        if kind not in _VIEW_CLASSES:
            _VIEW_CLASSES[kind] = type("Packed" + kind.__name__, (kind,), dict(_VIEW_PROPERTIES))
        for kind_name in ("keys", "values"):
            layer.__dict__["_narrow_" + kind_name] = layer.__dict__.pop(kind_name, None)
        layer.__class__ = _VIEW_CLASSES[kind]
    layer.__dict__["_press_view"] = PressView(attn, exact_keys)

    def close(module, args, output):
        close_press_views_(cache, module.layer_idx)
        handle.remove()

    handle = attn.register_forward_hook(close)
    return handle


def close_press_views_(cache, layer_idx: int | None = None) -> None:
    """Close the views of one cache layer, or of all: reads return the narrow tensors again."""
    layers = getattr(cache, "layers", None) or []
    for layer in layers if layer_idx is None else layers[layer_idx : layer_idx + 1]:
        layer.__dict__.pop("_press_view", None)


def install_attention_layout_(model: nn.Module) -> None:
    """Rebuild every attention module at the widths in ``config.attention_layout`` (before weights load)."""
    for layer, layout in zip(model.model.layers, model.config.attention_layout):
        if layout != full_layout(model.config):
            reshape_attention_(layer.self_attn, layout)


# ----------------------------------------------------------------------------- model classes


class _SurgeryMixin:
    """Put first in the bases: builds the wrapped causal LM, then switches on what config.json asks for.

    ``from_pretrained(..., project_context_only=True, exact_recent=R)`` (kv-compress outputs): see "exact keys
    after the prefill" above; config.json may hold them too."""

    def __init__(self, config, project_context_only: bool | None = None, exact_recent: int | None = None):
        if project_context_only is not None:
            config.project_context_only = bool(project_context_only)
        if exact_recent is not None:
            if int(exact_recent) < 0:
                raise ValueError(f"exact_recent takes 0 or a number of tokens, not {exact_recent}")
            config.exact_recent = int(exact_recent)
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
