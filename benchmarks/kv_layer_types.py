"""Which layers' key projection costs long-range recall, on a model that mixes sliding-window and full attention.

kv_recall.py projects every layer alike. On Gemma3-270M (15 sliding-window layers of window 512, 3 full-attention
layers) keys at d/2 everywhere lose the needle. This splits the projection by layer type: PCA bases (MatryoshkaKV's
initialisation, from the news calibration text) at a key and value rank per type, run as a projection press on the
stock model (kv_presses.projection_press: the prefill's cache projected, the question and answer exact), on
kv_recall's tasks. Per row: the share of all the context KV it stores (kv_recall's count: every layer holds every
token) and the share of the full-attention layers' KV (what grows with the context where the cache windows the
sliding layers, as transformers' DynamicCache(config=...) does), then string_match_all and the answer
log-likelihood per task.

    python benchmarks/kv_layer_types.py [--model gemma3-270m] [--length 1024] [--samples 16]
        [--tasks filler,news] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_recall import Method, haystack_texts, run_methods  # noqa: E402
from kv_recall_report import _mean  # noqa: E402
from kv_recall_tasks import TASKS, Haystacks, make_sample  # noqa: E402

from llmsurgery.errors import UserError  # noqa: E402

# (label, (key, value) rank of the full-attention layers, (key, value) rank of the sliding layers), as shares of d
ROWS = [
    ("every layer keys d/2 (kv-compress --keys-only 0.75)", (0.5, 1), (0.5, 1)),
    ("sliding keys d/2, full whole", (1, 1), (0.5, 1)),
    ("sliding keys 3d/4, full whole", (1, 1), (0.75, 1)),
    ("full keys d/2, sliding whole", (0.5, 1), (1, 1)),
    ("full keys d/4, sliding whole", (0.25, 1), (1, 1)),
    ("full keys and values d/2, sliding whole", (0.5, 0.5), (1, 1)),
    ("full keys d/4 values d/2, sliding whole", (0.25, 0.5), (1, 1)),
]


def pca_state(model, tokenizer, calib: str):
    from llmsurgery.calibration import calibration_batches
    from llmsurgery.passes import KVCompress
    from llmsurgery.passes.kv_compress.maths import MatryoshkaState, attach_, detach_, init_from_pca_

    config = model.config
    d, groups, layers = config.head_dim, config.num_key_value_heads, config.num_hidden_layers
    state = MatryoshkaState(d, [[d] * groups for _ in range(layers)], d // 8)
    saved = attach_(model, state)
    try:
        batches = calibration_batches(tokenizer, KVCompress(budget=1.0, calib=calib).calib)
        init_from_pca_(model, state, batches, v_identity=False)
    finally:
        detach_(saved)
    return state


def row_press(model, state, full_ranks, sliding_ranks):
    """The projection press of one row and its stored elements per token and layer."""
    from kv_recall import folded_copy

    from llmsurgery.kv_presses import projection_maps, projection_press, stored_widths

    config = model.config
    d, groups = config.head_dim, config.num_key_value_heads
    per_layer = [full_ranks if t == "full_attention" else sliding_ranks for t in config.layer_types]
    ranks = {
        "k": [[round(k * d)] * groups for k, _ in per_layer],
        "v": [[round(v * d)] * groups for _, v in per_layer],
    }
    twin = folded_copy(model, state, ranks)
    maps = projection_maps(twin, keys_only=all(v == 1 for _, v in per_layer))
    return (lambda: projection_press(maps)), stored_widths(maps)


def main(argv=None) -> int:
    os.environ.setdefault("TQDM_DISABLE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--tasks", default="filler,news")
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
    config = model.config
    d, groups = config.head_dim, config.num_key_value_heads
    full = [t == "full_attention" for t in types]
    state = pca_state(model, tokenizer, args.calib)
    methods = [Method("dense", "dense", 1.0)]
    for label, full_ranks, sliding_ranks in ROWS:
        press, widths = row_press(model, state, full_ranks, sliding_ranks)
        share = sum(widths) / (len(types) * 2 * groups * d)
        methods.append(Method("llmsurgery", label, round(share, 4), model=label, press=press, on_stock=True))
        methods[-1].widths = widths
        methods[-1].entry["full_layers_share"] = sum(w for w, f in zip(widths, full) if f) / (
            sum(full) * 2 * groups * d
        )
    hay = Haystacks(tokenizer, haystack_texts(args))
    cells = {
        (t, args.length): [make_sample(t, args.length, i, hay, args.seed) for i in range(args.samples)]
        for t in tasks
    }
    batching = argparse.Namespace(batch=4, batch_tokens=4096)
    with torch.no_grad():
        run_methods(model, tokenizer, methods, cells, None, len(types) * 2 * groups * d, batching)
    print(f"{args.model}, {args.length} tokens, {args.samples} samples a task; PCA bases, as presses")
    head = f"{'row':52s} {'all KV':>7s} {'full KV':>8s}"
    print(head + "".join(f" {t + ' match / ll':>22s}" for t in tasks))
    for m in methods:
        e = m.entry
        line = f"{e['label']:52s} {e['budget']:7.3f} {e.get('full_layers_share', 1.0):8.3f}"
        for t in tasks:
            cell = e["cells"][f"{t}@{args.length}"]
            line += f" {_mean(cell['match']):13.1f} / {sum(cell['ll']) / len(cell['ll']):6.3f}"
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps([m.entry for m in methods]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
