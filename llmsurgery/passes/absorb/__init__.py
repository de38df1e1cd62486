"""`absorb`: Absorb-Decompose of attention (CLOVER, arXiv 2411.17426); the maths is in `maths.py`.

With no knob only directions of zero singular value go (exact up to float rounding); knobs and qk are lossy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from ... import defaults
from ...errors import UserError
from ..base import CheckContext, CommaList, PassConfig, Report, windows_field


class AbsorbLayer(Report):
    layer: int
    v_before: list[int]
    v_after: list[int]
    qk_before: list[int]
    qk_after: list[int]
    params_before: int
    params_after: int
    spectra: list[list[float]]
    pair_scores: list[list[float]]


class AbsorbReport(Report):
    layers: list[AbsorbLayer]
    attention_params_before: int
    attention_params_after: int
    attention_reduction: float
    exact: bool
    lossy_qk: bool
    calibration_tokens: int | None = None

    def summary(self, cfg: Absorb) -> list:
        found = [self.per_layer_table()]
        if self.lossy_qk:
            found.append(
                "[yellow]note:[/yellow] qk drops RoPE frequency pairs, which is lossy at any setting"
            )
        return found

    def per_layer_table(self):
        """Per layer: V and Q-K widths kept per KV head, attention parameters, and the spectrum's spread."""
        from rich.table import Table

        table = Table(title="absorb-decompose (per layer; widths per KV head)")
        for column in ("layer", "v kept", "v dropped", "qk kept", "attention params", "after", "σ_min/σ_max"):
            table.add_column(column, justify="right")
        for row in self.layers:
            spreads = [s[-1] / s[0] for s in row.spectra if s and s[0] > 0]
            table.add_row(
                str(row.layer),
                ",".join(map(str, row.v_after)),
                str(sum(row.v_before) - sum(row.v_after)),
                ",".join(map(str, row.qk_after)),
                f"{row.params_before:,}",
                f"{row.params_after:,}",
                f"{min(spreads):.2e}" if spreads else "-",
            )
        before, after = self.attention_params_before, self.attention_params_after
        reduction = f"{after:,} (-{100 * self.attention_reduction:.1f}%)"
        table.add_row("all", "", "", "", f"{before:,}", reduction, "", style="bold")
        return table

    def plot(self, cfg: Absorb, path: Path) -> None:
        from ...plotting import save_spectra_plot

        title = f"{cfg.criterion} V-O singular values per KV head (dotted: dropped)"
        save_spectra_plot(path, [row.record() for row in self.layers], title)


class Absorb(PassConfig):
    """Re-factor each KV head's V-O product by SVD and drop its weakest directions (and, with qk, RoPE pairs)."""

    streams_as: ClassVar[str | None] = "absorb"
    saved_as: ClassVar[str] = "absorbed model"
    column: ClassVar[str] = "absorbed"
    command_help: ClassVar[str] = (
        "Absorb-Decompose (CLOVER): re-factor attention V-O pairs by SVD and drop their weakest directions.\n\n"
        "Without --threshold/--keep-ratio/--rank only directions of zero singular value go (lossless)."
    )
    dry_run_flag: ClassVar[str | None] = "dry-run"
    dry_run_help: ClassVar[str] = "Print the per-layer table; write no model."
    plots: ClassVar[bool] = True

    pass_: Literal["absorb"] = Field("absorb", alias="pass", exclude=True)
    threshold: float | None = Field(
        None, gt=0, lt=1, description="drop directions below T x the head's largest singular value"
    )
    keep_ratio: float | None = Field(
        None, alias="keep-ratio", gt=0, le=1, description="keep this fraction of every KV head's directions"
    )
    rank: int | None = Field(
        None,
        ge=1,
        le=defaults.MAX_DIM,
        description="keep at most r directions per KV head (qk: r dims, r/2 pairs)",
    )
    pairs: Annotated[tuple[Literal["vo", "qk"], ...], CommaList] = Field(
        ("vo",), description="vo (exact absorb-decompose) and/or qk (drops RoPE frequency pairs: lossy)"
    )
    criterion: Literal["whitened", "weight", "norm"] = Field(
        "whitened",
        description="whitened (calibration-aware SVD), weight (CLOVER's weight-only SVD) "
        "or norm (vanilla dim dropping)",
    )
    damp: float = Field(0.01, ge=0, le=1, description="covariance damping, a fraction of its mean diagonal")
    calib_samples: int = windows_field(16, "number of calibration windows", "calib-samples")

    @field_validator("pairs")
    @classmethod
    def _pairs(cls, value):
        if not value or len(set(value)) != len(value):
            raise ValueError("pairs must name vo and/or qk, each once")
        return value

    @model_validator(mode="after")
    def _one_knob(self):
        given = [k for k in ("threshold", "keep_ratio", "rank") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of threshold, keep-ratio, rank (got {', '.join(given)})")
        return self

    @property
    def exact(self) -> bool:
        """No knob: only directions of (numerically) zero singular value go."""
        return self.threshold is None and self.keep_ratio is None and self.rank is None

    def windows(self):
        return [self.calib] if self.criterion == "whitened" else []

    def check(self, ctx: CheckContext) -> None:
        check_absorbable(ctx.config.get("model_type"), self, ctx.config)

    def config_after(self, config: dict) -> dict:
        if "qk" not in self.pairs:
            return config
        layouts = config.get("attention_layout") or [{} for _ in range(config["num_hidden_layers"])]
        return config | {
            "attention_layout": [layout | {"qk": layout.get("qk") or [[]]} for layout in layouts]
        }

    def apply_(self, model, run) -> AbsorbReport:
        from .maths import absorb_decompose_

        batches = run.windows(self.calib) if self.needs_calibration else None
        return AbsorbReport(**absorb_decompose_(model.model, self, batches=batches, apply=not run.dry_run))

    def apply_streamed_(self, streamed, run, writer=None) -> AbsorbReport:
        """One layer at a time (its v_proj covariance from the windows passing through it); writes each layer."""
        from .maths import absorb_decompose_

        batches = run.windows(self.calib) if self.needs_calibration else None
        report = absorb_decompose_(streamed, self, batches=batches, apply=writer is not None, writer=writer)
        return AbsorbReport(**report)


def check_absorbable(model_type: str, cfg: Absorb, config: dict | None = None) -> None:
    from ...arch import arch_for_model_type

    kv_compressed = any(layout.get("k") for layout in (config or {}).get("attention_layout") or [])
    if "qk" in cfg.pairs and kv_compressed:
        raise UserError(
            "qk pairs cannot be dropped after kv-compress (keys are cached in a learned basis); use --pairs vo"
        )
    if "qk" in cfg.pairs and arch_for_model_type(model_type).qk_norm:
        raise UserError(
            f"'{model_type}' normalises q and k per head (RMSNorm over head_dim), so frequency pairs cannot "
            "be dropped from q_proj/k_proj; use --pairs vo"
        )
