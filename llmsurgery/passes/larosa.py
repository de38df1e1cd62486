"""LaRoSA: layerwise orthogonal rotations + per-token Top-K activation sparsity (arXiv 2507.01299).

Per decoder layer l, Q_l holds the eigenvectors (descending eigenvalues, float64 ``eigh`` with damping)
of the calibration covariance of the layer's normed attention input ``x / rms(x)``. The rotations
are folded into the weights (the deployable form):

* each RMSNorm scale is fused into the linears that read it, so the norm is scale-free and commutes
  with Q_l;
* the residual stream inside layer l is carried in the basis Q_l: q/k/v and gate/up read rotated
  inputs (``W Q_l``), o_proj and down_proj write rotated outputs (``Q_l^T W``);
* a ``rotation_adapter`` ``Q_{l-1}^T Q_l`` moves the stream between layers; the embedding absorbs
  Q_0, the (untied) LM head absorbs the final norm scale and Q_{L-1}^T.

At run time (``modeling/modeling_llmsurgery.py``) the normed inputs of q/k/v and gate/up keep
their largest ``1 - s_in`` entries in the rotated basis; the inputs of o_proj and down_proj (not
rotated: GQA mixes heads, silu(g)*u does not commute) keep their largest ``1 - s_out`` by
magnitude. Selection is on ``(x / rms) Q`` (folded form), not on ``(gamma x / rms) Q`` as the
released code's simulation does. ``method=magnitude`` folds the norms but uses Q = I (TEAL-style
baseline). Exact at sparsity 0 (up to float32 rounding); lossy above.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..arch import ArchSpec, arch_for, decoder_layers, get_submodule
from ..calibration import observe_inputs
from ..modeling import use_surgery_modeling_
from ..modeling.modeling_llmsurgery import add_rotation_adapters_, install_sparsity_hooks_
from .rotate_sparsify import RotateSparsify, check_foldable


@torch.no_grad()
def normed_input_covariances(model: nn.Module, batches: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, sum over calibration tokens of n^T n with n = x / rms(x) (no norm scale), float64 [D, D]."""
    layers = decoder_layers(model)
    covs = [
        torch.zeros(model.config.hidden_size, model.config.hidden_size, dtype=torch.float64) for _ in layers
    ]
    eps = model.config.rms_norm_eps

    def accumulate(i: int, x: torch.Tensor) -> None:
        x = x.double().flatten(0, -2)  # x: [B*T, D]
        n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        covs[i] += (n.T @ n).cpu()

    norms = [get_submodule(layer, arch_for(model).attn_norm) for layer in layers]
    observe_inputs(model, batches, norms, accumulate, "Collecting covariances")
    return covs


def principal_rotation(cov: torch.Tensor, damp: float) -> torch.Tensor:
    """Eigenvectors of the damped covariance, by descending eigenvalue (float64 [D, D], orthogonal)."""
    cov = cov.double()
    cov = cov + damp * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
    values, vectors = torch.linalg.eigh(cov)
    return vectors[:, values.argsort(descending=True)]


