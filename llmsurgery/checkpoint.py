"""Checks on a checkpoint folder before any weights are loaded: clear errors, never tracebacks."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from .arch import ArchSpec, arch_for_model_type
from .errors import UserError


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"{folder} has no config.json: not a Hugging Face model folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} does not hold a JSON object")
    return config


def safetensors_header(path: Path) -> dict:
    """The JSON header of a .safetensors file, after checking the file holds all the data it lists."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        raw_len = handle.read(8)
        if len(raw_len) < 8:
            raise UserError(f"{path} is truncated or corrupt (no safetensors header)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > size - 8:
            raise UserError(f"{path} is truncated or corrupt (header longer than the file)")
        try:
            header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{path} is corrupt (unreadable safetensors header)") from None
    if not isinstance(header, dict):
        raise UserError(f"{path} is corrupt (safetensors header is not an object)")
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise UserError(f"{path} is truncated: it lists {end} bytes of tensors but holds {size - 8 - header_len}")
    return header


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a folder, checked: safetensors shards (whole) or PyTorch .bin files."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{index} is corrupt") from None
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise UserError(f"{folder} is missing shard(s) listed in its index: {', '.join(missing)}")
        files = [folder / n for n in names]
    else:
        files = sorted(folder.glob("*.safetensors"))
    for path in files:
        safetensors_header(path)
    if not files:
        files = sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise UserError(f"{folder} holds no weights (*.safetensors or pytorch_model*.bin)")
    return files


def parameter_count(files: list[Path]) -> int:
    total = 0
    for path in files:
        if path.suffix != ".safetensors":
            continue
        for name, tensor in safetensors_header(path).items():
            if name != "__metadata__":
                count = 1
                for dim in tensor["shape"]:
                    count *= dim
                total += count
    return total


def check_folder(folder: Path) -> tuple[dict, ArchSpec, list[Path]]:
    """(config dict, architecture spec, weight files) of a folder, or a UserError."""
    config = read_config(folder)
    spec = arch_for_model_type(config.get("model_type"))
    return config, spec, weight_files(folder)
