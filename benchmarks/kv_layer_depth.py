"""Which decoder layers' key projection costs long-range recall: keys-only projection at every layer, then with one
block of consecutive layers kept whole.

kv_recall.py gives every layer the same key rank (`kv-compress --keys-only --budget 0.75`: r_k = d/2, values whole).
On SmolLM2-135M that keeps the needle in news and filler but loses it in pydoc (69 against ThinK's 90). This asks
where it is lost: the same bases (MatryoshkaKV, arXiv 2410.14731: PCA from the calibration text, then trained, as
kv_recall.py builds them; `--state-dir` reuses its kept bases) at keys d/2 on every layer, and then each block of
`--block` consecutive layers kept whole, each row run as a projection press on the stock model
(`kv_presses.projection_press`: the prefill's cache projected, the question and answer exact) on kv_recall's tasks.
A block whose keys kept whole win back most of the recall is where a per-layer rank budget should spend its dims:
`--whole A-B` adds a row that keeps layers A to B whole and narrows the others' keys so the budget stays that of
keys d/2 everywhere (3/4 of the dense KV). `--haystack FILE` builds the tasks from your own text instead of the held-
out news and pydoc (choose the block on calibration text, then score it on the held-out tasks).

Per row: the share of the dense context KV it stores (measured on the replayed cache), then string_match_all and
the answer log-likelihood per task.

    python benchmarks/kv_layer_depth.py [--model smollm2-135m] [--tasks pydoc] [--length 1024] [--samples 32]
        [--block 5] [--whole A-B] [--haystack FILE] [--bases trained|pca] [--calib news] [--train-steps 150]
        [--state-dir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kv_recall  # noqa: E402
from kv_recall import Method, haystack_texts, model_shape, run_methods  # noqa: E402
from kv_recall_report import _mean  # noqa: E402
from kv_recall_tasks import TASKS, Haystacks, make_sample  # noqa: E402

from llmsurgery.errors import UserError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="pydoc")
    parser.add_argument("--length", type=int, default=1024, help="context tokens per sample")
    parser.add_argument("--samples", type=int, default=32, help="samples per task")
    parser.add_argument(
        "--block", type=int, default=5, help="consecutive layers kept whole in a row (0: no such rows)"
    )
    parser.add_argument(
        "--whole", help="A-B: also keep layers A to B whole at the same budget (the others narrower)"
    )
    parser.add_argument(
        "--haystack", help="a .txt or .jsonl file whose text replaces the news and pydoc haystacks"
    )
    parser.add_argument("--bases", choices=("trained", "pca"), default="trained")
    parser.add_argument("--calib", default="news", help="calibration text of the bases (never evaluated)")
    parser.add_argument("--train-steps", type=int, default=150)
    parser.add_argument(
        "--state-dir", help="kv_recall.py's kept trained bases (trained and kept there if absent)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    if not args.tasks or any(t not in TASKS for t in args.tasks):
        raise UserError(f"--tasks: choose from {', '.join(TASKS)}")
    if args.samples < 1 or args.length < 128:
        raise UserError("--samples must be at least 1 and --length at least 128 tokens")
    if args.block < 0:
        raise UserError("--block must be 0 (no block rows) or more layers")
    if args.haystack and "pydoc" in args.tasks:
        raise UserError("--haystack replaces the pydoc haystack: leave pydoc out of --tasks")
    if args.whole is not None:
        first, _, last = args.whole.partition("-")
        if not (first.isdecimal() and last.isdecimal() and int(first) <= int(last)):
            raise UserError(f"--whole takes a layer range A-B (A <= B), not '{args.whole}'")
        args.whole = range(int(first), int(last) + 1)
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise UserError(f"cannot write {args.json}: its folder does not exist")
    # the bases as kv_recall.py builds them: its calibration and training settings, and its --state-dir file
    recall = ["--models", args.model, "--calib", args.calib, "--train-steps", str(args.train_steps)]
    recall += ["--projections", f"{args.bases}@keys"]
    recall += ["--state-dir", args.state_dir] if args.state_dir else []
    recall += ["--haystack", args.haystack] if args.haystack else []
    args.recall = kv_recall.parse_args(recall)
    return args


def bases(model, tokenizer, args):
    """The keys-only projection's state: PCA bases, then (--bases trained) Matryoshka training or the kept file."""
    from llmsurgery.passes.kv_compress.maths import attach_, detach_

    cfg = kv_recall.kv_config(args.recall)
    state = kv_recall.pca_state(model, tokenizer, cfg)
    if args.bases == "trained":
        saved = attach_(model, state)
        try:
            kv_recall._trained_(
                model, state, tokenizer, cfg, kv_recall.state_file_of(args.recall, args.model)
            )
        finally:
            detach_(saved)
    return state


