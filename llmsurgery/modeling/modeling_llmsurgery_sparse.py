"""Rotated Top-K activation sparsity at run time (LaRoSA, arXiv 2507.01299; TEAL-style magnitude).

Written next to the weights by `llmsurgery rotate-sparsify`, so that
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` runs the model without
llmsurgery installed. The rotations are already folded into the weights; at run time each decoder
layer (1) moves the residual stream from the previous layer's basis into its own with
``rotation_adapter`` (when the model is rotated), (2) keeps the ``1 - sparsity_in`` largest-magnitude
entries of the normed input to q/k/v and to gate/up, and (3) the ``1 - sparsity_out`` largest of the
inputs to o_proj and down_proj. Every token, prefill and decode. Change ``config.sparsity_in`` /
``config.sparsity_out`` (also as ``from_pretrained`` keyword arguments) to change the sparsity.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM


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


class _SparseMixin:
    """Put first in the bases: builds the wrapped causal LM, then adds adapters and hooks."""

    def __init__(self, config):
        super().__init__(config)
        if getattr(config, "rotated", False):
            add_rotation_adapters_(self)
        install_sparsity_hooks_(self)


class SparseLlamaForCausalLM(_SparseMixin, LlamaForCausalLM):
    pass


class SparseMistralForCausalLM(_SparseMixin, MistralForCausalLM):
    pass


class SparseQwen2ForCausalLM(_SparseMixin, Qwen2ForCausalLM):
    pass


class SparseQwen3ForCausalLM(_SparseMixin, Qwen3ForCausalLM):
    pass


SPARSE_CLASSES = {
    "llama": "SparseLlamaForCausalLM",
    "mistral": "SparseMistralForCausalLM",
    "qwen2": "SparseQwen2ForCausalLM",
    "qwen3": "SparseQwen3ForCausalLM",
}
