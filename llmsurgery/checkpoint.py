"""Checks on a checkpoint folder before any weights are loaded: clear errors, never tracebacks.

`check_folder` reads config.json and the safetensors headers (never the tensor data), checks the
config's sizes, and compares every tensor's name and shape with the model the config describes
(built on the meta device, so no memory is spent): a missing, unknown or wrongly shaped tensor is
bad input, never a freshly initialised weight.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .arch import ArchSpec, arch_for_model_type
from .errors import UserError, first_line

MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
# (key, required): positive integers the architectures read from config.json.
_SIZE_FIELDS = (
    ("num_hidden_layers", True),
    ("hidden_size", True),
    ("num_attention_heads", True),
    ("vocab_size", True),
    ("num_key_value_heads", False),
    ("head_dim", False),
    ("intermediate_size", False),
)


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"{folder} has no config.json: not a Hugging Face model folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} does not hold a JSON object")
    return config


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_config_sizes(config: dict, where: str = "config.json") -> None:
    """The sizes every pass reads are positive integers that fit together (heads divide evenly)."""
    for key, required in _SIZE_FIELDS:
        value = config.get(key)
        if value is None and not required:
            continue
        if not _positive_int(value):
            raise UserError(f"{where}: {key} should be a positive integer, got {json.dumps(value)}")
    heads, kv_heads = (
        config["num_attention_heads"],
        config.get("num_key_value_heads") or config["num_attention_heads"],
    )
    if heads % kv_heads:
        raise UserError(
            f"{where}: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})"
        )
    if config.get("head_dim") is None and config["hidden_size"] % heads:
        raise UserError(
            f"{where}: hidden_size ({config['hidden_size']}) is not a multiple of num_attention_heads ({heads})"
        )
    layer_types = config.get("layer_types")
    if layer_types is not None and (
        not isinstance(layer_types, list) or len(layer_types) != config["num_hidden_layers"]
    ):
        raise UserError(
            f"{where}: layer_types should list one entry per layer ({config['num_hidden_layers']})"
        )


def _check_entry(path: Path, name: str, entry, data_bytes: int) -> None:
    def bad(why: str) -> UserError:
        return UserError(f"{path} is corrupt: tensor '{name}' {why}")

    if not isinstance(entry, dict):
        raise bad("has no description")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise bad(f"has an unknown dtype {json.dumps(dtype)}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise bad("has no valid shape")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise bad("has no valid data_offsets")
    numel = 1
    for dim in shape:
        numel *= dim
    if offsets[1] - offsets[0] != numel * DTYPE_BYTES[dtype]:
        raise bad(
            f"spans {offsets[1] - offsets[0]} bytes, but {dtype} {shape} needs {numel * DTYPE_BYTES[dtype]}"
        )
    if offsets[1] > data_bytes:
        raise UserError(f"{path} is truncated: tensor '{name}' ends at byte {offsets[1]} of {data_bytes}")


def safetensors_header(path: Path) -> dict:
    """The JSON header of a .safetensors file, after checking every entry and that the file holds all its data."""
    if not path.is_file():
        raise UserError(f"{path} is not a file")
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            raw_len = handle.read(8)
            if len(raw_len) < 8:
                raise UserError(f"{path} is truncated or corrupt (no safetensors header)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > size - 8 or header_len > MAX_HEADER_BYTES:
                raise UserError(f"{path} is truncated or corrupt (header longer than the file)")
            raw = handle.read(header_len)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is corrupt (unreadable safetensors header)") from None
    if not isinstance(header, dict):
        raise UserError(f"{path} is corrupt (safetensors header is not an object)")
    for name, entry in header.items():
        if name != "__metadata__":
            _check_entry(path, name, entry, size - 8 - header_len)
    return header


def _index_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, OSError):
        raise UserError(f"{index} is corrupt (no readable weight_map)") from None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise UserError(f"{index} is corrupt (weight_map should map tensor names to file names)")
    bad = [v for v in weight_map.values() if Path(v).name != v or not v.endswith(".safetensors")]
    if bad:
        raise UserError(f"{index} names '{bad[0]}', which is not a .safetensors file in the same folder")
    return weight_map


def read_weights(folder: Path) -> tuple[list[Path], dict[str, tuple[int, ...]]]:
    """(the weight files of a folder, tensor name -> shape over all of them), checked; each header read once.

    Safetensors shards are checked whole and against their index; PyTorch .bin files (when there are no
    safetensors) are unpickled with weights_only, on meta.
    """
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _index_map(index)
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise UserError(f"{folder} is missing shard(s) listed in its index: {', '.join(missing)}")
        headers = {folder / n: safetensors_header(folder / n) for n in names}
        for tensor, shard in weight_map.items():
            if tensor not in headers[folder / shard]:
                raise UserError(f"{index} places tensor '{tensor}' in {shard}, which does not hold it")
        for path, header in headers.items():
            stray = [t for t in header if t != "__metadata__" and weight_map.get(t) != path.name]
            if stray:
                raise UserError(f"{path} holds tensor '{stray[0]}', which its index does not place there")
    else:
        headers = {path: safetensors_header(path) for path in sorted(folder.glob("*.safetensors"))}
    if headers:
        entries = {path: _header_shapes(header) for path, header in headers.items()}
    else:
        entries = {p: _bin_shapes(p) for p in sorted(folder.glob("pytorch_model*.bin")) if p.is_file()}
    if not entries:
        raise UserError(f"{folder} holds no weights (*.safetensors or pytorch_model*.bin)")
    return list(entries), _merged(entries)


def _header_shapes(header: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def _merged(entries: dict[Path, dict[str, tuple[int, ...]]]) -> dict[str, tuple[int, ...]]:
    """One name -> shape map over the weight files; a tensor in two files is a corrupt checkpoint."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path, found in entries.items():
        for name, shape in found.items():
            if name in shapes:
                raise UserError(f"tensor '{name}' appears in more than one weight file ({path.name})")
            shapes[name] = shape
    return shapes


