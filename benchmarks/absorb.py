"""Absorb-Decompose (CLOVER) vs vanilla V-dim dropping: attention parameters vs held-out perplexity, one run.

For one model (default smollm2-135m): token-level perplexity on held-out news articles (the
evaluation part of the built-in ``news`` corpus, one window per article) of the original model and,
at each setting, of three V-O variants that keep the same V width in every KV head:

* ``whitened``: absorb-decompose with the calibration-whitened SVD (the command's default);
* ``weight``: CLOVER's weight-only SVD;
* ``vanilla``: no absorbing, the V dims with the largest |W_V row| x |W_O cols| products kept.

Settings are ``keep:R`` (uniform keep ratio) or ``threshold:T`` (the whitened spectrum chooses each
head's width; the other two variants get the same widths). Calibration: 16 x 512 news tokens.

    python benchmarks/absorb.py [--model smollm2-135m] [--settings
        keep:0.95,keep:0.875,keep:0.75,keep:0.5,threshold:0.2] [--docs 20]
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
from llmsurgery.passes import Absorb
from llmsurgery.passes.absorb.maths import absorb_decompose_, v_input_covariances
from llmsurgery.perplexity import document_windows, token_perplexity


def _knob(setting: str) -> dict:
    kind, _, value = setting.partition(":")
    return {"keep_ratio": float(value)} if kind == "keep" else {"threshold": float(value)}


def measure(args: argparse.Namespace) -> dict:
    loaded = load_model(args.model)
    windows = document_windows(
        loaded.tokenizer, evaluation_documents("news")[: args.docs], max_tokens=args.max_tokens
    )
    calib = CalibConfig(source="news", samples=args.calib_samples, seq_len=args.calib_seq_len, seed=0)
    covs = v_input_covariances(loaded.model, calibration_batches(loaded.tokenizer, calib))
    rows = [
        {
            "setting": "original",
            "variant": "-",
            "reduction": 0.0,
            "perplexity": token_perplexity(loaded.model, windows),
        }
    ]
    for setting in args.settings.split(","):
        plan = absorb_decompose_(loaded.model, Absorb(calib=calib, **_knob(setting)), covs=covs, apply=False)
        widths = [row["v_after"] for row in plan["layers"]]
        for variant, criterion in (("whitened", "whitened"), ("weight", "weight"), ("vanilla", "norm")):
            model = copy.deepcopy(loaded.model)
            report = absorb_decompose_(
                model, Absorb(calib=calib, criterion=criterion), covs=covs, v_widths=widths
            )
            rows.append(
                {
                    "setting": setting,
                    "variant": variant,
                    "reduction": report["attention_reduction"],
                    "perplexity": token_perplexity(model, windows),
                }
            )
            del model
    return {"model": args.model, "docs": len(windows), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--settings", default="keep:0.95,keep:0.875,keep:0.75,keep:0.5,threshold:0.2")
    parser.add_argument("--docs", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = measure(args)
    table = Table(
        title=f"{result['model']}: V-O absorb-decompose, held-out news perplexity ({result['docs']} articles)"
    )
    for column in ("setting", "variant", "attention params removed", "perplexity"):
        table.add_column(column, justify="left" if column in ("setting", "variant") else "right")
    for row in result["rows"]:
        table.add_row(
            row["setting"], row["variant"], f"{100 * row['reduction']:.1f}%", f"{row['perplexity']:.2f}"
        )
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
