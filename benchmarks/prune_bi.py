"""Block-Influence layer pruning: held-out perplexity of the pruned model, and the cost of scoring.

Measures, in one run, for one model (a built-in name, a folder, a .gguf or a hub id):

1. Held-out perplexity on the evaluation part of the built-in ``news`` corpus: each document is its
   own window (BOS + its tokens, truncated to 1024 tokens), perplexity = exp(total NLL / predicted
   tokens). Rows: the dense model; N lowest-BI layers removed (``score_layers``); N random layers
   removed (median and every draw, seeded); the last N layers removed.
2. The wall time of Block-Influence scoring (``residual_stats`` over the calibration batches) as
   a ratio to one plain forward pass of the full causal LM over the same windows (one window at a
   time, ``torch.no_grad``), timed side by side, best of 3 each. Target: at most 1.3x.

Run it (offline) with::

    python benchmarks/prune_bi.py [--model smollm2-135m] [--remove 7] [--draws 5] [--seed 0] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console
from rich.table import Table

from llmsurgery.arch import decoder_layers
from llmsurgery.calibration import CalibConfig, calibration_batches
from llmsurgery.corpora import evaluation_documents
from llmsurgery.model_io import load_model
from llmsurgery.passes.prune_bi.maths import remove_layers_, residual_stats, score_layers
from llmsurgery.perplexity import document_windows, token_perplexity

TARGET_RATIO = 1.3


def pruned_ppl(model: torch.nn.Module, layers: list[int], windows: list[torch.Tensor]) -> float:
    """Perplexity of a deep copy of `model` with `layers` removed."""
    variant = copy.deepcopy(model)
    remove_layers_(variant, layers)
    ppl = token_perplexity(variant, windows)
    del variant
    return ppl


def wall(fn: Callable[[], object]) -> float:
    """Seconds one call of fn takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def plain_forward(model: torch.nn.Module, batches: torch.Tensor) -> None:
    for window in batches:
        model(input_ids=window.unsqueeze(0))


def time_scoring(model: torch.nn.Module, batches: torch.Tensor, repeats: int = 3) -> dict[str, float]:
    """Best-of-`repeats` seconds of BI scoring and of a plain forward, interleaved."""
    bi, fwd = [], []
    for _ in range(repeats):
        bi.append(wall(lambda: residual_stats(model, batches)))
        fwd.append(wall(lambda: plain_forward(model, batches)))
    return {"bi_s": min(bi), "forward_s": min(fwd), "ratio": min(bi) / min(fwd)}


def measure(args: argparse.Namespace) -> dict:
    loaded = load_model(args.model)
    model, tok = loaded.model, loaded.tokenizer
    n_layers = len(decoder_layers(model))
    windows = document_windows(tok, evaluation_documents("news"))
    batches = calibration_batches(tok, CalibConfig(source="news", samples=8, seq_len=512, seed=args.seed))
    scores, bi_layers = score_layers(model, batches, args.remove)
    rng = random.Random(args.seed)
    draws = [sorted(rng.sample(range(n_layers), args.remove)) for _ in range(args.draws)]
    last = list(range(n_layers - args.remove, n_layers))
    random_ppl = [pruned_ppl(model, layers, windows) for layers in draws]
    return {
        "model": args.model,
        "layers": n_layers,
        "remove": args.remove,
        "seed": args.seed,
        "eval_docs": len(windows),
        "eval_tokens": sum(w.shape[1] - 1 for w in windows),
        "bi_scores": scores,
        "bi_layers": bi_layers,
        "random_layers": draws,
        "last_layers": last,
        "ppl": {
            "dense": token_perplexity(model, windows),
            "bi": pruned_ppl(model, bi_layers, windows),
            "random_median": statistics.median(random_ppl),
            "random": random_ppl,
            "last": pruned_ppl(model, last, windows),
        },
        "timing": time_scoring(model, batches) | {"target_ratio": TARGET_RATIO},
    }


def report(r: dict, console: Console) -> None:
    n, p, t = r["remove"], r["ppl"], r["timing"]
    table = Table(
        title=f"{r['model']}: {r['layers']} layers, remove {n} ({r['eval_docs']} docs, {r['eval_tokens']} tokens)"
    )
    for col in ("variant", "layers removed", "perplexity"):
        table.add_column(col)
    table.add_row("dense", "-", f"{p['dense']:.4g}")
    table.add_row(f"BI-{n}", str(r["bi_layers"]), f"{p['bi']:.4g}")
    table.add_row(
        f"random-{n} median", f"{len(p['random'])} draws, seed {r['seed']}", f"{p['random_median']:.4g}"
    )
    for layers, value in zip(r["random_layers"], p["random"]):
        table.add_row("  random draw", str(layers), f"{value:.4g}")
    table.add_row(f"last-{n}", str(r["last_layers"]), f"{p['last']:.4g}")
    console.print(table)
    timing = Table(title="Block-Influence scoring cost (8 x 512 calibration tokens, best of 3)")
    for col in ("BI scoring s", "plain forward s", "ratio", "target", "ok"):
        timing.add_column(col)
    ok = t["ratio"] <= TARGET_RATIO
    timing.add_row(
        f"{t['bi_s']:.3f}",
        f"{t['forward_s']:.3f}",
        f"{t['ratio']:.2f}x",
        f"<= {TARGET_RATIO}x",
        "yes" if ok else "NO",
    )
    console.print(timing)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--remove", type=int, default=7)
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    result = measure(args)
    result["total_s"] = time.perf_counter() - start
    report(result, Console())
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
