"""The sha256 of every tensor that a fixed set of llmsurgery jobs writes on the real small model.

For refactors that must not change outputs: run it before the change and after, and compare.

    python scripts/output_digests.py run WORKDIR > before.json      # on the old code
    python scripts/output_digests.py run WORKDIR > after.json       # on the new code
    python scripts/output_digests.py compare before.json after.json

Every pass command runs once on SmolLM2-135M (small calibration settings), `prune --heal` and `heal` too,
and each streamable pass runs streamed (`--stream on`) from a converted safetensors folder. A tensor's
digest is of its name, dtype, shape and bytes, so shard layout does not matter.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

MODEL = "smollm2-135m"
SMALL = ["--calib-samples", "2", "--calib-seq-len", "64"]
KV_SMALL = ["--train-steps", "2", "--train-samples", "4", "--train-seq-len", "64"]
KV_SEARCH = ["--search-samples", "4", "--search-seq-len", "64"]
HEAL_SMALL = ["--heal-steps", "3", "--heal-calib-samples", "6", "--heal-calib-seq-len", "64"]

# name -> (arguments after `llmsurgery`, with {model}, {converted} and {pruned} filled in)
JOBS: dict[str, list[str]] = {
    "convert": ["convert", "{model}"],
    "prune": ["prune", "--bi", "{model}", "--remove", "4", *SMALL],
    "prune-angular": ["prune", "--bi", "{model}", "--remove", "3", "--metric", "angular", "--block", *SMALL],
    "prune-heal": ["prune", "--bi", "{model}", "--remove", "4", "--heal", *HEAL_SMALL, *SMALL],
    "heal": ["heal", "{pruned}", "--teacher", "{model}", "--steps", "3", "--calib-seq-len", "64"],
    "rotate-sparsify": ["rotate-sparsify", "{model}", "--sparsity", "0.3", *SMALL],
    "rotate-magnitude": ["rotate-sparsify", "{model}", "--sparsity", "0.3", "--method", "magnitude"],
    "absorb": ["absorb", "{model}", "--keep-ratio", "0.75", *SMALL],
    "absorb-qk": ["absorb", "{model}", "--pairs", "vo,qk", "--rank", "48", *SMALL],
    "kv-compress": ["kv-compress", "{model}", "--budget", "0.5", *KV_SMALL, *KV_SEARCH, *SMALL],
    "kv-compress-vo": [
        "kv-compress",
        "{model}",
        "--budget",
        "0.5",
        "--v-init",
        "vo",
        "--no-train",
        "--uniform",
        *SMALL,
    ],
    "kv-pca": ["kv-compress", "{model}", "--budget", "0.5", "--no-train", "--uniform", *SMALL],
    "streamed-prune": ["prune", "--bi", "{converted}", "--remove", "4", "--stream", "on", *SMALL],
    "streamed-rotate": ["rotate-sparsify", "{converted}", "--sparsity", "0.3", "--stream", "on", *SMALL],
    "streamed-absorb": ["absorb", "{converted}", "--keep-ratio", "0.75", "--stream", "on", *SMALL],
    "streamed-kv": [
        "kv-compress",
        "{converted}",
        "--budget",
        "0.5",
        "--no-train",
        "--uniform",
        "--stream",
        "on",
        *SMALL,
    ],
}


def tensor_digests(folder: Path) -> dict[str, str]:
    from safetensors import safe_open

    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name).contiguous()
                digest = hashlib.sha256(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
                digest.update(tensor.view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
                found[name] = digest.hexdigest()
    return dict(sorted(found.items()))


def run(workdir: Path, only: list[str]) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    paths = {"model": MODEL, "converted": str(workdir / "convert"), "pruned": str(workdir / "prune")}
    results = {}
    for name, args in JOBS.items():
        if only and name not in only and name not in ("convert", "prune"):
            continue
        out = workdir / name
        shutil.rmtree(out, ignore_errors=True)
        command = [
            sys.executable,
            "-m",
            "llmsurgery",
            *(a.format(**paths) for a in args),
            "--output",
            str(out),
        ]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            results[name] = {"error": done.stderr.strip().splitlines()[-1:]}
        else:
            results[name] = tensor_digests(out)
        print(f"{name}: {'ok' if done.returncode == 0 else 'FAILED'}", file=sys.stderr)
    return results


def compare(before: dict, after: dict) -> int:
    bad = 0
    for name in sorted(set(before) | set(after)):
        a, b = before.get(name), after.get(name)
        same = a == b and a is not None and "error" not in a
        bad += not same
        differing = [] if a is None or b is None else [k for k in set(a) | set(b) if a.get(k) != b.get(k)]
        print(
            f"{name}: {'identical' if same else 'DIFFERENT'}"
            + (f" ({sorted(differing)[:4]})" if not same else "")
        )
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "run":
        json.dump(run(Path(sys.argv[2]), sys.argv[3:]), sys.stdout, indent=1)
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(*(json.loads(Path(p).read_text()) for p in sys.argv[2:])))
    else:
        sys.exit(__doc__)
