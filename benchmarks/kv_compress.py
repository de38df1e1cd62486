"""MatryoshkaKV: PCA-only vs trained projections, uniform vs searched ranks, held-out perplexity; one run.

For one model (default smollm2-135m): token-level perplexity on held-out news articles (the
evaluation part of the built-in ``news`` corpus, one window per article) at each KV budget, for
PCA-initialised projections and for the same projections after Matryoshka training (the command's
defaults: 200 steps of 2 x 256 news tokens, lr 1e-3), each with uniform ranks and with the rank
search (20 x 256 tokens of output KL; for PCA-only with --search-pca). The projections run unfolded here
(the same maths that
``fold_`` writes into the weights, tested exact). Prints the training time and a table.

    python benchmarks/kv_compress.py [--model smollm2-135m] [--budgets 0.75,0.5,0.375] [--train-steps 200]
        [--docs 20] [--v-init pca] [--state FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from llmsurgery.calibration import calibration_batches
from llmsurgery.corpora import evaluation_documents
from llmsurgery.model_io import load_model
from llmsurgery.passes import KVCompress
from llmsurgery.passes.kv_compress.maths import (
    MatryoshkaState,
    attach_,
    init_from_pca_,
    search_ranks,
    train_,
    uniform_ranks,
)
from llmsurgery.perplexity import document_windows, token_perplexity


def _score(model, state, windows, budgets, label, rows, search=True):
    started = time.perf_counter()
    searched = search_ranks(model, state, windows["search"], budgets) if search else {}
    print(f"{label}: rank search took {time.perf_counter() - started:.0f} s", flush=True)
    for b in budgets:
        for kind, ranks in (("uniform", uniform_ranks(state, b)), ("searched", searched.get(b))):
            if ranks is None:
                continue
            state.set_ranks(ranks)
            state.project = True
            state.refresh_bases()
            rows.append(
                {
                    "budget": b,
                    "projections": label,
                    "ranks": kind,
                    "reached": state.budget(),
                    "perplexity": token_perplexity(model, windows["eval"]),
                }
            )
            state._bases = {}


def measure(args: argparse.Namespace) -> dict:
    loaded = load_model(args.model)
    model, tok = loaded.model, loaded.tokenizer
    cfg = KVCompress(budget=1.0, train_steps=args.train_steps, v_init=args.v_init)
    if args.v_init == "vo":
        from llmsurgery.passes.absorb.maths import Truncation, absorb_decompose_

        absorb_decompose_(model, Truncation(), batches=calibration_batches(tok, cfg.calib))
    windows = {
        "eval": document_windows(tok, evaluation_documents("news")[: args.docs], max_tokens=args.max_tokens),
        "pca": calibration_batches(tok, cfg.calib),
        "train": calibration_batches(tok, cfg.train_calib),
        "search": calibration_batches(tok, cfg.search_calib),
    }
    dense = token_perplexity(model, windows["eval"])
    config = model.config
    d = (
        config.head_dim
        if getattr(config, "head_dim", None)
        else config.hidden_size // config.num_attention_heads
    )
    v_widths = [
        list(getattr(layer.self_attn, "attention_layout", {"v": [d] * config.num_key_value_heads})["v"])
        for layer in model.model.layers
    ]
    state = MatryoshkaState(d, v_widths, d // 8)
    attach_(model, state)
    init_from_pca_(model, state, windows["pca"], v_identity=args.v_init == "vo")
    budgets = [float(b) for b in args.budgets.split(",")]
    rows: list[dict] = []
    _score(model, state, windows, budgets, "pca", rows, search=args.search_pca)
    if args.state and args.state.exists():  # trained earlier by this script with the same settings
        saved = torch.load(args.state)
        state.load_state_dict(saved["state"])
        state.init_k, state.init_v = saved["init_k"], saved["init_v"]
        losses, seconds = saved["losses"], saved["seconds"]
        print(
            f"loaded the trained projections from {args.state} (trained in {seconds / 60:.1f} min)",
            flush=True,
        )
    else:
        started = time.perf_counter()
        losses = train_(model, state, windows["train"], cfg)
        seconds = time.perf_counter() - started
        if args.state:
            torch.save(
                {
                    "state": state.state_dict(),
                    "init_k": state.init_k,
                    "init_v": state.init_v,
                    "losses": losses,
                    "seconds": seconds,
                },
                args.state,
            )
    started = time.perf_counter()
    _score(model, state, windows, budgets, "trained", rows)
    search_seconds = time.perf_counter() - started
    return {
        "model": args.model,
        "docs": len(windows["eval"]),
        "dense": dense,
        "train_seconds": seconds,
        "search_seconds": search_seconds,
        "train_steps": args.train_steps,
        "v_init": args.v_init,
        "loss_first_last": [losses[:10], losses[-10:]],
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--budgets", default="0.75,0.5,0.375")
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--v-init", default="pca", choices=["pca", "vo"])
    parser.add_argument("--docs", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument(
        "--search-pca", action="store_true", help="also search ranks for the PCA-only projections"
    )
    parser.add_argument(
        "--state", type=Path, help="save the trained projections here, or load them if the file exists"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = measure(args)
    table = Table(
        title=f"{result['model']}: held-out news perplexity "
        f"({result['docs']} articles; original {result['dense']:.2f}; "
        f"v-init {result['v_init']}; training {result['train_steps']} steps in {result['train_seconds'] / 60:.1f} min; "
        f"searching {len(result['rows']) and result['search_seconds'] / 60:.1f} min for all budgets)"
    )
    for column in ("budget", "projections", "ranks", "budget reached", "perplexity"):
        table.add_column(column, justify="right")
    for row in result["rows"]:
        table.add_row(
            f"{row['budget']:.3f}",
            row["projections"],
            row["ranks"],
            f"{row['reached']:.3f}",
            f"{row['perplexity']:.2f}",
        )
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
