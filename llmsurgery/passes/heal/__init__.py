"""`heal`: distil a layer-pruned model towards its original (KL on logits); the maths is in `maths.py`.

Only the chosen tensors change; the output is the same standard checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import BeforeValidator, Field, field_validator

from ... import defaults
from ...errors import UserError
from ..base import CalibConfig, CheckContext, CommaList, PassConfig, Report, seq_len_field, windows_field

TRAIN_CHOICES = ("norms", "mlp-near-gaps", "layers-near-gaps", "all-mlp", "all")
VALIDATION_WINDOWS = defaults.HEAL_HELD_OUT_WINDOWS
SEED_OFFSET = 3  # heal's windows differ from those of a prune drawn with the same seed


def _layer_numbers(value):
    """ "12,13,25" from the command line; a list from a recipe."""
    if isinstance(value, str):
        try:
            return tuple(int(v) for v in value.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"takes 0-based layer numbers, comma-separated, got '{value}'") from None
    return value


class HealReport(Report):
    steps: int
    tokens: int
    removed_layers: list[int]
    trained_layers: list[int]
    trained_modules: list[str]
    trained_parameters: dict[str, int]
    trained_parameter_count: int
    loss_curve: list[float]
    held_out_kl_before: float
    held_out_kl_after: float
    kept: bool
    teacher: str
    calibration_tokens: int

    def summary(self, cfg: Heal) -> list:
        from ...console import ends_mean, key_value_table

        kept = "" if self.kept else "  (worse: the old weights were kept)"
        rows = [
            ("teacher", str(self.teacher)),
            ("removed layers (teacher numbering)", ", ".join(map(str, self.removed_layers)) or "none"),
            (
                "trained",
                f"{self.trained_parameter_count:,} parameters in {len(self.trained_modules)} modules",
            ),
            ("steps / tokens", f"{self.steps} / {self.tokens:,}"),
            ("KL, first / last 10 steps", ends_mean(self.loss_curve)),
            (
                "held-out KL before / after",
                f"{self.held_out_kl_before:.4f} / {self.held_out_kl_after:.4f}{kept}",
            ),
        ]
        return [key_value_table("heal (distillation towards the teacher)", rows)]


class Heal(PassConfig):
    """Train a few tensors of the student so that its next-token distribution matches the teacher's."""

    saved_as: ClassVar[str] = "healed model"
    column: ClassVar[str] = "healed"
    command_help: ClassVar[str] = (
        "Distil a pruned model towards its original (KL on logits), training only a few tensors; writes a "
        "standard checkpoint."
    )
    model_help: ClassVar[str | None] = "The pruned model (folder, .gguf, built-in name or hub id)."
    may_train: ClassVar[bool] = True

    pass_: Literal["heal"] = Field("heal", alias="pass", exclude=True)
    teacher: str | None = Field(
        None,
        description="the model to distil from (default: the model before this run's passes, "
        "else the source in the model's history)",
    )
    steps: int = Field(
        defaults.HEAL_STEPS,
        ge=1,
        le=defaults.MAX_STEPS,
        description="optimizer steps (a batch of batch-size windows each)",
    )
    lr: float = Field(
        defaults.HEAL_LR,
        gt=0,
        le=100,
        description="peak AdamW learning rate (10% linear warm-up, cosine decay)",
    )
    batch_size: int = Field(
        defaults.HEAL_BATCH_SIZE,
        alias="batch-size",
        ge=1,
        le=defaults.MAX_BATCH,
        description="windows per step",
    )
    train: Annotated[tuple[str, ...], CommaList] = Field(
        defaults.HEAL_TRAIN, description=f"what trains, comma-separated: {', '.join(TRAIN_CHOICES)}"
    )
    removed: Annotated[
        tuple[Annotated[int, Field(ge=0, le=defaults.MAX_DIM)], ...] | None, BeforeValidator(_layer_numbers)
    ] = Field(
        None,
        description="the teacher's layers the student lacks, 0-based "
        "(default: from the history, else by matching weights)",
    )
    calib_samples: int = windows_field(
        defaults.HEAL_WINDOWS[0], "training windows (cycled through)", "calib-samples"
    )
    calib_seq_len: int = seq_len_field(
        defaults.HEAL_WINDOWS[1], "tokens per training window", "calib-seq-len"
    )

    @field_validator("train")
    @classmethod
    def _known(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [v for v in value if v not in TRAIN_CHOICES]
        if unknown or not value:
            raise ValueError(
                f"train takes {', '.join(TRAIN_CHOICES)} (comma-separated), got '{','.join(value)}'"
            )
        return value

    @property
    def calib(self) -> CalibConfig:
        """The training windows followed by the held-out ones, all disjoint."""
        return CalibConfig(
            source=self.calib_source,
            samples=self.calib_samples + VALIDATION_WINDOWS,
            seq_len=self.calib_seq_len,
            seed=self.seed + SEED_OFFSET,
        )

    def check(self, ctx: CheckContext) -> None:
        """The teacher (given; the history's source when heal comes first; else the input) and the layer counts."""
        from ...arch import arch_for_model_type
        from ...data_parallel import check_batch
        from ...model_io import check_model, read_history

        config = ctx.config
        arch_for_model_type(config.get("model_type"))
        check_batch(self.batch_size, "--batch-size" if ctx.earlier == [] else "heal's batch size")
        earlier = sorted({p.name for p in ctx.earlier} - {"prune-bi"})
        if self.teacher is None and earlier:
            raise UserError(
                f"heal without a teacher distils towards the input model, so only prune-bi may come before it "
                f"(here: {', '.join(earlier)})"
            )
        n_student = config["num_hidden_layers"]
        teacher = self.teacher
        if teacher is None and not ctx.earlier:
            history = read_history(ctx.folder) if ctx.folder is not None else None
            if not history or not history["passes"]:
                raise UserError(
                    "give --teacher (the model before pruning): this model has no llmsurgery history naming its source"
                )
            teacher = history["source"].get("id")
        if teacher is None:
            teacher_config = ctx.input_config  # the input model, as loaded before the earlier passes
        else:
            try:
                found = ctx.models.get(str(teacher)) if ctx.models is not None else check_model(str(teacher))
                teacher_config, teacher_folder = found.config, found.folder
            except UserError as exc:
                raise UserError(f"teacher {teacher}: {exc}") from None
            if (
                not ctx.earlier
                and ctx.folder is not None
                and teacher_folder is not None
                and Path(teacher_folder).resolve() == Path(ctx.folder).resolve()
            ):
                raise UserError(
                    f"the teacher {teacher} is the model being healed; give the model before pruning"
                )
        if teacher_config.get("model_type") != config.get("model_type"):
            raise UserError(
                f"the teacher is {teacher_config.get('model_type')}, the student {config.get('model_type')}"
            )
        if teacher_config.get("vocab_size") != config.get("vocab_size"):
            raise UserError(
                f"the teacher's vocabulary ({teacher_config.get('vocab_size')}) differs from the student's "
                f"({config.get('vocab_size')})"
            )
        n_teacher = teacher_config["num_hidden_layers"]
        if self.removed is not None:
            if len(set(self.removed)) != len(self.removed) or any(
                not 0 <= i < n_teacher for i in self.removed
            ):
                raise UserError(
                    f"--removed should name distinct layers of the teacher's {n_teacher} (0 to {n_teacher - 1})"
                )
            if n_student + len(self.removed) != n_teacher:
                raise UserError(
                    f"the teacher has {n_teacher} layers, the student {n_student}: "
                    f"removing {sorted(self.removed)} does not match"
                )
        elif n_student > n_teacher:
            raise UserError(f"the student has more layers ({n_student}) than the teacher ({n_teacher})")

    @property
    def trains(self) -> bool:
        return True

    @property
    def memory_factor(
        self,
    ) -> float:  # a teacher loaded beside the student, gradients and AdamW of a few tensors
        return 2.25

    def apply_(self, model, run) -> HealReport:
        from .maths import heal_loaded_

        windows = run.windows(self.calib)
        return HealReport(**heal_loaded_(model, self, windows, run.load, model.pending, sharded=run.sharded))
