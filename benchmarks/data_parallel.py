"""One process against two data-parallel CPU processes (torchrun, gloo) on the same global batch, in one run.

For kv-compress (training, uniform ranks), heal (of a BI-pruned model) and eval on a built-in model: the
launch command, the wall time of each, and how far apart the results are (max abs difference of every
weight tensor; the budget reached, the held-out KL, the loss curves; the lm-eval figures).

    python benchmarks/data_parallel.py [--model smollm2-135m] [--steps 20] [--batch-size 4] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file


def launch(processes: int, args: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    """Seconds and result of `llmsurgery ARGS` in `processes` processes (one process: no launcher at all)."""
    start = [sys.executable, "-m", "llmsurgery"]
    env = dict(os.environ)
    if processes > 1:
        start = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(processes),
            "-m",
            "llmsurgery",
        ]
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    started = time.perf_counter()
    done = subprocess.run([*start, *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(
            f"llmsurgery {' '.join(args)} in {processes} process(es) failed:\n{done.stderr[-3000:]}"
        )
    return time.perf_counter() - started, done


def weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors |= load_file(path)
    return tensors


def max_difference(a: Path, b: Path) -> float:
    x, y = weights(a), weights(b)
    return max(float((x[k].double() - y[k].double()).abs().max()) for k in x)


def report(folder: Path) -> dict:
    return json.loads((folder / "llmsurgery_history.json").read_text())["passes"][-1]["report"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    console = Console()
    work = Path(tempfile.mkdtemp(prefix="llmsurgery-dp-"))
    batch = ["--batch-size", str(args.batch_size)]
    results = {}
    try:
        pruned = work / "pruned"
        launch(1, ["prune", "--bi", args.model, "--remove", "6", "--output", str(pruned)])
        jobs = {
            "kv-compress": [
                "kv-compress",
                args.model,
                "--budget",
                "0.5",
                "--uniform",
                "--train-steps",
                str(args.steps),
            ]
            + batch,
            "heal": ["heal", str(pruned), "--teacher", args.model, "--steps", str(args.steps)] + batch,
        }
        for name, job in jobs.items():
            runs = {}
            for n in (1, 2):
                out = work / f"{name}-{n}"
                runs[n] = launch(n, [*job, "--output", str(out)])[0], report(out)
            (t1, r1), (t2, r2) = runs[1], runs[2]
            curves = max(abs(a - b) for a, b in zip(r1["loss_curve"], r2["loss_curve"]))
            results[name] = {
                "command": "llmsurgery " + " ".join(job),
                "seconds": [t1, t2],
                "max_abs_weight_difference": max_difference(work / f"{name}-1", work / f"{name}-2"),
                "max_abs_loss_difference": curves,
                "one": {k: r1.get(k) for k in ("budget_reached", "held_out_kl_after", "kept")},
                "two": {k: r2.get(k) for k in ("budget_reached", "held_out_kl_after", "kept")},
            }
        evals = {}
        for n in (1, 2):
            path = work / f"eval-{n}.json"
            seconds = launch(
                n,
                ["eval", args.model, "--tasks", "news_ppl", "--limit", str(args.limit), "--json", str(path)],
            )[0]
            evals[n] = (
                seconds,
                {f"{r['task']}.{r['metric']}": r["value"] for r in json.loads(path.read_text())["results"]},
            )
        results["eval"] = {
            "command": f"llmsurgery eval {args.model} --tasks news_ppl --limit {args.limit}",
            "seconds": [evals[1][0], evals[2][0]],
            "one": evals[1][1],
            "two": evals[2][1],
            "max_relative_difference": max(abs(evals[1][1][k] / evals[2][1][k] - 1) for k in evals[1][1]),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = Table(title=f"{args.model}: one process against two (torchrun --nproc-per-node 2, gloo)")
    for column in ("job", "1 process s", "2 processes s", "max abs weight diff", "1 process", "2 processes"):
        table.add_column(column)
    for name in ("kv-compress", "heal"):
        r = results[name]
        table.add_row(
            name, f"{r['seconds'][0]:.0f}", f"{r['seconds'][1]:.0f}", f"{r['max_abs_weight_difference']:.2e}",
            json.dumps(r["one"]), json.dumps(r["two"]),
        )  # fmt: skip
    e = results["eval"]
    table.add_row(
        "eval", f"{e['seconds'][0]:.0f}", f"{e['seconds'][1]:.0f}", f"rel {e['max_relative_difference']:.1e}",
        json.dumps({k: round(v, 4) for k, v in e["one"].items()}),
        json.dumps({k: round(v, 4) for k, v in e["two"].items()}),
    )  # fmt: skip
    console.print(table)
    for name in ("kv-compress", "heal"):
        console.print(f"{name}: loss curves differ by at most {results[name]['max_abs_loss_difference']:.2e}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
