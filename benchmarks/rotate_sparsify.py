"""LaRoSA vs magnitude Top-K: held-out perplexity at several sparsities, measured in one run.

For one model (default smollm2-135m): token-level perplexity on held-out news articles (the
evaluation part of the built-in ``news`` corpus, one window per article) of the dense model, and of
``rotate_sparsify_`` with ``method=magnitude`` and ``method=larosa`` at each sparsity, for the split
given (``1,0`` = only q/k/v and gate/up inputs sparsified, as in METHODS.md's figures), calibrated
on 40 x 512 news tokens (the command's default).

    python benchmarks/rotate_sparsify.py [--model smollm2-135m] [--sparsity 0.25,0.4,0.5] [--split 1,0]
        [--docs 20] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from llmsurgery.calibration import CalibConfig, calibration_batches
from llmsurgery.corpora import evaluation_documents
from llmsurgery.model_io import load_model
from llmsurgery.passes import RotateSparsify
from llmsurgery.passes.rotate_sparsify.maths import rotate_sparsify_
from llmsurgery.perplexity import document_windows, token_perplexity


def measure(args: argparse.Namespace) -> dict:
    loaded = load_model(args.model)
    windows = document_windows(
        loaded.tokenizer, evaluation_documents("news")[: args.docs], max_tokens=args.max_tokens
    )
    calib = CalibConfig(source="news", samples=args.calib_samples, seq_len=args.calib_seq_len, seed=0)
    batches = calibration_batches(loaded.tokenizer, calib)
    split = tuple(float(v) for v in args.split.split(","))
    rows = {"dense": token_perplexity(loaded.model, windows)}
    for s in (float(v) for v in args.sparsity.split(",")):
        for method in ("magnitude", "larosa"):
            model = copy.deepcopy(loaded.model)
            report = rotate_sparsify_(
                model, batches, RotateSparsify(sparsity=s, method=method, split=split, calib=calib)
            )
            rows[f"{method} {s:.2f} (effective {report['effective_sparsity']:.3f})"] = token_perplexity(
                model, windows
            )
    return {"model": args.model, "split": args.split, "docs": len(windows), "perplexity": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsity", default="0.25,0.4,0.5")
    parser.add_argument("--split", default="1,0")
    parser.add_argument("--docs", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--calib-samples", type=int, default=40)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = measure(args)
    table = Table(
        title=f"{result['model']}: held-out news perplexity ({result['docs']} articles, split {result['split']})"
    )
    table.add_column("variant")
    table.add_column("perplexity", justify="right")
    for name, value in result["perplexity"].items():
        table.add_row(name, f"{value:.2f}")
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
