"""`rotate-sparsify`: LaRoSA (arXiv 2507.01299), layerwise rotations + per-token Top-K; the maths is in `maths.py`.

Exact at sparsity 0 (up to float32 rounding), lossy above; the output runs on llmsurgery's modeling code.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import BeforeValidator, Field, model_validator

from ...errors import UserError
from ..base import CheckContext, PassConfig, Report, windows_field

FOLDABLE = ("llama", "mistral", "qwen2", "qwen3")


def _two_numbers(value):
    """ "0.8,1.2" from the command line; a two-item list from a recipe."""
    if isinstance(value, str):
        try:
            a, b = (float(v) for v in value.split(","))
        except ValueError:
            raise ValueError(f"wants two numbers A,B (multipliers of the sparsity), got '{value}'") from None
        return a, b
    return value


class RotateSparsifyReport(Report):
    sparsity_in: float
    sparsity_out: float
    effective_sparsity: float
    rotated: bool
    explained_top_half: list[float] | None = None
    calibration_tokens: int | None = None

    def summary(self, cfg: RotateSparsify) -> list:
        return [self.table(f"rotate-sparsify ({cfg.method})", skip=("explained_top_half",))]


class RotateSparsify(PassConfig):
    """Fold rotations into the weights and keep each layer input's largest entries per token."""

    streams_as: ClassVar[str | None] = "rotate-sparsify"
    saved_as: ClassVar[str] = "sparse model"
    column: ClassVar[str] = "sparse"
    command_help: ClassVar[str] = (
        "LaRoSA: fold layerwise rotations into the weights and Top-K the layer inputs per token."
    )

    pass_: Literal["rotate-sparsify"] = Field("rotate-sparsify", alias="pass", exclude=True)
    sparsity: float = Field(ge=0, lt=1, description="target sparsity S of the layer inputs")
    method: Literal["larosa", "magnitude"] = Field(
        "larosa", description="larosa (rotated Top-K) or magnitude (Top-K without rotation)"
    )
    split: Annotated[
        tuple[Annotated[float, Field(ge=0, le=100)], Annotated[float, Field(ge=0, le=100)]],
        BeforeValidator(_two_numbers),
    ] = Field(
        (0.8, 1.2),
        description="A,B: the q/k/v and gate/up inputs are sparsified at A*S, the o_proj and down_proj inputs at B*S",
    )
    damp: float = Field(0.01, ge=0, le=1, description="covariance damping, a fraction of the mean eigenvalue")
    # 40 x 512 measured better than the paper's 10 x 2048 here (README)
    calib_samples: int = windows_field(40, "number of calibration windows", "calib-samples")

    @model_validator(mode="after")
    def _valid_split(self):
        a, b = self.split
        if a * self.sparsity >= 1 or b * self.sparsity >= 1:
            raise ValueError(
                f"split {a},{b} at sparsity {self.sparsity} gives input sparsities outside [0, 1)"
            )
        return self

    @property
    def sparsity_in(self) -> float:
        return round(self.split[0] * self.sparsity, 6)

    @property
    def sparsity_out(self) -> float:
        return round(self.split[1] * self.sparsity, 6)

    def windows(self):
        return [self.calib] if self.method == "larosa" else []

    def check(self, ctx: CheckContext) -> None:
        from ...modeling import uses_surgery_modeling

        check_foldable(ctx.config.get("model_type"))
        if ctx.config.get("sparsity_in") is not None or (
            ctx.config.get("auto_map") and not uses_surgery_modeling(ctx.config)
        ):
            raise UserError(
                "rotate-sparsify needs a dense model (this one is already sparse or carries foreign code)"
            )

    def config_after(self, config: dict) -> dict:
        return config | {"sparsity_in": self.sparsity_in}

    def apply_(self, model, run) -> RotateSparsifyReport:
        from .maths import rotate_sparsify_

        batches = run.windows(self.calib) if self.needs_calibration else None
        return RotateSparsifyReport(**rotate_sparsify_(model.model, batches, self))

    def apply_streamed_(self, streamed, run, writer=None) -> RotateSparsifyReport:
        """One layer at a time (its rotation from the windows passing through it); writes each folded layer."""
        from .maths import streamed_rotate_sparsify

        batches = run.windows(self.calib) if self.needs_calibration else None
        return RotateSparsifyReport(**streamed_rotate_sparsify(streamed, batches, self, writer))


def check_foldable(model_type: str) -> None:
    """Refuse architectures whose norms sit where a rotation cannot pass."""
    if model_type not in FOLDABLE:
        raise UserError(
            f"rotate-sparsify cannot fold rotations into '{model_type}' models (gemma3 normalises attention and MLP "
            "outputs before the residual add, which does not commute with a rotation); supported: "
            f"{', '.join(FOLDABLE)}"
        )
