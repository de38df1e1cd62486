"""The passes a recipe can name: their options (spelled as on the command line) and how each runs.

A pass slots in with one `PassSpec` in `PASSES` (and its options class in `recipe.PassEntry`); the recipe
runner and the pass commands read everything else from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import defaults
from .calibration import CalibConfig, calibration_batches
from .errors import UserError, first_line


class PassOptions(BaseModel):
    """Options every pass takes: the calibration overrides (recipe-level `calibration` fills the rest)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=False, frozen=True, allow_inf_nan=False)

    calib: str | None = Field(None, description="calibration source (default: the recipe's)")
    calib_samples: int | None = Field(None, alias="calib-samples", gt=0)
    calib_seq_len: int | None = Field(None, alias="calib-seq-len", gt=1)
    seed: int | None = None

    def calib_config(self, recipe_calib: dict, default: CalibConfig) -> CalibConfig:
        values = default.model_dump() | {k: v for k, v in recipe_calib.items() if v is not None}
        mine = {"source": self.calib, "samples": self.calib_samples, "seq_len": self.calib_seq_len, "seed": self.seed}
        return CalibConfig(**(values | {k: v for k, v in mine.items() if v is not None}))


class PruneBiOptions(PassOptions):
    pass_: Literal["prune-bi"] = Field(alias="pass")
    remove: int | None = None
    ratio: float | None = None
    metric: Literal["bi", "angular"] = "bi"
    block: bool = False


class RotateSparsifyOptions(PassOptions):
    pass_: Literal["rotate-sparsify"] = Field(alias="pass")
    sparsity: float
    method: Literal["larosa", "magnitude"] = "larosa"
    split: tuple[float, float] = (0.8, 1.2)
    damp: float = 0.01


class AbsorbOptions(PassOptions):
    pass_: Literal["absorb"] = Field(alias="pass")
    threshold: float | None = None
    keep_ratio: float | None = Field(None, alias="keep-ratio")
    rank: int | None = None
    pairs: list[Literal["vo", "qk"]] = ["vo"]
    criterion: Literal["whitened", "weight", "norm"] = "whitened"
    damp: float = 0.01


class KVCompressOptions(PassOptions):
    pass_: Literal["kv-compress"] = Field(alias="pass")
    budget: float
    train: bool = True
    uniform: bool = False
    train_steps: int = Field(defaults.KV_TRAIN_STEPS, alias="train-steps")
    lr: float = defaults.KV_LR
    batch_size: int = Field(defaults.KV_BATCH_SIZE, alias="batch-size")
    rank_step: int | None = Field(None, alias="rank-step")
    v_init: Literal["pca", "vo"] = Field("pca", alias="v-init")
    train_samples: int = Field(defaults.KV_TRAIN_WINDOWS[0], alias="train-samples", gt=0)
    train_seq_len: int = Field(defaults.KV_TRAIN_WINDOWS[1], alias="train-seq-len", gt=1)
    search_samples: int = Field(defaults.KV_SEARCH_WINDOWS[0], alias="search-samples", gt=0)
    search_seq_len: int = Field(defaults.KV_SEARCH_WINDOWS[1], alias="search-seq-len", gt=1)


class HealOptions(PassOptions):
    pass_: Literal["heal"] = Field(alias="pass")
    teacher: str | None = Field(None, description="the model to distil from (default: the recipe's input model)")
    steps: int = Field(defaults.HEAL_STEPS, gt=0)
    lr: float = Field(defaults.HEAL_LR, gt=0)
    batch_size: int = Field(defaults.HEAL_BATCH_SIZE, alias="batch-size", gt=0)
    train: list[str] = list(defaults.HEAL_TRAIN)
    removed: list[int] | None = None


# ----------------------------------------------------------------------------- per-pass config + apply


def _prune_check(cfg, config: dict, folder, earlier: list, input_config: dict) -> None:
    cfg.n_remove(config["num_hidden_layers"])


def _prune_config(o: PruneBiOptions, calib: dict):
    from .passes.block_influence import BlockInfluenceConfig

    return BlockInfluenceConfig(remove=o.remove, ratio=o.ratio, metric=o.metric, block=o.block,
                                calib=o.calib_config(calib, BlockInfluenceConfig.model_fields["calib"].default))


def _prune_apply(loaded, cfg, dry_run: bool = False) -> dict:
    from .arch import decoder_layers
    from .passes.block_influence import remove_layers_, score_layers

    batches = calibration_batches(loaded.tokenizer, cfg.calib)
    n_layers = len(decoder_layers(loaded.model))
    scores, removed = score_layers(loaded.model, batches, cfg)
    if not dry_run:
        remove_layers_(loaded.model, removed)
    return {"scores": scores, "score_kind": "angular distance" if cfg.metric == "angular" else "block influence", "removed_layers": removed,
            "layers_before": n_layers, "layers_after": n_layers - len(removed), "calibration_tokens": int(batches.numel())}


