"""Load a causal LM from any source; save a transformed one with its history, atomically."""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import check_folder
from .console import status
from .errors import UserError
from .sources import SOURCE_FILE, Source, local_folder, resolve_source, sha256_files

HISTORY_FILE = "llmsurgery_history.json"
RECIPE_FILE = "llmsurgery_recipe.json"
HISTORY_FORMAT = "llmsurgery-history/1"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("cpu", "cuda", "auto")


@dataclass
class LoadedModel:
    model: Any  # transformers.PreTrainedModel
    tokenizer: Any
    source: Source
    folder: Path | None
    history: dict = field(default_factory=dict)
    quantized: bool = False
    original: Any = None  # the model as loaded, sharing its tensors (see heal.shared_copy), when a heal follows
    pending: list = field(default_factory=list)  # history entries of passes run on it in this process, not saved yet


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("llmsurgery", "torch", "transformers", "safetensors", "lm_eval"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def resolve_device(device: str) -> str:
    if device not in DEVICES:
        raise UserError(f"unknown device '{device}'; choose one of {', '.join(DEVICES)}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA device")
    return device


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _source_record(source: Source, folder: Path | None, weights: list[Path], config: dict) -> dict:
    """The id and content hash of the model as loaded, from its history if it has one."""
    if folder is not None and (folder / HISTORY_FILE).is_file():
        return json.loads((folder / HISTORY_FILE).read_text())
    if folder is not None and (folder / SOURCE_FILE).is_file():
        source_info = json.loads((folder / SOURCE_FILE).read_text())
    elif folder is not None:
        source_info = {"id": str(folder.resolve()), "kind": "folder", "sha256": sha256_files(weights)}
    else:
        source_info = {"id": source.spec, "kind": "hub", "revision": config.get("_commit_hash")}
    return {"format": HISTORY_FORMAT, "source": source_info, "passes": []}


def _quantization_config(load_in_8bit: bool, load_in_4bit: bool):
    if load_in_8bit and load_in_4bit:
        raise UserError("choose one of --load-in-8bit and --load-in-4bit")
    if not (load_in_8bit or load_in_4bit):
        return None
    from transformers import BitsAndBytesConfig

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _hub_config(spec: str, trust_remote_code: bool) -> dict:
    from transformers import AutoConfig

    from .arch import arch_for_model_type

    try:
        config = AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - offline, missing repo, gated: one line for all
        raise UserError(
            f"'{spec}' is not a local path or built-in model, and loading it from the Hugging Face hub "
            f"failed (offline?): {_first_line(exc)}"
        ) from None
    arch_for_model_type(config.model_type)
    return config.to_dict()


def _checked_config(source: Source, trust_remote_code: bool) -> tuple[dict, Path | None, list[Path]]:
    folder = local_folder(source)
    if folder is None:
        return _hub_config(source.spec, trust_remote_code), None, []
    config, _, weights = check_folder(folder)
    return config, folder, weights


def peek_config(spec: str, trust_remote_code: bool = False) -> tuple[dict, Path | None, list[Path]]:
    """(config dict, local folder or None, weight files) of a model, checked, without loading weights."""
    return _checked_config(resolve_source(spec), trust_remote_code)


def load_model(
    spec: str,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load model + tokenizer + surgery history from a folder, .gguf, built-in name or hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype, device = resolve_dtype(dtype), resolve_device(device)
    quant = _quantization_config(load_in_8bit, load_in_4bit)
    source = resolve_source(spec)
    config, folder, weights = _checked_config(source, trust_remote_code)
    history = _source_record(source, folder, weights, config)
    if folder is not None:
        # Models written by llmsurgery with their own modeling code load without the flag.
        trust_remote_code = trust_remote_code or ("auto_map" in config and (folder / HISTORY_FILE).is_file())
        if "auto_map" in config and not trust_remote_code:
            raise UserError(f"{spec} carries its own modeling code; pass --trust-remote-code to run it")
    where = str(folder) if folder is not None else spec
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = device
    try:
        with status(f"Loading {spec} ({dtype}, {device})"):
            model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - a broken checkpoint is bad input, not a crash
        raise UserError(f"could not load {spec}: {_first_line(exc)}") from None
    if quant is None:
        model.to(device)
    model.eval()
    return LoadedModel(model, tokenizer, source, folder, history, quantized=quant is not None)


def check_output_free(out: Path, force: bool, loaded_from: Path | None = None) -> None:
    """Refuse an existing output (without --force) and any output inside or equal to the input."""
    if loaded_from is not None:
        src, dst = loaded_from.resolve(), out.resolve()
        if dst == src or src in dst.parents or dst in src.parents:
            raise UserError(f"output {out} would overwrite the input model {loaded_from}; choose another folder")
    if out.exists() and not force:
        raise UserError(f"output {out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder")


def pass_record(name: str, config: dict, report: dict, seconds: float, input_history: dict) -> dict:
    """One history entry: what ran, on what, with which settings, what it found, how long it took."""
    return {
        "pass": name,
        "config": config,
        "report": report,
        "seconds": round(seconds, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": library_versions(),
        "input_passes": len(input_history.get("passes", [])),
    }


def _model_card(history: dict, config: dict) -> str:
    src = history["source"]
    lines = [
        "---",
        "library_name: transformers",
        "tags: [llmsurgery]",
        "---",
        "# Transformed with llmsurgery",
        "",
        f"Source: `{src.get('id')}` (sha256 `{src.get('sha256', src.get('revision'))}`)",
        f"Architecture: `{config.get('model_type')}`, {config.get('num_hidden_layers')} layers.",
        "",
        "| # | pass | seconds | settings |",
        "|---|------|---------|----------|",
    ]
    for i, entry in enumerate(history["passes"], 1):
        settings = ", ".join(f"{k}={v}" for k, v in entry["config"].items())
        lines.append(f"| {i} | {entry['pass']} | {entry['seconds']} | {settings} |")
    if not history["passes"]:
        lines.append("| - | (none: converted only) | | |")
    loader = "AutoModelForCausalLM.from_pretrained(path" + (", trust_remote_code=True)" if "auto_map" in config else ")")
    lines += ["", "Load it with stock transformers:", "", "```python", "from transformers import AutoModelForCausalLM",
              f"model = {loader}", "```", "", f"Full history: `{HISTORY_FILE}`.", ""]
    return "\n".join(lines)


def _remote_code_files(config: dict, folder: Path | None) -> list[Path]:
    """The modeling files config.json's auto_map names: llmsurgery's own from the package, others from the input."""
    from .modeling import REMOTE_FILES, REMOTE_MODULE

    files = []
    for module in sorted({str(v).split(".")[0] for v in (config.get("auto_map") or {}).values()}):
        if module == REMOTE_MODULE:
            files.extend(REMOTE_FILES)
        elif folder is not None and (folder / f"{module}.py").is_file():
            files.append(folder / f"{module}.py")
    return files


def save_model(loaded: LoadedModel, out: Path, *, force: bool = False, new_passes: list[dict] | None = None,
               extra_files: list[Path] | None = None, recipe_yaml: str | None = None) -> Path:
    """Write weights, config, tokenizer, history, pass settings, card and `extra_files` to `out`, atomically."""
    if loaded.quantized:
        raise UserError("a model loaded in 8-bit or 4-bit is for evaluation only; load it unquantized to save")
    out = out.expanduser()
    check_output_free(out, force, loaded.folder)
    history = dict(loaded.history)
    history["passes"] = list(history.get("passes", [])) + list(new_passes or [])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    trash = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with status(f"Saving to {out}"):
            config = loaded.model.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            loaded.model.save_pretrained(tmp, max_shard_size="2GB")
            loaded.tokenizer.save_pretrained(tmp)
            (tmp / HISTORY_FILE).write_text(json.dumps(history, indent=2))
            (tmp / RECIPE_FILE).write_text(json.dumps([p["config"] | {"pass": p["pass"]} for p in new_passes or []], indent=2))
            (tmp / "README.md").write_text(_model_card(history, config.to_dict()))
            if recipe_yaml is not None:  # the exact recipe `llmsurgery run` followed
                (tmp / "llmsurgery_recipe.yaml").write_text(recipe_yaml)
            for path in _remote_code_files(config.to_dict(), loaded.folder) + list(extra_files or []):
                shutil.copyfile(path, tmp / path.name)
        if out.exists():
            out.replace(trash)
        tmp.replace(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(trash, ignore_errors=True)
    loaded.history = history
    loaded.pending = []
    return out
