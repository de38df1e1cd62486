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

from ...arch import ArchSpec, arch_for, decoder_layers, get_submodule
from ...layer_walk import as_layers, walk_layers, watching
from ...modeling import use_surgery_modeling_
from ...modeling.modeling_llmsurgery import install_sparsity_hooks_


def normed_input_covariance(layer: nn.Module, spec: ArchSpec, run, eps: float) -> torch.Tensor:
    """Sum over the windows' tokens of n^T n, n = x / rms(x) (no norm scale) of the layer's attention input,
    float64 [D, D]; `run` sends the windows through the layer (`layer_walk`)."""
    size = get_submodule(layer, spec.attn_norm).weight.shape[0]
    cov = torch.zeros(size, size, dtype=torch.float64)

    def accumulate(x: torch.Tensor) -> None:
        x = x.double().flatten(0, -2)  # x: [B*T, D]
        n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        cov.add_((n.T @ n).cpu())

    with watching(get_submodule(layer, spec.attn_norm), accumulate):
        run()
    return cov


@torch.no_grad()
def normed_input_covariances(model, batches: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, `normed_input_covariance` over the batches (the model unchanged)."""
    layers = as_layers(model)
    eps, covs = layers.config.rms_norm_eps, []
    walk_layers(
        layers,
        batches,
        lambda i, layer, run: covs.append(normed_input_covariance(layer, layers.spec, run, eps)),
        "Collecting covariances",
        keep_embedding=True,
    )
    return covs


def principal_rotation(cov: torch.Tensor, damp: float) -> torch.Tensor:
    """Eigenvectors of the damped covariance, by descending eigenvalue (float64 [D, D], orthogonal)."""
    damped = cov.double().clone()
    damped.diagonal().add_(damp * cov.diagonal().double().mean())
    values, vectors = torch.linalg.eigh(damped)
    del damped
    return vectors[:, values.argsort(descending=True)]


# Rows (or columns) of a weight folded at a time: whole float64 copies of 7B-sized matrices are large.
FOLD_ROWS = 4096


def folded_input(
    weight: torch.Tensor,
    scale: torch.Tensor | None = None,
    q: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """W' with x' W'^T = x W^T for x' = x Q, the norm scale fused first: ((W * scale) cast back) Q, cast back.

    Row block by row block (FOLD_ROWS) in float64, so no whole float64 copy of W exists; every fold goes
    through here, in memory and streamed alike, so both give the same bits. `out=weight` folds in place.
    """
    out = torch.empty_like(weight) if out is None else out
    q = None if q is None else q.to(weight.device)
    scale = None if scale is None else scale.to(weight.device)
    for start in range(0, weight.shape[0], FOLD_ROWS):
        block = weight[start : start + FOLD_ROWS]
        if scale is not None:
            block = (block.double() * scale).to(weight.dtype)
        if q is not None:
            block = (block.double() @ q).to(weight.dtype)
        out[start : start + FOLD_ROWS] = block
    return out


def folded_output(weight: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """W' = Q^T W (outputs in the basis Q), column block by column block (FOLD_ROWS) in float64."""
    out = torch.empty_like(weight)
    qt = q.to(weight.device).T
    for start in range(0, weight.shape[1], FOLD_ROWS):
        out[:, start : start + FOLD_ROWS] = (qt @ weight[:, start : start + FOLD_ROWS].double()).to(
            weight.dtype
        )
    return out


def _norm_scale_(norm: nn.Module, offset: float) -> torch.Tensor:
    """The norm's (offset + gamma) in float64; the norm becomes scale-free."""
    scale = offset + norm.weight.double()
    norm.weight.data.fill_(1.0 - offset)
    return scale


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
def fold_layer_(
    layer: nn.Module, spec: ArchSpec, q: torch.Tensor | None, previous: torch.Tensor | None
) -> None:
    """One decoder layer: norm scales into the linears that read them; with Q_l, the layer in its own basis.

    q/k/v and gate/up read inputs in basis Q_l (``(W * gamma) Q_l``), o_proj and down_proj write outputs in it
    (``Q_l^T W``, ``b Q_l``), and the adapter ``Q_{l-1}^T Q_l`` moves the incoming stream (basis Q_{l-1}, or
    Q_0 from the embedding for the first layer: previous=None).
    """
    q = None if q is None else q.to(layer.rotation_adapter.device)  # the rotations are computed on the CPU
    for norm, readers in (
        (spec.attn_norm, (spec.q_proj, spec.k_proj, spec.v_proj)),
        (spec.mlp_norm, (spec.gate_proj, spec.up_proj)),
    ):
        scale = _norm_scale_(get_submodule(layer, norm), spec.norm_weight_offset)
        for path in readers:
            linear = get_submodule(layer, path)
            linear.weight.data = folded_input(linear.weight.data, scale, q)
    if q is None:
        return
    for path in (spec.o_proj, spec.down_proj):
        linear = get_submodule(layer, path)
        linear.weight.data = folded_output(linear.weight.data, q)
        if linear.bias is not None:
            linear.bias.data = (linear.bias.double() @ q.to(linear.bias.device)).to(linear.bias.dtype)
    previous = q if previous is None else previous.to(q.device)
    layer.rotation_adapter.data = (previous.T @ q).to(layer.rotation_adapter.dtype)


@torch.no_grad()
def fold_head(
    head: torch.Tensor, final_norm: nn.Module, spec: ArchSpec, last: torch.Tensor | None
) -> torch.Tensor:
    """The LM head with the final norm's scale and Q_{L-1}^T folded in; the norm becomes scale-free."""
    return folded_input(head, _norm_scale_(final_norm, spec.norm_weight_offset), last)


def layer_sparsity_weights(layer: nn.Module, spec: ArchSpec, cfg) -> tuple[float, int]:
    """(sum of sparsity x parameters, parameters) over the linears of one layer that read sparse inputs."""
    weighted = total = 0
    for paths, s in (
        ((spec.q_proj, spec.k_proj, spec.v_proj, spec.gate_proj, spec.up_proj), cfg.sparsity_in),
        ((spec.o_proj, spec.down_proj), cfg.sparsity_out),
    ):
        n = sum(get_submodule(layer, p).weight.numel() for p in paths)
        weighted += s * n
        total += n
    return weighted, total


def effective_sparsity(model: nn.Module, cfg) -> float:
    """Model-level sparsity: each input's sparsity weighted by the parameters it feeds."""
    spec = arch_for(model)
    parts = [layer_sparsity_weights(layer, spec, cfg) for layer in decoder_layers(model)]
    return sum(w for w, _ in parts) / sum(n for _, n in parts)


def explained_top_half(cov: torch.Tensor) -> float:
    return float(torch.linalg.eigvalsh(cov).flip(0)[: cov.shape[0] // 2].sum() / cov.trace())


def sparse_config_(config, cfg, rotated: bool) -> None:
    """What the saved model's runtime reads: input sparsities, the rotation flag, the sparse decode path."""
    config.sparsity_in, config.sparsity_out = cfg.sparsity_in, cfg.sparsity_out
    config.rotated = rotated
    # one-token CPU decoding through the sparse kernel; from_pretrained(..., sparse_decode=False) turns it off
    config.sparse_decode = True
    config.tie_word_embeddings = False
    use_surgery_modeling_(config)


def add_rotation_adapter_(layer: nn.Module, size: int) -> None:
    """The layer's [D, D] `rotation_adapter` (identity until folded), in the layer's dtype and on its device."""
    like = next(layer.parameters())
    layer.register_parameter(
        "rotation_adapter",
        nn.Parameter(torch.eye(size, dtype=like.dtype, device=like.device), requires_grad=False),
    )


@torch.no_grad()
def rotate_layers_(layers, batches: torch.Tensor | None, cfg, writer=None) -> tuple[dict, dict]:
    """Rotate and fold every decoder layer (in memory or streamed, `layer_walk`); (report, Q_{L-1}).

    Q_l comes from the normed inputs of layer l summed over the windows; the windows go on through the original
    layer, then the layer is folded (norm scales, and with Q_l its own basis) and, with a `writer`, written.
    `cfg`: the pass's settings (method, damp, sparsity_in, sparsity_out). Returns (report, {"first": Q_0, "previous":
    Q_{L-1}}), the rotations the embedding and the head take (None: not rotated).
    """
    spec, config = layers.spec, layers.config
    eps, size = config.rms_norm_eps, config.hidden_size
    explained, totals, rotations = [], [0.0, 0], {"first": None, "previous": None}
    batches = batches if cfg.method == "larosa" else None  # magnitude: Q = I, no statistics

    def visit(i: int, layer: nn.Module, run) -> None:
        q = None
        if batches is not None:
            cov = normed_input_covariance(layer, spec, run, eps)
            q = principal_rotation(cov, cfg.damp)
            explained.append(explained_top_half(cov))
            del cov
            add_rotation_adapter_(layer, size)
        weighted, total = layer_sparsity_weights(layer, spec, cfg)
        totals[0], totals[1] = totals[0] + weighted, totals[1] + total
        fold_layer_(layer, spec, q, rotations["previous"])
        rotations["first"] = q if i == 0 else rotations["first"]
        rotations["previous"] = q

    walk_layers(layers, batches, visit, "Rotate-sparsify", writer, keep_embedding=True)
    report = {
        "sparsity_in": cfg.sparsity_in,
        "sparsity_out": cfg.sparsity_out,
        "effective_sparsity": totals[0] / totals[1],
        "rotated": rotations["first"] is not None,
    }
    if batches is not None:
        report |= {"explained_top_half": explained, "calibration_tokens": int(batches.numel())}
    return report, rotations


@torch.no_grad()
def rotate_sparsify_(model: nn.Module, batches: torch.Tensor | None, cfg) -> dict:
    """Fold (rotations +) norms into `model`, make it a sparse model in place; returns the report."""
    spec = arch_for(model)
    report, rotations = rotate_layers_(as_layers(model), batches, cfg)
    head = _untie_lm_head_(model, spec)
    head.weight.data = fold_head(
        head.weight.data, get_submodule(model, spec.final_norm), spec, rotations["previous"]
    )
    if rotations["first"] is not None:
        embed = get_submodule(model, spec.embed)
        embed.weight.data = folded_input(embed.weight.data, q=rotations["first"])
    sparse_config_(model.config, cfg, report["rotated"])
    install_sparsity_hooks_(model)
    return report


@torch.no_grad()
def streamed_rotate_sparsify(streamed, batches: torch.Tensor | None, cfg, writer=None) -> dict:
    """`rotate_sparsify_` one decoder layer in memory at a time (`streaming.StreamedModel`); returns the report.

    With a `writer`, each folded layer is written when it is done, then the head (norm scale and Q_{L-1}^T
    folded in, from the embedding when tied), the scale-free final norm and the embedding (times Q_0).
    """
    spec = streamed.spec
    report, rotations = rotate_layers_(streamed, batches, cfg, writer)
    if writer is None:
        return report
    # The head first (from the embedding when tied), written and freed; then the embedding folded in place.
    embed = get_submodule(streamed.base, spec.embed.split(".", 1)[1]).weight.data  # in the compute dtype
    head_name = spec.lm_head + ".weight"
    head = streamed.ckpt.get(head_name).to(streamed.dtype) if head_name in streamed.ckpt.weight_map else embed
    norm = get_submodule(streamed.base, spec.final_norm.split(".", 1)[1])
    writer.add(head_name, fold_head(head, norm, spec, rotations["previous"]))
    writer.add(spec.final_norm + ".weight", norm.weight.data)
    writer.flush()
    del head
    first = rotations["first"]
    writer.add(spec.embed + ".weight", embed if first is None else folded_input(embed, q=first, out=embed))
    sparse_config_(streamed.config, cfg, first is not None)
    return report
