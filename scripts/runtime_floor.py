"""The saved-model runtime on the transformers floor that pyproject.toml declares.

`make DIR` (in the test environment, newest transformers): tiny models of every architecture, absorbed (lossy
keep-ratio, Q-K pairs where allowed) and KV-compressed (PCA, uniform ranks; llama and gemma3 also with
--exact-values), each saved with llmsurgery, plus
its logits and greedy generations (with and without the cache) as computed here.

`check DIR` (in a bare environment holding only torch and the floor transformers, no llmsurgery): each saved
model loads with `trust_remote_code=True` from the files next to its weights, gives the same logits to float32
tolerance, and generates the same tokens with and without the cache; a KV-compressed one also hands a forward hook
full-width keys and values (as kvpress's presses read them) and keeps the narrow rows of what the hook keeps, and
generates the same tokens when loaded with project_context_only (and with exact_recent).
Exit 1 and one line per failure.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # before transformers imports tqdm

import torch  # noqa: E402

PROMPT = [[1, 37, 120, 55, 201, 9, 77, 300, 12, 5, 66, 88]]
NEW_TOKENS = 8
RECENT = 4  # exact_recent: the prompt's last keys kept exact


def _outputs(model) -> dict:
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0].tolist()
        cached = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True)[0].tolist()
        uncached = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=False)[
            0
        ].tolist()
    return {"logits": logits, "cached": cached, "uncached": uncached}


def _evicted_logits(model) -> float | None:
    """Packed caches (kv-compress) seen through a forward hook at full width, as kvpress's presses see them: a hook
    keeps every other token of each layer; the next logits must equal those from the narrow cache gathered
    directly. Returns the largest difference (None for models without a key basis)."""
    from transformers import DynamicCache

    attns = [layer.self_attn for layer in model.model.layers]
    if not all("key_basis" in a._parameters for a in attns):
        return None
    ids, keep = torch.tensor(PROMPT), torch.arange(0, len(PROMPT[0]), 2)

    def hook(module, args, kwargs, output):
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        layer = cache.layers[module.layer_idx]
        if layer.keys.shape[1:4:2] != (module.config.num_key_value_heads, module.head_dim):
            raise RuntimeError(f"a hook saw keys of shape {tuple(layer.keys.shape)}, not full width")
        layer.keys, layer.values = layer.keys[:, :, keep], layer.values[:, :, keep]

    def next_logits(cache):
        position = torch.tensor([[len(PROMPT[0])]])
        return model(input_ids=ids[:, :1], past_key_values=cache, position_ids=position).logits

    with torch.no_grad():
        full, evicted = DynamicCache(), DynamicCache()
        model(input_ids=ids, past_key_values=full)
        hooks = [a.register_forward_hook(hook, with_kwargs=True) for a in attns]
        model(input_ids=ids, past_key_values=evicted)
        for h in hooks:
            h.remove()
        direct = DynamicCache()
        for i, layer in enumerate(full.layers):
            direct.update(layer.keys[:, :, keep], layer.values[:, :, keep], i)
        return (next_logits(evicted) - next_logits(direct)).abs().max().item()


def _context_only_tokens(folder: Path, recent: int = 0) -> list[int]:
    """Greedy tokens of a kv-compress model loaded with project_context_only (the prefill exact, its keys
    projected in the cache, later tokens' keys exact; with `recent`, the prompt's last `recent` keys exact too)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=True, dtype=torch.float32, project_context_only=True, exact_recent=recent
    ).eval()
    with torch.no_grad():
        ids = torch.tensor(PROMPT)
        return model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True)[0].tolist()


def make(root: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import ARCHS, build_tiny
    from helpers import run_cli
    from transformers import AutoModelForCausalLM

    calib = ["--calib-samples", "2", "--calib-seq-len", "32"]
    for arch in ARCHS:
        tiny = build_tiny(arch, root / "tiny" / arch)
        pairs = "vo" if arch in ("qwen3", "gemma3_text") else "vo,qk"  # per-head q/k norms: no Q-K pairs
        jobs = {
            f"absorb-{arch}": ["absorb", tiny, "--keep-ratio", "0.75", "--pairs", pairs, *calib],
            f"kv-{arch}": ["kv-compress", tiny, "--budget", "0.5", "--no-train", "--uniform", *calib],
        }
        if arch in ("llama", "gemma3_text"):  # the exact values' runtime too (project_context_only)
            jobs[f"kv-exact-{arch}"] = [*jobs[f"kv-{arch}"], "--exact-values"]
        for name, args in jobs.items():
            out = root / name
            result = run_cli(*args, "--output", out)
            assert result.exit_code == 0, result.output
            model = AutoModelForCausalLM.from_pretrained(
                out, trust_remote_code=True, dtype=torch.float32
            ).eval()
            expected = _outputs(model)
            if name.startswith("kv-"):
                expected["context_only"] = _context_only_tokens(out)
                expected["exact_recent"] = _context_only_tokens(out, recent=RECENT)
            (out / "expected.json").write_text(json.dumps(expected))
            print(f"made {name}")


def check(root: Path) -> int:
    import transformers
    from transformers import AutoModelForCausalLM

    failures = 0
    folders = sorted(p.parent for p in root.glob("*/expected.json"))
    for folder in folders:
        expected = json.loads((folder / "expected.json").read_text())
        try:
            model = AutoModelForCausalLM.from_pretrained(
                folder, trust_remote_code=True, dtype=torch.float32
            ).eval()
            got = _outputs(model)
        except Exception as exc:  # noqa: BLE001 - report every model, then fail
            print(f"FAIL {folder.name}: {type(exc).__name__}: {exc}".splitlines()[0])
            failures += 1
            continue
        diff = (torch.tensor(got["logits"]) - torch.tensor(expected["logits"])).abs().max().item()
        problems = [f"logits differ by {diff:.2e}"] if diff > 1e-4 else []
        evicted = _evicted_logits(model)
        if (evicted or 0) > 1e-4:
            problems.append(f"evicting through the press view changed logits by {evicted:.2e}")
        problems += ["cached generation differs"] if got["cached"] != expected["cached"] else []
        problems += ["cached and uncached generation differ"] if got["cached"] != got["uncached"] else []
        if "context_only" in expected and _context_only_tokens(folder) != expected["context_only"]:
            problems.append("generation with project_context_only differs")
        if "exact_recent" in expected and _context_only_tokens(folder, RECENT) != expected["exact_recent"]:
            problems.append(f"generation with exact_recent={RECENT} differs")
        print(
            ("FAIL " if problems else "ok   ")
            + f"{folder.name}: max |logit diff| {diff:.2e}"
            + ("" if evicted is None else f"; evicted through the press view {evicted:.2e}")
            + "".join(f"; {p}" for p in problems)
        )
        failures += bool(problems)
    print(f"transformers {transformers.__version__}: {len(folders) - failures} passed, {failures} failed")
    return 1 if failures or not folders else 0


if __name__ == "__main__":
    mode, folder = sys.argv[1], Path(sys.argv[2])
    if mode == "make":
        make(folder)
    else:
        sys.exit(check(folder))
