"""llama.cpp on llmsurgery's GGUF exports: the same greedy tokens as Hugging Face, and what pruning buys in speed.

In one run:

1. llama.cpp is built from PyPI's source distribution of llama-cpp-python (`pip wheel --no-binary`, compiled
   for this CPU) into ``$LLMSURGERY_CACHE/llama-cpp-python/VERSION/`` once; later runs import it from there.
2. Every architecture: a tiny random model of each (llama, mistral, qwen2, qwen3, gemma3_text with a sliding
   window shorter than the prompt) exported at f32; llama.cpp's logits on 24 tokens against transformers'
   (f32 KV cache), as max |difference| / max |logit|.
3. Tokenizers read from tokenizer.json (byte-level BPE: SmolLM2's converted folder; SentencePiece-style BPE:
   Gemma3's): llama.cpp's tokenization of 24 texts against transformers'.
4. Tokens, SmolLM2-135M dense (30 layers) and pruned by Block Influence (`prune --bi --remove 7`, 23 layers),
   and Gemma3-270M dense and pruned by a block of 6 (`prune --bi --block --remove 6`, 12 layers, the pattern
   kept): llama.cpp's tokenizer on the prompt equals HF's, then 32 greedy tokens from the same prompt ids,
   llama.cpp against transformers (float32 safetensors). The check is at f32 with an f32 KV cache (the same numbers);
   f16 and q8_0 (llama.cpp's default f16 KV cache) round the weights, so their agreement is printed as the
   number of leading tokens equal.
5. Speed, SmolLM2 in llama.cpp, batch 1, default settings: prompt processing (one batch of `--prompt-tokens`
   tokens) and decoding (`--decode-tokens` tokens one at a time) in tokens/s, dense and pruned interleaved in
   every repetition (median of `--reps`), with the pruned/dense ratio, at f16 and q8_0.

Run it (offline; the first run compiles llama.cpp, 20+ minutes on 2 cores)::

    python benchmarks/serving.py [--threads 2] [--reps 5] [--json FILE]

Exit status 1 when a check fails (an architecture's logits, or f32 tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from llmsurgery.sources import cache_dir

LLAMA_CPP_PYTHON = "0.3.36"
PROMPT = "The prime minister said on Tuesday that the government"
console = Console()


def llama_cpp_site(version: str = LLAMA_CPP_PYTHON) -> Path:
    """Build (once) and return the folder holding `llama_cpp`, compiled from the source distribution."""
    root = cache_dir() / "llama-cpp-python" / version
    site = root / "site"
    if (site / "llama_cpp").is_dir():
        return site
    wheels = root / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    if not list(wheels.glob("llama_cpp_python-*.whl")):
        console.print(f"building llama-cpp-python {version} from source (once; cached in {root})")
        env = os.environ | {"CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
        started = time.perf_counter()
        subprocess.run(
            [
                *pip,
                "wheel",
                "--no-deps",
                "--no-binary",
                "llama-cpp-python",
                f"llama-cpp-python=={version}",
                "-w",
                wheels,
            ],
            check=True,
            env=env,
        )
        console.print(f"built in {time.perf_counter() - started:.0f} s")
    wheel = next(wheels.glob("llama_cpp_python-*.whl"))
    subprocess.run([*pip, "install", "-q", "--no-deps", "--target", site, wheel, "diskcache"], check=True)
    return site


def run_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "llmsurgery", *args], check=True)


def pruned(work: Path, model: str, args: list[str]) -> Path:
    """`prune --bi MODEL ARGS`, made once in `work`."""
    target = work / f"{model}-{'-'.join(a.lstrip('-') for a in args)}"
    if not target.is_dir():
        run_cli("prune", "--bi", model, *args, "--output", str(target))
    return target


TINY_ARCHS = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {"head_dim": 32},
    "gemma3_text": {
        "head_dim": 32,
        "query_pre_attn_scalar": 32,
        "sliding_window": 8,
        "layer_types": ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(7)],
    },
}


def tiny_model(arch: str, folder: Path, tokenizer_folder: Path) -> Path:
    """A 7-layer random model of `arch` (random norms too) with the tokenizer of `tokenizer_folder`, saved once."""
    if folder.is_dir():
        return folder
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        arch,
        vocab_size=json.loads((tokenizer_folder / "config.json").read_text())["vocab_size"],
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=7,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=arch == "gemma3_text",
        **TINY_ARCHS[arch],
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(0.2 * torch.randn_like(param) + (0.0 if arch == "gemma3_text" else 1.0))
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_folder / name).is_file():
            shutil.copyfile(tokenizer_folder / name, folder / name)
    return folder


@torch.no_grad()
def logits_gap(folder: Path, gguf: Path, ids: list[int], threads: int) -> tuple[float, bool]:
    """(max |llama.cpp - transformers| / max |transformers| over the prompt's logits, argmax equal everywhere)."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    llm = open_gguf(gguf, threads, n_ctx=64, f32_cache=True, logits_all=True)
    llm.eval(ids)
    cpp = np.array(llm.scores[: len(ids)])
    llm.close()
    hf = (
        AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        .eval()(torch.tensor([ids]))
        .logits[0]
    )
    hf = hf.numpy()
    return float(np.abs(cpp - hf).max() / np.abs(hf).max()), bool((cpp.argmax(-1) == hf.argmax(-1)).all())


def export(folder: Path, target: Path, outtype: str) -> Path:
    if not target.is_file():
        run_cli("export", str(folder), "--format", "gguf", "--outtype", outtype, "--output", str(target))
    return target


@torch.no_grad()
def hf_greedy(folder: Path, ids: list[int], n: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids) :].tolist()


