"""What every pass shares: its one config (options, spellings, defaults, ranges, help), checks and interface.

A pass is a `PassConfig` subclass in a light module (pydantic only; the maths is imported inside its methods),
registered in `passes/__init__.py`. The command line (`cli_options`), recipes (`recipe.PassEntry`), the recipe
schema and the Python API all read the same class: a field's alias is its spelling on the command line and in
recipes, its description the help text, its bounds the validation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from .. import defaults
from ..corpora import CalibConfig

CALIBRATION_PANEL = "Calibration"  # the --help panel of the calibration options
CALIB_SOURCE_HELP = (
    "calibration text: news, pydoc, a .txt/.jsonl file, or hf:NAME[@CONFIG]:SPLIT[:FIELD]; mix several with +"
)


def _comma_list(value: Any) -> Any:
    """The command line gives lists as one comma-separated string ("0.8,1.2", "vo,qk"); recipes as YAML lists."""
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return value


CommaList = BeforeValidator(_comma_list)


def windows_field(default: int, what: str, alias: str, panel: str | None = CALIBRATION_PANEL) -> Any:
    return Field(
        default,
        alias=alias,
        ge=1,
        le=defaults.MAX_WINDOWS,
        description=what,
        json_schema_extra={"panel": panel} if panel else None,
    )


def seq_len_field(default: int, what: str, alias: str, panel: str | None = CALIBRATION_PANEL) -> Any:
    return Field(
        default,
        alias=alias,
        ge=2,
        le=defaults.MAX_SEQ_LEN,
        description=what,
        json_schema_extra={"panel": panel} if panel else None,
    )


# What earlier versions wrote in the history for the passes named otherwise there; they still read.
OLD_RECORD_NAMES = {
    "block_influence": "prune-bi",
    "rotate_sparsify": "rotate-sparsify",
    "kv_compress": "kv-compress",
}


def record_pass(record: dict) -> str:
    """The pass a history record names, by its name today."""
    return OLD_RECORD_NAMES.get(record.get("pass"), record.get("pass"))


@dataclass
class CheckContext:
    """What a pass may check before any weight loads."""

    config: dict  # config.json as the passes before this one leave it
    folder: Path | None  # the input model's folder (None: a hub model not yet downloaded)
    earlier: list = field(default_factory=list)  # the configs of the passes before this one
    input_config: dict = field(default_factory=dict)  # the input's config.json, before any pass
    models: Any = (
        None  # model_io.CheckedModels: other models a pass names (heal's teacher), each checked once
    )


@dataclass
class RunContext:
    """What the runner hands a pass besides the model: its calibration windows and the job's settings."""

    streams: Any  # calibration.TokenStreams: each source tokenized once per job
    dry_run: bool = False  # plan only (prune --scores-only, absorb --dry-run): leave the model as it is
    sharded: bool = (
        False  # FSDP: the trained passes run sharded copies of the model (sharding.training_copies)
    )
    load: Callable[[str], Any] | None = (
        None  # another model (heal's teacher), loaded as the job loads its own
    )

    def windows(self, cfg: CalibConfig) -> Any:
        """The token windows [samples, seq_len] that `cfg` names."""
        return self.streams.windows(cfg)


