"""Passes on a checkpoint larger than the memory they may use: a random Llama-7B-shaped bf16 model under a cap.

1. Writes the checkpoint (once; kept in --dir): hidden 4096, MLP 11008, 32 layers, 32 heads, untied head, bf16,
   random weights (N(0, 0.02), norms 1), tensor by tensor into 2 GiB safetensors shards. The tokenizer is
   SmolLM2's, so the vocabulary is its 49,152 tokens instead of Llama's 32,000 (13.7 GB instead of 13.5).
2. Runs each pass with `llmsurgery` under `../shared/tools/memcap LIMIT` (a memory cgroup; page cache is
   reclaimed under the cap, the command is killed if its own memory needs more): peak anonymous memory,
   wall time, exit code, output size and dtype.
3. In this process: BI scoring (`residual_stats`) against a plain layer-by-layer forward over the same
   calibration tokens (the same streaming loop without the statistics), measured plain, BI, plain.

    python benchmarks/large_model.py [--dir /tmp/llama7b] [--cap 3G] [--samples 2] [--seq-len 128] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from llmsurgery.calibration import CalibConfig, calibration_batches
from llmsurgery.streaming import ShardWriter, StreamedModel

MEMCAP = Path(__file__).resolve().parents[2] / "shared" / "tools" / "memcap"
SHAPE = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
}


def write_checkpoint(folder: Path, layers: int = SHAPE["num_hidden_layers"]) -> None:
    """A random-weight Llama-7B-shaped bf16 checkpoint with SmolLM2's tokenizer (skipped when it exists)."""
    from transformers import AutoTokenizer, LlamaConfig

    from llmsurgery.sources import local_folder, resolve_source

    if (folder / "config.json").is_file():
        return
    tokenizer = AutoTokenizer.from_pretrained(local_folder(resolve_source("smollm2-135m")))
    config = LlamaConfig(
        **(SHAPE | {"num_hidden_layers": layers}),
        vocab_size=len(tokenizer),
        tie_word_embeddings=False,
        dtype="bfloat16",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    d, m, v = config.hidden_size, config.intermediate_size, config.vocab_size

    def normal(*shape):
        return (torch.randn(*shape, generator=generator) * 0.02).to(torch.bfloat16)

    writer = ShardWriter(tmp, max_bytes=2 << 30)
    writer.add("model.embed_tokens.weight", normal(v, d))
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            writer.add(p + f"self_attn.{name}.weight", normal(d, d))
        writer.add(p + "mlp.gate_proj.weight", normal(m, d))
        writer.add(p + "mlp.up_proj.weight", normal(m, d))
        writer.add(p + "mlp.down_proj.weight", normal(d, m))
        writer.add(p + "input_layernorm.weight", torch.ones(d, dtype=torch.bfloat16))
        writer.add(p + "post_attention_layernorm.weight", torch.ones(d, dtype=torch.bfloat16))
    writer.add("model.norm.weight", torch.ones(d, dtype=torch.bfloat16))
    writer.add("lm_head.weight", normal(v, d))
    writer.close()
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def capped(command: list[str], cap: str) -> tuple[subprocess.CompletedProcess, int | None]:
    """Run `command` under memcap; (the finished process, peak anonymous MiB of its cgroup).

    memcap prints its own peak, but formats it with awk's %d, which stops at 2047 MiB; this samples the same
    figure (total_rss of the memcap cgroup, named after memcap's pid) every 0.1 s itself.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen([str(MEMCAP), cap, *command], stdout=out, stderr=err, text=True)
        stat = Path(f"/sys/fs/cgroup/memory/memcap-{process.pid}/memory.stat")
        peak = None
        while process.poll() is None:
            try:
                rss = int(re.search(r"^total_rss (\d+)$", stat.read_text(), re.M).group(1))
                peak = max(peak or 0, rss >> 20)
            except (OSError, AttributeError):
                pass
            time.sleep(0.1)
        out.seek(0), err.seek(0)
        done = subprocess.CompletedProcess(process.args, process.returncode, out.read(), err.read())
    if peak is None:  # too short to sample: memcap's own figure
        found = re.search(r"peak anonymous (\d+) MiB", done.stderr)
        peak = int(found.group(1)) if found else None
    return done, peak


def run_capped(cap: str, args: list[str], out: Path) -> dict:
    """One `llmsurgery` command under the memory cap: exit code, peak anonymous memory, time, last line."""
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    done, peak = capped([sys.executable, "-m", "llmsurgery", *args, "--output", str(out)], cap)
    seconds = time.perf_counter() - started
    lines = [
        line for line in (done.stdout + done.stderr).splitlines() if line.strip() and "memcap:" not in line
    ]
    dtypes = set()
    if out.is_dir():
        from safetensors import safe_open

        for path in out.glob("*.safetensors"):
            with safe_open(path, "pt") as handle:
                dtypes |= {str(handle.get_slice(k).get_dtype()) for k in handle.keys()}
    return {
        "exit": done.returncode,
        "peak_mib": peak,
        "seconds": seconds,
        "output_gb": folder_bytes(out) / 1e9 if out.is_dir() else None,
        "dtypes": sorted(dtypes),
        "last_line": lines[-1] if lines else "",
    }


@torch.no_grad()
def bi_against_plain(folder: Path, samples: int, seq_len: int) -> dict:
    """Seconds of BI scoring and of a plain layer-by-layer forward over the same windows (plain, BI, plain)."""
    from transformers import AutoConfig, AutoTokenizer

    from llmsurgery.passes.prune_bi.maths import residual_stats

    config = AutoConfig.from_pretrained(folder)
    windows = calibration_batches(
        AutoTokenizer.from_pretrained(folder), CalibConfig(source="news", samples=samples, seq_len=seq_len)
    )

    def plain() -> float:
        streamed = StreamedModel(folder, config, torch.bfloat16)  # built outside the timed part
        started = time.perf_counter()
        hidden, arguments = streamed.layer_inputs(windows)
        for i in range(streamed.n_layers):
            layer = streamed.load_layer(i)
            for w, x in enumerate(hidden):
                args, kwargs = arguments[w][i]
                out = layer(x, *args, **kwargs)
                hidden[w] = out[0] if isinstance(out, tuple) else out
            streamed.free_layer(i)
        return time.perf_counter() - started

    first = plain()
    streamed = StreamedModel(folder, config, torch.bfloat16)
    started = time.perf_counter()
    residual_stats(streamed, windows)
    bi = time.perf_counter() - started
    second = plain()
    return {"plain_seconds": [first, second], "bi_seconds": bi, "ratio": bi / ((first + second) / 2)}


LOAD_CHECK = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(path)
ids = model.generate(**tok("The prime minister said", return_tensors="pt"), max_new_tokens=2, do_sample=False)
print("loaded", type(model).__name__, "layers", model.config.num_hidden_layers, "generated", ids.shape[1])
"""


def load_check(out: Path, cap: str) -> str:
    """Load the output with transformers (trust_remote_code for llmsurgery's runtime) and greedy-decode 2 tokens."""
    done, peak = capped([sys.executable, "-c", LOAD_CHECK, str(out)], cap)
    lines = [line for line in done.stdout.splitlines() if line.startswith("loaded")]
    return (lines[0] if lines and done.returncode == 0 else f"failed (exit {done.returncode})") + (
        f", {peak} MiB" if peak is not None else ""
    )


RUNS = {
    "prune": ["prune", "--bi", "{ckpt}", "--remove", "4"],
    "prune-whole": ["prune", "--bi", "{ckpt}", "--remove", "4", "--stream", "off"],
    "rotate-sparsify": ["rotate-sparsify", "{ckpt}", "--sparsity", "0.4"],
    "absorb": ["absorb", "{ckpt}", "--keep-ratio", "0.75"],
    "kv-compress": ["kv-compress", "{ckpt}", "--budget", "0.5", "--no-train", "--uniform"],
    "kv-compress-train": ["kv-compress", "{ckpt}", "--budget", "0.5"],
    "heal": ["heal", "{pruned}", "--teacher", "{ckpt}", "--steps", "20"],  # the student: prune's output
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/llama7b-bf16"))
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (fewer: a quick shape check)")
    parser.add_argument("--cap", default="3G")
    parser.add_argument("--load-cap", default="20G", help="memory cap of the load check of each output")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--only", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    parser.add_argument("--no-load-check", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    console = Console()
    ckpt = args.dir
    started = time.perf_counter()
    write_checkpoint(ckpt, args.layers)
    console.print(
        f"checkpoint {ckpt}: {folder_bytes(ckpt) / 1e9:.2f} GB ({time.perf_counter() - started:.0f} s)"
    )
    calib = ["--calib-samples", str(args.samples), "--calib-seq-len", str(args.seq_len)]
    out, pruned = ckpt.with_name(ckpt.name + "-out"), ckpt.with_name(ckpt.name + "-pruned")
    results = {}
    table = Table(title=f"{ckpt.name} ({folder_bytes(ckpt) / 1e9:.1f} GB bf16) under memcap {args.cap}")
    for column in ("run", "exit", "peak anon MiB", "seconds", "output GB", "dtype"):
        table.add_column(column)
    for name in args.only.split(","):
        command = [
            a.replace("{ckpt}", str(ckpt)).replace("{pruned}", str(pruned)) for a in RUNS[name]
        ] + calib
        target = pruned if name == "prune" else out
        r = results[name] = run_capped(args.cap, command, target) | {"command": " ".join(command[:-4])}
        if r["exit"] == 0 and not args.no_load_check:
            r["load_check"] = load_check(target, args.load_cap)
        table.add_row(
            name,
            str(r["exit"]),
            str(r["peak_mib"]),
            f"{r['seconds']:.0f}",
            "-" if r["output_gb"] is None else f"{r['output_gb']:.2f}",
            ",".join(r["dtypes"]) or "-",
        )
        shutil.rmtree(out, ignore_errors=True)
        console.print(
            f"{name}: llmsurgery {r['command']}: exit {r['exit']}: {r['last_line'][:300]}"
            + (f"; load check: {r['load_check']}" if "load_check" in r else "")
        )
    shutil.rmtree(pruned, ignore_errors=True)
    console.print(table)
    timing = results["bi_vs_plain"] = bi_against_plain(ckpt, args.samples, args.seq_len)
    console.print(
        f"BI scoring {timing['bi_seconds']:.1f} s; plain layer-by-layer forward "
        f"{timing['plain_seconds'][0]:.1f} / {timing['plain_seconds'][1]:.1f} s "
        f"-> bi/plain: {timing['ratio']:.2f}x"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
