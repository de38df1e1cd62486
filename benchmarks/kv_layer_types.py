"""Which layers' key projection costs long-range recall on a model that mixes sliding-window and full attention, and
what projecting only the full-attention layers buys against token eviction in a windowed cache.

kv_recall.py projects every layer alike. On Gemma3-270M (15 sliding-window layers of window 512, 3 full-attention
layers) keys at d/2 everywhere lose the needle. This splits the projection by layer type: PCA bases (MatryoshkaKV's
initialisation, from the news calibration text) at a key and value rank per type, run as a projection press on the
stock model (kv_presses.projection_press: the prefill's cache projected, the question and answer exact), on
kv_recall's tasks.

Then equal memory in a *windowed* cache (transformers' DynamicCache(config=...): a sliding-window layer holds only
the window - 1 tokens it reads, a full-attention layer every token). There the full-attention layers are what grows
with the context. At each windowed budget (--windowed-budgets, and the share of the full-attention projection
alone) two rows: TOVA alone, and `kv-compress --layers full-attention --keys-only --budget 0.625` (keys at d/4 on
the full-attention layers, as a press) composed with TOVA, each evicting as little as reaches the budget.

Per row: the share of all the context KV it stores (kv_recall's count: every layer holds every token), of a
windowed cache, and of the full-attention layers' KV (all measured on the replayed cache), then string_match_all
and the answer log-likelihood per task; last, one line per windowed budget (recall averaged over the tasks where
the dense model scores at least --min-dense).

    python benchmarks/kv_layer_types.py [--model gemma3-270m] [--length 1024] [--samples 16]
        [--tasks filler,news] [--windowed-budgets 0.75,0.5,0.375] [--min-dense 85] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_recall import Method, _floats, haystack_texts, model_shape, pca_state, run_methods  # noqa: E402
from kv_recall_report import _mean  # noqa: E402
from kv_recall_tasks import TASKS, Haystacks, make_sample  # noqa: E402

from llmsurgery.errors import UserError  # noqa: E402

# (label, (key, value) rank of the full-attention layers, (key, value) rank of the sliding layers), as shares of d
ROWS = [
    ("every layer keys d/2 (kv-compress --keys-only 0.75)", (0.5, 1), (0.5, 1)),
    ("sliding keys d/2, full whole", (1, 1), (0.5, 1)),
    ("sliding keys 3d/4, full whole", (1, 1), (0.75, 1)),
    ("full keys d/2, sliding whole", (0.5, 1), (1, 1)),
    ("full keys and values d/2, sliding whole", (0.5, 0.5), (1, 1)),
    ("full keys d/4 values d/2, sliding whole", (0.25, 0.5), (1, 1)),
]
# what `kv-compress --layers full-attention --keys-only --budget 0.625` projects: alone, and composed with TOVA
COMPOSED = ("full keys d/4, sliding whole", (0.25, 1), (1, 1))


def row_maps(model, state, full_ranks, sliding_ranks):
    """The projection maps of one row (`kv_presses.projection_maps`) and its stored elements per token and layer."""
    from kv_recall import folded_copy

    from llmsurgery.kv_presses import projection_maps, stored_widths

    config = model.config
    d, groups, _ = model_shape(model)
    per_layer = [full_ranks if t == "full_attention" else sliding_ranks for t in config.layer_types]
    ranks = {
        "k": [[round(k * d)] * groups for k, _ in per_layer],
        "v": [[round(v * d)] * groups for _, v in per_layer],
    }
    twin = folded_copy(model, state, ranks)
    maps = projection_maps(twin, keys_only=all(v == 1 for _, v in per_layer))
    return maps, stored_widths(maps)


def windowed_share(length: int, caps: list[int | None], full_share: float, kept: int) -> float:
    """The share of a windowed cache held when every layer keeps `kept` of `length` context tokens (a sliding-window
    layer at most the `caps` its window reads) and a full-attention layer stores `full_share` of each one's KV."""
    held = sum(min(kept, cap) if cap else kept * full_share for cap in caps)
    return held / sum(min(length, cap) if cap else length for cap in caps)


def eviction_for(target: float, length: int, caps: list[int | None], full_share: float) -> float | None:
    """The least kvpress compression ratio (it keeps int(length (1 - ratio)) tokens) that brings the windowed share
    to `target` or below: 0 when no eviction is needed, None when even one token a layer is too many."""
    kept = [k for k in range(1, length + 1) if windowed_share(length, caps, full_share, k) <= target + 1e-9]
    if not kept:
        return None
    return 0.0 if kept[-1] == length else 1 - (kept[-1] + 0.5) / length


def equal_memory_methods(model, press, widths, targets, length) -> tuple[list[Method], dict]:
    """TOVA alone and the full-attention projection `press` (stored `widths` per layer) composed with TOVA, at each
    windowed budget in `targets` and at the projection's own. Returns the rows, and per budget the pair compared
    there: (TOVA's row, ours), ours being the projection alone wherever it needs no eviction to fit."""
    from llmsurgery.kv_presses import make_press, window_caps

    caps = window_caps(model)
    d, groups, _ = model_shape(model)
    full_share = next(w for w, cap in zip(widths, caps) if cap is None) / (2 * groups * d)
    alone = windowed_share(length, caps, full_share, length)

    def row(side: str, label: str, budget: float, evict: float, **kw) -> Method:
        method = Method(side, label, round(budget, 4), **kw)
        share = full_share if side == "llmsurgery" else 1.0
        method.entry["full_layers_share"] = share * int(length * (1 - evict)) / length
        return method

    projected = {"widths": widths, "on_stock": True}
    ours_alone = row("llmsurgery", COMPOSED[0], alone, 0.0, model="alone", press=press, **projected)
    methods, pairs = [ours_alone], {}
    for target in sorted({alone, *targets}, reverse=True):
        c = eviction_for(target, length, caps, 1.0)
        e = eviction_for(target, length, caps, full_share)
        tova = ours = None
        if c:
            tova = row("kvpress", f"tova c={c:.3f}", target, c, press=lambda c=c: make_press("tova", c))
            methods.append(tova)
        if e == 0:
            ours = ours_alone
        elif e is not None:
            label = f"full keys d/4 + tova e={e:.3f}"
            ours = row("llmsurgery", label, target, e, model=label, press=lambda e=e: press(e), **projected)
            methods.append(ours)
        pairs[round(target, 4)] = (tova, ours)
    return methods, pairs