def checkpoint_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape over the given weight files, from their headers (.bin files: on meta)."""
    return _merged(
        {
            p: _header_shapes(safetensors_header(p)) if p.suffix == ".safetensors" else _bin_shapes(p)
            for p in files
        }
    )


def _bin_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    import torch

    try:
        state = torch.load(
            path, map_location="meta", weights_only=True
        )  # weights_only: never runs pickled code
    except Exception as exc:  # noqa: BLE001 - any unreadable file is bad input
        raise UserError(f"{path} is not a readable PyTorch weights file: {first_line(exc)}") from None
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise UserError(f"{path} does not hold a state dict of tensors")
    return {k: tuple(v.shape) for k, v in state.items()}


def parameter_count(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(math.prod(shape) for shape in shapes.values())


@dataclass
class Checkpoint:
    """A checkpoint folder as `check_folder` found it: its weights match its config."""

    config: dict  # config.json
    spec: ArchSpec
    files: list[Path]  # the weight files
    shapes: dict[str, tuple[int, ...]]  # every tensor's shape, from the headers
    hf_config: Any = None  # the transformers config the model was built from (None with foreign code)


def expected_shapes(folder: Path, model_class=None) -> tuple[dict[str, tuple[int, ...]], list[set[str]], Any]:
    """(name -> shape of every tensor the config's model holds, groups of names tied to one tensor, the
    transformers config), built on meta."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .console import quiet_transformers

    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
            with torch.device("meta"):
                model = (
                    model_class._from_config(config)
                    if model_class is not None
                    else AutoModelForCausalLM.from_config(config)
                )
    except Exception as exc:  # noqa: BLE001 - a config transformers cannot build is bad input
        raise UserError(
            f"{folder / 'config.json'} does not describe a model transformers can build: {first_line(exc)}"
        ) from None
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    by_tensor: dict[int, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(param), set()).add(name)
    return shapes, [names for names in by_tensor.values() if len(names) > 1], config


def check_tensors(
    found: dict[str, tuple[int, ...]],
    expected: dict[str, tuple[int, ...]],
    tied: list[set[str]],
    folder: Path,
) -> None:
    """Every expected tensor present (one name of a tied group is enough) with its shape, and nothing else."""
    for name, shape in found.items():
        if name not in expected:
            raise UserError(
                f"{folder}: unexpected tensor '{name}' (the config's model has no such weight; "
                "wrong config.json or a checkpoint of another model?)"
            )
        if shape != expected[name]:
            raise UserError(
                f"{folder}: tensor '{name}' has shape {list(shape)}, but config.json implies {list(expected[name])}"
            )
    alias = {name: group for group in tied for name in group}
    for name in expected:
        if name not in found and not (alias.get(name, set()) & found.keys()):
            raise UserError(
                f"{folder}: tensor '{name}' is missing (truncated checkpoint, or config.json claims more "
                "than the weights hold)"
            )


def check_folder(folder: Path, model_class=None) -> Checkpoint:
    """A folder whose weights match its config (headers read once, the model built once on meta), or a UserError.

    model_class: the class that will load it, when not the stock one (llmsurgery's own, for transformed models);
    None with foreign modeling code skips the tensor check (its model cannot be built without running that code).
    """
    config = read_config(folder)
    spec = arch_for_model_type(config.get("model_type"))
    check_config_sizes(config, str(folder / "config.json"))
    files, found = read_weights(folder)
    hf_config = None
    if model_class is not None or not config.get("auto_map"):
        # the layer count before building: a config may claim millions
        check_layer_count(found, config["num_hidden_layers"], spec, folder)
        expected, tied, hf_config = expected_shapes(folder, model_class)
        check_tensors(found, expected, tied, folder)
    return Checkpoint(config, spec, files, found, hf_config)


def check_layer_count(found: dict[str, tuple[int, ...]], n_layers: int, spec: ArchSpec, folder: Path) -> None:
    """config.json's num_hidden_layers against the decoder layers the tensor names hold."""
    pattern = re.compile(rf"^{re.escape(spec.layers)}\.(\d+)\.")
    held = {int(m[1]) for name in found if (m := pattern.match(name))}
    if not held:
        raise UserError(f"{folder}: the weights hold no decoder layers (no '{spec.layers}.N.*' tensors)")
    if (
        len(held) != n_layers or max(held) != n_layers - 1
    ):  # held is then exactly 0 .. n_layers - 1 (no set of that range)
        extra = sorted(k for k in held if k >= n_layers)
        absent = next(k for k in range(len(held) + 1) if k not in held)
        first = (
            f"unexpected tensor '{min(n for n in found if n.startswith(f'{spec.layers}.{extra[0]}.'))}'"
            if extra
            else f"tensors '{spec.layers}.{absent}.*' are missing"
        )
        raise UserError(
            f"{folder}: {first}: config.json says {n_layers} decoder layers, the weights hold {len(held)} "
            f"(numbered {min(held)} to {max(held)})"
        )
