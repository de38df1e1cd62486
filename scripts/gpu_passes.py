"""Every pass's CUDA path against its CPU path, on tiny random models (llama, gemma3_text), for a GPU machine.

    python scripts/gpu_passes.py [OUT_DIR]

Each pass command runs three times on the same input: `--device cpu`, `--device cuda`, and (for the streamable
passes) `--device cuda --stream on`. The script prints, per pass and architecture, whether the three outputs have
the same tensors and shapes, the largest relative weight difference against the CPU output, and the largest
difference of the outputs' logits on one prompt. Exit 1 when a run fails or when shapes differ. Needs llmsurgery
importable, CUDA, and the news corpus (gensim's test file, or a stand-in package holding it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

DEVICE = os.environ.get("DEVICE", "cuda")  # DEVICE=cpu rehearses the script where there is no GPU
ENTRY = "import sys; from llmsurgery.cli import run; sys.argv[0] = 'llmsurgery'; run()"
CALIB = ["--calib", "news", "--calib-samples", "8", "--calib-seq-len", "64"]
TRAINED_KV = ["--train-steps", "4", "--batch-size", "2", "--train-samples", "8", "--train-seq-len", "64"]
SEARCH = ["--search-samples", "4", "--search-seq-len", "64"]
PASSES = {  # name -> (arguments, streamable, architectures)
    "prune": (["prune", "--bi", "--remove", "2", *CALIB], True, ("llama", "gemma3_text")),
    "rotate-sparsify": (["rotate-sparsify", "--sparsity", "0.4", *CALIB], True, ("llama",)),
    "absorb": (["absorb", "--keep-ratio", "0.75", *CALIB], True, ("llama", "gemma3_text")),
    "kv-compress": (["kv-compress", "--budget", "0.5", *TRAINED_KV, *SEARCH, *CALIB], False, ("llama",)),
    "kv-compress uniform": (
        ["kv-compress", "--budget", "0.5", "--no-train", "--uniform", "--v-init", "pca", *CALIB],
        True,
        ("llama", "gemma3_text"),
    ),
    "heal": (["heal", "--steps", "4", "--batch-size", "2", *CALIB], False, ("llama", "gemma3_text")),
}


def run(args: list[str]) -> tuple[bool, float, str]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", ENTRY, "--debug", *args], capture_output=True, text=True)
    tail = (done.stderr or done.stdout).strip().splitlines()[-8:] if done.returncode else []
    return done.returncode == 0, time.perf_counter() - started, "\n    ".join(tail)  # the traceback's end


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out |= load_file(file)
    return out


def logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def compare(reference: Path, other: Path) -> tuple[bool, float, float]:
    a, b = weights(reference), weights(other)
    same = a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    if not same:
        return False, float("nan"), float("nan")
    rel = max(((a[k].double() - b[k].double()).norm() / (a[k].double().norm() + 1e-12)).item() for k in a)
    return True, rel, (logits(reference) - logits(other)).abs().max().item()


def main() -> int:
    from concurrent.futures import ThreadPoolExecutor

    from conftest import build_tiny

    if DEVICE == "cuda":
        assert torch.cuda.is_available(), "no CUDA device"
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    models = {arch: build_tiny(arch, root / arch) for arch in ("llama", "gemma3_text")}
    jobs = []  # (pass, arch, label, arguments, output)
    for name, (args, streamable, archs) in PASSES.items():
        for arch in archs:
            source, extra = models[arch], []
            if name == "heal":  # heals the CPU prune output towards its original
                source, extra = root / f"{arch}-prune-cpu", ["--teacher", str(models[arch])]
            runs = {"cpu": ["--device", "cpu"], "cuda": ["--device", DEVICE]}
            if streamable:
                runs["cuda stream"] = ["--device", DEVICE, "--stream", "on"]
            for label, device in runs.items():
                out = root / f"{arch}-{name}-{label}".replace(" ", "-")
                jobs.append(
                    (
                        name,
                        arch,
                        label,
                        [args[0], str(source), *args[1:], *extra, *device, "--output", str(out)],
                        out,
                    )
                )
    with ThreadPoolExecutor(6) as pool:  # heal reads the prune outputs: it runs after the others
        first = list(pool.map(lambda job: run(job[3]), [j for j in jobs if j[0] != "heal"]))
        second = list(pool.map(lambda job: run(job[3]), [j for j in jobs if j[0] == "heal"]))
    order = [j for j in jobs if j[0] != "heal"] + [j for j in jobs if j[0] == "heal"]
    results = {job[4]: outcome for job, outcome in zip(order, first + second)}
    failures = 0
    print(
        f"{'pass':20} {'arch':12} {'run':12} {'seconds':>8} {'shapes':>7} {'max rel dW':>11} {'max |dlogit|':>13}"
    )
    for job in jobs:
        name, arch, label, _, out = job
        ok, seconds, error = results[out]
        head = f"{name:20} {arch:12} {label:12} {seconds:8.1f}"
        if not ok:
            failures += 1
            print(f"{head} FAILED: {error}", flush=True)
        elif label == "cpu":
            print(f"{head} {'-':>7} {'-':>11} {'-':>13}", flush=True)
        elif (reference := root / f"{arch}-{name}-cpu".replace(" ", "-")).exists():
            same, rel, dlogit = compare(reference, out)
            failures += not same
            print(f"{head} {'same' if same else 'DIFFER':>7} {rel:11.2e} {dlogit:13.2e}", flush=True)
    print("failures:", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
