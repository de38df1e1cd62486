"""The options of a job, defined once: which model, where the result goes, how it loads, what scores it.

`JobOptions` is the one description of them. The pass commands' options (`cli_options.job_parameters`), a
recipe's job fields (`recipe.Recipe` is a `JobOptions`), the runner's `Job` and the Python API
(`llmsurgery.run_passes`, whose keyword arguments are these fields) are all derived from it, so a name, a
default, a help text or a range lives in one place. A field's description is its help text; its
`json_schema_extra` says where it is shown:

- `panel`: the --help panel of its option;
- `flags`: more spellings of its option (`-o`);
- `recipe: False`: never repeated in the recipe saved beside a model (`force`: a saved recipe that is run again
  does not replace a folder unless asked);
- `trains: True`: only on commands whose pass may train (`--fsdp`).

`EvalOptions` is the evaluation after the passes (a recipe's `eval:` block without its gates); the pass
commands take its `tasks` and `limit` as `--eval` and `--eval-limit`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from . import defaults

IO, LOADING, EVALUATION = "Input / output", "Loading", "Evaluation"  # --help panels
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")  # auto: the checkpoint's own
DEVICE_CHOICES = ("cpu", "cuda", "auto")
STREAM_CHOICES = ("auto", "on", "off")
MODEL_HELP = "A model folder, a .gguf file, a built-in name (smollm2-135m, gemma3-270m) or a hub id."


def yaml_word(value: Any) -> Any:
    """YAML reads on/off, yes/no and true/false as booleans: an option that takes a word gets the word back
    (true: on, false: off), so `stream: on` means what it says."""
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


def one_of(what: str, choices: tuple[str, ...]) -> BeforeValidator:
    """A word among `choices`; anything else reads "unknown WHAT 'x'; choose one of ...", wherever it came from."""

    def check(value: Any) -> Any:
        value = yaml_word(value)
        if value not in choices:
            raise ValueError(f"unknown {what} '{value}'; choose one of {', '.join(choices)}")
        return value

    return BeforeValidator(check)


# Options that more than one command takes, each described once.
Dtype = Annotated[
    str,
    one_of("dtype", DTYPE_CHOICES),
    Field(
        description="auto (the checkpoint's own: bfloat16 stays bfloat16; the built-ins are float32), float32, "
        "bfloat16 or float16.",
        json_schema_extra={"panel": LOADING, "enum": list(DTYPE_CHOICES)},
    ),
]
Device = Annotated[
    str,
    one_of("device", DEVICE_CHOICES),
    Field(
        description="cpu, cuda or auto.", json_schema_extra={"panel": LOADING, "enum": list(DEVICE_CHOICES)}
    ),
]
TrustRemoteCode = Annotated[
    bool,
    Field(
        alias="trust-remote-code",
        description="Run modeling code shipped with a model not written by llmsurgery.",
        json_schema_extra={"panel": LOADING},
    ),
]
Limit = Annotated[
    int | None,
    Field(ge=1, le=defaults.MAX_WINDOWS, description="score only the first N documents of each task"),
]
BatchSize = Annotated[
    int, Field(alias="batch-size", ge=1, le=defaults.MAX_BATCH, description="lm-eval batch size")
]


def _loading_flag(alias: str, description: str):
    return Annotated[bool, Field(alias=alias, description=description, json_schema_extra={"panel": LOADING})]


LoadIn8bit = _loading_flag("load-in-8bit", "Quantize to int8 with bitsandbytes while loading.")
LoadIn4bit = _loading_flag("load-in-4bit", "Quantize to NF4 with bitsandbytes while loading.")


class Strict(BaseModel):
    """Unknown keys, NaN and infinities are refused; options are read by their spelling (alias) or name."""

    model_config = ConfigDict(
        extra="forbid", allow_inf_nan=False, populate_by_name=True, frozen=True, defer_build=True
    )


def _list_of_words(value: Any) -> Any:
    """Tasks as one comma-separated string (the command line) or a list (recipes, Python)."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list) and not value:
        raise ValueError("needs at least one task name")
    return value


class EvalOptions(Strict):
    """lm-eval after the passes; with `baseline`, the input model is scored first (before any pass)."""

    tasks: Annotated[list[str], BeforeValidator(_list_of_words)] = Field(
        min_length=1,
        description="tasks to score: news_ppl, pydoc_ppl, news_cloze or lm-eval names",
        json_schema_extra={
            "flag": "eval",
            "help": "Score the transformed model on these tasks, the original as baseline.",
        },
    )
    limit: Annotated[
        Limit, Field(json_schema_extra={"flag": "eval-limit", "help": "Documents per task for --eval."})
    ] = None
    batch_size: BatchSize = 8
    baseline: bool = Field(True, description="score the source model in the same run")
    load_in_8bit: LoadIn8bit = False
    load_in_4bit: LoadIn4bit = False

    @model_validator(mode="after")
    def _one_quantization(self):
        return one_quantization(self)

    @property
    def quantized(self) -> bool:
        return self.load_in_8bit or self.load_in_4bit