def equal_budget_key_ranks(d: int, layers: int, step: int, whole: range) -> list[int]:
    """Key ranks per layer: the `whole` layers at d, the others sharing what is left of keys d/2 everywhere, in steps
    of `step` (the earlier layers take a step more where it does not divide evenly)."""
    others = [layer for layer in range(layers) if layer not in whole]
    steps = (layers * (d // 2) - (layers - len(others)) * d) // step
    if not others or steps < len(others):
        raise UserError(
            f"--whole {whole.start}-{whole.stop - 1} leaves the other layers less than a rank step"
        )
    each, extra = divmod(steps, len(others))
    ranks = {layer: d for layer in whole}
    ranks |= {layer: (each + (i < extra)) * step for i, layer in enumerate(others)}
    return [ranks[layer] for layer in range(layers)]


def depth_rows(model, state, block: int, whole: range | None) -> list[Method]:
    """Keys d/2 on every layer, then each block of `block` layers (if any) with its keys whole; then (`whole`) those
    layers whole at the budget of keys d/2 everywhere; values whole throughout."""
    from llmsurgery.kv_presses import projection_maps, projection_press, stored_widths

    d, groups, layers = model_shape(model)
    plans = [("keys d/2 on every layer", [d // 2] * layers)]
    for start in range(0, layers, block) if block else ():
        kept = range(start, min(start + block, layers))
        label = f"layers {kept.start}-{kept.stop - 1} keys whole"
        plans.append((label, [d if i in kept else d // 2 for i in range(layers)]))
    if whole is not None:
        key_ranks = equal_budget_key_ranks(d, layers, state.step, whole)
        others = "/".join(str(r) for r in sorted({r for i, r in enumerate(key_ranks) if i not in whole}))
        plans.append((f"layers {whole.start}-{whole.stop - 1} whole, others {others} of {d}", key_ranks))
    rows = []
    for label, key_ranks in plans:
        ranks = {"k": [[r] * groups for r in key_ranks], "v": [[d] * groups for _ in range(layers)]}
        twin = kv_recall.folded_copy(model, state, ranks)
        maps = projection_maps(twin, keys_only=True)
        del twin
        widths = stored_widths(maps)
        share = round(sum(widths) / (layers * 2 * groups * d), 4)
        rows.append(
            Method(
                "llmsurgery",
                label,
                share,
                model=label,
                press=lambda maps=maps: projection_press(maps, 0.0, "tova"),
                widths=widths,
                on_stock=True,
            )
        )
    return rows


def main(argv=None) -> int:
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        args = parse_args(argv)
        from llmsurgery.kv_presses import require_kvpress
        from llmsurgery.model_io import load_model

        require_kvpress()
        kv_recall.check_state_file(args.recall, args.model)
        loaded = load_model(args.model, device="cpu", dtype="float32")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model, tokenizer = loaded.model, loaded.tokenizer
    d, groups, layers = model_shape(model)
    if args.whole is not None and args.whole.stop > layers:
        print(f"error: --whole: {args.model} has layers 0-{layers - 1}", file=sys.stderr)
        return 2
    try:
        rows = depth_rows(model, bases(model, tokenizer, args), args.block, args.whole)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    methods = [Method("dense", "dense", 1.0), *rows]
    hay = Haystacks(tokenizer, haystack_texts(args.recall))
    text = "file" if args.haystack else "news"
    cells = {
        (t, args.length): [make_sample(t, args.length, i, hay, args.seed, text) for i in range(args.samples)]
        for t in args.tasks
    }
    batching = argparse.Namespace(batch=4, batch_tokens=4096)
    with torch.no_grad():
        run_methods(model, tokenizer, methods, cells, None, layers * 2 * groups * d, batching)
    print(
        f"{args.model}, {args.length} tokens, {args.samples} samples a task; {args.bases} bases, as presses"
    )
    width = max(len(m.entry["label"]) for m in methods)
    print(f"{'row':{width}s} {'b':>7s} " + " ".join(f"{t:>18s}" for t in args.tasks))
    for m in methods:
        scores = []
        for t in args.tasks:
            cell = m.entry["cells"][f"{t}@{args.length}"]
            scores.append(f"{_mean(cell['match']):6.1f} ({_mean(cell['ll']):7.3f})")
        measured = _mean(m.entry["cells"][f"{args.tasks[0]}@{args.length}"]["b"])
        print(f"{m.entry['label']:{width}s} {measured:7.4f} " + " ".join(f"{s:>18s}" for s in scores))
    if args.json:
        Path(args.json).write_text(json.dumps([m.entry for m in methods]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
