"""One process against two CPU processes (gloo) on the same global batch, in one run.

For kv-compress (training, uniform ranks), heal (of a BI-pruned model) and eval on a built-in model, each
run three ways: in one process; under `accelerate launch --cpu --num_processes 2` (which runs one process,
so llmsurgery starts the two with torchrun); and, for the trained passes, under torchrun with `--fsdp` (the
weights sharded over the two). Printed: the wall time of each, and how far each is from the one-process
result (max abs difference of every weight tensor; the budget reached, the held-out KL, the loss curves;
the lm-eval figures).

    python benchmarks/data_parallel.py [--model smollm2-135m] [--steps 20] [--batch-size 4] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file

from llmsurgery.data_parallel import launcher_command

MODES = {  # how each run is started: (processes, launcher, extra llmsurgery options)
    "1 process": (1, None, []),
    "accelerate --cpu, 2": (2, "accelerate", []),
    "torchrun --fsdp, 2": (2, "torchrun", ["--fsdp"]),
}


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launch(mode: str, args: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    """Seconds and result of `llmsurgery ARGS` started as MODES[mode] says (one process: no launcher)."""
    processes, launcher, extra = MODES[mode]
    env = dict(os.environ)
    start = [sys.executable, "-m", "llmsurgery"]
    if launcher:
        start = launcher_command(launcher, processes, _free_port())
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    started = time.perf_counter()
    done = subprocess.run([*start, *args, *extra], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"llmsurgery {' '.join(args)} ({mode}) failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started, done


def weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors |= load_file(path)
    return tensors


def max_difference(a: Path, b: Path) -> float:
    x, y = weights(a), weights(b)
    return max(float((x[k].double() - y[k].double()).abs().max()) for k in x)


def held_out_logits(folder: Path, docs: int = 4) -> list[torch.Tensor]:
    """The model's logits on a few held-out news documents (evaluation text, never calibration)."""
    from llmsurgery.corpora import evaluation_documents
    from llmsurgery.model_io import load_model
    from llmsurgery.perplexity import document_windows

    loaded = load_model(str(folder), trust_remote_code=True)
    windows = document_windows(loaded.tokenizer, evaluation_documents("news")[:docs], max_tokens=256)
    with torch.no_grad():
        return [loaded.model(input_ids=w).logits.double() for w in windows]


def logit_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Max abs logit difference, relative to the largest logit magnitude of `a`."""
    scale = max(float(x.abs().max()) for x in a)
    return max(float((x - y).abs().max()) for x, y in zip(a, b)) / scale


def report(folder: Path) -> dict:
    return json.loads((folder / "llmsurgery_history.json").read_text())["passes"][-1]["report"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--remove", type=int, default=6, help="layers the BI prune before heal removes")
    parser.add_argument("--jobs", default="kv-compress,heal,eval", help="which of kv-compress, heal, eval")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    console = Console(width=170)
    work = Path(tempfile.mkdtemp(prefix="llmsurgery-dp-"))
    batch = ["--batch-size", str(args.batch_size)]
    results = {}
    try:
        pruned = work / "pruned"
        launch(
            "1 process", ["prune", "--bi", args.model, "--remove", str(args.remove), "--output", str(pruned)]
        )
        kv = ["kv-compress", args.model, "--budget", "0.5", "--uniform", "--train-steps", str(args.steps)]
        heal = ["heal", str(pruned), "--teacher", args.model, "--steps", str(args.steps)]
        jobs = args.jobs.split(",")
        for name, job in {"kv-compress": kv + batch, "heal": heal + batch}.items():
            if name not in jobs:
                continue
            runs = {}
            for mode in MODES:
                out = work / f"{name}-{mode.replace(' ', '_')}"
                runs[mode] = launch(mode, [*job, "--output", str(out)])[0], report(out), out
            t1, r1, one = runs["1 process"]
            results[name] = {"command": "llmsurgery " + " ".join(job), "runs": {}}
            reference = held_out_logits(one)
            for mode, (seconds, r, out) in runs.items():
                results[name]["runs"][mode] = {
                    "seconds": seconds,
                    "max_abs_weight_difference": max_difference(one, out),
                    "relative_logit_difference": logit_difference(reference, held_out_logits(out)),
                    "max_abs_loss_difference": max(
                        abs(a - b) for a, b in zip(r1["loss_curve"], r["loss_curve"])
                    ),
                    "result": {
                        k: r.get(k) for k in ("budget_reached", "held_out_kl_after", "kept") if k in r
                    },
                }
        evals = {}
        for mode in ("1 process", "accelerate --cpu, 2") if "eval" in jobs else ():
            path = work / f"eval-{mode.replace(' ', '_')}.json"
            job = ["eval", args.model, "--tasks", "news_ppl", "--limit", str(args.limit), "--json", str(path)]
            seconds = launch(mode, job)[0]
            figures = {
                f"{r['task']}.{r['metric']}": r["value"] for r in json.loads(path.read_text())["results"]
            }
            evals[mode] = seconds, figures
        base = evals.get("1 process", (0, {}))[1]
        results["eval"] = {
            "command": f"llmsurgery eval {args.model} --tasks news_ppl --limit {args.limit}",
            "runs": {
                mode: {
                    "seconds": seconds,
                    "max_relative_difference": max(abs(figures[k] / base[k] - 1) for k in base),
                    "result": figures,
                }
                for mode, (seconds, figures) in evals.items()
            },
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = Table(title=f"{args.model}: one process against two CPU processes (gloo), same global batch")
    for column in ("job", "started as", "seconds", "max abs diff to 1 process", "result"):
        table.add_column(column)
    for name in ("kv-compress", "heal", "eval"):
        for mode, r in results.get(name, {"runs": {}})["runs"].items():
            diff = (
                f"rel {r['max_relative_difference']:.1e}"
                if name == "eval"
                else f"weights {r['max_abs_weight_difference']:.2e}, logits rel "
                f"{r['relative_logit_difference']:.1e}, loss {r['max_abs_loss_difference']:.1e}"
            )
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in r["result"].items()}
            table.add_row(name, mode, f"{r['seconds']:.0f}", diff, json.dumps(shown))
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