class Report(BaseModel):
    """What a pass found and did; saved in the history under `report`, printed by `summary`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def record(self) -> dict:
        return self.model_dump(mode="json", exclude_none=True)

    def summary(self, cfg: PassConfig) -> list:
        """What the command prints after the pass (rich renderables): here the numbers and short lists."""
        return [self.table(cfg.name)]

    def table(self, title: str, skip: tuple[str, ...] = ()) -> Any:
        from ..console import fmt, key_value_table

        return key_value_table(
            title,
            (
                (key.replace("_", " "), fmt(value) if isinstance(value, float) else str(value))
                for key, value in self.record().items()
                if key not in skip and (not isinstance(value, (list, dict)) or len(value) <= 8)
            ),
        )

    def plot(self, cfg: PassConfig, path: Path) -> None:
        """Save a chart of the report (passes whose config sets `plots`)."""
        raise NotImplementedError


class PassConfig(BaseModel):
    """One pass's settings. Subclasses add `pass_` (the pass's name), their knobs and `apply_`.

    The pass's name (`pass_`) is its name in recipes and in the history. What the runner asks of a config with
    its settings (`trains`, `streamable`, `memory_factor`) are properties; class attributes describe the pass
    and its command.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, populate_by_name=True)

    streams_as: ClassVar[str | None] = (
        None  # the settings that run one decoder layer at a time (for messages)
    )
    saved_as: ClassVar[str] = "model"  # the kind of model the pass writes, for the command's last line
    column: ClassVar[str] = "transformed"  # the result's column in the evaluation table
    command_help: ClassVar[str] = ""  # the command's --help text (default: the class's docstring)
    model_help: ClassVar[str | None] = None  # the command's MODEL argument, when not any model
    # the command's option that plans only ("scores-only"), and its help
    dry_run_flag: ClassVar[str | None] = None
    dry_run_help: ClassVar[str] = ""
    plots: ClassVar[bool] = False  # the command takes --plot (its report's `plot`)
    may_train: ClassVar[bool] = False  # some settings take gradient steps: the command takes --fsdp

    calib_source: str = Field(
        "news", alias="calib", description=CALIB_SOURCE_HELP, json_schema_extra={"panel": CALIBRATION_PANEL}
    )
    calib_samples: int = windows_field(8, "number of calibration windows", "calib-samples")
    calib_seq_len: int = seq_len_field(512, "tokens per calibration window", "calib-seq-len")
    seed: int = Field(
        0,
        ge=0,
        lt=defaults.MAX_SEED,
        description="seed choosing the calibration windows",
        json_schema_extra={"panel": CALIBRATION_PANEL},
    )

    @model_validator(mode="before")
    @classmethod
    def _calib_as_config(cls, data: Any) -> Any:
        """In Python, `calib=CalibConfig(...)` sets the four calibration options at once."""
        if isinstance(data, dict) and isinstance(data.get("calib"), CalibConfig):
            c = data["calib"]
            data = {k: v for k, v in data.items() if k != "calib"}
            data |= {
                "calib": c.source,
                "calib-samples": c.samples,
                "calib-seq-len": c.seq_len,
                "seed": c.seed,
            }
        return data

    @field_validator("calib_source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        return CalibConfig._known_source(value)

    @classmethod
    def pass_name(cls) -> str:
        return cls.model_fields["pass_"].default

    @property
    def name(self) -> str:
        return self.pass_name()

    @property
    def calib(self) -> CalibConfig:
        return CalibConfig(
            source=self.calib_source, samples=self.calib_samples, seq_len=self.calib_seq_len, seed=self.seed
        )

    def windows(self) -> list[CalibConfig]:
        """Every set of calibration windows the pass draws with these settings (none: it needs no data)."""
        return [self.calib]

    @property
    def needs_calibration(self) -> bool:
        return bool(self.windows())

    @property
    def trains(self) -> bool:
        """Takes gradient steps (data parallel splits them; --fsdp shards the model)."""
        return False

    @property
    def streamable(self) -> bool:
        """Runs one decoder layer in memory at a time with these settings (has `apply_streamed_`)."""
        return self.streams_as is not None

    @property
    def memory_factor(self) -> float:
        """Peak memory of the whole-model path with these settings, in units of the weights."""
        return 1.25

    def check(self, ctx: CheckContext) -> None:
        """Refuse, with a UserError, what config.json already shows this pass cannot do."""

    def config_after(self, config: dict) -> dict:
        """config.json as this pass leaves it, in what later passes' checks read."""
        return config

    def apply_(self, model, run: RunContext) -> Report:
        """Transform `model` (a `model_io.LoadedModel`) in place; `run` draws the windows (`run.dry_run`: plan only)."""
        raise NotImplementedError

    def apply_streamed_(self, streamed, run: RunContext, writer=None) -> Report:
        """Transform a `streaming.StreamedModel` one layer at a time, each written by `writer` (streamable passes)."""
        raise NotImplementedError

    def record(self) -> dict:
        """The settings as saved in the history (field names)."""
        return self.model_dump(mode="json", exclude={"pass_"})

    def recipe_entry(self) -> dict:
        """The settings as a recipe's pass entry (recipe spellings), `pass:` first."""
        return {"pass": self.name} | self.model_dump(mode="json", by_alias=True, exclude={"pass_"})
