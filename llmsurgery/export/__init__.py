"""`llmsurgery export --format gguf`: a standard checkpoint as one GGUF file for llama.cpp, ollama and LM Studio.

Our own writer over gguf-py (`GGUFWriter`); the conventions are those of llama.cpp's convert_hf_to_gguf.py:
- `hparams.py`: the architecture keys (block_count = the layers the checkpoint holds, so a pruned model is a
  plain smaller model there);
- `tensors.py`: llama.cpp's tensor names, llama's q/k row permutation, gemma's norm offset, storage types;
- `vocab.py`: the tokenizer (copied from the source GGUF, or read from tokenizer.json);
- `refusals.py`: what llama.cpp would run differently (refused, one line, nothing written).

Exact at f32 up to gemma's 1 + w (rounded once in float32, as HF computes it): the permutation and the layout
change no value. f16 / bf16 round each weight once; q8_0 quantizes blocks of 32 (norms stay float32).
The file is written beside the target and renamed into place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

__all__ = ["ExportResult", "export_gguf"]


@dataclass
class ExportResult:
    path: Path
    architecture: str
    layers: int
    outtype: str
    tensors: int
    bytes: int
    tokenizer: str
    notes: list[str] = field(default_factory=list)


def export_gguf(model: str, output: Path, *, outtype: str = "f16", force: bool = False) -> ExportResult:
    """Write MODEL (folder, .gguf, built-in name) to `output` as GGUF; refuses with a UserError before writing."""
    from ..arch import arch_for_model_type
    from ..model_io import check_model, read_history
    from ..sources import SOURCE_FILE, resolve_source
    from . import refusals, vocab
    from .tensors import plan_tensors

    refusals.check_outtype(outtype)
    source = resolve_source(model)
    if source.kind == "hub":
        raise UserError(
            f"export reads local weights: download {model} first (`hf download {model} --local-dir DIR`) "
            "and export DIR"
        )
    checked = check_model(model, read_only=True)
    config_dict, folder, weights, shapes = checked.config, checked.folder, checked.weights, checked.shapes
    history = read_history(folder) or _source_record(folder, SOURCE_FILE)
    refusals.check_runtime_free(model, config_dict, history)
    arch = arch_for_model_type(config_dict.get("model_type"))
    config = checked.hf_config or _transformers_config(folder)
    refusals.check_architecture(model, config, arch, shapes)
    # A .gguf given as MODEL is its own source (its cached conversion may name an earlier copy of the same bytes).
    gguf_file, why_not = (source.path, None) if source.kind == "gguf" else vocab.source_gguf(history)
    inputs = [folder] + ([gguf_file] if gguf_file else [])
    out = check_target(Path(output), force, inputs)
    n_rows = shapes[f"{arch.embed}.weight"][0]
    tokenizer = (
        vocab.from_source_gguf(gguf_file, n_rows) if gguf_file else vocab.from_tokenizer_json(folder, n_rows)
    )
    plans = plan_tensors(arch, config, shapes, outtype)
    notes = [f"tokenizer read from the folder: {why_not}"] if why_not else []
    name = Path(model).stem if Path(model).exists() else model
    notes += _write(out, arch, config, outtype, name, history, tokenizer, plans, weights)
    return ExportResult(
        out,
        arch.gguf_arch,
        config.num_hidden_layers,
        outtype,
        len(plans),
        out.stat().st_size,
        tokenizer.origin,
        notes,
    )


def _write(out: Path, arch, config, outtype: str, name: str, history, tokenizer, plans, weights) -> list[str]:
    """The file: keys, tensor infos, then the tensors one at a time (read, converted, encoded, written), into a
    temporary file renamed to `out` at the end. Returns the notes of the metadata."""
    import gguf
    import numpy as np

    from ..atomic import replacing_file
    from ..console import status, track
    from .hparams import write_hparams
    from .tensors import CheckpointReader

    with replacing_file(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch.gguf_arch)
        notes = write_hparams(writer, config, arch, outtype, name, tokenizer.n_tokens)
        _describe_origin(writer, history)
        tokenizer.write(writer)
        for plan in plans:
            raw = None if plan.qtype in ("F32", "F16") else gguf.GGMLQuantizationType[plan.qtype]
            shape = plan.shape if raw is None else gguf.quant_shape_to_byte_shape(plan.shape, raw)
            dtype = np.dtype({"F32": "float32", "F16": "float16"}.get(plan.qtype, "uint8"))
            writer.add_tensor_info(plan.name, shape, dtype, plan.nbytes, raw_dtype=raw)
        with status(f"Writing the GGUF header of {out.name}"):
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
        with CheckpointReader(weights) as read:
            for plan in track(plans, f"Exporting {len(plans)} tensors ({outtype})"):
                writer.write_tensor_data(plan.encode(plan.load(read)))
        writer.close()
    return notes


def check_target(output: Path, force: bool, inputs: list[Path]) -> Path:
    """The file to write: a .gguf name, not an input or inside one, free (or --force), in a writable folder."""
    from ..model_io import check_not_an_input, check_writable_parent

    out = output.expanduser()
    if out.suffix.lower() != ".gguf":
        raise UserError(f"--output {output}: give a file name ending in .gguf")
    check_not_an_input(out, inputs, "output")
    if out.is_dir():
        raise UserError(f"output {output} is a folder; give a file name ending in .gguf")
    if out.exists() and not force:
        raise UserError(f"output {output} already exists; pass --force to replace it")
    check_writable_parent(out, "output")
    return out


def _source_record(folder: Path, source_file: str) -> dict | None:
    from ..model_io import read_json_record

    path = folder / source_file
    return {"source": read_json_record(path, ("id",)), "passes": []} if path.is_file() else None


def _transformers_config(folder: Path):
    """config.json as transformers reads it (RoPE parameters and layer types normalised across versions)."""
    from transformers import AutoConfig

    from ..console import quiet_transformers
    from ..errors import first_line

    try:
        with quiet_transformers():
            return AutoConfig.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - a config transformers cannot read is bad input
        raise UserError(f"{folder / 'config.json'}: {first_line(exc)}") from None


def _describe_origin(writer, history: dict | None) -> None:
    """general.description: the source and the passes that made the model (from its history)."""
    if not history:
        return
    passes = [p["pass"] for p in history.get("passes", [])]
    source = (history.get("source") or {}).get("id")
    text = f"llmsurgery: {' -> '.join(passes) if passes else 'converted'} from {source}"
    writer.add_description(text)
