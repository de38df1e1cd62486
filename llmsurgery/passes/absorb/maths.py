"""Absorb-Decompose of attention (CLOVER, arXiv 2411.17426): drop redundant V-O directions per KV head.

V-O, per decoder layer and KV head g (GQA done jointly): the value weights ``A_g`` [D, d] and the
o_proj slices ``B_h`` [d, D] of the n_rep query heads reading g form one product
``A_g [B_h1 ... B_hn]`` of rank <= d. It is re-factored through an SVD of ``L^T A_g`` (thin, [D, d])
and an SVD of the small ``Sigma W^T [B_h...]`` ([d, n_rep D]), in float64, never forming D x D
products; the singular values are split as sqrt(S) across both sides (no transfer matrix). ``L`` is
the Cholesky factor of the damped calibration covariance of the v_proj input (``whitened``, SVD-LLM
style, so the truncation error is measured on real activations) or the identity (``weight``: CLOVER's
weight-only SVD). The new value weights are ``A_g W Sigma^-1 U_r sqrt(S_r)``, so they stay in the
span of the old ones. Biases of v_proj ride along as an extra input row. Keeping every direction of
nonzero singular value is exact (up to float rounding); dropping the weakest ones is lossy. Widths
may differ per KV head and layer; the K/V cache shrinks with them.

``norm`` is the vanilla baseline of the paper: keep the V dims with the largest ``|A col| |B row|``
products, without absorbing.

Q-K: every architecture here applies RoPE between q/k and their product, so Q-K cannot be absorbed.
Only transformations that commute with RoPE are allowed; ``pairs=qk`` drops whole RoPE frequency pairs
per KV head (and from all query heads that read it), ranked by ``|k_f| sum_h |q_h,f|`` (activation
norms under ``whitened``, weight norms otherwise). This is lossy even at full rank of nothing: it is
labelled so. Models with per-head q/k norms (qwen3, gemma3) are refused for qk.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ...arch import ArchSpec, get_submodule
from ...errors import UserError
from ...layer_walk import as_layers, walk_layers, watching
from ...modeling import use_surgery_modeling_
from ...modeling.modeling_llmsurgery import full_layout, qk_widths, reshape_attention_

EXACT_RTOL = 1e-5  # singular values below this fraction of the largest count as zero (float32 weights)


@dataclass(frozen=True)
class Truncation:
    """What absorb keeps (the `absorb` pass's knobs; its config carries the same names): no knob keeps every
    direction of nonzero singular value (exact)."""

    threshold: float | None = None
    keep_ratio: float | None = None
    rank: int | None = None
    pairs: tuple[str, ...] = ("vo",)
    criterion: str = "whitened"
    damp: float = 0.01

    @property
    def exact(self) -> bool:
        return self.threshold is None and self.keep_ratio is None and self.rank is None


def kept_count(scores: torch.Tensor, current: int, cfg, per: int = 1) -> int:
    """How many of `scores` (descending) to keep: the knob, never past the numerical rank, at least one.

    per: dims per scored item (2 for frequency pairs, so that `rank` counts dims).
    """
    nonzero = int((scores > EXACT_RTOL * scores[0]).sum()) if scores[0] > 0 else 0
    if cfg.rank is not None:
        wanted = cfg.rank // per
    elif cfg.keep_ratio is not None:
        wanted = round(cfg.keep_ratio * current)
    elif cfg.threshold is not None:
        wanted = int((scores >= cfg.threshold * scores[0]).sum())
    else:
        wanted = nonzero
    return max(1, min(wanted, nonzero, len(scores)))


def v_input_covariance(layer: nn.Module, spec: ArchSpec, run) -> torch.Tensor:
    """The mean of [x, 1]^T [x, 1] over the windows' tokens of the layer's v_proj input x, float64 [D+1, D+1];
    `run` sends the windows through the layer (`layer_walk`)."""
    size = get_submodule(layer, spec.v_proj).weight.shape[1] + 1
    total, count = torch.zeros(size, size, dtype=torch.float64), 0

    def accumulate(x: torch.Tensor) -> None:
        nonlocal total, count
        x = x.double().flatten(0, -2)  # x: [B*T, D]
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)  # [B*T, D+1]
        total += (x.T @ x).cpu()
        count += x.shape[0]

    with watching(get_submodule(layer, spec.v_proj), accumulate):
        run()
    return total / max(count, 1)


@torch.no_grad()
def v_input_covariances(model, batches: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, `v_input_covariance` over the batches (the model unchanged)."""
    layers, covs = as_layers(model), []
    walk_layers(
        layers,
        batches,
        lambda i, layer, run: covs.append(v_input_covariance(layer, layers.spec, run)),
        "Collecting covariances",
    )
    return covs


def whitening_factor(cov: torch.Tensor, damp: float) -> torch.Tensor:
    """Lower-triangular L with L L^T = cov + damp * mean(diag) * I (float64)."""
    cov = cov.double()
    extra = damp * cov.diagonal().mean()
    for _ in range(6):
        damped = cov.clone()  # the damping on the diagonal only (no D x D identity beside it)
        damped.diagonal().add_(extra)
        factor, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            return factor
        extra = max(float(extra) * 10, 1e-10 * float(cov.diagonal().mean()) + 1e-12)
    raise UserError("the calibration covariance is singular; raise --damp")


def absorb_vo_group(a: torch.Tensor, b: torch.Tensor, chol: torch.Tensor | None):
    """Exact re-factorisation of the product a @ b, ordered by (whitened) singular value.

    a: [Din, w] value weights (transposed, + bias row), b: [w, n_rep * D] o_proj rows of the heads.
    Returns (s [k], left [Din, k], right [k, n_rep * D]) with left @ right == a @ b (k = numerical rank).
    """
    la = a if chol is None else chol.T @ a  # [Din, w]
    _, sig, wt = torch.linalg.svd(la, full_matrices=False)  # sig: [w], wt: [w, w]
    k = int((sig > 1e-12 * sig[0]).sum()) if sig[0] > 0 else 0
    if k == 0:
        return (
            torch.zeros(1, dtype=a.dtype),
            torch.zeros(a.shape[0], 1, dtype=a.dtype),
            torch.zeros(1, b.shape[1], dtype=a.dtype),
        )
    core = sig[:k, None] * (wt[:k] @ b)  # [k, n_rep * D]: the product in the whitened, orthonormal basis
    u, s, vt = torch.linalg.svd(core, full_matrices=False)  # u: [k, k], s: [k], vt: [k, n_rep * D]
    root = s.sqrt()
    left = (a @ wt[:k].T / sig[:k]) @ u * root  # [Din, k], in span(a)
    right = root[:, None] * vt  # [k, n_rep * D]
    return s, left, right


def vanilla_vo_group(a: torch.Tensor, b: torch.Tensor):
    """The no-absorb baseline: the V dims themselves, ordered by |a col| x |b row|."""
    scores = a.norm(dim=0) * b.norm(dim=1)  # [w]
    order = scores.argsort(descending=True)
    return scores[order], a[:, order], b[order]


@dataclass
class LayerPlan:
    """New q/k/v/o weights (as (weight, bias)) of one layer, its new layout and what the table shows."""

    layout: dict
    weights: dict = field(default_factory=dict)
    spectra: list = field(default_factory=list)  # per KV head, the scores that ranked its V directions
    pair_scores: list = field(default_factory=list)  # per KV head, the frequency-pair importances


def _linear_parts(linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    return (
        linear.weight.detach().double().cpu(),
        None if linear.bias is None else linear.bias.detach().double().cpu(),
    )


def plan_vo(
    attn: nn.Module,
    layout: dict,
    cov: torch.Tensor | None,
    cfg,
    plan: LayerPlan,
    widths_wanted: list[int] | None = None,
) -> None:
    """Decompose every KV head's V-O product and keep the directions the knob (or `widths_wanted`) asks for."""
    n_rep = attn.num_key_value_groups
    wv, bv = _linear_parts(attn.v_proj)
    wo, bo = _linear_parts(attn.o_proj)
    chol = None
    if cfg.criterion == "whitened":
        chol = whitening_factor(cov if bv is not None else cov[:-1, :-1], cfg.damp)
    head_widths = [layout["v"][h // n_rep] for h in range(len(layout["v"]) * n_rep)]
    head_starts = [sum(head_widths[:h]) for h in range(len(head_widths))]
    new_v, new_vb, new_o_cols, widths = [], [], [None] * len(head_widths), []
    row = 0
    for g, width in enumerate(layout["v"]):
        a = wv[row : row + width].T  # [D, w]
        if bv is not None:
            a = torch.cat([a, bv[None, row : row + width]], dim=0)  # [D+1, w]
        row += width
        heads = range(g * n_rep, (g + 1) * n_rep)
        b = torch.cat(
            [wo[:, head_starts[h] : head_starts[h] + width].T for h in heads], dim=1
        )  # [w, n_rep*D]
        s, left, right = vanilla_vo_group(a, b) if cfg.criterion == "norm" else absorb_vo_group(a, b, chol)
        r = kept_count(s, width, cfg) if widths_wanted is None else min(widths_wanted[g], len(s))
        plan.spectra.append([float(x) for x in s])
        widths.append(r)
        new_v.append(left[: wv.shape[1], :r].T)  # [r, D]
        if bv is not None:
            new_vb.append(left[-1, :r])
        for j, h in enumerate(heads):
            new_o_cols[h] = right[:r, j * wo.shape[0] : (j + 1) * wo.shape[0]].T  # [D, r]
    plan.layout["v"] = widths
    plan.layout.pop("v_basis", None)  # new value coordinates: kv-compress's value bases no longer apply
    plan.layout.pop("v_exact", None)  # nor its unprojected v_proj/o_proj (--exact-values)
    plan.weights["v"] = (torch.cat(new_v), torch.cat(new_vb) if bv is not None else None)
    plan.weights["o"] = (torch.cat(new_o_cols, dim=1), bo)


def _row_energy(w: torch.Tensor, cov: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """Per output row of a linear, E[(x w + b)^2] under cov (or |w|^2 with cov None)."""
    if cov is None:
        return w.pow(2).sum(1)
    if bias is not None:
        w = torch.cat([w, bias[:, None]], dim=1)
    else:
        cov = cov[:-1, :-1]
    return ((w @ cov) * w).sum(1).clamp_min(0)


def plan_qk(attn: nn.Module, layout: dict, cov: torch.Tensor | None, cfg, plan: LayerPlan) -> None:
    """Drop whole RoPE frequency pairs per KV head (from its key and from the queries that read it). Lossy."""
    d, n_rep = attn.head_dim, attn.num_key_value_groups
    wq, bq = _linear_parts(attn.q_proj)
    wk, bk = _linear_parts(attn.k_proj)
    cov = cov if cfg.criterion == "whitened" else None
    eq, ek = _row_energy(wq, cov, bq), _row_energy(wk, cov, bk)  # per output dim
    widths = qk_widths(layout, d)
    current = layout["qk"] or [list(range(d // 2))] * len(widths)
    q_widths = [widths[h // n_rep] for h in range(len(widths) * n_rep)]
    q_starts = [sum(q_widths[:h]) for h in range(len(q_widths))]
    q_rows, k_rows, kept_pairs = [], [], []
    k_at = 0
    for g, (width, pairs) in enumerate(zip(widths, current)):
        m = width // 2  # dims f and f + m of this head hold frequency pair f (rotate-half layout)
        pair_norm = lambda e, at: (e[at : at + m] + e[at + m : at + width]).sqrt()  # noqa: E731  [m]
        heads = [q_starts[h] for h in range(g * n_rep, (g + 1) * n_rep)]
        scores = pair_norm(ek, k_at) * sum(pair_norm(eq, at) for at in heads)  # [m]: |k_f| x sum_h |q_h,f|
        order = scores.argsort(descending=True)
        keep = order[: kept_count(scores[order], m, cfg, per=2)].sort().values
        plan.pair_scores.append([float(x) for x in scores[order]])
        kept_pairs.append([pairs[i] for i in keep.tolist()])
        dims = torch.cat([keep, keep + m])
        k_rows.append(k_at + dims)
        q_rows += [at + dims for at in heads]
        k_at += width
    k_index, q_index = torch.cat(k_rows), torch.cat(q_rows)
    plan.layout["qk"] = kept_pairs
    plan.weights["q"] = (wq[q_index], None if bq is None else bq[q_index])
    plan.weights["k"] = (wk[k_index], None if bk is None else bk[k_index])


def attention_parameters(attn: nn.Module) -> int:
    return sum(
        p.numel()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj")
        for p in getattr(attn, name).parameters()
    )


def _planned_parameters(attn: nn.Module, plan: LayerPlan) -> int:
    total = 0
    for key, name in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj")):
        if key in plan.weights:
            weight, bias = plan.weights[key]
            total += weight.numel() + (0 if bias is None else bias.numel())
        else:
            total += sum(p.numel() for p in getattr(attn, name).parameters())
    return total


def absorb_layer_(
    attn: nn.Module,
    layout: dict,
    cov: torch.Tensor | None,
    cfg,
    index: int,
    apply: bool = True,
    v_widths: list[int] | None = None,
) -> tuple[dict, dict]:
    """Plan (and with apply, perform) absorb-decompose on one attention module: (report row, its new layout)."""
    plan = LayerPlan(layout=dict(layout, v=list(layout["v"])))
    if "vo" in cfg.pairs:
        plan_vo(attn, layout, cov, cfg, plan, v_widths)
    if "qk" in cfg.pairs:
        plan_qk(attn, layout, cov, cfg, plan)
    d = attn.head_dim
    row = {
        "layer": index,
        "v_before": list(layout["v"]),
        "v_after": list(plan.layout["v"]),
        "qk_before": qk_widths(layout, d),
        "qk_after": qk_widths(plan.layout, d),
        "params_before": attention_parameters(attn),
        "params_after": _planned_parameters(attn, plan),
        "spectra": [[float(f"{x:.4g}") for x in s] for s in plan.spectra],
        "pair_scores": [[float(f"{x:.4g}") for x in s] for s in plan.pair_scores],
    }
    if apply:
        reshape_attention_(attn, plan.layout, **plan.weights)
    return row, plan.layout


def absorb_report(rows: list[dict], cfg) -> dict:
    before, after = sum(r["params_before"] for r in rows), sum(r["params_after"] for r in rows)
    return {
        "layers": rows,
        "attention_params_before": before,
        "attention_params_after": after,
        "attention_reduction": 1 - after / before,
        "exact": cfg.exact and "qk" not in cfg.pairs and cfg.criterion != "norm",
        "lossy_qk": "qk" in cfg.pairs,
    }


@torch.no_grad()
def absorb_decompose_(
    model,
    cfg,
    *,
    batches: torch.Tensor | None = None,
    covs: list[torch.Tensor] | None = None,
    apply: bool = True,
    v_widths: list[list[int]] | None = None,
    writer=None,
) -> dict:
    """Plan (and with apply, perform) absorb-decompose on every layer of `model` (in memory, or a
    `streaming.StreamedModel` written by `writer`); returns the report.

    The v_proj input covariance of layer l comes from `covs`, else from the `batches` passing through the
    original layer (`layer_walk`); `cfg` is a `Truncation` or the pass's config. v_widths: per layer and KV
    head, V widths to keep instead of the knob's (to compare criteria at equal widths).
    """
    layers = as_layers(model)
    spec, config = layers.spec, layers.config
    layouts = getattr(config, "attention_layout", None) or [full_layout(config)] * layers.n_layers
    rows, new_layouts = [], []

    def visit(i: int, layer: nn.Module, run) -> None:
        cov = covs[i] if covs is not None else None
        if batches is not None and covs is None:
            cov = v_input_covariance(layer, spec, run)
        attn = get_submodule(layer, spec.attn)
        layout = getattr(attn, "attention_layout", None) or layouts[i]
        row, new_layout = absorb_layer_(
            attn, layout, cov, cfg, i, apply, None if v_widths is None else v_widths[i]
        )
        rows.append(row)
        new_layouts.append(new_layout)

    walk_layers(layers, batches if covs is None else None, visit, "Absorb-decompose", writer)
    if apply:
        config.attention_layout = new_layouts
        use_surgery_modeling_(config)
    report = absorb_report(rows, cfg)
    if batches is not None:
        report["calibration_tokens"] = int(batches.numel())
    return report
