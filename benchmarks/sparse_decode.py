"""Sparse vs dense decoding on CPU, interleaved in one run: single GEMVs and end-to-end tokens/s.

(a) One matrix-vector product, float32 and bfloat16, for a 4096 -> 11008 and an 11008 -> 4096 matrix
    (a Llama-7B up/gate and down projection): dense ``F.linear`` on the stock [out, in] weight vs the
    fused Top-K + row-gather kernel on the input-major weight (its Top-K included) at 25/40/50%
    sparsity; "kernel 0%" is the kernel keeping every row, to show what the kernel alone is worth.
(b) Greedy decoding with a KV cache, batch 1, tokens/s after a 16-token prompt: the dense original vs
    its ``rotate-sparsify`` (LaRoSA, default split 0.8/1.2 of S) at S = 40% through the sparse kernel,
    and the same sparse model on its dense masked path (``sparse_decode=False``), for
    - the real small model (smollm2-135m), and
    - a Llama-7B-shaped stack (hidden 4096, MLP 11008, 32 heads) of --layers layers with random
      weights; its vocabulary is cut to 4096 so that embedding and head carry the share of bytes
      they have in the 32-layer model (about 2%) instead of dominating a few-layer stack.
    Rounds alternate between the models; each figure is the median over rounds.

Threads: torch's (``torch.get_num_threads()``), the same for both paths. Ends with
``speedup@40%: X.XXx``, the 7B-shaped end-to-end ratio.

    python benchmarks/sparse_decode.py [--layers 4] [--rounds 5] [--tokens 16] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from llmsurgery.calibration import CalibConfig, calibration_batches
from llmsurgery.model_io import load_model
from llmsurgery.modeling.llmsurgery_sparse_kernel import kernel_status, load_kernel
from llmsurgery.modeling.modeling_llmsurgery import sparse_kernel_calls
from llmsurgery.passes import RotateSparsify
from llmsurgery.passes.rotate_sparsify.maths import rotate_sparsify_

SPARSITY = 0.4


def _interleaved(calls: dict, rounds: int) -> dict:
    """Median seconds per call of each callable, alternating between them every round (2 warm-up rounds)."""
    times: dict = {name: [] for name in calls}
    for r in range(rounds + 2):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            if r >= 2:
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def gemv_rows(rounds: int) -> list[dict]:
    kernel, rows = load_kernel(), []
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for fan_in, fan_out in ((4096, 11008), (11008, 4096)):
            weight = (torch.randn(fan_out, fan_in) * 0.02).to(dtype)
            weight_in = weight.t().contiguous()
            x = torch.randn(fan_in).to(dtype)
            calls = {"dense": lambda: F.linear(x, weight)}
            if kernel is not None:
                calls["kernel 0%"] = lambda: kernel.top_k_gemv(x, fan_in, weight_in)
                for s in (0.25, 0.4, 0.5):
                    keep = fan_in - round(s * fan_in)
                    calls[f"{s:.0%}"] = lambda keep=keep: kernel.top_k_gemv(x, keep, weight_in)
            t = _interleaved(calls, rounds * 4)
            rows.append(
                {
                    "dtype": str(dtype).removeprefix("torch."),
                    "shape": f"{fan_in}->{fan_out}",
                    "dense_ms": t["dense"] * 1e3,
                    **{k: t["dense"] / v for k, v in t.items() if k != "dense"},
                }
            )
    return rows


def _decoder(model, prompt: torch.Tensor, tokens: int, sparse_decode: bool = True):
    """A callable that prefills `prompt` (untimed) and returns the seconds of a greedy decode of `tokens` tokens."""

    def run() -> float:
        model.config.sparse_decode = sparse_decode
        with torch.no_grad():
            out = model(prompt, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            started = time.perf_counter()
            for _ in range(tokens):
                out = model(nxt, past_key_values=cache, use_cache=True)
                cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            return time.perf_counter() - started

    return run


def decode_row(name: str, dense, sparse, prompt: torch.Tensor, tokens: int, rounds: int) -> dict:
    """tokens/s of dense original, sparse model on the kernel, sparse model on its dense masked path."""
    runs = {
        "dense original": _decoder(dense, prompt, tokens),
        "sparse, kernel": _decoder(sparse, prompt, tokens),
        "sparse, dense path": _decoder(sparse, prompt, tokens, sparse_decode=False),
    }
    seconds: dict = {k: [] for k in runs}
    for r in range(rounds + 1):
        for k, run in runs.items():
            elapsed = run()
            if r >= 1:
                seconds[k].append(elapsed)
    sparse.config.sparse_decode = True
    tps = {k: tokens / statistics.median(v) for k, v in seconds.items()}
    return {
        "model": name,
        **{f"{k} tok/s": v for k, v in tps.items()},
        "speedup": tps["sparse, kernel"] / tps["dense original"],
        "masked dense vs original": tps["sparse, dense path"] / tps["dense original"],
        "kernel calls": sparse_kernel_calls(sparse),
    }


def smollm2_row(args) -> dict:
    loaded = load_model("smollm2-135m")
    dense = loaded.model
    sparse = copy.deepcopy(dense)
    calib = CalibConfig(source="news", samples=8, seq_len=256, seed=0)
    rotate_sparsify_(
        sparse, calibration_batches(loaded.tokenizer, calib), RotateSparsify(sparsity=SPARSITY, calib=calib)
    )
    prompt = loaded.tokenizer(
        "The council said on Tuesday that the new bridge", return_tensors="pt"
    ).input_ids[:, :16]
    return decode_row("smollm2-135m", dense, sparse, prompt, args.tokens, args.rounds)


def llama7b_shaped_row(args) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        num_hidden_layers=args.layers,
        vocab_size=4096,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    models = []
    for _ in range(2):  # the same random weights twice: one stays dense, one is sparsified
        torch.manual_seed(0)
        models.append(LlamaForCausalLM(config).eval())
    dense, sparse = models
    generator = torch.Generator().manual_seed(1)
    calib = torch.randint(0, config.vocab_size, (4, 128), generator=generator)
    rotate_sparsify_(
        sparse, calib, RotateSparsify(sparsity=SPARSITY, calib=CalibConfig(samples=4, seq_len=128))
    )
    prompt = torch.randint(0, config.vocab_size, (1, 16), generator=generator)
    row = decode_row(
        f"llama-7b-shaped x{args.layers} layers", dense, sparse, prompt, args.tokens, args.rounds
    )
    return row | prefill_row(
        dense, sparse, torch.randint(0, config.vocab_size, (1, 64), generator=generator), args.rounds
    )


def prefill_row(dense, sparse, prompt: torch.Tensor, rounds: int) -> dict:
    """A 64-token prefill: the sparse model chooses its dense path by itself (no kernel call); time vs the original."""
    before = sparse_kernel_calls(sparse)

    def prefill(model):
        with torch.no_grad():
            model(prompt, use_cache=True)

    t = _interleaved({"dense": lambda: prefill(dense), "sparse": lambda: prefill(sparse)}, rounds)
    return {
        "prefill_tokens": prompt.shape[1],
        "prefill_ratio": t["dense"] / t["sparse"],
        "prefill_kernel_calls": sparse_kernel_calls(sparse) - before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the 7B-shaped stack")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=16, help="tokens decoded per round")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    console = Console(width=130)
    console.print(f"sparse decode: {kernel_status()}; torch threads {torch.get_num_threads()}")
    gemv = gemv_rows(args.rounds)
    table = Table(title="(a) one GEMV: dense F.linear time and speed-up of the Top-K kernel (x dense)")
    for column in ("dtype", "in -> out", "dense ms", "kernel 0%", "25%", "40%", "50%"):
        table.add_column(column, justify="right")
    for row in gemv:
        table.add_row(
            row["dtype"],
            row["shape"],
            f"{row['dense_ms']:.2f}",
            *(f"{row[k]:.2f}x" if k in row else "-" for k in ("kernel 0%", "25%", "40%", "50%")),
        )
    console.print(table)
    decode = [smollm2_row(args), llama7b_shaped_row(args)]
    table = Table(
        title=f"(b) greedy decode, batch 1, {args.tokens} tokens a round, "
        f"median of {args.rounds} interleaved rounds, S = {SPARSITY:.0%}"
    )
    for column in (
        "model",
        "dense original tok/s",
        "sparse, kernel tok/s",
        "sparse, dense path tok/s",
        "speed-up",
        "kernel calls",
    ):
        table.add_column(column, justify="right")
    for row in decode:
        table.add_row(
            row["model"],
            f"{row['dense original tok/s']:.2f}",
            f"{row['sparse, kernel tok/s']:.2f}",
            f"{row['sparse, dense path tok/s']:.2f}",
            f"{row['speedup']:.2f}x",
            str(row["kernel calls"]),
        )
    console.print(table)
    last = decode[-1]
    console.print(
        f"prefill of {last['prefill_tokens']} tokens, {last['model']}: the sparse model ran "
        f"{last['prefill_kernel_calls']} "
        f"kernel calls (dense path chosen) at {last['prefill_ratio']:.2f}x the original's speed (Top-K masks and "
        "rotation adapters cost the difference)",
        soft_wrap=True,
        highlight=False,
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "kernel": kernel_status(),
                    "threads": torch.get_num_threads(),
                    "gemv": gemv,
                    "decode": decode,
                },
                indent=2,
            )
        )
    console.print(f"speedup@40%: {decode[-1]['speedup']:.2f}x", soft_wrap=True, highlight=False)


if __name__ == "__main__":
    main()
