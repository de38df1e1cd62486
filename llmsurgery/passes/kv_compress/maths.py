"""MatryoshkaKV (arXiv 2410.14731): trainable orthogonal projections that shrink the cached keys and values.

Per decoder layer and KV head g (GQA: one basis per KV head, shared by the query heads that read it):
orthogonal U^K (d x d) and U^V (w x w) with means mu^K, mu^V. The cache stores the first r columns:
``k~ = (k - mu^K) U^K_r`` (keys after RoPE; queries use the same basis, ``q~ = q U^K_r``; the dropped
``q . mu^K`` is constant per query and cancels in the softmax) and ``v~ = (v - mu^V) U^V_r``, folded
into v_proj (bias ``(b - mu^V) U^V_r``); the output ``(a v~) U^V_r^T + mu^V`` is folded into o_proj
(columns ``W_O U^V_r``, bias ``W_O mu^V``). At full rank this is exact (the attention weights sum to one).

1. Init: PCA per (layer, KV head) of post-RoPE keys and of values on calibration text (centred
   covariance, float64 ``eigh``, descending, first column flipped if det < 0 so the Cayley map reaches
   it). ``v_init="vo"`` instead re-factors V-O exactly with the whitened absorb-decompose first and
   starts U^V at the identity (its columns are then ordered by output contribution). ``k_init="rotary-pairs"``
   gives U^K whole RoPE frequency pairs instead, ranked by ThinK's score (arXiv 2407.21018) on the same text
   (`rotary_pair_basis`): a subspace RoPE turns within itself, so what a key loses does not depend on its
   position; training leaves it (X^K stays zero, the means train).
2. Train (model frozen): ``U = U_init cayley(X)``, ``cayley(X) = (I - A/2)^-1 (I + A/2)``, ``A = X - X^T``,
   X from zero; each step samples r^K, r^V per (layer, head) from {s, 2s, ..., d} (nested prefixes);
   loss ``0.25 KL(original || compressed) + 0.75 LM``; AdamW, cosine schedule.
3. Ranks: uniform ranks for the budget (``sum(r^K + r^V) / (2 L G d) <= budget``), then rank steps moved
   between heads on output KL (`search_ranks`, scored to first order through per-step gates and kept only
   when the exact KL on held-out windows falls); or uniform only; or keys only (every value whole, one key rank
   (2 budget - 1) d, for caches that project the context only). The paper lowers ranks greedily from
   full, one step at a time; on this CPU that costs hours, and the exact one-window versions tried here
   fitted the few search tokens they could afford (measured: README).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from ... import data_parallel, sharding
from ...arch import arch_for, decoder_layers, get_submodule
from ...console import stepper
from ...layer_walk import as_layers, walk_layers
from ...modeling import use_surgery_modeling_
from ...modeling.modeling_llmsurgery import full_layout, reshape_attention_
from ...training import cycled_batch, take_step, warmup_cosine


def cayley(x: torch.Tensor) -> torch.Tensor:
    """(I - A/2)^-1 (I + A/2) with A = X - X^T: orthogonal with det +1, identity at X = 0."""
    a = x - x.transpose(-1, -2)
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    return torch.linalg.solve(eye - a / 2, eye + a / 2)


def rotary_pair_basis(query_power: torch.Tensor, key_power: torch.Tensor) -> torch.Tensor:
    """Identity columns that keep RoPE's frequency pairs whole: dims i and i + d/2 (as rotate_half pairs them) side
    by side, the pairs in descending order of E[q^2] E[k^2] summed over the pair (ThinK's channel score, arXiv
    2407.21018, taken once from calibration text); det +1.

    An even rank keeps whole pairs, whose plane RoPE turns within itself: the kept subspace is the same at every
    position, so a key far from the calibration windows' positions loses no more than a near one. `query_power`,
    `key_power`: [d] per-dim second moments of the post-RoPE queries (the KV head's group) and keys."""
    half = len(key_power) // 2
    score = query_power * key_power
    order = (score[:half] + score[half:]).argsort(descending=True)
    basis = torch.eye(len(key_power), dtype=torch.float64)[
        :, torch.stack([order, order + half], 1).reshape(-1)
    ]
    if torch.linalg.det(basis) < 0:
        basis[:, 0] = -basis[:, 0]
    return basis


def principal_basis(second_moment: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of the centred covariance, descending, det +1 (float64)."""
    cov = second_moment - torch.outer(mean, mean)
    values, vectors = torch.linalg.eigh(cov)
    vectors = vectors[:, values.argsort(descending=True)]
    if torch.linalg.det(vectors) < 0:
        vectors[:, 0] = -vectors[:, 0]
    return vectors


def window_positions(windows: torch.Tensor | None, span: int, seed: int) -> torch.Tensor | None:
    """Position ids [N, T] that start each window at its own random offset in [0, span - T] (seeded), so that the
    post-RoPE keys the bases are fitted to are those of every position up to `span`, not only of the first T
    (kv-compress --positions); None where that leaves nothing to move (no windows, span <= T).

    RoPE attention depends only on the distance between tokens, so a window's outputs do not change with its
    offset; its keys do: a basis fitted at positions 0..T-1 alone misses the directions that RoPE's slow
    frequency pairs turn keys into further on (measured: README)."""
    if windows is None or span <= windows.shape[1]:
        return None
    n, length = windows.shape
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.randint(0, span - length + 1, (n, 1), generator=generator)
    return offsets + torch.arange(length)


class MatryoshkaState(nn.Module):
    """Per (layer, KV head): initial bases, trainable X and means, current ranks; drives the patched attention.

    whole: per layer, whether it keeps every key and value dim (the sliding-window layers under --layers
    full-attention); training never samples a lower rank there and the ranks of a fixed budget leave it whole."""

    def __init__(self, head_dim: int, v_widths: list[list[int]], step: int, whole: list[bool] | None = None):
        super().__init__()
        self.d, self.v_widths, self.step = head_dim, v_widths, step
        self.whole = list(whole) if whole else [False] * len(v_widths)
        self.groups = len(v_widths[0])
        n = len(v_widths) * self.groups
        widths = [w for layer in v_widths for w in layer]
        self.x_k = nn.ParameterList([nn.Parameter(torch.zeros(head_dim, head_dim)) for _ in range(n)])
        self.x_v = nn.ParameterList([nn.Parameter(torch.zeros(w, w)) for w in widths])
        self.mu_k = nn.ParameterList([nn.Parameter(torch.zeros(head_dim)) for _ in range(n)])
        self.mu_v = nn.ParameterList([nn.Parameter(torch.zeros(w)) for w in widths])
        self.init_k = [torch.eye(head_dim) for _ in range(n)]
        self.init_v = [torch.eye(w) for w in widths]
        self.rank_k = [[head_dim] * self.groups for _ in v_widths]
        self.rank_v = [list(layer) for layer in v_widths]
        self.project = False
        self.stats: dict | None = None
        self.query_stats = False  # with stats: the queries' too (what `rotary_pair_basis` ranks by)
        self.gates: dict | None = None
        self._bases: dict = {}

    def move_(self, device: torch.device) -> None:
        """Parameters and initial bases onto `device` (the bases are plain lists, which .to() skips)."""
        self.to(device)
        self.init_k = [t.to(device) for t in self.init_k]
        self.init_v = [t.to(device) for t in self.init_v]

    def max_rank(self, layer: int, group: int, kind: str) -> int:
        return self.d if kind == "k" else self.v_widths[layer][group]

    def ranks(self) -> dict:
        return {"k": [list(r) for r in self.rank_k], "v": [list(r) for r in self.rank_v]}

    def set_ranks(self, ranks: dict) -> None:
        self.rank_k, self.rank_v = [list(r) for r in ranks["k"]], [list(r) for r in ranks["v"]]

    def refresh_bases(self, layer: int | None = None) -> None:
        """U = U_init cayley(X) for every head, or for one layer's (keeps the graph when grad is enabled)."""
        heads = (
            range(len(self.x_k)) if layer is None else range(layer * self.groups, (layer + 1) * self.groups)
        )
        self._bases = {
            i: (  # init_k/init_v are plain lists, which .to(device) does not move
                self.init_k[i].to(self.x_k[i].device) @ cayley(self.x_k[i]),
                self.init_v[i].to(self.x_v[i].device) @ cayley(self.x_v[i]),
            )
            for i in heads
        }

    def bases(self, layer: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        u_k, u_v = self._bases[layer * self.groups + group]
        return u_k[:, : self.rank_k[layer][group]], u_v[:, : self.rank_v[layer][group]]

    def gate_columns(self, layer: int, group: int, kind: str) -> torch.Tensor:
        """Per basis column, the gate of the rank step holding it."""
        return self.gates[kind, layer, group].repeat_interleave(self.step)[
            : self.max_rank(layer, group, kind)
        ]

    def sample_ranks_(self, generator: torch.Generator) -> None:
        """Nested-prefix training: every (layer, head, K/V) rank drawn from {s, 2s, ..., max}; whole layers at max."""
        for layer in range(len(self.v_widths)):
            for g in range(self.groups):
                for kind, table in (("k", self.rank_k), ("v", self.rank_v)):
                    options = rank_options(self.max_rank(layer, g, kind), self.step)
                    if self.whole[layer]:
                        table[layer][g] = options[-1]
                    else:
                        table[layer][g] = options[int(torch.randint(len(options), (1,), generator=generator))]

    def projected_layers(self) -> list[int]:
        return [i for i, keep in enumerate(self.whole) if not keep]

    def budget(self) -> float:
        used = sum(map(sum, self.rank_k)) + sum(map(sum, self.rank_v))
        return used / (2 * len(self.v_widths) * self.groups * self.d)


def rank_options(top: int, step: int) -> list[int]:
    return sorted({min(top, step * i) for i in range(1, math.ceil(top / step) + 1)})


class ProjectionHook:
    """The runtime attention forward's `kv_projection` while projections train or are scored (no cache).

    Per KV head g of one layer: statistics of the post-RoPE keys and of the values when `state.stats` is set,
    and, when `state.project` is on, queries and keys in the first r_k columns of U^K (keys centred), values
    centred in the first r_v of U^V (times the search's rank-step gates, if any) and the output mapped back.
    A plain object, so that the shared state does not become a submodule of every attention.
    """

    def __init__(self, state: MatryoshkaState, layer: int) -> None:
        self.state, self.layer = state, layer

    def _head(self, g: int) -> int:
        return self.layer * self.state.groups + g

    def keys(self, g: int, queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.state
        if state.stats is not None:
            _accumulate(state.stats, (self.layer, g, "k"), keys)
            if state.query_stats:
                _accumulate(state.stats, (self.layer, g, "q"), queries)
        if not state.project:
            return queries, keys
        u_k, _ = state.bases(self.layer, g)  # [d, r_k]
        queries, keys = queries @ u_k, (keys - state.mu_k[self._head(g)]) @ u_k
        return queries, keys if state.gates is None else keys * state.gate_columns(self.layer, g, "k")

    def values(self, g: int, values: torch.Tensor) -> torch.Tensor:
        state = self.state
        if state.stats is not None:
            _accumulate(state.stats, (self.layer, g, "v"), values)
        if not state.project:
            return values
        _, u_v = state.bases(self.layer, g)  # [w, r_v]
        values = (values - state.mu_v[self._head(g)]) @ u_v
        return values if state.gates is None else values * state.gate_columns(self.layer, g, "v")

    def output(self, g: int, out: torch.Tensor) -> torch.Tensor:
        state = self.state
        if not state.project:
            return out
        _, u_v = state.bases(self.layer, g)
        return out @ u_v.T + state.mu_v[self._head(g)]


def _accumulate(stats: dict, key: tuple, x: torch.Tensor) -> None:
    """Count, sum and second moment (float64) of the rows of x: [..., d]."""
    x = x.detach().reshape(-1, x.shape[-1]).double().cpu()  # [N, d]
    entry = stats.setdefault(key, [0, 0.0, 0.0])
    entry[0] += x.shape[0]
    entry[1] = entry[1] + x.sum(0)
    entry[2] = entry[2] + x.T @ x


def attach_(model: nn.Module, state: MatryoshkaState) -> list:
    """Run every attention module through the runtime forward with `state`'s projections; `detach_` undoes it."""
    spec, saved = arch_for(model), []
    for i, layer in enumerate(decoder_layers(model)):
        attn = get_submodule(layer, spec.attn)
        saved.append((attn, attn.__dict__.get("forward"), getattr(attn, "attention_layout", None)))
        reshape_attention_(
            attn, attn.attention_layout if saved[-1][2] else full_layout(model.config)
        )  # widths as they are
        attn.kv_projection = ProjectionHook(state, i)
    return saved


def detach_(saved: list) -> None:
    for attn, forward, layout in saved:
        del attn.kv_projection
        if layout is None:
            del attn.attention_layout
        if forward is None:
            del attn.forward
        else:
            attn.forward = forward


@torch.no_grad()
def init_from_pca_(
    model: nn.Module,
    state: MatryoshkaState,
    windows: torch.Tensor,
    v_identity: bool,
    k_init: str = "pca",
    positions: torch.Tensor | None = None,
) -> None:
    """Means and PCA bases of post-RoPE keys (or `k_init` "rotary-pairs": `rotary_pair_basis`) and of values per
    (layer, KV head), the windows at `positions` (`window_positions`; None: from 0)."""
    state.stats, state.project, state.query_stats = {}, False, k_init == "rotary-pairs"
    walk_layers(
        as_layers(model),
        windows,
        lambda i, layer, run: run(),
        "Collecting key/value statistics",
        positions=positions,
    )
    stats, state.stats = state.stats, None
    init_from_stats_(state, stats, v_identity, k_init)


def init_from_stats_(state: MatryoshkaState, stats: dict, v_identity: bool, k_init: str = "pca") -> None:
    """The heads in `stats` ({(layer, head, "q" | "k" | "v"): (count, sum, second moment)}): their means and
    bases, PCA (the keys' `rotary_pair_basis` under `k_init` "rotary-pairs", from the queries' statistics too)."""
    device = state.x_k[0].device
    for (layer, g, kind), (count, total, second) in stats.items():
        if kind == "q":
            continue
        i = layer * state.groups + g
        mean = total / count
        if kind == "k" and k_init == "rotary-pairs":
            queries = stats[layer, g, "q"]
            basis = rotary_pair_basis(queries[2].diagonal() / queries[0], second.diagonal() / count)
        else:
            basis = principal_basis(second / count, mean)
        if kind == "k":
            state.init_k[i], state.mu_k[i].data = basis.float().to(device), mean.float().to(device)
        else:
            state.init_v[i] = (torch.eye(len(mean)) if v_identity else basis.float()).to(device)
            state.mu_v[i].data = mean.float().to(device)


@contextmanager
def _frozen(params) -> Iterator[None]:
    """Stop gradients to the parameters that take them; restore exactly those afterwards."""
    frozen = [p for p in params if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _kl(teacher_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    logp = logits.to(teacher_logp.dtype).log_softmax(-1)
    return (teacher_logp.exp() * (teacher_logp - logp)).sum(-1).mean()


def matryoshka_loss(
    model: nn.Module,
    state: MatryoshkaState,
    batch: torch.Tensor,
    generator: torch.Generator,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """One step's loss on `batch` [b, T] (at `positions` [b, T], None: from 0): ranks drawn for every head, then
    0.25 KL to the unprojected model's next-token distribution + 0.75 next-token cross-entropy, each a mean over
    the batch's tokens."""
    with torch.no_grad():
        state.project = False
        teacher = (
            model(input_ids=batch, position_ids=positions, use_cache=False).logits.float().log_softmax(-1)
        )
    state.project = True
    state.sample_ranks_(generator)
    state.refresh_bases()
    logits = model(input_ids=batch, position_ids=positions, use_cache=False).logits
    lm = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
    return 0.25 * _kl(teacher, logits) + 0.75 * lm


def train_(
    model: nn.Module,
    state: MatryoshkaState,
    windows: torch.Tensor,
    cfg,
    sharded: bool = False,
    positions: torch.Tensor | None = None,
) -> list[float]:
    """Matryoshka distillation of the projections and means only; returns the loss per step. positions: the
    windows' position ids (`window_positions`; None: from 0).

    sharded (FSDP): the frozen model runs as a sharded copy; the projections stay whole on every process and
    their gradients are summed as in plain data parallel."""
    data_parallel.same_start_(state.parameters(), "projections")
    home = state.x_k[0].device
    generator = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    try:
        with (
            _frozen(model.parameters()),
            sharding.training_copies([model], {}, shared=(state,), sharded=sharded) as ((run,), _),
            stepper("Training projections", cfg.train_steps) as step,
        ):
            device = next(run.parameters()).device
            state.move_(device)  # the sharded copy's device under FSDP (a GPU per process with NCCL)
            optimizer = torch.optim.AdamW(state.parameters(), lr=cfg.lr, weight_decay=0.0)
            schedule = warmup_cosine(optimizer, cfg.train_steps)
            for s in range(cfg.train_steps):
                # data parallel: this process's share of the global batch [b, T], its mean weighted by the share
                batch, weight = data_parallel.share(cycled_batch(windows, s, cfg.batch_size))
                at = (
                    None
                    if positions is None
                    else data_parallel.share(cycled_batch(positions, s, cfg.batch_size))[0]
                )
                loss = matryoshka_loss(run, state, batch.to(device), generator, _on(at, device)) * weight
                value = take_step(loss, optimizer, schedule, state.parameters())
                losses.append(round(value, 5))
                step(f"loss {value:.4f}")
    finally:
        state._bases = {}
        state.move_(home)
    return losses


def uniform_ranks(state: MatryoshkaState, budget: float) -> dict:
    """The same rank r (a multiple of the step, at most the budget) for every K and V head."""
    r = max(state.step, int(budget * state.d / state.step) * state.step)
    layers = range(len(state.v_widths))
    return {
        "k": [[min(r, state.d)] * state.groups for _ in layers],
        "v": [[min(r, w) for w in state.v_widths[layer]] for layer in layers],
    }


def keys_only_ranks(state: MatryoshkaState, budget: float) -> dict:
    """Every value at its whole width and one key rank r for every head: (r + d) / 2d <= budget."""
    r = int((2 * budget - 1) * state.d / state.step) * state.step
    return {"k": [[r] * state.groups for _ in state.v_widths], "v": [list(w) for w in state.v_widths]}


def fixed_ranks(state: MatryoshkaState, cfg) -> dict:
    """The ranks of a pass that does not search them: keys only, or uniform; the state's whole layers (the
    sliding-window layers under --layers full-attention) keep every key and value dim, so they stay exact."""
    ranks = keys_only_ranks(state, cfg.budget) if cfg.keys_only else uniform_ranks(state, cfg.budget)
    for layer, keep in enumerate(state.whole):
        if keep:
            ranks["k"][layer] = [state.d] * state.groups
            ranks["v"][layer] = list(state.v_widths[layer])
    return ranks


def _on(positions: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if positions is None else positions.to(device)


def _window_logits(
    model: nn.Module, window: torch.Tensor, at: torch.Tensor | None, keep: int
) -> torch.Tensor:
    """The last `keep` positions' logits of one window (token ids [T]) at position ids `at` ([T]; None: from 0)."""
    at = _on(None if at is None else at.unsqueeze(0), window.device)
    return model(input_ids=window.unsqueeze(0), position_ids=at, use_cache=False, logits_to_keep=keep).logits


def _placed(windows: torch.Tensor, positions: torch.Tensor | None) -> list[tuple]:
    """(window, its position ids or None) pairs."""
    return list(zip(windows, [None] * len(windows) if positions is None else positions))


def _total_kl(
    model: nn.Module,
    state: MatryoshkaState,
    windows: torch.Tensor,
    teacher: list[torch.Tensor],
    keep: int,
    positions: torch.Tensor | None = None,
) -> float:
    """KL summed over the windows (data parallel: this process's windows, summed over the processes)."""
    state.refresh_bases()
    return data_parallel.sum_float(
        sum(
            float(_kl(t, _window_logits(model, w, at, keep)))
            for t, (w, at) in zip(teacher, _placed(windows, positions))
        )
    )


@torch.no_grad()
def search_ranks(
    model: nn.Module,
    state: MatryoshkaState,
    windows: torch.Tensor,
    budgets: list[float],
    rounds: int = 4,
    positions: torch.Tensor | None = None,
) -> dict[float, dict]:
    """Ranks for each budget: uniform ranks improved by moving rank steps between heads on output KL.

    The first three quarters of the windows profile (at least one), the rest check (all windows when
    there is one). Each round scores every (layer, KV head, K or V) one step lower and one step higher at
    the current ranks, to first order (`_step_gradients`); unused budget goes to the best gains, then steps
    move from the cheapest losses to the best gains while the gain is larger. A round's moves are kept only
    if they lower the exact KL (second half of each window) on the check windows, halving the moves until
    they do; at most `rounds`. positions: the windows' position ids (`window_positions`; None: from 0).
    """
    windows = windows.to(next(model.parameters()).device)
    split = max(1, 3 * len(windows) // 4)

    # data parallel: each process scores every world_size-th window of each set; the sums are reduced
    def parts(x: torch.Tensor | None) -> tuple:
        """(profile, check) windows or position ids."""
        if x is None:
            return None, None
        return data_parallel.strided(x[:split]), data_parallel.strided(x[split:] if len(x) > 1 else x)

    (profile, check), (profile_at, check_at) = parts(windows), parts(positions)
    keep = max(1, windows.shape[1] // 2)
    state.project = False
    teacher_profile, teacher_check = (
        [_window_logits(model, w, at, keep).float().log_softmax(-1) for w, at in _placed(part, part_at)]
        for part, part_at in ((profile, profile_at), (check, check_at))
    )
    state.project = True
    total = 2 * len(state.v_widths) * state.groups * state.d
    found: dict[float, dict] = {}
    with stepper("Searching ranks", len(budgets) * rounds) as step:
        for b in sorted(budgets, reverse=True):
            state.set_ranks(uniform_ranks(state, b))
            current = _total_kl(model, state, check, teacher_check, keep, check_at)
            for _ in range(rounds):
                spare = math.floor((b - state.budget()) * total / state.step + 1e-6)
                groups = _moves(
                    *_step_gradients(model, state, profile, teacher_profile, keep, profile_at), spare
                )
                applied = 0
                while groups:
                    saved = state.ranks()
                    for kind, layer, g, delta in (move for group in groups for move in group):
                        getattr(state, f"rank_{kind}")[layer][g] += delta * state.step
                    new = _total_kl(model, state, check, teacher_check, keep, check_at)
                    if new < current:
                        current, applied = new, len(groups)
                        break
                    state.set_ranks(saved)
                    groups = groups[: len(groups) // 2]
                step(f"budget {b:g}: KL {current:.4f}")
                if not applied:
                    break
            found[b] = state.ranks()
    state._bases = {}
    return found


def _step_gradients(
    model: nn.Module,
    state: MatryoshkaState,
    windows: torch.Tensor,
    teacher: list[torch.Tensor],
    keep: int,
    positions: torch.Tensor | None = None,
) -> tuple[list, list]:
    """First-order KL change of one rank step less and one more for every (layer, KV head, K or V).

    Every step of every basis gets a gate on its coordinates (1 inside the current rank, 0 outside); one
    backward pass per window gives dKL/dgate, so a step down costs about -grad of the last kept step and a
    step up gains about -grad of the next one. This scores all 4 L G candidates on many windows for the
    price of one forward and backward each (exact one-window scoring reran the layers per candidate and
    fitted its window). Returns (gains, losses) as sorted (estimate, kind, layer, group) lists.
    """
    ranks, gates = state.ranks(), {}
    for kind, table in (("k", state.rank_k), ("v", state.rank_v)):
        for layer, row in enumerate(table):
            for g, r in enumerate(row):
                options = rank_options(state.max_rank(layer, g, kind), state.step)
                gates[kind, layer, g] = torch.zeros(len(options), device=state.x_k[0].device)
                gates[kind, layer, g][: options.index(r) + 1] = 1
                gates[kind, layer, g].requires_grad_(True)
    state.set_ranks(
        {"k": [[state.d] * state.groups for _ in state.v_widths], "v": [list(w) for w in state.v_widths]}
    )
    state.gates = gates
    try:
        with _frozen([*model.parameters(), *state.parameters()]), torch.enable_grad():
            state.refresh_bases()
            for t, (w, at) in zip(teacher, _placed(windows, positions)):
                _kl(t, _window_logits(model, w, at, keep)).backward()
            data_parallel.sum_gradients_(gates.values())  # the windows of every process
    finally:
        state.gates, state._bases = None, {}
        state.set_ranks(ranks)
    gains, losses = [], []
    for (kind, layer, g), gate in gates.items():
        on = int(gate.detach().sum())
        grad = gate.grad if gate.grad is not None else torch.zeros_like(gate)
        if on > 1:
            losses.append((-float(grad[on - 1]), kind, layer, g))
        if on < len(gate):
            gains.append((-float(grad[on]), kind, layer, g))
    return sorted(gains, reverse=True), sorted(losses)


def _moves(gains: list, losses: list, spare: int) -> list[list[tuple[str, int, int, int]]]:
    """Groups of rank-step moves (kind, layer, group, +1/-1), best first: first `spare` single steps up
    (unused budget), then pairs (one step up, one down) that keep the budget while the gain beats the loss."""
    groups = [[(kind, layer, g, 1)] for gain, kind, layer, g in gains[:spare] if gain > 0]
    raised = {group[0][:3] for group in groups}
    losses = [x for x in losses if x[1:] not in raised]
    lowered: set = set()
    for gain, *up in gains[len(groups) :]:
        if tuple(up) in lowered:
            continue
        losses = [x for x in losses if tuple(x[1:]) != tuple(up)]
        if not losses or gain <= losses[0][0]:
            break
        loss, *down = losses.pop(0)
        lowered.add(tuple(down))
        groups.append([(*up, 1), (*down, -1)])
    return groups


@torch.no_grad()
def fold_(model: nn.Module, state: MatryoshkaState, ranks: dict, exact_values: bool = False) -> None:
    """Write the truncated projections into v_proj/o_proj and the key basis; the model becomes a
    standard-loadable one. exact_values: keep v_proj/o_proj as they were too, where values are projected
    (`fold_layer_`)."""
    state.set_ranks(ranks)
    state.refresh_bases()
    spec, layouts = arch_for(model), []

    def visit(i: int, layer: nn.Module, run) -> None:
        attn = get_submodule(layer, spec.attn)
        layouts.append(fold_layer_(attn, state, ranks, i, model.config, exact_values))

    walk_layers(as_layers(model), None, visit, "Folding projections")
    model.config.attention_layout = layouts
    use_surgery_modeling_(model.config)
    state._bases = {}


@torch.no_grad()
def fold_layer_(
    attn: nn.Module, state: MatryoshkaState, ranks: dict, layer_index: int, config, exact_values: bool = False
) -> dict:
    """One attention module: v_proj/o_proj through the truncated value bases, the key basis; returns its layout.

    exact_values (kv-compress --exact-values): where a value rank is below its head's width, keep v_proj/o_proj as
    they were as well, for project_context_only to attend over exact values (modeling_llmsurgery, "exact values
    after the prefill"); the cache stays as narrow."""
    n_rep, widths = attn.num_key_value_groups, state.v_widths[layer_index]
    wv = attn.v_proj.weight.double()
    bv = (
        attn.v_proj.bias.double()
        if attn.v_proj.bias is not None
        else torch.zeros(wv.shape[0], dtype=torch.float64, device=wv.device)
    )
    wo = attn.o_proj.weight.double()
    bo = (
        attn.o_proj.bias.double()
        if attn.o_proj.bias is not None
        else torch.zeros(wo.shape[0], dtype=torch.float64, device=wo.device)
    )
    before = ((wv, bv), (wo, bo))  # v_proj/o_proj as they were (float64)
    v_rows, v_bias, o_cols, bases, means, v_bases, v_means = [], [], [], [], [], [], []
    d, row, col = attn.head_dim, 0, 0
    for g, w in enumerate(widths):
        u_k, u_v = (u.double() for u in state.bases(layer_index, g))  # [d, r_k], [w, r_v]
        i = layer_index * state.groups + g
        mu_v = state.mu_v[i].double()
        v_rows.append(u_v.T @ wv[row : row + w])  # [r_v, D]
        v_bias.append(u_v.T @ (bv[row : row + w] - mu_v))
        row += w
        for _ in range(n_rep):
            slice_o = wo[:, col : col + w]  # [D, w]
            o_cols.append(slice_o @ u_v)
            bo = bo + slice_o @ mu_v
            col += w
        bases.append(u_k)
        means.append(state.mu_k[i].double())
        v_bases.append(F.pad(u_v, (0, 0, 0, d - w)))  # [d, r_v]: rows past the head's value width are zero
        v_means.append(F.pad(mu_v, (0, d - w)))
    layout = dict(getattr(attn, "attention_layout", None) or full_layout(config))
    layout |= {
        "v": list(ranks["v"][layer_index]),
        "k": list(ranks["k"][layer_index]),
        "v_bias": True,
        "o_bias": True,
        "v_basis": True,
    }
    keep = exact_values and any(r < w for r, w in zip(layout["v"], widths))
    if keep:
        layout["v_exact"] = list(widths)
    else:
        layout.pop("v_exact", None)
    reshape_attention_(
        attn,
        layout,
        v=(torch.cat(v_rows), torch.cat(v_bias)),
        o=(torch.cat(o_cols, dim=1), bo),
        key_projection=(torch.cat(bases, dim=1), torch.stack(means)),
        value_projection=(torch.cat(v_bases, dim=1), torch.stack(v_means)),
        exact_values=before if keep else None,
    )
    return attn.attention_layout


def kv_compress_(model: nn.Module, cfg, batches: dict[str, torch.Tensor], sharded: bool = False) -> dict:
    """The whole pass in place: init, optional training, ranks for the budget, folding. Returns the report.

    batches: "pca", "train" and "search" token windows ([N, T] each), each placed within cfg.positions
    (`KVCompress.placed`). sharded: train under FSDP (`train_`).
    """
    config = model.config
    spec = arch_for(model)
    head_dim, step = cfg.head_dim_and_step(config.to_dict())
    report: dict = {"rank_step": step, "head_dim": head_dim}
    if cfg.v_init == "vo":  # the whitened, exact V-O re-factorisation first (absorb's maths, at no knob)
        from ..absorb.maths import Truncation, absorb_decompose_

        absorb_decompose_(model, Truncation(), batches=batches["pca"])
    layers = decoder_layers(model)
    v_widths = [
        list((getattr(get_submodule(layer, spec.attn), "attention_layout", None) or full_layout(config))["v"])
        for layer in layers
    ]
    whole = cfg.whole_layers(config.to_dict())
    state = MatryoshkaState(head_dim, v_widths, step, whole).to(next(model.parameters()).device)
    saved = attach_(model, state)
    at = {kind: cfg.placed(kind, windows) for kind, windows in batches.items()}
    try:
        init_from_pca_(
            model,
            state,
            batches["pca"],
            v_identity=cfg.v_init == "vo",
            k_init=cfg.k_init,
            positions=at["pca"],
        )
        if cfg.k_init == "rotary-pairs":  # training would turn the basis off the pairs: the keys' means train
            for x in state.x_k:
                x.requires_grad_(False)
        if cfg.train:
            report["loss_curve"] = train_(model, state, batches["train"], cfg, sharded, at["train"])
            report["train_tokens"] = cfg.train_steps * cfg.batch_size * batches["train"].shape[1]
        ranks = (
            search_ranks(model, state, batches["search"], [cfg.budget], positions=at["search"])[cfg.budget]
            if cfg.searches
            else fixed_ranks(state, cfg)
        )
    finally:
        detach_(saved)
    fold_(model, state, ranks, cfg.exact_values)
    state.set_ranks(ranks)
    report |= kv_report(state, ranks, cfg, model.config.attention_layout)
    return report


def kv_report(state: MatryoshkaState, ranks: dict, cfg, layouts: list[dict]) -> dict:
    """Ranks and shares; the budget reached is counted over the projected layers (all but the state's whole);
    how many of the folded `layouts` kept their unprojected v_proj/o_proj (`fold_layer_`, --exact-values)."""
    layers, d = len(state.v_widths), state.d
    projected = state.projected_layers()
    used = sum(sum(ranks["k"][i]) + sum(ranks["v"][i]) for i in projected)
    return {
        "ranks_k": ranks["k"],
        "ranks_v": ranks["v"],
        "budget": cfg.budget,
        "budget_reached": round(used / (2 * len(projected) * state.groups * d), 6),
        "keys_share": round(sum(map(sum, ranks["k"])) / (layers * state.groups * d), 6),
        "values_share": round(sum(map(sum, ranks["v"])) / (layers * state.groups * d), 6),
        "exact_value_layers": sum(bool(layout.get("v_exact")) for layout in layouts),
    }


@torch.no_grad()
def streamed_kv_compress(streamed, windows: torch.Tensor, cfg, writer=None) -> dict:
    """`kv_compress_` without training, at uniform ranks, one decoder layer in memory at a time.

    Layer l runs the windows through the runtime attention (projections off) collecting its key/value
    statistics, as `init_from_pca_` does over the whole model; its heads get their PCA bases and means, and
    with a `writer` it is folded at the uniform ranks and written. The windows go on through the unfolded layer.
    """
    config, spec = streamed.config, streamed.spec
    head_dim, step = cfg.head_dim_and_step(config.to_dict())
    groups = config.num_key_value_heads
    widths = [[head_dim] * groups for _ in range(streamed.n_layers)]
    state = MatryoshkaState(head_dim, widths, step, cfg.whole_layers(config.to_dict())).to(streamed.device)
    state.query_stats = cfg.k_init == "rotary-pairs"
    ranks = fixed_ranks(state, cfg)
    state.set_ranks(ranks)
    layouts = []

    def visit(i: int, layer: nn.Module, run) -> None:
        attn = get_submodule(layer, spec.attn)
        reshape_attention_(attn, full_layout(config))  # the runtime forward, at the layer's own widths
        attn.kv_projection = ProjectionHook(state, i)
        state.stats, state.project = {}, False
        run()
        stats, state.stats = state.stats, None
        del attn.kv_projection
        init_from_stats_(state, stats, v_identity=False, k_init=cfg.k_init)
        if writer is not None:
            state.refresh_bases(i)
            layouts.append(fold_layer_(attn, state, ranks, i, config, cfg.exact_values))

    walk_layers(streamed, windows, visit, "KV projections", writer, positions=cfg.placed("pca", windows))
    state._bases = {}
    if writer is not None:
        config.attention_layout = layouts
        use_surgery_modeling_(config)
    return {"rank_step": step, "head_dim": head_dim, **kv_report(state, ranks, cfg, layouts)}
