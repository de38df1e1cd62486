"""`prune-bi`: Block-Influence layer removal (ShortGPT, arXiv 2403.03853); the maths is in `maths.py`.

Lossy. Every kept layer is untouched and the output is a standard checkpoint with fewer layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from ... import defaults
from ...errors import UserError
from ..base import CheckContext, PassConfig, Report


class PruneBIReport(Report):
    scores: list[float]
    score_kind: str
    removed_layers: list[int]
    layers_before: int
    layers_after: int
    calibration_tokens: int

    def _chosen(self, cfg: PruneBI) -> tuple[list[int], str]:
        return (
            ([self.removed_layers[0]], "block start")
            if cfg.metric == "angular"
            else (self.removed_layers, "layer")
        )

    def summary(self, cfg: PruneBI) -> list:
        from ...plotting import score_table

        chosen, index_label = self._chosen(cfg)
        return [
            score_table(self.scores, chosen, self.score_kind, index_label),
            f"layers to remove (0-based): {self.removed_layers}  ({self.layers_before} -> "
            f"{self.layers_after} layers)",
        ]

    def plot(self, cfg: PruneBI, path: Path) -> None:
        from ...plotting import save_score_plot

        chosen, index_label = self._chosen(cfg)
        save_score_plot(path, self.scores, chosen, self.score_kind, index_label)


class PruneBI(PassConfig):
    """Remove the decoder layers whose output is most like their input (lowest Block Influence)."""

    streams_as: ClassVar[str | None] = "prune-bi"
    column: ClassVar[str] = "pruned"
    command_help: ClassVar[str] = (
        "Remove the least influential decoder layers and write a standard checkpoint (--heal: then distil it)."
    )
    dry_run_flag: ClassVar[str | None] = "scores-only"
    dry_run_help: ClassVar[str] = "Print the layer scores; write no model."
    plots: ClassVar[bool] = True

    pass_: Literal["prune-bi"] = Field("prune-bi", alias="pass", exclude=True)
    remove: int | None = Field(None, ge=1, le=defaults.MAX_DIM, description="number of layers to remove")
    ratio: float | None = Field(None, gt=0, lt=1, description="fraction of the layers to remove")
    metric: Literal["bi", "angular"] = Field(
        "bi", description="bi (ShortGPT, per layer) or angular (Gromov et al., one block, needs block)"
    )
    block: bool = Field(False, description="remove one contiguous block of layers")

    @model_validator(mode="after")
    def _one_amount(self):
        if (self.remove is None) == (self.ratio is None):
            raise ValueError("give exactly one of remove and ratio")
        if self.metric == "angular" and not self.block:
            raise ValueError("the angular metric scores contiguous blocks: set block (--block)")
        return self

    @property
    def score_kind(self) -> str:
        return "angular distance" if self.metric == "angular" else "block influence"

    def n_remove(self, n_layers: int) -> int:
        n = self.remove if self.remove is not None else int(round(self.ratio * n_layers))
        if n < 1 or n >= n_layers:
            raise UserError(f"cannot remove {n} of {n_layers} layers: choose between 1 and {n_layers - 1}")
        return n

    def check(self, ctx: CheckContext) -> None:
        self.n_remove(ctx.config["num_hidden_layers"])

    def config_after(self, config: dict) -> dict:
        return config | {
            "num_hidden_layers": config["num_hidden_layers"] - self.n_remove(config["num_hidden_layers"])
        }

    def _report(self, scores: list[float], removed: list[int], n_layers: int, batches) -> PruneBIReport:
        return PruneBIReport(
            scores=scores,
            score_kind=self.score_kind,
            removed_layers=removed,
            layers_before=n_layers,
            layers_after=n_layers - len(removed),
            calibration_tokens=int(batches.numel()),
        )

    def _choose(self, model, run) -> tuple[list[float], list[int], int, object]:
        from .maths import choose_layers, residual_stats

        batches = run.windows(self.calib)
        stats = residual_stats(model, batches)
        scores, removed = choose_layers(stats, self.n_remove(stats.n), self.metric, self.block)
        return scores, removed, stats.n, batches

    def apply_(self, model, run) -> PruneBIReport:
        from .maths import remove_layers_

        scores, removed, n_layers, batches = self._choose(model.model, run)
        if not run.dry_run:
            remove_layers_(model.model, removed)
        return self._report(scores, removed, n_layers, batches)

    def apply_streamed_(self, streamed, run, writer=None) -> PruneBIReport:
        """Score one layer at a time; with a `writer`, copy the kept layers' tensors, renumbered."""
        from .maths import write_kept_layers

        scores, removed, n_layers, batches = self._choose(streamed, run)
        if writer is not None:
            write_kept_layers(streamed, writer, removed)
        return self._report(scores, removed, n_layers, batches)
