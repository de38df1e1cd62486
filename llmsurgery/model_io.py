"""Load a causal LM from any source; save a transformed one with its history, atomically."""

from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic import replacing_folder
from .checkpoint import check_folder, read_config
from .console import quiet_transformers, status
from .errors import UserError, first_line
from .sources import SOURCE_FILE, Source, local_folder, resolve_source, sha256_files

HISTORY_FILE = "llmsurgery_history.json"
PASSES_FILE = "llmsurgery_recipe.json"  # the settings of the passes that made the folder
RECIPE_YAML = "llmsurgery_recipe.yaml"  # a recipe that makes the folder again
HISTORY_FORMAT = "llmsurgery-history/1"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)  # auto: the checkpoint's own (config.json), float32 when it names none
DEVICES = ("cpu", "cuda", "auto")


@dataclass
class LoadedModel:
    model: Any  # transformers.PreTrainedModel
    tokenizer: Any
    source: Source
    folder: Path | None
    history: dict = field(default_factory=dict)
    quantized: bool = False
    original: Any = (
        None  # the model as loaded, sharing its tensors (see heal.shared_copy), when a heal follows
    )
    pending: list = field(
        default_factory=list
    )  # history entries of passes run on it in this process, not saved yet


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


def resolve_dtype(dtype: str, config: dict | None = None) -> torch.dtype:
    """The torch dtype for `--dtype`; "auto" reads the checkpoint's config.json (float32 when it names none)."""
    if dtype not in DTYPE_CHOICES:
        raise UserError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPE_CHOICES)}")
    if dtype == "auto":
        named = str(
            (config or {}).get("dtype") or (config or {}).get("torch_dtype") or "float32"
        ).removeprefix("torch.")
        return DTYPES.get(named, torch.float32)
    return DTYPES[dtype]


