"""Healing after layer removal: held-out perplexity of the original, the pruned and the healed model; one run.

For one model (default smollm2-135m): remove the N lowest-Block-Influence layers (the prune command's
defaults), then heal with the heal command's defaults (or the given --steps/--lr/--train), and
score token-level perplexity on held-out news articles (the evaluation part of the built-in corpus,
never calibration text). Prints the healing time on this machine.

    python benchmarks/heal.py [--model smollm2-135m] [--remove 7] [--steps 200] [--lr 3e-4] [--train
        norms,mlp-near-gaps] [--docs 20]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from llmsurgery import defaults
from llmsurgery.arch import decoder_layers
from llmsurgery.calibration import calibration_batches
from llmsurgery.corpora import evaluation_documents
from llmsurgery.model_io import load_model
from llmsurgery.passes import Heal, PruneBI
from llmsurgery.passes.heal.maths import heal_, shared_copy
from llmsurgery.passes.prune_bi.maths import remove_layers_, score_layers
from llmsurgery.perplexity import document_windows, token_perplexity


def measure(args: argparse.Namespace) -> dict:
    loaded = load_model(args.model)
    model, tok = loaded.model, loaded.tokenizer
    held_out = document_windows(tok, evaluation_documents("news")[: args.docs], max_tokens=args.max_tokens)
    original = token_perplexity(model, held_out)
    teacher = shared_copy(model)
    n_layers = len(decoder_layers(model))
    prune = PruneBI(remove=args.remove)
    _, removed = score_layers(model, calibration_batches(tok, prune.calib), prune.remove)
    remove_layers_(model, removed)
    pruned = token_perplexity(model, held_out)
    cfg = Heal(steps=args.steps, lr=args.lr, train=tuple(args.train.split(",")))
    windows = calibration_batches(tok, cfg.calib)  # training windows, then the held-out ones
    started = time.perf_counter()
    report = heal_(model, teacher, cfg, windows, removed, n_layers)
    seconds = time.perf_counter() - started
    healed = token_perplexity(model, held_out)
    curve = report["loss_curve"]
    return {
        "model": args.model,
        "docs": len(held_out),
        "removed": sorted(removed),
        "steps": args.steps,
        "lr": args.lr,
        "train": args.train,
        "trained_parameters": report["trained_parameter_count"],
        "heal_seconds": seconds,
        "original": original,
        "pruned": pruned,
        "healed": healed,
        "kl_first_last": [sum(curve[:10]) / 10, sum(curve[-10:]) / 10],
        "kept": report["kept"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--remove", type=int, default=7)
    parser.add_argument("--steps", type=int, default=defaults.HEAL_STEPS)
    parser.add_argument("--lr", type=float, default=defaults.HEAL_LR)
    parser.add_argument("--train", default=",".join(defaults.HEAL_TRAIN))
    parser.add_argument("--docs", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    r = measure(args)
    table = Table(
        title=f"{r['model']} minus {len(r['removed'])} layers {r['removed']}: "
        f"held-out news perplexity ({r['docs']} articles); "
        f"heal {r['steps']} steps, lr {r['lr']:g}, {r['train']} ({r['trained_parameters']:,} parameters) "
        f"in {r['heal_seconds'] / 60:.1f} min"
    )
    for column in ("original", "pruned", "healed", "recovered"):
        table.add_column(column, justify="right")
    recovered = (r["pruned"] - r["healed"]) / (r["pruned"] - r["original"])
    table.add_row(f"{r['original']:.2f}", f"{r['pruned']:.2f}", f"{r['healed']:.2f}", f"{recovered:.0%}")
    Console().print(table)
    print(
        f"KL first/last 10 steps: {r['kl_first_last'][0]:.4f} / {r['kl_first_last'][1]:.4f}; kept: {r['kept']}"
    )
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
