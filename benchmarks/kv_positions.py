"""Where fitted key bases lose the keys of a long context: the share of each post-RoPE key that a kept rank drops,
by the key's position, for bases fitted with the calibration windows at position 0 and placed within a span.

MatryoshkaKV (arXiv 2410.14731) fits its key bases (PCA, then training) to post-RoPE keys of calibration windows.
RoPE turns each key's frequency pairs by its position; the slow pairs turn little within a window of 512 tokens, so
windows that all start at 0 show the bases keys of the first 512 positions only. `kv-compress --positions N` starts
each window at its own random offset below N (`kv_compress.maths.window_positions`): the model's outputs do not
change (RoPE attention sees distances), its keys do. Here: PCA bases (no training) from kv_recall's calibration
windows (the news calibration part, never evaluated) at each `--spans` value, and the share of the centred key
energy outside the first r columns, summed over every layer and KV head, per position bin of the held-out news
haystack contexts of `--length` tokens (kv_recall's news task).

    python benchmarks/kv_positions.py [--model smollm2-135m] [--length 2048] [--samples 4]
        [--spans 0,2048,8192] [--keep 0.5,0.75] [--calib news] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kv_recall  # noqa: E402
from kv_recall_tasks import Haystacks, make_sample  # noqa: E402

from llmsurgery.errors import UserError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--length", type=int, default=2048, help="context tokens per sample")
    parser.add_argument("--samples", type=int, default=4, help="news contexts whose keys are measured")
    parser.add_argument("--spans", default="0,2048,8192", help="kv-compress --positions of each set of bases")
    parser.add_argument("--keep", default="0.5,0.75", help="key ranks kept, as fractions of head_dim")
    parser.add_argument("--calib", default="news", help="calibration text of the bases (never evaluated)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    try:
        args.spans = [int(x) for x in args.spans.split(",") if x]
        args.keep = [float(x) for x in args.keep.split(",") if x]
    except ValueError:
        raise UserError("--spans takes whole numbers and --keep fractions, comma-separated") from None
    if not args.spans or any(s < 0 for s in args.spans):
        raise UserError("--spans takes 0 (windows at position 0) or context lengths")
    if not args.keep or not all(0 < k < 1 for k in args.keep):
        raise UserError("--keep takes fractions of head_dim strictly between 0 and 1")
    if args.samples < 1 or args.length < 128:
        raise UserError("--samples must be at least 1 and --length at least 128 tokens")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise UserError(f"cannot write {args.json}: its folder does not exist")
    args.recall = kv_recall.parse_args(["--models", args.model, "--calib", args.calib, "--no-ppl"])
    for span in args.spans:
        args.recall.positions = span
        kv_recall.kv_config(args.recall).check_positions(None)
    return args


def bins_of(length: int) -> list[int]:
    """Bin edges: 0, 256, 512, then doubling, then the length."""
    edges = [0, 256, 512]
    while edges[-1] * 2 < length:
        edges.append(edges[-1] * 2)
    return [e for e in edges if e < length] + [length]


@torch.no_grad()
def context_keys(model, contexts: list[list[int]]) -> list[list[torch.Tensor]]:
    """Per context, per layer: the cached post-RoPE keys [KV heads, T, d] of the stock model's prefill."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    keys = []
    for ids in contexts:
        cache = DynamicCache()
        model(input_ids=torch.tensor([ids], device=device), past_key_values=cache, use_cache=True)
        keys.append([layer.keys[0].float().cpu() for layer in cache.layers])
    return keys


def lost_shares(state, keys: list[list[torch.Tensor]], rank: int, edges: list[int]) -> list[float]:
    """Per position bin: the centred key energy outside the first `rank` basis columns over the energy, summed over
    contexts, layers and KV heads."""
    lost, total = (
        torch.zeros(len(edges) - 1, dtype=torch.float64),
        torch.zeros(len(edges) - 1, dtype=torch.float64),
    )
    for per_layer in keys:
        for layer, k in enumerate(per_layer):
            for g in range(k.shape[0]):
                i = layer * state.groups + g
                x = (k[g] - state.mu_k[i].detach().cpu()).double()
                kept = state.init_k[i][:, :rank].cpu().double()
                residual = x - x @ kept @ kept.T
                for b, (lo, hi) in enumerate(zip(edges, edges[1:])):
                    lost[b] += residual[lo:hi].pow(2).sum()
                    total[b] += x[lo:hi].pow(2).sum()
    return (lost / total).tolist()


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        from llmsurgery.model_io import check_model, load_model

        checked = check_model(args.model)  # its config only: a span beyond its context fails before loading
        context = checked.config.get("max_position_embeddings")
        for span in args.spans:
            if context and span > context:
                raise UserError(f"--spans: {span} is beyond the model's context of {context} tokens")
        loaded = load_model(args.model, device="cpu", dtype="float32", checked=checked)
        model, tokenizer = loaded.model, loaded.tokenizer
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    hay = Haystacks(tokenizer, kv_recall.haystack_texts(args.recall))
    contexts = [
        make_sample("news", args.length, i, hay, args.seed, "news").context for i in range(args.samples)
    ]
    keys = context_keys(model, contexts)
    d = kv_recall.model_shape(model)[0]
    edges = bins_of(args.length)
    rows = []
    for span in args.spans:
        args.recall.positions = span
        state = kv_recall.pca_state(model, tokenizer, kv_recall.kv_config(args.recall))
        for keep in args.keep:
            shares = lost_shares(state, keys, max(1, round(keep * d)), edges)
            rows.append({"positions": span, "keep": keep, "lost": [round(x, 4) for x in shares]})
    head = ["--positions", "keys kept"] + [f"{lo}-{hi}" for lo, hi in zip(edges, edges[1:])]
    print(
        f"\n{args.model}: share of the post-RoPE keys' centred energy that PCA key bases drop, by key position"
    )
    print(f"({args.samples} held-out news contexts of {args.length} tokens; bases from {args.calib} windows)")
    print(" | ".join(head))
    for row in rows:
        print(" | ".join([str(row["positions"]), f"{row['keep']:g} d"] + [f"{x:.3f}" for x in row["lost"]]))
    if args.json:
        setup = {"model": args.model, "length": args.length, "samples": args.samples, "calib": args.calib}
        Path(args.json).write_text(json.dumps(setup | {"bins": edges, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