def open_gguf(path: Path, threads: int, n_ctx: int = 1024, f32_cache: bool = False, logits_all: bool = False):
    """A llama.cpp context; f32_cache: keys and values cached in float32 (llama.cpp's default is float16)."""
    from llama_cpp import Llama

    kv = {"type_k": 0, "type_v": 0} if f32_cache else {}  # GGML_TYPE_F32
    return Llama(
        str(path),
        n_ctx=n_ctx,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=logits_all,
        verbose=False,
        **kv,
    )


def cpp_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    found = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        found.append(int(token))
        if len(found) == n:
            break
    return found


def leading_equal(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def speed(llm, text: list[int], n_prompt: int, n_decode: int) -> tuple[float, float]:
    """(prompt tokens/s, decode tokens/s) by llama.cpp's own counters (`llama_perf_context`, as llama-cli prints
    them): the first `n_prompt` tokens of `text` in one batch, then the next `n_decode` one at a time (each step
    costs what a generated token costs; feeding the text's tokens keeps the runs identical)."""
    import llama_cpp

    llm.reset()
    llama_cpp.llama_perf_context_reset(llm.ctx)
    llm.eval(text[:n_prompt])
    llama_cpp.llama_synchronize(llm.ctx)  # llama.cpp adds a decode to its counters when it synchronizes
    for token in text[n_prompt : n_prompt + n_decode]:
        llm.eval([token])
        llama_cpp.llama_synchronize(llm.ctx)
    perf = llama_cpp.llama_perf_context(llm.ctx)
    assert perf.n_p_eval == n_prompt and perf.n_eval == n_decode, (perf.n_p_eval, perf.n_eval)
    return perf.n_p_eval / perf.t_p_eval_ms * 1e3, perf.n_eval / perf.t_eval_ms * 1e3


def prompt_tokens(tokenizer, n: int) -> list[int]:
    from llmsurgery.corpora import evaluation_documents

    text = "\n\n".join(evaluation_documents("news")[:20])
    return tokenizer(text, add_special_tokens=False)["input_ids"][:n]


ARCH_GAP = 2e-3  # ggml's GELU reads a float16 table; the SiLU architectures agree to about 1e-6


def check_architectures(work: Path, tokenizer_folder: Path, threads: int, report: dict) -> bool:
    table = Table(title="Every architecture in llama.cpp: logits on 24 tokens against transformers (f32)")
    for column in ("architecture", "max |diff| / max |logit|", "argmax equal", "check"):
        table.add_column(column)
    ids = [int(i) for i in torch.randint(100, 40000, (24,), generator=torch.Generator().manual_seed(0))]
    ok = True
    for arch in TINY_ARCHS:
        folder = tiny_model(arch, work / f"tiny-{arch}", tokenizer_folder)
        gap, same = logits_gap(folder, export(folder, work / f"tiny-{arch}.gguf", "f32"), ids, threads)
        passed = gap < ARCH_GAP and same
        ok &= passed
        table.add_row(arch, f"{gap:.2e}", str(same), "pass" if passed else "FAIL")
        report["architectures"][arch] = {"relative_gap": gap, "argmax_equal": same}
    console.print(table)
    return ok


TOKENIZER_TEXTS = [
    "def f(x):\n    return {'a': x ** 2}  # 12345 67.89",
    "  leading spaces, \ttabs,\n\nnew lines and trailing  ",
    "naïve café – 東京 😀 Ünïcödé",
    "<|im_start|>user\nHello<|im_end|>",
]


def check_tokenizers(work: Path, threads: int, report: dict) -> bool:
    """Vocabularies read from tokenizer.json (no source GGUF: `export` derives tokens, types, merges or scores and
    the pre-tokenizer): llama.cpp's tokenizer against transformers' on the held-out news and a few hard texts,
    special tokens in the text parsed by both (transformers does by default, llama-cli for chat templates)."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from llmsurgery.corpora import evaluation_documents
    from llmsurgery.sources import local_folder, resolve_source

    texts = [*evaluation_documents("news")[:20], *TOKENIZER_TEXTS]
    table = Table(title="Tokenizers exported from tokenizer.json: llama.cpp vs transformers")
    for column in ("tokenizer.json of", "GGUF vocabulary", "texts tokenized the same", "check"):
        table.add_column(column)
    ok = True
    for builtin, arch in (("smollm2-135m", "llama"), ("gemma3-270m", "gemma3_text")):
        source = local_folder(resolve_source(builtin))
        folder = tiny_model(
            arch, work / f"tokenizer-{builtin}", source
        )  # a folder without history: tokenizer.json
        gguf = export(folder, work / f"tokenizer-{builtin}.gguf", "f16")
        llm = Llama(str(gguf), vocab_only=True, verbose=False)
        hf = AutoTokenizer.from_pretrained(folder)
        same = sum(llm.tokenize(t.encode(), add_bos=True, special=True) == hf(t)["input_ids"] for t in texts)
        kind = f"{llm.metadata.get('tokenizer.ggml.model')} / {llm.metadata.get('tokenizer.ggml.pre')}"
        llm.close()
        passed = same == len(texts)
        ok &= passed
        table.add_row(
            builtin + " (converted folder)", kind, f"{same}/{len(texts)}", "pass" if passed else "FAIL"
        )
        report["tokenizers"][builtin] = {"same": same, "texts": len(texts)}
    console.print(table)
    return ok


def check_tokens(folders: dict[str, Path], files: dict, args, report: dict) -> bool:
    from transformers import AutoTokenizer

    table = Table(title=f"Greedy {args.greedy_tokens} tokens: llama.cpp vs transformers (f32 safetensors)")
    for column in ("model", "layers", "gguf", "tokenizer", "leading tokens equal", "check"):
        table.add_column(column)
    ok = True
    for name, folder in folders.items():
        tokenizer = AutoTokenizer.from_pretrained(folder)
        prompt_ids = tokenizer(PROMPT)["input_ids"]  # with the BOS the model's tokenizer adds (gemma), if any
        reference = hf_greedy(folder, prompt_ids, args.greedy_tokens)
        layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
        for outtype in ("f32", "f16", "q8_0"):
            if (name, outtype) not in files:
                continue
            gate = outtype == "f32"
            llm = open_gguf(files[(name, outtype)], args.threads, f32_cache=gate)
            same_tokens = llm.tokenize(PROMPT.encode(), special=False) == prompt_ids  # add_bos from the file
            equal = leading_equal(cpp_greedy(llm, prompt_ids, args.greedy_tokens), reference)
            llm.close()
            passed = equal == args.greedy_tokens and same_tokens
            ok &= passed or not gate
            verdict = ("pass" if passed else "FAIL") if gate else "(informative)"
            tok = "equal" if same_tokens else "DIFFERS"
            table.add_row(name, str(layers), outtype, tok, f"{equal}/{args.greedy_tokens}", verdict)
            report["tokens"][f"{name}/{outtype}"] = {"leading_equal": equal, "tokenizer_equal": same_tokens}
        console.print(f"{name} (transformers): {tokenizer.decode(reference)!r}")
    console.print(table)
    return ok


def measure_speed(folders: dict[str, Path], files: dict, args, report: dict) -> None:
    from transformers import AutoTokenizer

    text = prompt_tokens(
        AutoTokenizer.from_pretrained(folders["dense"]), args.prompt_tokens + args.decode_tokens
    )
    load = os.getloadavg()[0]
    title = f"llama.cpp speed, batch 1, {args.threads} thread(s) (median of {args.reps}, interleaved)"
    speeds = Table(title=f"{title}; load average before: {load:.2f} on {os.cpu_count()} CPUs")
    report["load_average_before_speed"] = load
    for column in ("gguf", "model", "MiB", "prompt tok/s", "decode tok/s"):
        speeds.add_column(column, justify="right" if column != "model" else "left")
    for outtype in ("f16", "q8_0"):
        llms = {name: open_gguf(files[(name, outtype)], args.threads) for name in ("dense", "pruned")}
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in llms}
        for _ in range(args.reps):
            for name, llm in llms.items():  # dense and pruned side by side in every repetition
                runs[name].append(speed(llm, text, args.prompt_tokens, args.decode_tokens))
        for llm in llms.values():
            llm.close()
        medians = {
            name: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs))
            for name, rs in runs.items()
        }
        for name, (p, d) in medians.items():
            size = files[(name, outtype)].stat().st_size / 2**20
            speeds.add_row(outtype, name, f"{size:.0f}", f"{p:.1f}", f"{d:.1f}")
        ratio = (medians["pruned"][0] / medians["dense"][0], medians["pruned"][1] / medians["dense"][1])
        speeds.add_row(outtype, "pruned / dense", "", f"{ratio[0]:.3f}x", f"{ratio[1]:.3f}x")
        report["speed"][outtype] = {
            "median": medians,
            "ratio_prompt": ratio[0],
            "ratio_decode": ratio[1],
            "runs": runs,
        }
    report["load_average_after_speed"] = os.getloadavg()[0]
    console.print(speeds)
    console.print(f"load average after: {report['load_average_after_speed']:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--remove", type=int, default=7)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--greedy-tokens", type=int, default=32)
    parser.add_argument("--work", type=Path, default=cache_dir() / "bench-serving")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    sys.path.insert(0, str(llama_cpp_site()))
    import llama_cpp

    from llmsurgery.sources import local_folder, resolve_source

    console.print(
        f"llama.cpp (llama-cpp-python {llama_cpp.__version__}): {llama_cpp.llama_print_system_info().decode()}"
    )
    args.work.mkdir(parents=True, exist_ok=True)
    report: dict = {"llama_cpp_python": llama_cpp.__version__, "threads": args.threads}
    report |= {"architectures": {}, "tokenizers": {}, "tokens": {}, "speed": {}}
    dense = local_folder(resolve_source("smollm2-135m"))
    ok = check_architectures(args.work, dense, args.threads, report)
    ok &= check_tokenizers(args.work, args.threads, report)

    folders = {
        "dense": dense,
        "pruned": pruned(args.work, "smollm2-135m", ["--remove", str(args.remove)]),
        "gemma3 dense": local_folder(resolve_source("gemma3-270m")),
        "gemma3 pruned": pruned(args.work, "gemma3-270m", ["--block", "--remove", "6"]),
    }
    files = {
        (name, outtype): export(folder, args.work / f"{name.replace(' ', '-')}-{outtype}.gguf", outtype)
        for name, folder in folders.items()
        for outtype in (("f32", "f16", "q8_0") if not name.startswith("gemma3") else ("f32",))
    }
    ok &= check_tokens(folders, files, args, report)
    measure_speed(folders, files, args, report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    console.print("[green]all checks pass[/green]" if ok else "[bold red]a check failed[/bold red]")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