def _set_weight_(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    linear.weight.data = weight.to(linear.weight.dtype).contiguous()
    if bias is not None:
        linear.bias.data = bias.to(linear.bias.dtype).contiguous()


def fuse_norm_into_linears_(norm: nn.Module, linears: list[nn.Linear], offset: float = 0.0) -> None:
    """Scale the inputs of `linears` by the norm's (offset + gamma); the norm becomes scale-free."""
    scale = offset + norm.weight.double()
    for linear in linears:
        _set_weight_(linear, linear.weight.double() * scale)
    norm.weight.data.fill_(1.0 - offset)


def rotate_input_(linear: nn.Linear, q: torch.Tensor) -> None:
    """y = (x Q) W'^T equals x W^T: W' = W Q."""
    _set_weight_(linear, linear.weight.double() @ q)


def rotate_output_(linear: nn.Linear, q: torch.Tensor) -> None:
    """y' = y Q: W' = Q^T W, b' = b Q."""
    bias = linear.bias.double() @ q if linear.bias is not None else None
    _set_weight_(linear, q.T @ linear.weight.double(), bias)


def _untie_lm_head_(model: nn.Module, spec: ArchSpec) -> nn.Linear:
    head = get_submodule(model, spec.lm_head)
    embed = get_submodule(model, spec.embed)
    if head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr():
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = None
    return head


@torch.no_grad()
def fold_rotations_(model: nn.Module, rotations: list[torch.Tensor] | None) -> None:
    """Fuse norm scales and fold per-layer rotations into the weights (rotations=None: norms only)."""
    spec = arch_for(model)
    layers = decoder_layers(model)
    head = _untie_lm_head_(model, spec)
    fuse_norm_into_linears_(get_submodule(model, spec.final_norm), [head], spec.norm_weight_offset)
    for i, layer in enumerate(layers):
        # Step 1: norm scales into the linears that read the normed stream.
        readers_attn = [get_submodule(layer, p) for p in (spec.q_proj, spec.k_proj, spec.v_proj)]
        readers_mlp = [get_submodule(layer, p) for p in (spec.gate_proj, spec.up_proj)]
        fuse_norm_into_linears_(get_submodule(layer, spec.attn_norm), readers_attn, spec.norm_weight_offset)
        fuse_norm_into_linears_(get_submodule(layer, spec.mlp_norm), readers_mlp, spec.norm_weight_offset)
        if rotations is None:
            continue
        q = rotations[i]  # [D, D]
        # Step 2: readers take inputs in basis Q_l, writers emit outputs in basis Q_l.
        for linear in readers_attn + readers_mlp:
            rotate_input_(linear, q)
        for path in (spec.o_proj, spec.down_proj):
            rotate_output_(get_submodule(layer, path), q)
        # Step 3: the adapter moves the incoming stream (basis Q_{l-1}, or Q_0 from the embedding).
        previous = rotations[i - 1] if i else q
        layer.rotation_adapter.data = (previous.T @ q).to(layer.rotation_adapter.dtype)
    if rotations is not None:
        embed = get_submodule(model, spec.embed)
        embed.weight.data = (embed.weight.double() @ rotations[0]).to(embed.weight.dtype)
        rotate_input_(head, rotations[-1])


def effective_sparsity(model: nn.Module, cfg: RotateSparsify) -> float:
    """Model-level sparsity: each input's sparsity weighted by the parameters it feeds."""
    spec = arch_for(model)
    weighted = total = 0
    for layer in decoder_layers(model):
        for paths, s in (
            ((spec.q_proj, spec.k_proj, spec.v_proj, spec.gate_proj, spec.up_proj), cfg.sparsity_in),
            ((spec.o_proj, spec.down_proj), cfg.sparsity_out),
        ):
            n = sum(get_submodule(layer, p).weight.numel() for p in paths)
            weighted += s * n
            total += n
    return weighted / total


def rotate_sparsify_(model: nn.Module, batches: torch.Tensor | None, cfg: RotateSparsify) -> dict:
    """Fold (rotations +) norms into `model`, make it a sparse model in place; returns the report."""
    check_foldable(model.config.model_type)
    report: dict = {}
    rotations = None
    if cfg.method == "larosa":
        covs = normed_input_covariances(model, batches)
        rotations = [principal_rotation(c, cfg.damp) for c in covs]
        add_rotation_adapters_(model)
        tokens = int(batches.numel())
        report["explained_top_half"] = [
            float(torch.linalg.eigvalsh(c).flip(0)[: c.shape[0] // 2].sum() / c.trace()) for c in covs
        ]
        report["calibration_tokens"] = tokens
    fold_rotations_(model, rotations)
    config = model.config
    config.sparsity_in, config.sparsity_out = cfg.sparsity_in, cfg.sparsity_out
    config.rotated = rotations is not None
    # one-token CPU decoding through the sparse kernel; from_pretrained(..., sparse_decode=False) turns it off
    config.sparse_decode = True
    use_surgery_modeling_(config)
    install_sparsity_hooks_(model)
    report |= {
        "sparsity_in": cfg.sparsity_in,
        "sparsity_out": cfg.sparsity_out,
        "effective_sparsity": effective_sparsity(model, cfg),
        "rotated": config.rotated,
    }
    return report