class JobOptions(Strict):
    """What every job takes besides its passes: the model, the output, loading and evaluation."""

    model: str = Field(description=MODEL_HELP)
    fsdp: bool = Field(
        False,
        description="Under torchrun / accelerate launch: shard the model over the processes while it trains "
        "(FSDP), so that several GPUs hold what one cannot.",
        json_schema_extra={"panel": LOADING, "trains": True},
    )
    eval: EvalOptions | None = Field(None, description="score the result (and the original) with lm-eval")
    output: Path | None = Field(
        None, description="Folder to write the model to.", json_schema_extra={"panel": IO, "flags": ["-o"]}
    )
    force: bool = Field(
        False,
        description="Replace an existing output folder.",
        json_schema_extra={"panel": IO, "recipe": False},
    )
    dtype: Dtype = "auto"
    device: Device = "cpu"
    trust_remote_code: TrustRemoteCode = False
    stream: Annotated[str, one_of("stream", STREAM_CHOICES)] = Field(
        "auto",
        description="on: one decoder layer in memory at a time (prune, rotate-sparsify, absorb, kv-compress "
        "--no-train --uniform); auto: when the checkpoint is larger than half the memory available; off: load "
        "the whole model.",
        json_schema_extra={"panel": LOADING, "enum": list(STREAM_CHOICES)},
    )


def one_quantization(options):
    if options.load_in_8bit and options.load_in_4bit:
        raise ValueError("choose one of load-in-8bit and load-in-4bit")
    return options


class EvalJob(Strict):
    """Score MODEL with lm-eval, offline built-in tasks included; with --baseline, side by side."""

    model: str = Field(description=MODEL_HELP)
    tasks: Annotated[list[str], BeforeValidator(_list_of_words)] = Field(
        ["news_ppl", "news_cloze"],
        min_length=1,
        description="Comma-separated tasks: news_ppl, pydoc_ppl, news_cloze, or lm-eval names.",
        json_schema_extra={"panel": EVALUATION},
    )
    baseline: str | None = Field(
        None, description="A second model scored side by side.", json_schema_extra={"panel": EVALUATION}
    )
    limit: Annotated[Limit, Field(json_schema_extra={"panel": EVALUATION})] = None
    batch_size: Annotated[BatchSize, Field(json_schema_extra={"panel": EVALUATION})] = 8
    load_in_8bit: LoadIn8bit = False
    load_in_4bit: LoadIn4bit = False
    backend: Annotated[str, one_of("backend", ("hf", "vllm"))] = Field(
        "hf",
        description="lm-eval backend: hf (transformers, any model) or vllm (standard architectures, GPUs).",
        json_schema_extra={"panel": EVALUATION, "enum": ["hf", "vllm"]},
    )
    tensor_parallel: int = Field(
        1,
        alias="tensor-parallel",
        ge=1,
        le=1024,
        description="vllm: GPUs per model copy.",
        json_schema_extra={"panel": EVALUATION},
    )
    data_parallel: int = Field(
        1,
        alias="data-parallel",
        ge=1,
        le=1024,
        description="vllm: model copies scoring in parallel.",
        json_schema_extra={"panel": EVALUATION},
    )
    dtype: Dtype = "auto"
    device: Device = "cpu"
    trust_remote_code: TrustRemoteCode = False

    @model_validator(mode="after")
    def _one_quantization(self):
        return one_quantization(self)


def job_fields(trains: bool = True) -> dict[str, Any]:
    """JobOptions' fields but the model (every command takes it as its argument), in --help order;
    `trains`: whether the command's pass may train (else no --fsdp)."""
    return {
        name: info
        for name, info in JobOptions.model_fields.items()
        if name != "model" and (trains or not (info.json_schema_extra or {}).get("trains"))
    }


def saved_options(options: JobOptions) -> dict:
    """The job options a saved recipe repeats, in recipe spelling: the model, dtype and device always, the rest
    (but output and force) when set away from their defaults."""
    given = options.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    always = options.model_dump(mode="json", by_alias=True, include={"model", "dtype", "device"})
    order = ("model", "dtype", "device", "trust-remote-code", "stream", "fsdp", "eval")
    return {
        key: always[key] if key in always else given[key] for key in order if key in always or key in given
    }


class ExportJob(Strict):
    """Write MODEL as one GGUF file that llama.cpp and ollama run (standard architectures: prune, heal, convert)."""

    model: str = Field(description=MODEL_HELP)
    output: Path = Field(
        description="The file to write (FILE.gguf).", json_schema_extra={"panel": IO, "flags": ["-o"]}
    )
    format: str = Field(
        "gguf", description="gguf (llama.cpp, ollama, LM Studio).", json_schema_extra={"enum": ["gguf"]}
    )
    outtype: str = Field("f16", description="Weight storage: f32, f16, bf16 or q8_0 (norms stay f32).")
    force: bool = Field(False, description="Replace an existing file.", json_schema_extra={"panel": IO})