def read_json_record(path: Path, keys: tuple[str, ...]) -> dict:
    """A JSON object written by llmsurgery (history, source record), checked for `keys`; corrupt means bad input."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        raise UserError(f"{path} is corrupt (not readable JSON); remove it or restore it") from None
    if not isinstance(record, dict) or any(k not in record for k in keys):
        raise UserError(
            f"{path} is corrupt (it should be an object with {', '.join(keys)}); remove it or restore it"
        )
    if "passes" in keys and not (
        isinstance(record["passes"], list)
        and isinstance(record["source"], dict)
        and all(
            isinstance(p, dict)
            and isinstance(p.get("pass"), str)
            and isinstance(p.get("config"), dict)
            and isinstance(p.get("seconds"), (int, float))
            for p in record["passes"]
        )
    ):
        raise UserError(
            f"{path} is corrupt (source should be an object, passes a list of records with pass, config, seconds)"
        )
    return record


def read_history(folder: Path) -> dict | None:
    """The surgery history of a folder written by llmsurgery (None when it has none). It records; it never
    grants trust."""
    path = folder / HISTORY_FILE
    return read_json_record(path, ("source", "passes")) if path.is_file() else None


def record_scores(folder: Path, rows: list) -> None:
    """Scores taken from the saved model (streamed runs, bitsandbytes evaluation) into its history's last pass
    record and its card, as an in-memory evaluation records them before saving; each file replaced atomically."""
    from .atomic import replacing_file
    from .model_card import model_card

    history = read_history(folder)
    if history is None or not history["passes"]:
        return
    history["passes"][-1]["eval"] = rows
    card = model_card(history, read_config(folder), HISTORY_FILE)
    with (
        replacing_file(folder / HISTORY_FILE) as history_tmp,
        replacing_file(folder / "README.md") as card_tmp,
    ):
        history_tmp.write_text(json.dumps(history, indent=2))
        card_tmp.write_text(card)  # both written before either replaces its file


def _source_record(source: Source, folder: Path | None, weights: list[Path], config: dict) -> dict:
    """The id and content hash of the model as loaded, from its history if it has one."""
    history = read_history(folder) if folder is not None else None
    if history is not None:
        return history
    if folder is not None and (folder / SOURCE_FILE).is_file():
        source_info = read_json_record(folder / SOURCE_FILE, ("id",))
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
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )


def _hub_config(spec: str, trust_remote_code: bool) -> dict:
    from transformers import AutoConfig

    from .arch import arch_for_model_type

    try:
        config = AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - offline, missing repo, gated: one line for all
        raise UserError(
            f"'{spec}' is not a local path or built-in model, and loading it from the Hugging Face hub "
            f"failed (offline?): {first_line(exc)}"
        ) from None
    arch_for_model_type(config.model_type)
    return config.to_dict()


@dataclass
class CheckedModel:
    """A model checked without loading its weights, each file read once: what loading and saving it need.

    config: config.json; folder: the local folder (a GGUF's or built-in's converted one; None for a hub id);
    weights: its weight files; shapes: every tensor's shape (from the headers); own_class: llmsurgery's
    installed class for folders written by llmsurgery (see modeling.foreign_code); hf_config: the transformers
    config the model was built from on meta. `history()` is the record a transformed copy starts from (its
    content hash computed once, when first asked).
    """

    source: Source
    config: dict
    folder: Path | None
    weights: list[Path] = field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    own_class: Any = None
    hf_config: Any = None
    trust_remote_code: bool = False
    _history: dict | None = field(default=None, repr=False)

    @property
    def spec(self) -> str:
        return self.source.spec

    def history(self) -> dict:
        if self._history is None:
            self._history = _source_record(self.source, self.folder, self.weights, self.config)
        return copy.deepcopy(self._history)


def check_model(spec: str, trust_remote_code: bool = False, read_only: bool = False) -> CheckedModel:
    """A model checked without loading its weights (folder, .gguf, built-in name or hub id), or a UserError.

    read_only: only files are read (inspect), so a folder with foreign modeling code is described, not refused.
    """
    from .modeling import foreign_code, surgery_class

    source = resolve_source(spec)
    folder = local_folder(source)
    if folder is None:
        return CheckedModel(
            source, _hub_config(spec, trust_remote_code), None, trust_remote_code=trust_remote_code
        )
    config = read_config(folder)
    own = None
    if config.get("auto_map"):
        from .arch import arch_for_model_type

        arch_for_model_type(config.get("model_type"))
        why = foreign_code(config, folder)
        if why is None:
            own = surgery_class(config)
        elif not (trust_remote_code or read_only):
            raise UserError(f"{spec} {why}; it runs only with --trust-remote-code")
    found = check_folder(folder, own)
    return CheckedModel(
        source, found.config, folder, found.files, found.shapes, own, found.hf_config, trust_remote_code
    )


class CheckedModels:
    """The models one job names (its input, heal's teacher), each checked once (`check_model`), by spec."""

    def __init__(self, trust_remote_code: bool = False) -> None:
        self.trust_remote_code = trust_remote_code
        self._found: dict[str, CheckedModel] = {}

    def get(self, spec: str) -> CheckedModel:
        if spec not in self._found:
            self._found[spec] = check_model(spec, self.trust_remote_code)
        return self._found[spec]


def _check_loading_info(spec: str, info: dict) -> None:
    """What transformers reports after loading: any weight it had to invent or drop is bad input."""
    for key, what in (
        ("missing_keys", "is missing"),
        ("unexpected_keys", "is unexpected"),
        ("mismatched_keys", "has the wrong shape"),
    ):
        names = sorted(info.get(key) or [])
        if names:
            name = names[0][0] if isinstance(names[0], tuple) else names[0]
            raise UserError(f"could not load {spec}: tensor '{name}' {what} ({len(names)} such)")


def _processes() -> str:
    """ ", 2 processes" under a launcher: each process loads the model."""
    from . import data_parallel

    return f", {data_parallel.world_size()} processes" if data_parallel.world_size() > 1 else ""


def load_tokenizer(checked: CheckedModel):
    """The model's tokenizer (from its folder, or the hub); a tokenizer that cannot load is bad input."""
    from transformers import AutoTokenizer

    where = str(checked.folder) if checked.folder is not None else checked.spec
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(where, trust_remote_code=checked.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - a tokenizer that cannot load is bad input
        raise UserError(f"could not load the tokenizer of {where}: {first_line(exc)}") from None


def load_model(
    spec: str,
    *,
    dtype: str = "auto",
    device: str = "cpu",
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
    trust_remote_code: bool = False,
    checked: CheckedModel | None = None,
    tokenizer=None,
) -> LoadedModel:
    """Load model + tokenizer + surgery history from a folder, .gguf, built-in name or hub id.

    dtype "auto" keeps the checkpoint's own (the dequantized built-ins are float32). checked, tokenizer: what a
    job's checks already read (`runner.check_job`), so that nothing is read twice.
    """
    from transformers import AutoModelForCausalLM

    resolve_dtype(dtype)  # a bad name fails before any file is read
    device = resolve_device(device)
    quant = _quantization_config(load_in_8bit, load_in_4bit)
    checked = checked or check_model(spec, trust_remote_code)
    config, folder = checked.config, checked.folder
    torch_dtype = resolve_dtype(dtype, config)
    where = str(folder) if folder is not None else spec
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "output_loading_info": True}
    if checked.own_class is None:
        kwargs["trust_remote_code"] = trust_remote_code
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = device
    elif device == "cuda":  # straight onto the GPU (this process's own under a launcher), no CPU copy first
        kwargs["device_map"] = f"cuda:{torch.cuda.current_device()}"
    loader = checked.own_class or AutoModelForCausalLM
    with (
        status(f"Loading {spec} ({str(torch_dtype).removeprefix('torch.')}, {device}{_processes()})"),
        quiet_transformers(),
    ):
        tokenizer = tokenizer or load_tokenizer(checked)  # first: it is cheap
        try:
            model, info = loader.from_pretrained(where, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a broken checkpoint is bad input, not a crash
            raise UserError(f"could not load {spec}: {first_line(exc)}") from None
        _check_loading_info(spec, info)  # inside the status: a refused model shows only its error line
        if quant is None:
            check_finite_weights(spec, model)
    if "device_map" not in kwargs:
        model.to(device)
    model.eval()
    return LoadedModel(
        model, tokenizer, checked.source, folder, checked.history(), quantized=quant is not None
    )


def check_writable_parent(path: Path, what: str) -> None:
    """The folder `path` would be written in exists or can be made: its nearest existing ancestor is a
    writable folder."""
    ancestor = path.expanduser().absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{what} {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: {ancestor} is not writable")


def check_file_target(path: Path | None, what: str) -> None:
    """A file the command will write (--json, --plot): refused before any work if it cannot be written."""
    if path is None:
        return
    path = path.expanduser()
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise UserError(f"{what} {path}: the folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"{what} {path} is not writable")


PLOT_FORMATS = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def check_file_targets(output: Path | None = None, **paths: Path | None) -> None:
    """Files a command writes at the end (--json, --plot, by option), checked before any work; they may go into
    `output`, the model folder it writes (--json only: it is written after the model)."""
    given = [p.expanduser().resolve() for p in paths.values() if p is not None]
    if len(given) != len(set(given)):
        raise UserError(f"{' and '.join('--' + o for o in paths)} name the same file")
    folder = output.expanduser().resolve() if output is not None else None
    for option, path in paths.items():
        if path is None:
            continue
        if path.expanduser().resolve() == folder:
            raise UserError(f"--{option} {path} is the output folder; give a file name")
        if not (option == "json" and path.expanduser().resolve().parent == folder):
            check_file_target(path, f"--{option}")
        if option == "plot" and path.suffix.lower() not in PLOT_FORMATS:
            raise UserError(f"--plot {path}: the file name should end in {', '.join(PLOT_FORMATS)}")


@torch.no_grad()
def check_finite_weights(spec: str, model) -> None:
    """NaN or inf in a weight is a corrupt checkpoint: every pass would turn it into garbage or a crash."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(
                f"could not load {spec}: tensor '{name}' holds NaN or infinite values (a corrupt checkpoint)"
            )


def check_not_an_input(target: Path, inputs: list[Path], what: str) -> None:
    """Writing (or replacing) `target` must not touch any input: not equal to one, not above one, not inside
    an input folder."""
    dst = target.expanduser().resolve()
    for given in inputs:
        src = given.expanduser().resolve()
        if dst == src or dst in src.parents or (src.is_dir() and src in dst.parents):
            kind = "the input model" if given == inputs[0] else "an input"
            raise UserError(f"{what} {target} would overwrite {kind} {given}; choose another place")


def check_output_free(
    out: Path, force: bool, loaded_from: Path | None = None, inputs: list[Path] | None = None
) -> None:
    """Refuse an existing output (without --force), any output inside, equal to or above an input,
    and unwritable places.

    inputs: what else the run reads (teacher folders, calibration files, the recipe), after the model folder.
    """
    out = out.expanduser()
    if not str(out).strip() or out.name in ("", ".", ".."):
        raise UserError(f"output '{out}' is not a folder name")
    protected = [p for p in [loaded_from, *(inputs or [])] if p is not None]
    if protected:
        check_not_an_input(out, protected, "output")
    if out.exists() and not force:
        raise UserError(f"output {out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder")
    check_writable_parent(out, "output")


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


def save_model(
    loaded: LoadedModel,
    out: Path,
    *,
    force: bool = False,
    new_passes: list[dict] | None = None,
    extra_files: list[Path] | None = None,
    recipe_yaml: str | None = None,
) -> Path:
    """Write weights, config, tokenizer, history, pass settings, card and `extra_files` to `out`, atomically."""
    if loaded.quantized:
        raise UserError(
            "a model loaded in 8-bit or 4-bit is for evaluation only; load it unquantized to save"
        )
    out = out.expanduser()
    check_output_free(out, force, loaded.folder)
    new_passes = loaded.pending if new_passes is None else new_passes  # passes run since loading, by default
    history = dict(loaded.history)
    history["passes"] = list(history.get("passes", [])) + list(new_passes or [])
    with status(f"Saving to {out}"), replacing_folder(out) as tmp:
        config = loaded.model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        loaded.model.save_pretrained(tmp, max_shard_size="2GB")
        write_beside_weights(
            tmp,
            history,
            config.to_dict(),
            loaded.tokenizer,
            new_passes,
            recipe_yaml,
            _remote_code_files(config.to_dict(), loaded.folder) + list(extra_files or []),
        )
    loaded.history = history
    loaded.pending = []
    return out


@dataclass
class StreamedSave:
    """A streamed job's output while it is written: the pass adds the decoder layers' tensors to `writer` as
    it goes, and the runner sets `records` (the new history entries) before the save ends."""

    writer: Any  # streaming.ShardWriter
    records: list[dict] = field(default_factory=list)


@contextmanager
def streamed_save(out: Path, streamed, checked: CheckedModel, tokenizer, recipe_yaml: str | None = None):
    """Write a model one layer at a time into `out`, atomically: yields a `StreamedSave`; on leaving, the
    tensors the pass did not write (embedding, norm, head) are copied in the compute dtype, then the config
    (the pass's `streamed.config`), generation config, tokenizer, history, settings, card and code, as
    `save_model` writes them for a model in memory."""
    from .streaming import ShardWriter

    with replacing_folder(out.expanduser()) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        save = StreamedSave(ShardWriter(tmp))
        yield save
        with status(f"Saving to {out}"):
            layers = streamed.layer_prefix
            streamed.copy_tensors(save.writer, lambda name: None if name.startswith(layers) else name)
            save.writer.close()
            config = streamed.config
            config.dtype = streamed.dtype
            # what save_pretrained of the class the model loads as would write
            config.architectures = checked.config.get("architectures") or [causal_lm_class(config)]
            config.save_pretrained(tmp)
            if (checked.folder / "generation_config.json").is_file():
                shutil.copyfile(checked.folder / "generation_config.json", tmp / "generation_config.json")
            history = checked.history()
            history["passes"] = list(history.get("passes", [])) + save.records
            code = _remote_code_files(config.to_dict(), checked.folder)
            write_beside_weights(tmp, history, config.to_dict(), tokenizer, save.records, recipe_yaml, code)


def causal_lm_class(config) -> str:
    """The name of transformers' causal-LM class for a config (what `architectures` names)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM._model_mapping[type(config)].__name__


def write_beside_weights(
    tmp: Path,
    history: dict,
    config: dict,
    tokenizer,
    new_passes: list[dict] | None,
    recipe_yaml: str | None,
    files: list[Path],
) -> None:
    """Everything of a saved model but its weights (and config.json): tokenizer, history, settings, card, code."""
    tokenizer.save_pretrained(tmp)
    (tmp / HISTORY_FILE).write_text(json.dumps(history, indent=2))
    settings = [p["config"] | {"pass": p["pass"]} for p in new_passes or []]
    (tmp / PASSES_FILE).write_text(json.dumps(settings, indent=2))
    from .model_card import model_card

    (tmp / "README.md").write_text(model_card(history, config, HISTORY_FILE))
    if recipe_yaml is not None:  # the recipe `llmsurgery run` followed, or the one a pass command spelt out
        (tmp / RECIPE_YAML).write_text(recipe_yaml)
    for path in files:
        shutil.copyfile(path, tmp / path.name)
