"""Long-range recall at equal KV memory: kvpress's token eviction against kv-compress, and both together; one run.

For each model and context length, RULER-style synthetic tasks (kv_recall_tasks.py) score every method at KV
budgets b (a share of the dense context KV; question and answer tokens stay dense, as in kvpress's pipeline):

* kvpress on the stock model: SnapKV, StreamingLLM, TOVA, ExpectedAttention, Knorm at compression 1 - b;
  ThinK alone (key channels only, c = 2 (1 - b), so b >= 0.5) and SnapKV+ThinK (c = 0.25 or 0.5, the rest
  evicted);
* llmsurgery kv-compress (MatryoshkaKV): PCA bases and Matryoshka-trained bases (trained once: nested prefixes
  serve every rank), ranks searched per budget by the pass's own search; keys only (r_k = d/2) at b = 0.75;
  trained bases composed with the best eviction press at b, over the splits (1 - e) p = b with p <= 0.75; the
  models run with project_context_only (the prefill attends exactly and caches its coordinates, the question's
  and answer's keys stay exact, and so do their values where values are projected: folded with --exact-values);
* the same bases as a press on the stock model (llmsurgery.kv_presses.projection_press): the prefill's cache
  projected, the question and answer exact as kvpress treats every press; alone, and composed with the best
  eviction press over the same splits (both kinds).

`--recent N` keeps the keys of the context's last N tokens exact in the keys-only rows (models loaded with
exact_recent=N, presses with recent=N); what they cost, N / (2 x context) of the dense KV, is counted on the cache
and paid for in the composed rows by evicting more (`evict_for`), so each stays within its b.

`--projections` picks which projections run (and so which rows); `--resume FILE[,FILE...]` carries over every
finished row of earlier runs whose settings cover these (their first --samples samples, these tasks and lengths;
the finished rows of projections not picked too) and runs the rest, reusing their searched ranks: bases are
trained only if a picked trained projection has rows left to run. The JSON is written after every sample batch, and
a row cut short, or of a run with fewer samples, goes on from its last finished batch: the dense and kvpress rows
always, a projection's rows where its bases are the same (a digest on each row; keep trained bases with
--state-dir). So a run too long for one sitting (Gemma3's kvpress rows at 100 samples on 2 CPU cores) goes on over
several, each resuming the last one's JSON.

Eviction does not change a prefill's hidden states, so one prefill per projection (or per stock model) and
sample batch serves every press and budget: llmsurgery.kv_presses.replay runs kvpress's own forward hook on a copy
of the recorded cache (tested equal to the live hook). Scores: string_match_all of greedy answers (the
teacher-forced reference is the draft; rows that leave it decode greedily) and the teacher-forced answer
log-likelihood per token, each with bootstrap 95% intervals. Also continuation perplexity (384 tokens of news
context, 128 scored, 9 windows) per method. Ends with one line per budget: the best of each side, averaged over
the tasks at the lengths where the dense model scores at least --min-dense.

    python benchmarks/kv_recall.py [--models smollm2-135m,gemma3-270m] [--lengths 512,1024,2048,4096]
        [--samples 100] [--budgets 0.75,0.5,0.375,0.25] [--haystack FILE] [--device cpu|cuda]
        [--train-steps 200] [--positions N] [--recent N] [--state-dir DIR] [--projections pca@keys,...]
        [--resume FILE]
        [--plot FILE.png] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_recall_report import _mean, best, print_report, save_plot, summary_lines  # noqa: E402
from kv_recall_tasks import TASKS, Haystacks, make_sample, string_match_all  # noqa: E402

from llmsurgery.errors import UserError, validation_line  # noqa: E402

PPL_CONTEXT, PPL_SCORED, PPL_WINDOWS = 384, 128, 9
# kv-compress bases: PCA; whole rotary pairs (--k-init rotary-pairs, keys ranked by ThinK's score, values PCA);
# trained from PCA (MatryoshkaKV)
KINDS = ("pca", "pairs", "trained")


EVICTION_PRESSES = ("snapkv", "streamingllm", "tova", "expected_attention", "knorm")


# How the kv-compress models run (modeling_llmsurgery): the prefill attends exactly and caches its coordinates,
# the later tokens keep exact keys. Rows of an earlier run without this mark (every token projected) do not carry.
RUNTIME = "project_context_only"
# ... and where values are projected, folded with --exact-values: the prefill and the later tokens attend over
# exact values, the context's cached ones projected. Earlier rows of such projections (the prefill attended over
# projected values) do not carry.
RUNTIME_EXACT_VALUES = "project_context_only, exact values"
# How the presses run (llmsurgery.kv_presses.window_safe): kept tokens in order, sliding windows kept first. Without
# it, a model with sliding-window layers scored 0 under every press: an earlier run's rows of such a model without
# this mark do not carry.
PRESSES = "window_safe"


@dataclass
class Method:
    """One configuration: which model (stock, or a projection) and which press, at budget b; `entry` holds its
    results as they go to the JSON file (cells "task@length": per-sample match, log-likelihood, budget b)."""

    side: str  # "kvpress" | "llmsurgery" | "dense"
    label: str
    budget: float
    model: str = "stock"  # "stock" or a projection key, e.g. "trained@0.5"
    press: object = None  # a factory: () -> press, or None
    entry: dict = field(default_factory=dict)
    # a projection press's stored elements per token, per layer (set when its bases are built)
    widths: list[int] | None = None
    on_stock: bool = False  # a projection press: runs on the stock model
    # the context's last tokens whose keys stay exact (kv-compress models' exact_recent); its press is then a
    # factory of the context length, (tokens) -> press, which evicts what they cost
    recent: int = 0

    def __post_init__(self):
        self.entry = {"side": self.side, "label": self.label, "budget": self.budget, "ppl": None, "cells": {}}
        if self.model != "stock" and not self.on_stock:  # a kv-compress model, run as kvpress runs a press
            runtime = RUNTIME if self.model.endswith("@keys") else RUNTIME_EXACT_VALUES
            self.entry["runtime"] = runtime + (f", exact_recent={self.recent}" if self.recent else "")

    def press_for(self, tokens: int):
        """The press for a context of `tokens` tokens (None: no press)."""
        if self.press is None:
            return None
        return self.press(tokens) if self.recent else self.press()


# ----------------------------------------------------------------------------- scoring one cache batch


def _eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def _rows(cache, rows: torch.Tensor, length: int):
    """A new DynamicCache of the given batch rows, cut to `length` tokens (a kv-compress model's exact keys of
    the tokens after the prefill carried along)."""
    from transformers import DynamicCache

    from llmsurgery.modeling.modeling_llmsurgery import copy_exact_tail_

    out = DynamicCache()
    for i, layer in enumerate(cache.layers):
        out.update(layer.keys[rows, :, :length], layer.values[rows, :, :length], i)
    copy_exact_tail_(cache, out, rows, length)
    return out


@torch.no_grad()
def answer_batch(model, tokenizer, cache, samples, context_len: int) -> tuple[list[float], list[float]]:
    """string_match_all of the greedy answers and the per-token answer log-likelihood, one value per sample.

    One forward of [question + reference answer] per row, left-padded so the rows end together, scores the
    reference teacher-forced and checks it as a draft of the greedy answer; rows whose greedy tokens leave the
    reference are decoded greedily from the end of their question (at most answer length + 4 tokens)."""
    device = next(model.parameters()).device
    kept = cache.get_seq_length()
    blocks = [s.question + s.answer for s in samples]
    width, rows = max(map(len, blocks)), len(samples)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((rows, width), pad, dtype=torch.long)
    positions = torch.full((rows, width), context_len, dtype=torch.long)
    mask = torch.zeros(rows, kept + width, dtype=torch.long)
    mask[:, :kept] = 1
    for b, block in enumerate(blocks):
        ids[b, width - len(block) :] = torch.tensor(block)
        positions[b, width - len(block) :] = context_len + torch.arange(len(block))
        mask[b, kept + width - len(block) :] = 1
    longest = max(len(s.answer) for s in samples)
    logits = model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        past_key_values=cache,
        logits_to_keep=longest + 1,
    ).logits.float()  # [B, longest + 1, V]
    scores, lls, retry = [], [], {}
    for b, s in enumerate(samples):
        n = len(s.answer)
        here = logits[b, -(n + 1) : -1]  # predictions of the answer tokens
        target = torch.tensor(s.answer, device=here.device)
        lls.append(float(here.log_softmax(-1).gather(-1, target[:, None]).mean()))
        greedy = here.argmax(-1)
        if torch.equal(greedy, target):
            scores.append(string_match_all(tokenizer.decode(s.answer), s.values))
        else:
            scores.append(float("nan"))
            retry.setdefault(n, []).append(b)
    eos = _eos_ids(model, tokenizer)
    for n, group in retry.items():
        first = logits[group, -(n + 1)].argmax(-1)  # [g]: the greedy token after each question
        length, new = kept + width - n, n + 4
        texts = _greedy(model, tokenizer, cache, group, first, length, mask, samples, context_len, new, eos)
        for b, text in zip(group, texts):
            scores[b] = string_match_all(text, samples[b].values)
    return scores, lls


def _greedy(
    model, tokenizer, cache, group, first, length, mask, samples, context_len, max_new, eos
) -> list[str]:
    """Greedy answers of the rows `group` from the end of their questions (their cache cut at `length`)."""
    device = first.device
    rows = torch.tensor(group, device=device)
    sub = _rows(cache, rows, length)
    mask = mask[group, :length].to(device)
    position = torch.tensor([context_len + len(samples[b].question) for b in group], device=device)
    tokens, out, done = first, [first], torch.zeros(len(group), dtype=torch.bool, device=device)
    for step in range(max_new - 1):
        done |= torch.isin(tokens, torch.tensor(sorted(eos), device=device)) if eos else done
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones(len(group), 1, dtype=mask.dtype, device=device)], dim=1)
        logits = model(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=(position + step)[:, None],
            past_key_values=sub,
            logits_to_keep=1,
        ).logits
        tokens = logits[:, -1].argmax(-1)
        out.append(tokens)
    generated = torch.stack(out, dim=1).tolist()
    cuts = [next((i for i, t in enumerate(row) if t in eos), len(row)) for row in generated]
    return [tokenizer.decode(row[:cut]) for row, cut in zip(generated, cuts)]


def stored_elements(
    cache, widths: list[int] | None = None, caps: list[int | None] | None = None, recent: int = 0
) -> int:
    """K and V elements a cache holds, not counting key channels zeroed for every kept token of a head (ThinK's
    pruned channels: kvpress keeps them as zeros, an implementation that drops them would not store them); with
    `widths` (a projection press), each kept token of layer l counts widths[l], its heads' r_k + r_v coordinates,
    and each of its last `recent` tokens d more per head (the exact-key residual a kv-compress model with
    exact_recent keeps, counted on such a model's cache as it holds them). With `caps` (`window_caps`), a
    sliding-window layer counts at most the tokens its window reads, as a windowed cache (transformers'
    DynamicCache(config=...)) would hold them."""
    total = 0
    for i, layer in enumerate(cache.layers):
        keys = layer.keys  # [B, H, T, w]
        batch, heads, tokens, width = keys.shape
        held = min(tokens, caps[i]) if caps and caps[i] else tokens
        if widths is not None:
            total += batch * (held * widths[i] + min(recent, held) * heads * width)
        else:
            total += (int((keys != 0).any(dim=2).sum()) + batch * heads * layer.values.shape[-1]) * held
            residual = (layer.__dict__.get("_exact_tail") or {}).get("residual")  # [B, 1, R, H d]
            if residual is not None:
                total += batch * min(residual.shape[-2], held) * residual.shape[-1]
    return total


# ----------------------------------------------------------------------------- methods


def stock_methods(budgets: list[float]) -> list[Method]:
    from llmsurgery.kv_presses import make_press, think_press

    methods = [Method("dense", "dense", 1.0)]
    for b in budgets:
        for name in EVICTION_PRESSES:
            methods.append(Method("kvpress", name, b, press=lambda n=name, b=b: make_press(n, 1 - b)))
        if b >= 0.5:
            methods.append(Method("kvpress", "think", b, press=lambda b=b: think_press(2 * (1 - b))))
        for c in (0.25, 0.5):
            evict = 1 - b / (1 - c / 2)
            if 0 < evict < 1:
                label = f"snapkv+think c={c:g}"
                methods.append(Method("kvpress", label, b, press=lambda c=c, e=evict: think_press(c, e)))
    return methods


def recent_label(recent: int) -> str:
    """What a row's label says of --recent."""
    return f" + last {recent} exact" if recent else ""


def evict_for(b: float, p: float, recent: int = 0, tokens: int | None = None) -> float:
    """The share of a context of `tokens` tokens to evict so that a projection storing p of the dense KV per token,
    its last `recent` tokens' keys exact (d more per KV head: recent / (2 tokens) of the dense KV), stores b:
    (1 - e) p + recent / (2 tokens) = b (recent 0: 1 - b / p, whatever the length)."""
    return 1 - (b - (recent / (2 * tokens) if recent else 0.0)) / p


def keys_recent(model: str, recent: int) -> int:
    """--recent for the projection `model` ("kind@budget" or "kind@keys"): only the keys-only ones take it."""
    return recent if model.endswith("@keys") else 0


def projection_methods(
    budgets: list[float], best: dict[float, str], selected: list[str], recent: int = 0
) -> list[Method]:
    """The llmsurgery rows of the projections `selected` ("kind@budget" or "kind@keys"): each alone, and the
    trained and rotary-pair ones composed with the best eviction press at every lower budget b, (1 - e) p = b with
    p <= 0.75. The keys-only ones keep the keys of the context's last `recent` tokens exact (exact_recent), paid
    for by evicting more: `evict_for`."""
    from llmsurgery.kv_presses import make_press

    methods = []
    tag = recent_label(recent)
    for kind in KINDS:
        for p in budgets:
            if f"{kind}@{p:g}" in selected:
                methods.append(Method("llmsurgery", f"kv {kind}", p, model=f"{kind}@{p:g}"))
        if 0.75 in budgets and f"{kind}@keys" in selected:
            only = Method(
                "llmsurgery", f"kv {kind} keys only{tag}", 0.75, model=f"{kind}@keys", recent=recent
            )
            methods.append(only)
    for kind in ("pairs", "trained"):
        for b in budgets:
            splits = [(f"{kind}@{p:g}", f"p={p:g}", p) for p in budgets if b < p <= 0.75]
            if 0.75 in budgets and b < 0.75:  # keys at d/2, values whole: p = 0.75 as well
                splits.append((f"{kind}@keys", "keys only p=0.75", 0.75))
            for model, name, p in splits:
                if model not in selected:
                    continue
                r = keys_recent(model, recent)
                press = lambda t=None, n=best[b], b=b, p=p, r=r: make_press(n, evict_for(b, p, r, t))  # noqa: E731
                label = f"kv {kind} {name} + {best[b]}{recent_label(r)}"
                methods.append(Method("llmsurgery", label, b, model=model, press=press, recent=r))
    return methods


def press_methods(
    budgets: list[float], best: dict[float, str], selected: list[str], maps: dict, recent: int = 0
) -> list[Method]:
    """The same projections as presses on the stock model (`projection_press`: the prefill's cache projected, the
    question and answer exact, as kvpress treats them; the keys-only ones' last `recent` context keys exact):
    each alone, and composed with the best eviction press at every lower budget. `maps` is filled with each
    projection's bases before these run."""
    from llmsurgery.kv_presses import projection_press

    methods = []
    for key in selected:
        kind, at = key.split("@")
        p, name = (0.75, f"{kind} keys only") if at == "keys" else (float(at), kind)
        r = keys_recent(key, recent)
        for b in [p] + [b for b in budgets if b < p <= 0.75]:
            n = best[b]
            label = f"kv {name} press" + (f" p={p:g} + {n}" if b < p else "") + recent_label(r)
            press = lambda t=None, key=key, b=b, p=p, n=n, r=r: projection_press(  # noqa: E731
                maps[key], evict_for(b, p, r, t) if b < p else 0.0, n, recent=r
            )
            methods.append(Method("llmsurgery", label, b, model=key, press=press, on_stock=True, recent=r))
    return methods


def all_projections(budgets: list[float]) -> list[str]:
    """Every projection: each kind at each budget, and keys only where 0.75 is a budget."""
    keys = ["keys"] if 0.75 in budgets else []
    return [f"{kind}@{at}" for kind in KINDS for at in [f"{b:g}" for b in budgets] + keys]


# ----------------------------------------------------------------------------- projections


@dataclass
class Projections:
    """PCA and trained MatryoshkaKV bases of one model and the ranks searched for each budget."""

    states: dict  # kind -> MatryoshkaState
    ranks: dict  # (kind, budget or "keys") -> ranks
    reached: dict  # (kind, budget or "keys") -> budget reached
    train_seconds: float
    train_tokens: int
    losses: list[float]


def pca_state(model, tokenizer, cfg, k_init: str = "pca"):
    """MatryoshkaKV's starting point: a full-rank state of `model`'s KV heads with PCA bases and means from the
    calibration text of `cfg` (a KVCompress), on the model's device; `k_init` "rotary-pairs": the keys' basis
    whole RoPE pairs (kv-compress --k-init rotary-pairs)."""
    from llmsurgery.calibration import calibration_batches
    from llmsurgery.passes.kv_compress.maths import (
        MatryoshkaState,
        attach_,
        detach_,
        init_from_pca_,
    )

    device = next(model.parameters()).device
    d, groups, layers = model_shape(model)
    state = MatryoshkaState(d, [[d] * groups for _ in range(layers)], d // 8).to(device)
    saved = attach_(model, state)
    windows = calibration_batches(tokenizer, cfg.calib).to(device)
    try:
        init_from_pca_(
            model,
            state,
            windows,
            v_identity=False,
            k_init=k_init,
            positions=cfg.placed("pca", windows),
        )
    finally:
        detach_(saved)
    return state


def model_shape(model) -> tuple[int, int, int]:
    """(head_dim, KV heads, decoder layers) of a stock model."""
    config = model.config
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return d, config.num_key_value_heads, config.num_hidden_layers


def build_projections(
    model,
    tokenizer,
    args,
    budgets: list[float],
    state_file: Path | None,
    known: dict,
    needed: set[str],
) -> Projections:
    """PCA bases from the calibration text, then (if a trained projection is needed) Matryoshka training from
    them; ranks searched, for each kind, only at the budgets of its `needed` projections (ranks in `known`, keyed
    (kind, budget), are taken as they are)."""
    from llmsurgery.calibration import calibration_batches
    from llmsurgery.passes.kv_compress.maths import (
        attach_,
        detach_,
        keys_only_ranks,
        search_ranks,
    )

    cfg = kv_config(args)
    device = next(model.parameters()).device
    states, ranks, reached = {}, {}, {}
    train_seconds, losses = 0.0, []
    pca = (
        pca_state(model, tokenizer, cfg) if any(k.startswith(("pca@", "trained@")) for k in needed) else None
    )
    search = calibration_batches(tokenizer, cfg.search_calib).to(device)
    search_at = cfg.placed("search", search)
    for kind in KINDS:
        if not any(key.startswith(f"{kind}@") for key in needed):
            continue
        if kind == "pairs":  # their own bases, not trained
            state = pca_state(model, tokenizer, cfg, k_init="rotary-pairs")
        else:  # trained from the PCA bases, once: every rank is a prefix of the same bases
            state = copy.deepcopy(pca) if kind == "trained" else pca
        states[kind] = state
        saved = attach_(model, state)
        try:
            if kind == "trained":
                train_seconds, losses = _trained_(model, state, tokenizer, cfg, state_file)
            wanted = [b for b in budgets if f"{kind}@{b:g}" in needed]
            found = {b: known[kind, f"{b:g}"] for b in wanted if (kind, f"{b:g}") in known}
            missing = [b for b in wanted if b not in found]
            found |= search_ranks(model, state, search, missing, positions=search_at) if missing else {}
            for b in wanted:
                ranks[kind, b] = found[b]
                state.set_ranks(found[b])
                reached[kind, b] = state.budget()
            ranks[kind, "keys"] = keys_only_ranks(state, 0.75)  # kv-compress --keys-only --budget 0.75
            state.set_ranks(ranks[kind, "keys"])
            reached[kind, "keys"] = state.budget()
        finally:
            detach_(saved)
    trained = any(key.startswith("trained@") for key in needed)
    tokens = args.train_steps * args.train_batch * args.train_seq_len if trained else 0
    return Projections(states, ranks, reached, train_seconds, tokens, losses)


def kv_config(args):
    """The kv-compress settings of the projections: the calibration text and the training."""
    from llmsurgery.passes import KVCompress

    return KVCompress(
        budget=1.0,
        calib=args.calib,
        train_steps=args.train_steps,
        batch_size=args.train_batch,
        train_samples=args.train_samples,
        train_seq_len=args.train_seq_len,
        positions=args.positions,
    )


def state_file_of(args, name: str) -> Path | None:
    """Where --state-dir keeps `name`'s trained bases."""
    return Path(args.state_dir) / f"{Path(name).name}-trained.pt" if args.state_dir else None


def check_state_file(args, name: str) -> None:
    """Refuse a kept state file of `name` that is unreadable or trained with other settings (main, before any
    work: `_trained_` then loads it as it is)."""
    path = state_file_of(args, name)
    if path is not None and path.exists() and any(key.startswith("trained@") for key in args.projections):
        try:
            stored = torch.load(path, map_location="cpu")
        except Exception as exc:
            why = type(exc).__name__
            raise UserError(f"--state-dir: cannot read {path} ({why}); delete it to train anew") from None
        settings = _training_settings(kv_config(args))
        if stored.get("settings") != settings:
            raise UserError(
                f"--state-dir: {path} holds bases trained with other settings ({stored.get('settings')}, "
                f"not {settings}); give another --state-dir, or delete the file to train anew"
            )


def _training_settings(cfg) -> dict:
    """What decides the trained bases besides the model: a state file is reused only where these are the same."""
    settings = {
        "calib": cfg.calib.model_dump(),
        "train": cfg.train_calib.model_dump(),
        "steps": cfg.train_steps,
        "batch": cfg.batch_size,
        "lr": cfg.lr,
        "seed": cfg.seed,
    }
    return settings | ({"positions": cfg.positions} if cfg.positions else {})  # runs from before it: absent


def _trained_(model, state, tokenizer, cfg, state_file: Path | None) -> tuple[float, list[float]]:
    """Matryoshka training of the attached state (the pass's train_), or its result loaded from `state_file`."""
    from llmsurgery.calibration import calibration_batches
    from llmsurgery.passes.kv_compress.maths import train_

    device = state.x_k[0].device
    if state_file is not None and state_file.exists():  # its settings checked by check_state_file
        stored = torch.load(state_file, map_location=device)
        state.load_state_dict(stored["state"])
        state.init_k, state.init_v = stored["init_k"], stored["init_v"]
        print(f"loaded the trained bases from {state_file}", flush=True)
        return stored["seconds"], stored["losses"]
    started = time.perf_counter()
    windows = calibration_batches(tokenizer, cfg.train_calib).to(device)
    losses = train_(model, state, windows, cfg, positions=cfg.placed("train", windows))
    seconds = time.perf_counter() - started
    if state_file is not None:
        state_file.parent.mkdir(parents=True, exist_ok=True)
        saved = {"state": state.state_dict(), "init_k": state.init_k, "init_v": state.init_v}
        torch.save(
            saved | {"seconds": seconds, "losses": losses, "settings": _training_settings(cfg)}, state_file
        )
    return seconds, losses


def folded_copy(model, state, ranks, recent: int = 0):
    """A copy of `model` with the projection folded at `ranks` (the runtime a saved kv-compress output runs, with
    project_context_only and exact_recent=`recent`; folded with --exact-values where values are projected); every
    weight the fold does not replace is shared with `model`."""
    from llmsurgery.passes.kv_compress.maths import fold_

    memo = {id(p): p for p in model.parameters()}
    memo |= {id(b): b for b in model.buffers()}
    # one copy of the config, shared by the twin's modules as by the model's
    twin = copy.deepcopy(model, memo)
    fold_(twin, state, ranks, exact_values=True)
    twin.config.project_context_only = True
    twin.config.exact_recent = recent
    return twin


def bases_digest(maps: list[list[tuple]]) -> str:
    """A short sha256 of a projection's bases and means (`projection_maps`), recorded on each of its rows: a row
    cut short goes on only with the same bases (training on CPU does not repeat bit for bit)."""
    digest = hashlib.sha256()
    for tensor in (t for layer in maps for head in layer for pair in head if pair for t in pair):
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def basis_bytes(model) -> tuple[int, int, int]:
    """Bytes of the key bases and means (needed to run), of the value bases and means (for presses only, and for
    the exact values) and of the unprojected v_proj/o_proj kept by --exact-values."""
    keys = values = exact = 0
    for name, p in model.named_parameters():
        if name.endswith(("key_basis", "key_mean")):
            keys += p.numel() * p.element_size()
        elif name.endswith(("value_basis", "value_mean")):
            values += p.numel() * p.element_size()
        elif ".v_exact." in name or ".o_exact." in name:
            exact += p.numel() * p.element_size()
    return keys, values, exact


# ----------------------------------------------------------------------------- running


def run_methods(
    model,
    tokenizer,
    methods: list[Method],
    cells: dict,
    ppl_windows,
    dense_per_token: int,
    args,
    save=None,
):
    """Every method on `model`: one prefill per batch of a cell, then each method's press replayed on it; `save()`
    after each batch. A method whose cell already holds results (a row continued from an earlier run) runs from
    the first batch it lacks, and its perplexity only if it has none."""
    from llmsurgery.kv_presses import record_prefill, replay, window_caps

    device = next(model.parameters()).device
    caps = window_caps(model)
    windowed = any(caps)  # a model with sliding-window layers: "bw", the share of a windowed cache, as well
    for (task, length), samples in cells.items():
        batch = max(1, min(args.batch, args.batch_tokens // length))
        held = sum(min(length, cap) if cap else length for cap in caps) / len(caps)  # tokens a layer holds
        for start in range(0, len(samples), batch):
            part = samples[start : start + batch]
            pending = [m for m in methods if _cell_(m, f"{task}@{length}", start, len(part)) is not None]
            if not pending:
                continue
            record = record_prefill(model, torch.tensor([s.context for s in part], device=device))
            for m in pending:
                cache = replay(model, m.press_for(length), record)
                actual = stored_elements(cache, m.widths, recent=m.recent) / (
                    dense_per_token * length * len(part)
                )
                cell = m.entry["cells"][f"{task}@{length}"]
                if windowed:  # counted before the question and answer join the cache
                    share = stored_elements(cache, m.widths, caps, m.recent) / (
                        dense_per_token * held * len(part)
                    )
                    cell.setdefault("bw", []).append(round(share, 5))
                match, ll = answer_batch(model, tokenizer, cache, part, length)
                cell["match"] += match
                cell["ll"] += [round(x, 4) for x in ll]
                cell["b"].append(round(actual, 5))
            del record
            if save is not None:
                save()
    if ppl_windows is not None and any(m.entry["ppl"] is None for m in methods):
        ids = ppl_windows.to(device)
        context, scored = ids[:, :PPL_CONTEXT], ids[:, PPL_CONTEXT:]
        record = record_prefill(model, context)
        for m in (m for m in methods if m.entry["ppl"] is None):
            cache = replay(model, m.press_for(context.shape[1]), record)
            with torch.no_grad():
                logits = model(
                    input_ids=scored[:, :-1],
                    past_key_values=cache,
                    position_ids=PPL_CONTEXT + torch.arange(scored.shape[1] - 1, device=device)[None],
                ).logits.float()
            logits = torch.cat([record.last_logits[:, None].float(), logits], dim=1)
            nll = F.cross_entropy(logits.flatten(0, 1).double(), scored.flatten())
            m.entry["ppl"] = math.exp(float(nll))


def _cell_(m: Method, key: str, start: int, size: int) -> dict | None:
    """`m`'s results in cell `key` if it still has to run the batch of `size` samples from `start`, else None.
    Results that reach into that batch without covering it (an earlier run batched otherwise, or one of fewer
    samples) are cut back to `start`, their measured budgets (one per batch) to the batches before it."""
    cell = m.entry["cells"].setdefault(key, {"match": [], "ll": [], "b": []})
    done = len(cell["match"])
    if done >= start + size:
        return None
    if done > start:
        for k in [k for k in ("b", "bw") if k in cell]:
            cell[k] = cell[k][: len(cell[k]) * start // done]
        cell["match"], cell["ll"] = cell["match"][:start], cell["ll"][:start]
    return cell


def no_context_ppl(model, ppl_windows, tokenizer) -> float:
    device = next(model.parameters()).device
    scored = ppl_windows[:, PPL_CONTEXT:].to(device)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = torch.cat([torch.full((scored.shape[0], 1), bos, device=device), scored], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids[:, :-1]).logits.float()
    return math.exp(float(F.cross_entropy(logits.flatten(0, 1).double(), scored.flatten())))


def ppl_windows_of(tokenizer) -> torch.Tensor:
    """9 windows of 512 tokens, evenly spaced over the held-out news articles joined (BOS first)."""
    from llmsurgery.corpora import evaluation_documents

    stream = tokenizer("\n\n".join(evaluation_documents("news")), add_special_tokens=False)["input_ids"]
    size = PPL_CONTEXT + PPL_SCORED
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    step = (len(stream) - size) // PPL_WINDOWS
    return torch.tensor([bos + stream[i * step : i * step + size - len(bos)] for i in range(PPL_WINDOWS)])


SAME_SETTINGS = ("budget_list", "seed", "haystack", "min_dense", "all_cells", "no_ppl")
COVERED_SETTINGS = ("lengths", "samples", "tasks")  # an earlier run may have more of each


def sample_digests(cells: dict) -> dict[str, list[str]]:
    """A short sha256 of each sample's tokens, per "task@length" cell: what --resume compares. (The pydoc haystack
    is CPython's own help text, so it differs between Python versions.)"""
    return {
        f"{task}@{length}": [
            hashlib.sha256(json.dumps([s.context, s.question, s.answer, s.values]).encode()).hexdigest()[:12]
            for s in samples
        ]
        for (task, length), samples in cells.items()
    }


def _covers(earlier: dict, args) -> bool:
    ours = _settings(args)
    return (
        all(earlier.get(k) == ours[k] for k in SAME_SETTINGS)
        and set(ours["tasks"]) <= set(earlier.get("tasks", []))
        and set(ours["lengths"]) <= set(earlier.get("lengths", []))
    )


def _sliced(entry: dict, digests: dict, samples: int) -> dict:
    """An earlier run's entry cut to these cells and their first `samples` samples (its measured budgets "b", one
    per batch, in proportion)."""
    cells = {}
    for key in digests:
        cell = entry["cells"].get(key)
        if cell is not None and cell["match"]:
            batches = math.ceil(len(cell["b"]) * min(samples, len(cell["match"])) / len(cell["match"]))
            cells[key] = {
                "match": cell["match"][:samples],
                "ll": cell["ll"][:samples],
                "b": cell["b"][:batches],
            }
            if "bw" in cell:
                cells[key]["bw"] = cell["bw"][:batches]
    return entry | {"cells": cells}


def _earlier_run(args, name: str, digests: dict, sliding: bool) -> dict | None:
    """With --resume FILE[,FILE...]: the results for `name` whose settings cover these (the same budgets, seed and
    haystack; these tasks and lengths among its own; window-safe presses, for a model with `sliding` window
    layers), every method's entry cut to these cells and samples; where several hold a row, the first that finished
    it, or else the one that went furthest. Rows of a run of fewer samples, or of one cut short, go on from where
    they stopped (the dense and kvpress rows too); a run whose bases were calibrated or trained otherwise (or did
    not record how) lends only its dense and kvpress rows. Cells whose samples differ from these (a run that
    recorded digests) are refused. "origin": the file each carried row came from; "described": per file, where
    its dense and kvpress rows came from (its own `stock_from`, else the file and its machine)."""
    if not args.resume:
        return None
    runs = [
        (path, result) for path in args.resume.split(",") for result in json.loads(Path(path).read_text())
    ]
    entries, origin, merged, described = {}, {}, {}, {}
    training = _training_settings(kv_config(args))
    for path, result in runs:
        if result["model"] != name or not _covers(result["settings"], args):
            continue
        if sliding and result.get("presses") != PRESSES:
            print(f"{name}: {path} ran presses that were not window-safe: not carried", flush=True)
            continue
        theirs = result.get("sample_digests")
        for key, ours in digests.items():
            if theirs is not None and theirs.get(key, [])[: len(ours)] != ours[: len(theirs.get(key, []))]:
                raise UserError(f"--resume: the {key} samples of {path} differ from this run's")
        # bases calibrated or trained otherwise: its projection rows do not serve
        otherwise = result.get("training") != training
        if otherwise and any(m["side"] == "llmsurgery" for m in result["methods"]):
            print(
                f"{name}: {path} calibrated or trained its bases otherwise: its projection rows not carried",
                flush=True,
            )
        for m in result["methods"]:
            row = (m["side"], m["label"], m["budget"])
            if otherwise and m["side"] == "llmsurgery":
                continue
            cut = _sliced(m, digests, args.samples)
            # the first that finished the row, or went furthest with it
            if row not in entries or _done(entries[row]) < _done(cut):
                entries[row], origin[row] = cut, path
        for key in ("reached", "ranks", "overhead_bytes"):  # each projection's from the first run with it
            merged[key] = (result.get(key, {}) if not otherwise else {}) | merged.get(key, {})
        if "train" in result and not otherwise:
            merged.setdefault("train", result["train"])
        print(f"{name}: the results of {path} carry over", flush=True)
        unchecked = "" if theirs is not None else " (its samples were not fingerprinted: not checked)"
        own = f"{path}, {result.get('machine', 'machine not recorded')}" + unchecked
        # a run that went on with earlier ones' rows said "in this run": that run is `path`
        described[path] = result.get("stock_from", own).replace(GONE_ON, f"gone on with in {own}")
    if not described:
        raise UserError(f"--resume: {args.resume} holds no run of {name} whose settings cover these")
    return {"entries": entries, "origin": origin, "result": merged, "described": described}


GONE_ON = "gone on with in this run"


def stock_files(earlier: dict, stock: list[Method]) -> list[str]:
    """The files `earlier` carried samples of the dense and kvpress rows from, each as it described its own. Take
    it before this run adds samples: the carried entries are the ones it appends to."""
    rows = [(m.side, m.label, m.budget) for m in stock]
    rows = [row for row in rows if row in earlier["origin"] and _done(earlier["entries"][row])]
    return [earlier["described"][path] for path in dict.fromkeys(earlier["origin"][row] for row in rows)]


def stock_from(files: list[str], ran_here: bool, machine: str) -> str | None:
    """Where the dense and kvpress rows came from: `files` (from `stock_files`), and this run where it added
    samples; None if all ran here."""
    parts = files + [f"{GONE_ON} ({machine})"] if ran_here and files else files
    return "; ".join(parts) or None


def _done(entry: dict) -> int:
    """How many samples `entry` holds results for, over all its cells."""
    return sum(len(cell["match"]) for cell in entry["cells"].values())


def _complete(entry: dict, cells, samples: int) -> bool:
    """Whether `entry` holds `samples` results in each of `cells` ("task@length")."""
    return all(len(entry["cells"].get(key, {}).get("match", [])) == samples for key in cells)


def _our_methods(budgets, best_press, args, carried: dict, cells: dict, maps: dict):
    """llmsurgery's rows: those of the selected projections, and (with --resume) the rows of other projections that
    finished in an earlier run; and which of them still have to run."""
    ours, todo = [], []
    names = [f"{t}@{n}" for t, n in cells]
    for key in all_projections(budgets):
        rows = projection_methods(budgets, best_press, [key], args.recent)
        rows += press_methods(budgets, best_press, [key], maps, args.recent)
        unfinished = []
        for m in rows:
            earlier_entry = carried.get((m.side, m.label, m.budget), {})
            if earlier_entry.get("runtime") == m.entry.get("runtime"):
                m.entry |= earlier_entry
            if not _complete(m.entry, names, args.samples):
                if "bases" not in m.entry:  # continued only where the bases are known to be the same (below)
                    m.entry |= {"ppl": None, "cells": {}}
                unfinished.append(m)
        if key in args.projections:
            ours += rows
            todo += unfinished
        else:
            ours += [m for m in rows if all(m is not u for u in unfinished)]
    # the models, then the presses; each in the order asked, carried ones last
    order = {key: i for i, key in enumerate(args.projections)}
    ours.sort(key=lambda m: (m.on_stock, order.get(m.model, len(order))))
    return ours, todo


def _settings(args) -> dict:
    return {key: getattr(args, key) for key in (*COVERED_SETTINGS, *SAME_SETTINGS)}


def _machine(args) -> str:
    import platform

    import transformers

    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    return (
        f"{args.device} ({where}), {args.dtype}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )


def haystack_texts(args) -> dict[str, list[str]]:
    from llmsurgery.corpora import evaluation_documents, file_documents

    if args.haystack:
        return {"file": file_documents(Path(args.haystack).expanduser())}
    return {"news": evaluation_documents("news"), "pydoc": evaluation_documents("pydoc")}


def run_model(name: str, args, budgets: list[float], results: list, save) -> None:
    """All methods on one model, its result appended to `results` at once; `save()` after each step writes the
    results so far (a run cut short keeps what it finished)."""
    from llmsurgery.model_io import load_model

    loaded = load_model(name, device=args.device, dtype=args.dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    config = model.config
    d, groups, layers = model_shape(model)
    dense_per_token = layers * 2 * groups * d
    hay = Haystacks(tokenizer, haystack_texts(args))
    tasks = [t for t in args.tasks if not (args.haystack and t == "pydoc")]
    cells = {
        (task, length): [
            make_sample(task, length, i, hay, args.seed, "file" if args.haystack else "news")
            for i in range(args.samples)
        ]
        for length in args.lengths
        for task in tasks
    }
    ppl = None if args.no_ppl else ppl_windows_of(tokenizer)
    stock = stock_methods(budgets)
    result = {
        "model": name,
        "tasks": tasks,
        "lengths": args.lengths,
        "budgets": budgets,
        "min_dense": args.min_dense,
        "methods": [m.entry for m in stock],
        "ppl_setup": f"{PPL_WINDOWS} held-out news windows, {PPL_CONTEXT} tokens of context under the method, "
        f"{PPL_SCORED} scored with their own cache dense",
        "dense_bytes_per_token": dense_per_token * next(model.parameters()).element_size(),
        "seconds": {},
        "settings": _settings(args),
        "machine": _machine(args),
        "sample_digests": sample_digests(cells),
        "presses": PRESSES,
        "training": _training_settings(kv_config(args)),
    }
    results.append(result)
    clock = time.perf_counter()

    def lap(what: str) -> None:
        nonlocal clock
        result["seconds"][what] = round(time.perf_counter() - clock, 1)
        print(f"{name}: {what} took {result['seconds'][what]:.0f} s", flush=True)
        clock = time.perf_counter()
        save()

    sliding = "sliding_attention" in (getattr(config, "layer_types", None) or ())
    earlier = _earlier_run(args, name, result["sample_digests"], sliding)
    carried = earlier["entries"] if earlier else {}
    files = stock_files(earlier, stock) if earlier else []
    for m in stock:  # --resume: the dense and kvpress rows of earlier runs, to go on from
        m.entry |= carried.get((m.side, m.label, m.budget), {})
    held = sum(_done(m.entry) for m in stock)
    kept = ("train", "reached", "ranks", "overhead_bytes")
    # until step 3 sorts them, the carried projection rows stand as they came, so that a save during steps 1 and 2
    # (a run cut short there) keeps them for the next --resume
    if earlier:
        result["methods"] += [entry for row, entry in carried.items() if row[0] == "llmsurgery"]
        result |= {k: earlier["result"][k] for k in kept if k in earlier["result"]}
        if where := stock_from(files, True, result["machine"]):  # settled after step 2
            result["stock_from"] = where
    # Step 1: the dense model in every (task, length) cell; the methods then run where it scores >= --min-dense.
    run_methods(model, tokenizer, stock[:1], cells, ppl, dense_per_token, args, save)
    dense = stock[0].entry["cells"]
    usable = [f"{t}@{n}" for t, n in cells if _mean(dense[f"{t}@{n}"]["match"]) >= args.min_dense]
    result |= {"usable": usable or [f"{t}@{n}" for t, n in cells], "fallback": not usable}
    result["no_context_ppl"] = None if ppl is None else no_context_ppl(model, ppl, tokenizer)
    lap("dense")
    if args.dense_only:
        return
    if not args.all_cells:
        cells = {key: samples for key, samples in cells.items() if f"{key[0]}@{key[1]}" in result["usable"]}
    # Step 2: kvpress on the stock model, one prefill per batch for every press and budget.
    run_methods(model, tokenizer, stock[1:], cells, ppl, dense_per_token, args, save)
    if earlier:
        ran_here = sum(_done(m.entry) for m in stock) > held
        result["stock_from"] = stock_from(files, ran_here, result["machine"])
        if result["stock_from"] is None:
            del result["stock_from"]
    evicting = [m.entry for m in stock if m.entry["label"] in EVICTION_PRESSES]
    result["best_press"] = {
        b: best([m for m in evicting if m["budget"] == b], result["usable"])["label"] for b in budgets
    }
    lap("kvpress presses")
    # Step 3: PCA and trained bases, ranks searched per budget; each projection folded and run, then the same
    # projections as presses on the stock model (one prefill per batch for all of them).
    from llmsurgery.kv_presses import projection_maps, stored_widths

    maps: dict = {}
    ours, todo = _our_methods(budgets, result["best_press"], args, carried, cells, maps)
    result["methods"] = [m.entry for m in stock + ours]
    if not todo:
        save()
        return
    known = {tuple(k.split("@")): v for k, v in result.get("ranks", {}).items()}
    needed = {m.model for m in todo}
    p = build_projections(model, tokenizer, args, budgets, state_file_of(args, name), known, needed)
    if p.train_tokens or "train" not in result:  # trained here, or nothing trained yet
        result["train"] = {"seconds": p.train_seconds, "tokens": p.train_tokens, "losses": p.losses}
    result |= {
        "reached": result.get("reached", {}) | {f"{k[0]}@{k[1]}": v for k, v in p.reached.items()},
        "ranks": result.get("ranks", {}) | {f"{k[0]}@{k[1]}": v for k, v in p.ranks.items()},
        "overhead_bytes": result.get("overhead_bytes", {}),
    }
    lap("projections (PCA, training, rank search)")
    for key in args.projections:
        packed = [m for m in todo if m.model == key and not m.on_stock]
        presses = [m for m in todo if m.model == key and m.on_stock]
        if not packed and not presses:
            continue
        kind, at = key.split("@")
        ranks = p.ranks[kind, "keys" if at == "keys" else float(at)]
        twin = folded_copy(model, p.states[kind], ranks, keys_recent(key, args.recent))
        result["overhead_bytes"][key] = basis_bytes(twin)
        maps[key] = projection_maps(twin, keys_only=at == "keys")
        digest = bases_digest(maps[key])
        for m in packed + presses:
            if m.entry.get("bases", digest) != digest:  # a row cut short on other bases starts anew
                print(
                    f"{name}: {m.entry['label']} at b={m.budget:g} ran on other bases: run anew", flush=True
                )
                m.entry |= {"ppl": None, "cells": {}}
            elif _done(m.entry):
                held = ", ".join(f"{cell} {len(c['match'])}" for cell, c in m.entry["cells"].items())
                print(
                    f"{name}: {m.entry['label']} at b={m.budget:g} goes on from the samples held: {held}",
                    flush=True,
                )
            m.entry["bases"] = digest
        for m in presses:
            m.widths = stored_widths(maps[key])
        if packed:
            run_methods(twin, tokenizer, packed, cells, ppl, dense_per_token, args, save)
            lap(f"kv-compress {key}")
        del twin
    presses = [m for m in todo if m.on_stock]
    if presses:
        run_methods(model, tokenizer, presses, cells, ppl, dense_per_token, args, save)
        lap("the projections as presses on the stock model")


# ----------------------------------------------------------------------------- command line


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--{what} takes comma-separated numbers, not '{text}'") from None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--lengths", default="512,1024,2048,4096", help="context tokens per sample")
    parser.add_argument("--samples", type=int, default=100, help="samples per (task, length) cell")
    parser.add_argument("--budgets", default="0.75,0.5,0.375,0.25")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument(
        "--haystack", help="a .txt or .jsonl file whose text replaces the news and pydoc haystacks"
    )
    parser.add_argument(
        "--all-cells", action="store_true", help="run the methods also in cells where dense scores low"
    )
    parser.add_argument(
        "--dense-only", action="store_true", help="only the dense model: which lengths qualify"
    )
    parser.add_argument("--min-dense", type=float, default=85.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--calib", default="news", help="calibration text of the projections (never evaluated)"
    )
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--train-samples", type=int, default=200, help="training windows (cycled)")
    parser.add_argument("--train-seq-len", type=int, default=256)
    parser.add_argument(
        "--positions",
        type=int,
        default=0,
        help="kv-compress --positions of the projections: calibration, training and search windows start at "
        "random positions below this (0: at position 0)",
    )
    parser.add_argument(
        "--recent",
        type=int,
        default=0,
        help="keep the keys of the context's last N tokens exact in llmsurgery's keys-only rows (a kv-compress model "
        "loaded with exact_recent=N; its presses likewise), their cost counted and paid for by evicting more tokens "
        "(0: every context key projected)",
    )
    parser.add_argument("--state-dir", help="keep the trained bases here and reuse them on the next run")
    parser.add_argument(
        "--projections",
        default="all",
        help="the kv-compress projections to run, in this order: pca@B, pairs@B, trained@B (B one of --budgets) "
        "and pca@keys, pairs@keys, trained@keys (keys at d/2, b = 0.75); pairs: the keys' basis whole rotary "
        "frequency pairs (kv-compress --k-init rotary-pairs), not trained; each runs as a kv-compress model "
        "(composed with eviction: pairs and trained) and as a press on the stock model (composed: all) "
        "(default: all)",
    )
    parser.add_argument("--batch", type=int, default=16, help="samples per prefill at most")
    parser.add_argument("--batch-tokens", type=int, default=16384, help="context tokens per prefill at most")
    parser.add_argument("--no-ppl", action="store_true", help="skip the continuation-perplexity table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", help="recall against KV budget, a panel per task (PNG)")
    parser.add_argument("--json", help="write the results here (also after each sample batch of a run)")
    parser.add_argument(
        "--resume",
        help="carry over every finished row of earlier --json files (comma-separated; a row from the first that "
        "finished it; projections not in --projections too, if their bases were calibrated and trained alike) and "
        "their searched ranks, run the rest: same budgets, "
        "seed and haystack; these tasks and lengths among their own (their first N samples); a row cut short, or "
        "of a run with fewer samples, goes on from where it stopped (a projection's row if its bases are the same)",
    )
    parser.add_argument(
        "--report",
        help="print (and with --plot draw) the results of earlier runs' --json files (comma-separated)",
    )
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.lengths = [int(x) for x in _floats(args.lengths, "lengths")]
    args.budget_list = sorted(_floats(args.budgets, "budgets"), reverse=True)
    args.tasks = [t for t in args.tasks.split(",") if t]
    if any(t not in TASKS for t in args.tasks):
        raise UserError(f"--tasks: choose from {', '.join(TASKS)}")
    if not all(0 < b < 1 for b in args.budget_list):
        raise UserError("--budgets must lie strictly between 0 and 1")
    known = all_projections(args.budget_list)
    args.projections = known if args.projections == "all" else [p for p in args.projections.split(",") if p]
    if any(p not in known for p in args.projections):
        raise UserError(f"--projections: choose from {', '.join(known)} (or all)")
    shortest = min(args.lengths + ([] if args.no_ppl else [PPL_CONTEXT]))  # the perplexity's context too
    if args.recent < 0 or args.recent > shortest // 4:
        raise UserError(
            f"--recent takes 0 or a number of tokens up to a quarter of the shortest context ({shortest // 4})"
        )
    if args.recent and min(args.budget_list) <= args.recent / (2 * shortest):
        raise UserError(f"--recent {args.recent}: its exact keys alone would fill the smallest --budgets")
    if args.samples < 1 or any(n < 128 for n in args.lengths):
        raise UserError("--samples must be at least 1 and every length at least 128 tokens")
    from pydantic import ValidationError

    try:  # the calibration and training settings, as kv-compress checks them
        kv_config(args).check_positions(None)
    except ValidationError as exc:
        raise UserError(
            validation_line(exc, lambda loc: "--" + ".".join(map(str, loc)).replace("_", "-"))
        ) from None
    if args.haystack:
        from llmsurgery.corpora import check_source

        if not Path(args.haystack).expanduser().is_file():
            raise UserError(f"--haystack: no such file {args.haystack} (a .txt or .jsonl file)")
        check_source(args.haystack)  # readable text with at least one document
    for target in (args.plot, args.json):
        if target and not Path(target).resolve().parent.is_dir():
            raise UserError(f"cannot write {target}: its folder does not exist")
    if args.plot and not args.plot.endswith(".png"):
        raise UserError("--plot takes a .png file name")
    for path in args.resume.split(",") if args.resume else []:
        if not Path(path).is_file():
            raise UserError(f"--resume: no such file {path}")
        if args.json and Path(args.json).resolve() == Path(path).resolve():
            raise UserError(f"--json {args.json} is also a --resume file: write the results to another file")
    for path in args.report.split(",") if args.report else []:
        if not Path(path).is_file():
            raise UserError(f"--report: no such file {path}")
    return args


def report(results: list[dict], args) -> None:
    for result in results:
        print_report(result)
    if args.plot:
        save_plot(results, Path(args.plot))
    for result in results:
        print(f"== {result['model']}: the best of each side, string_match_all averaged over the tasks ==")
        for line in summary_lines(result):
            print(line)


def main(argv=None) -> int:
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        args = parse_args(argv)
        if args.report:
            results = [r for path in args.report.split(",") for r in json.loads(Path(path).read_text())]
        else:
            from llmsurgery.kv_presses import require_kvpress

            require_kvpress()
            for name in args.models:  # a kept state file trained otherwise is refused before any work
                check_state_file(args, name)
            results = []

            def save() -> None:
                if args.json:
                    Path(args.json).write_text(json.dumps(results))

            for name in args.models:
                run_model(name, args, args.budget_list, results, save)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