def main(argv=None) -> int:
    os.environ.setdefault("TQDM_DISABLE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--tasks", default="filler,news")
    parser.add_argument("--windowed-budgets", default="0.75,0.5,0.375")
    parser.add_argument(
        "--min-dense",
        type=float,
        default=85.0,
        help="the closing lines average the tasks where the dense model scores at least this",
    )
    parser.add_argument("--calib", default="news", help="calibration text of the PCA bases (never evaluated)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    args.haystack = None
    tasks = [t for t in args.tasks.split(",") if t]
    try:
        if not tasks or any(t not in TASKS for t in tasks):
            raise UserError(f"--tasks: choose from {', '.join(TASKS)}")
        if args.samples < 1 or args.length < 128:
            raise UserError("--samples must be at least 1 and --length at least 128 tokens")
        targets = _budgets(args.windowed_budgets)
        from llmsurgery.kv_presses import require_kvpress
        from llmsurgery.model_io import load_model

        require_kvpress()
        loaded = load_model(args.model, device="cpu", dtype="float32")
        model, tokenizer = loaded.model, loaded.tokenizer
        types = getattr(model.config, "layer_types", None) or []
        if "sliding_attention" not in types or "full_attention" not in types:
            raise UserError(f"{args.model} does not mix sliding-window and full-attention layers")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from llmsurgery.passes import KVCompress

    d, groups, layers = model_shape(model)
    per_layer = 2 * groups * d  # K and V elements a token of one layer stores, dense
    full = [t == "full_attention" for t in types]
    state = pca_state(model, tokenizer, KVCompress(budget=1.0, calib=args.calib))
    methods = [Method("dense", "dense", 1.0)]
    for label, full_ranks, sliding_ranks in ROWS:
        maps, widths = row_maps(model, state, full_ranks, sliding_ranks)
        share = round(sum(widths) / (layers * per_layer), 4)
        methods.append(
            Method(
                "llmsurgery", label, share, model=label, press=_press_of(maps), widths=widths, on_stock=True
            )
        )
        methods[-1].entry["full_layers_share"] = next(w for w, f in zip(widths, full) if f) / per_layer
    maps, widths = row_maps(model, state, *COMPOSED[1:])
    equal, pairs = equal_memory_methods(model, _press_of(maps), widths, targets, args.length)
    methods += equal
    hay = Haystacks(tokenizer, haystack_texts(args))
    cells = {
        (t, args.length): [make_sample(t, args.length, i, hay, args.seed) for i in range(args.samples)]
        for t in tasks
    }
    batching = argparse.Namespace(batch=4, batch_tokens=4096)
    with torch.no_grad():
        run_methods(model, tokenizer, methods, cells, None, layers * per_layer, batching)
    print_rows(methods, pairs, tasks, args)
    if args.json:
        Path(args.json).write_text(json.dumps([m.entry for m in methods]))
    return 0


def _budgets(text: str) -> list[float]:
    values = _floats(text, "windowed-budgets")
    if not values or not all(0 < v < 1 for v in values):
        raise UserError(f"--windowed-budgets takes comma-separated shares between 0 and 1, not '{text}'")
    return values


def _press_of(maps):
    from llmsurgery.kv_presses import projection_press

    return lambda evict=0.0: projection_press(maps, evict, "tova")


def print_rows(methods: list[Method], pairs: dict, tasks: list[str], args) -> None:
    """The table (measured shares: all KV, windowed, full-attention layers), then one line per windowed budget:
    the `pairs` compared there, recall averaged over the tasks where the dense model scores at least --min-dense
    (all of them if it does nowhere), as kv_recall.py does."""
    print(f"{args.model}, {args.length} tokens, {args.samples} samples a task; PCA bases, as presses")
    head = f"{'row':52s} {'all KV':>7s} {'windowed':>8s} {'full KV':>8s}"
    print(head + "".join(f" {t + ' match / ll':>22s}" for t in tasks))
    cells = [f"{t}@{args.length}" for t in tasks]
    for m in methods:
        e = m.entry
        shares = [[x for c in cells for x in e["cells"][c][k]] for k in ("b", "bw")]
        line = f"{e['label']:52s} {_mean(shares[0]):7.3f} {_mean(shares[1]):8.3f}"
        line += f" {e.get('full_layers_share', 1.0):8.3f}"
        for c in cells:
            cell = e["cells"][c]
            line += f" {_mean(cell['match']):13.1f} / {_mean(cell['ll']):6.3f}"
        print(line)
    dense = methods[0].entry["cells"]
    usable = [c for c in cells if _mean(dense[c]["match"]) >= args.min_dense] or cells
    print(f"the lines below average {', '.join(usable)} (dense at least {args.min_dense:g}, else every task)")
    for target, pair in pairs.items():
        parts = [
            f"{m.side} {_mean([_mean(m.entry['cells'][c]['match']) for c in usable]):.1f} ({m.label})"
            for m in pair
            if m is not None
        ]
        print(f"windowed b={target:g}: " + "; ".join(parts))


if __name__ == "__main__":
    sys.exit(main())