def _rotate_config(o: RotateSparsifyOptions, calib: dict):
    from .passes.larosa import RotateSparsifyConfig

    return RotateSparsifyConfig(sparsity=o.sparsity, method=o.method, split=o.split, damp=o.damp,
                                calib=o.calib_config(calib, RotateSparsifyConfig.model_fields["calib"].default))


def _rotate_apply(loaded, cfg) -> dict:
    from .passes.larosa import rotate_sparsify_

    batches = calibration_batches(loaded.tokenizer, cfg.calib) if cfg.method == "larosa" else None
    return rotate_sparsify_(loaded.model, batches, cfg)


def _absorb_config(o: AbsorbOptions, calib: dict):
    from .passes.absorb_decompose import AbsorbConfig

    return AbsorbConfig(threshold=o.threshold, keep_ratio=o.keep_ratio, rank=o.rank, pairs=tuple(o.pairs), criterion=o.criterion,
                        damp=o.damp, calib=o.calib_config(calib, AbsorbConfig.model_fields["calib"].default))


def _absorb_apply(loaded, cfg, dry_run: bool = False) -> dict:
    from .passes.absorb_decompose import absorb_decompose_, v_input_covariances

    batches = calibration_batches(loaded.tokenizer, cfg.calib) if cfg.needs_calibration else None
    report = absorb_decompose_(loaded.model, None if batches is None else v_input_covariances(loaded.model, batches), cfg, apply=not dry_run)
    if batches is not None:
        report["calibration_tokens"] = int(batches.numel())
    return report


def _kv_config(o: KVCompressOptions, calib: dict):
    from .passes.matryoshka_kv import KVCompressConfig

    pca = o.calib_config(calib, KVCompressConfig.model_fields["calib"].default)
    return KVCompressConfig(
        budget=o.budget, train=o.train, uniform=o.uniform, train_steps=o.train_steps, lr=o.lr, batch_size=o.batch_size,
        rank_step=o.rank_step, v_init=o.v_init, seed=pca.seed, calib=pca,
        train_calib=CalibConfig(source=pca.source, samples=o.train_samples, seq_len=o.train_seq_len, seed=pca.seed + 1),
        search_calib=CalibConfig(source=pca.source, samples=o.search_samples, seq_len=o.search_seq_len, seed=pca.seed + 2))


def _kv_apply(loaded, cfg) -> dict:
    from .passes.matryoshka_kv import kv_compress_

    tok = loaded.tokenizer
    batches = {"pca": calibration_batches(tok, cfg.calib), "train": calibration_batches(tok, cfg.train_calib) if cfg.train else None,
               "search": calibration_batches(tok, cfg.search_calib) if not cfg.uniform else None}
    return kv_compress_(loaded.model, cfg, batches)


def _heal_config(o: HealOptions, calib: dict):
    from .passes.heal import HealConfig

    return HealConfig(teacher=o.teacher, steps=o.steps, lr=o.lr, batch_size=o.batch_size, train=tuple(o.train),
                      removed=tuple(o.removed) if o.removed is not None else None, seed=o.seed or 0,
                      calib=o.calib_config(calib, HealConfig.model_fields["calib"].default))


def _heal_apply(loaded, cfg) -> dict:
    from .passes.heal import heal_loaded_

    return heal_loaded_(loaded, cfg, loaded.pending)


def _heal_check(cfg, config: dict, folder, earlier: list, input_config: dict) -> None:
    """The teacher (given; the history's source when heal comes first; else the input) and the layer counts, before any work."""
    from .arch import arch_for_model_type
    from .model_io import peek_config, read_history

    arch_for_model_type(config.get("model_type"))
    n_student = config["num_hidden_layers"]
    teacher = cfg.teacher
    if teacher is None and not earlier:
        history = read_history(folder) if folder is not None else None
        if not history or not history["passes"]:
            raise UserError("give --teacher (the model before pruning): this model has no llmsurgery history naming its source")
        teacher = history["source"].get("id")
    if teacher is None:
        teacher_config = input_config  # the input model, as loaded before the earlier passes
    else:
        try:
            teacher_config, teacher_folder, _ = peek_config(str(teacher))
        except UserError as exc:
            raise UserError(f"teacher {teacher}: {exc}") from None
        if not earlier and folder is not None and teacher_folder is not None and Path(teacher_folder).resolve() == Path(folder).resolve():
            raise UserError(f"the teacher {teacher} is the model being healed; give the model before pruning")
    if teacher_config.get("model_type") != config.get("model_type"):
        raise UserError(f"the teacher is {teacher_config.get('model_type')}, the student {config.get('model_type')}")
    if teacher_config.get("vocab_size") != config.get("vocab_size"):
        raise UserError(f"the teacher's vocabulary ({teacher_config.get('vocab_size')}) differs from the student's ({config.get('vocab_size')})")
    n_teacher = teacher_config["num_hidden_layers"]
    if cfg.removed is not None:
        if len(set(cfg.removed)) != len(cfg.removed) or any(not 0 <= i < n_teacher for i in cfg.removed):
            raise UserError(f"--removed should name distinct layers of the teacher's {n_teacher} (0 to {n_teacher - 1})")
        if n_student + len(cfg.removed) != n_teacher:
            raise UserError(f"the teacher has {n_teacher} layers, the student {n_student}: removing {sorted(cfg.removed)} does not match")
    elif n_student > n_teacher:
        raise UserError(f"the student has more layers ({n_student}) than the teacher ({n_teacher})")


