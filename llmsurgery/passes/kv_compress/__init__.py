"""`kv-compress`: MatryoshkaKV (arXiv 2410.14731), orthogonal projections of the cached keys and values.

The maths is in `maths.py`. Budget 1.0 reproduces the logits; lower budgets are lossy.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from ... import defaults
from ...errors import UserError
from ..base import (
    CALIBRATION_PANEL,
    CalibConfig,
    CheckContext,
    PassConfig,
    Report,
    seq_len_field,
    windows_field,
)


class KVCompressReport(Report):
    rank_step: int
    head_dim: int
    loss_curve: list[float] | None = None
    train_tokens: int | None = None
    ranks_k: list[list[int]]
    ranks_v: list[list[int]]
    budget: float
    budget_reached: float
    keys_share: float
    values_share: float
    calibration_tokens: int
    exact_value_layers: int = 0  # layers whose fold kept v_proj/o_proj unprojected (--exact-values)

    def summary(self, cfg: KVCompress) -> list:
        from ...console import ends_mean, key_value_table

        rows = [
            ("budget asked / reached", f"{cfg.budget:.4g} / {self.budget_reached:.4g}"),
            ("keys / values share", f"{self.keys_share:.3f} / {self.values_share:.3f}"),
            ("ranks", _ranks_kind(cfg)),
            ("key basis", "rotary pairs (ThinK's score), fixed" if cfg.k_init == "rotary-pairs" else "PCA"),
        ]
        if self.exact_value_layers:
            rows.append(
                (
                    "values",
                    f"exact v_proj/o_proj kept in {self.exact_value_layers} of {len(self.ranks_v)} layers "
                    "(project_context_only: the context's projected)",
                )
            )
        if cfg.positions:
            rows.append(("window positions", f"each from a random offset, within the first {cfg.positions}"))
        if cfg.layers == "full-attention":
            rows.append(("layers projected", "full-attention (the sliding-window layers kept whole)"))
        if self.loss_curve:
            rows.append(("training loss, first / last 10 steps", ends_mean(self.loss_curve)))
        return [key_value_table("kv-compress (MatryoshkaKV)", rows)]


def _ranks_kind(cfg: KVCompress) -> str:
    if cfg.keys_only:
        return "keys only, values whole"
    return "searched on output KL (from uniform)" if cfg.searches else "uniform"


class KVCompress(PassConfig):
    """PCA-initialised, Matryoshka-trained projections per KV head, cut to ranks that meet a cache budget."""

    streams_as: ClassVar[str | None] = "kv-compress --no-train --v-init pca with --uniform or --keys-only"
    saved_as: ClassVar[str] = "KV-compressed model"
    column: ClassVar[str] = "compressed"
    command_help: ClassVar[str] = (
        "MatryoshkaKV: orthogonal per-KV-head projections (PCA init, Matryoshka training) that shrink the KV cache."
    )
    may_train: ClassVar[bool] = True

    pass_: Literal["kv-compress"] = Field("kv-compress", alias="pass", exclude=True)
    budget: float = Field(gt=0, le=1, description="cached K+V dims to keep, a fraction of the original")
    train: bool = Field(True, description="Matryoshka-train the projections (else PCA only)")
    uniform: bool = Field(False, description="one rank for every head instead of the rank search")
    keys_only: bool = Field(
        False,
        alias="keys-only",
        description="project the keys only, values kept whole: one key rank (2 budget - 1) x head_dim for every "
        "head, so budget > 0.5; with project_context_only at load, what long-range recall needs (README)",
    )
    layers: Literal["all", "full-attention"] = Field(
        "all",
        description="the layers whose KV is projected: all, or full-attention (a model with sliding-window layers, "
        "Gemma3: those keep every dim and stay exact, the budget counts the full-attention layers' KV, what grows "
        "with the context; takes --uniform or --keys-only)",
    )
    train_steps: int = Field(
        defaults.KV_TRAIN_STEPS,
        alias="train-steps",
        ge=1,
        le=defaults.MAX_STEPS,
        description="training steps (a batch of batch-size windows each)",
    )
    lr: float = Field(
        defaults.KV_LR, gt=0, le=100, description="AdamW learning rate of the projections and means"
    )
    batch_size: int = Field(
        defaults.KV_BATCH_SIZE,
        alias="batch-size",
        ge=1,
        le=defaults.MAX_BATCH,
        description="training windows per step",
    )
    rank_step: int | None = Field(
        None,
        alias="rank-step",
        ge=1,
        le=defaults.MAX_DIM,
        description="rank granularity, a divisor of head_dim (default head_dim / 8)",
    )
    v_init: Literal["pca", "vo"] = Field(
        "pca", alias="v-init", description="pca (the paper) or vo (whitened V-O absorb-decompose basis)"
    )
    k_init: Literal["pca", "rotary-pairs"] = Field(
        "pca",
        alias="k-init",
        description="the keys' basis: pca (the paper), or rotary-pairs: whole RoPE frequency pairs ranked by "
        "ThinK's score on the calibration text and kept so in training (their plane turns with the position, so "
        "far tokens lose no more than near ones: long-range recall, README)",
    )
    exact_values: bool = Field(
        False,
        alias="exact-values",
        description="also keep v_proj/o_proj unprojected (about 10% more weights on SmolLM2): loaded with "
        "project_context_only, the prefill and the later tokens then attend over exact values and only the "
        "context's cached values are projected, as the keys (long-range recall below b = 0.75, README)",
    )
    positions: int = Field(
        0,
        ge=0,
        le=defaults.MAX_SEQ_LEN,
        description="place every calibration, training and search window at a random position below this, so the "
        "bases fit the keys RoPE turns far into a context, not only those of the first window-length positions (0: "
        "every window from position 0). Measured on SmolLM2 at 2048 tokens: far keys fit 2.5x better, yet needle "
        "recall falls (README), so keep 0 unless your own measurement says otherwise",
        json_schema_extra={"panel": CALIBRATION_PANEL},
    )
    calib_samples: int = windows_field(
        defaults.KV_PCA_WINDOWS[0], "windows for the PCA statistics", "calib-samples"
    )
    calib_seq_len: int = seq_len_field(defaults.KV_PCA_WINDOWS[1], "tokens per PCA window", "calib-seq-len")
    train_samples: int = windows_field(
        defaults.KV_TRAIN_WINDOWS[0], "training windows (cycled through)", "train-samples"
    )
    train_seq_len: int = seq_len_field(
        defaults.KV_TRAIN_WINDOWS[1], "tokens per training window", "train-seq-len"
    )
    search_samples: int = windows_field(
        defaults.KV_SEARCH_WINDOWS[0], "windows scoring the rank search", "search-samples"
    )
    search_seq_len: int = seq_len_field(
        defaults.KV_SEARCH_WINDOWS[1], "tokens per search window", "search-seq-len"
    )

    @property
    def memory_factor(self) -> float:  # training and the search keep activations for the backward pass
        return 1.5 if self.train or self.searches else 1.25

    @property
    def trains(self) -> bool:
        return self.train

    @property
    def streamable(self) -> bool:  # PCA init and folding are per layer; training and the search are not
        return not self.train and not self.searches and self.v_init == "pca"

    def apply_streamed_(self, streamed, run, writer=None) -> KVCompressReport:
        """PCA bases one layer at a time, folded at the uniform ranks and written as each layer is done."""
        from .maths import streamed_kv_compress

        batches = run.windows(self.calib)
        report = streamed_kv_compress(streamed, batches, self, writer)
        return KVCompressReport(**report, calibration_tokens=int(batches.numel()))

    @property
    def train_calib(self) -> CalibConfig:
        return CalibConfig(
            source=self.calib_source,
            samples=self.train_samples,
            seq_len=self.train_seq_len,
            seed=self.seed + 1,
        )

    @property
    def search_calib(self) -> CalibConfig:
        return CalibConfig(
            source=self.calib_source,
            samples=self.search_samples,
            seq_len=self.search_seq_len,
            seed=self.seed + 2,
        )

    def windows(self) -> list[CalibConfig]:
        return (
            [self.calib]
            + ([self.train_calib] if self.train else [])
            + ([self.search_calib] if self.searches else [])
        )

    def placed(self, kind: str, windows):
        """Position ids of the `kind` windows ("pca", "train" or "search", token ids [N, T]) under --positions:
        each from its own random offset, seeded as those windows are (`maths.window_positions`); None: from 0."""
        from .maths import window_positions

        seeds = {"pca": self.calib.seed, "train": self.train_calib.seed, "search": self.search_calib.seed}
        return window_positions(windows, self.positions, seeds[kind])

    @property
    def searches(self) -> bool:
        """Whether the ranks come from the search (keys-only ranks are uniform)."""
        return not self.uniform and not self.keys_only

    def check(self, ctx: CheckContext) -> None:
        from ...data_parallel import check_batch

        config = ctx.config
        check_compressible(config)
        if self.train:
            check_batch(self.batch_size)
        head_dim, step = self.head_dim_and_step(config)
        if step > head_dim:
            raise UserError(f"rank step {step} is larger than head_dim {head_dim}")
        if head_dim % step:
            divisors = [d for d in range(1, head_dim + 1) if head_dim % d == 0]
            raise UserError(
                f"--rank-step {step} does not divide head_dim {head_dim}; choose one of {', '.join(map(str, divisors))}"
            )
        if self.k_init == "rotary-pairs" and step % 2:
            raise UserError(
                f"--k-init rotary-pairs keeps whole frequency pairs, so --rank-step must be even, not {step}"
            )
        if self.layers == "full-attention":
            if self.searches:
                raise UserError(
                    "--layers full-attention takes --uniform or --keys-only: the rank search moves ranks across "
                    "every layer"
                )
            if not any(self.whole_layers(config)):
                raise UserError(
                    "--layers full-attention needs a model with sliding-window layers (Gemma3); this one has none"
                )
        if self.keys_only and self.exact_values:
            raise UserError(
                "--exact-values keeps v_proj/o_proj for projected values, and --keys-only projects none: drop one"
            )
        if self.keys_only and (2 * self.budget - 1) * head_dim < step:
            raise UserError(
                f"--keys-only keeps every value dim, so --budget must leave the keys at least one rank step "
                f"({step} of {head_dim} dims): above {0.5 + step / (2 * head_dim):g}, not {self.budget:g}"
            )
        self.check_positions(config.get("max_position_embeddings"))
        if self.budget < step / head_dim:
            raise UserError(
                f"--budget {self.budget:g} is below the smallest reachable, one rank step ({step} of {head_dim} dims) "
                f"per head: {step / head_dim:g}; lower --rank-step for smaller budgets"
            )

    def check_positions(self, context: int | None) -> None:
        """--positions places every window whole (at least the longest) within the model's `context`, if known."""
        if not self.positions:
            return
        longest = max(c.seq_len for c in self.windows())
        if self.positions < longest:
            raise UserError(
                f"--positions {self.positions} is shorter than the {longest}-token calibration windows it places: "
                f"give at least {longest} (or 0 to keep every window at position 0)"
            )
        if context and self.positions > context:
            raise UserError(
                f"--positions {self.positions} is beyond the model's context of {context} tokens "
                "(max_position_embeddings)"
            )

    def whole_layers(self, config: dict) -> list[bool] | None:
        """Per layer, whether it keeps its KV whole: under --layers full-attention, the sliding-window ones."""
        if self.layers == "all":
            return None
        return [kind == "sliding_attention" for kind in config.get("layer_types") or []]

    def head_dim_and_step(self, config: dict) -> tuple[int, int]:
        """(head_dim, rank step) for a config.json: the step is --rank-step, else head_dim / 8."""
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        return head_dim, self.rank_step or max(1, head_dim // 8)

    def config_after(self, config: dict) -> dict:
        layouts = config.get("attention_layout") or [{} for _ in range(config["num_hidden_layers"])]
        return config | {"attention_layout": [layout | {"k": layout.get("k") or [0]} for layout in layouts]}

    def apply_(self, model, run) -> KVCompressReport:
        from .maths import kv_compress_

        batches = {
            "pca": run.windows(self.calib),
            "train": run.windows(self.train_calib) if self.train else None,
            "search": run.windows(self.search_calib) if self.searches else None,
        }
        report = kv_compress_(model.model, self, batches, sharded=run.sharded)
        return KVCompressReport(**report, calibration_tokens=int(batches["pca"].numel()))


def check_compressible(config: dict) -> None:
    for layout in config.get("attention_layout") or []:
        if layout.get("k"):
            raise UserError("this model's KV cache is already compressed by kv-compress")
        if layout.get("qk"):
            raise UserError(
                "kv-compress needs full q/k heads; this model had Q-K frequency pairs dropped by absorb"
            )