def _rotate_check(cfg, config: dict, folder, earlier: list, input_config: dict) -> None:
    from .modeling import uses_surgery_modeling
    from .passes.larosa import check_foldable

    check_foldable(config.get("model_type"))
    if config.get("sparsity_in") is not None or (config.get("auto_map") and not uses_surgery_modeling(config)):
        raise UserError("rotate-sparsify needs a dense model (this one is already sparse or carries foreign code)")


def _absorb_check(cfg, config: dict, folder, earlier: list, input_config: dict) -> None:
    from .passes.absorb_decompose import check_absorbable

    check_absorbable(config.get("model_type"), cfg, config)


def _kv_check(cfg, config: dict, folder, earlier: list, input_config: dict) -> None:
    from .passes.matryoshka_kv import check_compressible

    check_compressible(config)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    step = cfg.rank_step or max(1, head_dim // 8)
    if step > head_dim:
        raise UserError(f"rank step {step} is larger than head_dim {head_dim}")
    if head_dim % step:
        divisors = [d for d in range(1, head_dim + 1) if head_dim % d == 0]
        raise UserError(f"--rank-step {step} does not divide head_dim {head_dim}; choose one of {', '.join(map(str, divisors))}")
    if cfg.budget < step / head_dim:
        raise UserError(f"--budget {cfg.budget:g} is below the smallest reachable, one rank step ({step} of {head_dim} dims) "
                        f"per head: {step / head_dim:g}; lower --rank-step for smaller budgets")


def _kv_calibration(cfg) -> list[CalibConfig]:
    return [cfg.calib] + ([cfg.train_calib] if cfg.train else []) + ([cfg.search_calib] if not cfg.uniform else [])


def _heal_calibration(cfg) -> list[CalibConfig]:
    from .passes.heal import VALIDATION_WINDOWS

    return [cfg.calib.model_copy(update={"samples": cfg.calib.samples + VALIDATION_WINDOWS})]


@dataclass(frozen=True)
class PassSpec:
    """One pass as recipes see it: options (CLI names), config builder, in-place apply, history name."""

    options: type[PassOptions]
    build: Callable[[Any, dict], BaseModel]
    apply: Callable[[Any, BaseModel], dict]
    record_name: str
    # Everything checkable from config.json before loading: (config, the model's config.json as the passes before leave it,
    # folder or None, the passes before, the input's config.json).
    check: Callable[[BaseModel, dict, Any, list, dict], None] | None = None
    # The calibration windows the pass will draw with this config (none: it needs no data).
    calibration: Callable[[BaseModel], list[CalibConfig]] = lambda cfg: [cfg.calib]


PASSES: dict[str, PassSpec] = {
    "prune-bi": PassSpec(PruneBiOptions, _prune_config, _prune_apply, "block_influence", _prune_check),
    "rotate-sparsify": PassSpec(RotateSparsifyOptions, _rotate_config, _rotate_apply, "rotate_sparsify", _rotate_check,
                                lambda cfg: [cfg.calib] if cfg.method == "larosa" else []),
    "absorb": PassSpec(AbsorbOptions, _absorb_config, _absorb_apply, "absorb", _absorb_check,
                       lambda cfg: [cfg.calib] if cfg.needs_calibration else []),
    "kv-compress": PassSpec(KVCompressOptions, _kv_config, _kv_apply, "kv_compress", _kv_check, _kv_calibration),
    "heal": PassSpec(HealOptions, _heal_config, _heal_apply, "heal", _heal_check, _heal_calibration),
}


def check_passes(steps: list[tuple[str, BaseModel]], config: dict, folder, trust_remote_code: bool,
                 where=lambda i, name: "") -> list[Path]:
    """Everything about the passes that can be told before loading weights: each pass's own check, then the calibration.

    Returns what the passes read besides the model (calibration files, teacher folders): no output may replace them.
    """
    current = config
    for i, (name, cfg) in enumerate(steps):
        try:
            if PASSES[name].check is not None:
                PASSES[name].check(cfg, current, folder, steps[:i], config)
            current = config_after(name, cfg, current)
        except UserError as exc:
            raise UserError(f"{where(i, name)}{exc}") from None
    check_calibration(folder, steps, trust_remote_code)
    return pass_inputs(steps)


def config_after(name: str, cfg: BaseModel, config: dict) -> dict:
    """config.json as a pass will leave it, in what the later passes' checks read: layer count, sparsity, key layout."""
    after = dict(config)
    layers = config["num_hidden_layers"]
    layouts = [dict(layout) for layout in config.get("attention_layout") or [{} for _ in range(layers)]]
    if name == "prune-bi":
        after["num_hidden_layers"] = layers - cfg.n_remove(layers)
    elif name == "rotate-sparsify":
        after["sparsity_in"] = cfg.sparsity_in
    elif name == "kv-compress":
        after["attention_layout"] = [layout | {"k": layout.get("k") or [0]} for layout in layouts]
    elif name == "absorb" and "qk" in cfg.pairs:
        after["attention_layout"] = [layout | {"qk": layout.get("qk") or [[]]} for layout in layouts]
    return after


def pass_inputs(steps: list[tuple[str, BaseModel]]) -> list[Path]:
    """Local files and folders the passes read: calibration files and given teachers (built-ins: their cached folder)."""
    from .sources import local_folder, resolve_source

    found = {Path(c.source).expanduser() for name, cfg in steps for c in PASSES[name].calibration(cfg)
             if Path(c.source).expanduser().is_file()}
    for name, cfg in steps:
        if name == "heal" and cfg.teacher:
            folder = local_folder(resolve_source(cfg.teacher))
            found |= {folder} if folder is not None else set()
    return sorted(found)


def check_calibration(folder, steps: list[tuple[str, BaseModel]], trust_remote_code: bool) -> None:
    """Every calibration source holds the windows the passes will ask of it, counted with the model's own tokenizer."""
    from .calibration import check_calibration_sizes

    needs = [c for name, cfg in steps for c in PASSES[name].calibration(cfg)]
    if folder is None or not needs:
        return
    from transformers import AutoTokenizer

    from .console import quiet_transformers

    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - a tokenizer that cannot load is bad input
        raise UserError(f"could not load the tokenizer of {folder}: {first_line(exc)}") from None
    check_calibration_sizes(tokenizer, needs)

def run_passes(loaded, steps: list[tuple[str, BaseModel]], *, dry_run: bool = False,
               on_report: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Apply passes in order, appending each history record to `loaded.pending`; returns those records.

    A heal after other passes with no teacher of its own distils towards the model as loaded: a second
    module tree over the same tensors (`heal.shared_copy`), made before the first pass and dropped after
    the last. A heal that comes first finds its teacher itself (`heal.heal_loaded_`).
    dry_run: only the first pass, told not to change the model (prune --scores-only, absorb --dry-run).
    """
    import time

    from .model_io import pass_record

    if any(name == "heal" and not cfg.teacher and i > 0 for i, (name, cfg) in enumerate(steps)):
        from .passes.heal import shared_copy

        loaded.original = shared_copy(loaded.model)
    try:
        for i, (name, cfg) in enumerate(steps):
            spec = PASSES[name]
            started = time.perf_counter()
            report = spec.apply(loaded, cfg, dry_run=True) if dry_run else spec.apply(loaded, cfg)
            so_far = {"passes": [*loaded.history.get("passes", []), *loaded.pending]}
            loaded.pending.append(pass_record(spec.record_name, cfg.model_dump(), report, time.perf_counter() - started, so_far))
            if on_report is not None:
                on_report(i, report)
            if dry_run:
                break
    finally:
        loaded.original = None
    return loaded.pending


_FIELD_TO_OPTION = {"keep_ratio": "keep-ratio", "train_steps": "train-steps", "batch_size": "batch-size", "rank_step": "rank-step",
                    "v_init": "v-init", "samples": "calib-samples", "seq_len": "calib-seq-len", "source": "calib"}


def build_pass_config(index: int, options: PassOptions, calib: dict) -> BaseModel:
    """The pass's own validated config, errors located as `passes[i].option: message`."""
    spec = PASSES[options.pass_]
    try:
        return spec.build(options, calib)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(_FIELD_TO_OPTION.get(str(p), str(p)) for p in first["loc"] if p != "calib")
        where = f"passes[{index}]" + (f".{field}" if field else "")
        raise UserError(f"{where}: {first['msg'].removeprefix('Value error, ')}") from None
