"""The `llmsurgery` command line: parse, validate, call the library, print a summary."""

from __future__ import annotations

import functools
import json
import math
import sys
import traceback
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.table import Table

from . import __version__
from .console import err, out
from .errors import GateFailed, UserError

app = typer.Typer(
    help="Model surgery and compression for causal language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
_state = {"debug": False}

IO, LOAD, CALIB, EVAL = "Input / output", "Loading", "Calibration", "Evaluation"
ModelArg = Annotated[str, typer.Argument(help="A model folder, a .gguf file, a built-in name (smollm2-135m, gemma3-270m) or a hub id.", show_default=False)]
DtypeOpt = Annotated[str, typer.Option(help="float32, bfloat16 or float16.", rich_help_panel=LOAD)]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda or auto.", rich_help_panel=LOAD)]
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Run modeling code shipped with a model not written by llmsurgery.", rich_help_panel=LOAD)]
OutputOpt = Annotated[Path, typer.Option("--output", "-o", help="Folder to write the model to (must not exist).", rich_help_panel=IO, show_default=False)]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output folder.", rich_help_panel=IO)]
JsonOpt = Annotated[Optional[Path], typer.Option("--json", help="Also write the results as JSON to this file.", rich_help_panel=IO)]


def _version(value: bool) -> None:
    if value:
        out.print(f"llmsurgery {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    _state["debug"] = debug


def handles_errors(fn: Callable) -> Callable:
    """Bad input -> one line on stderr and exit 2; a failed gate -> exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            if _state["debug"]:
                traceback.print_exc()
            err.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except GateFailed as exc:
            err.print(f"[bold red]gate failed:[/bold red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("interrupted; nothing was written")
            raise typer.Exit(130) from None

    return wrapper


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.4e}"


def print_metrics(rows: list[dict], model: str, baseline: str | None) -> None:
    table = Table(title="Evaluation", show_lines=False)
    for column in ("task", "metric", model):
        table.add_column(column, justify="right" if column == model else "left")
    if baseline:
        for column in (f"{baseline} (baseline)", "diff", "ratio"):
            table.add_column(column, justify="right")
    for row in rows:
        cells = [row["task"], row["metric"], _fmt(row["value"])]
        if baseline:
            cells += [_fmt(row.get("baseline")), _fmt(row.get("diff")), _fmt(row.get("ratio"))]
        table.add_row(*cells)
    out.print(table)


def write_json(path: Path | None, payload: dict) -> None:
    if path is not None:
        path.write_text(json.dumps(payload, indent=2, default=str))
        err.print(f"wrote {path}")


@app.command("eval")
@handles_errors
def eval_cmd(
    model: ModelArg,
    tasks: Annotated[str, typer.Option(help="Comma-separated tasks: news_ppl, pydoc_ppl, news_cloze, or lm-eval names.", rich_help_panel=EVAL)] = "news_ppl,news_cloze",
    baseline: Annotated[Optional[str], typer.Option(help="A second model scored side by side.", rich_help_panel=EVAL)] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Score only the first N documents of each task.", rich_help_panel=EVAL)] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="lm-eval batch size.", rich_help_panel=EVAL)] = 8,
    load_in_8bit: Annotated[bool, typer.Option("--load-in-8bit", help="Quantize to int8 with bitsandbytes while loading.", rich_help_panel=LOAD)] = False,
    load_in_4bit: Annotated[bool, typer.Option("--load-in-4bit", help="Quantize to NF4 with bitsandbytes while loading.", rich_help_panel=LOAD)] = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    trust_remote_code: TrustOpt = False,
    json_path: JsonOpt = None,
) -> None:
    """Score MODEL with lm-eval, offline built-in tasks included; with --baseline, side by side."""
    from .evaluate import check_tasks, compare, evaluate_model, parse_tasks
    from .model_io import load_model

    task_list = parse_tasks(tasks)
    manager = check_tasks(task_list)
    load = functools.partial(load_model, dtype=dtype, device=device, load_in_8bit=load_in_8bit,
                             load_in_4bit=load_in_4bit, trust_remote_code=trust_remote_code)
    base_metrics = None
    if baseline:
        base_metrics = evaluate_model(load(baseline), task_list, limit=limit, batch_size=batch_size, manager=manager)
    metrics = evaluate_model(load(model), task_list, limit=limit, batch_size=batch_size, manager=manager)
    rows = compare(metrics, base_metrics)
    print_metrics(rows, model, baseline)
    write_json(json_path, {"model": model, "baseline": baseline, "tasks": task_list, "limit": limit, "results": rows})


CalibOpt = Annotated[str, typer.Option("--calib", help="Calibration text: news, pydoc, a .txt/.jsonl file, or hf:NAME[@CONFIG]:SPLIT[:FIELD].", rich_help_panel=CALIB)]
SamplesOpt = Annotated[int, typer.Option("--calib-samples", min=1, help="Number of calibration windows.", rich_help_panel=CALIB)]
SeqLenOpt = Annotated[int, typer.Option("--calib-seq-len", min=2, help="Tokens per calibration window.", rich_help_panel=CALIB)]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed choosing the calibration windows.", rich_help_panel=CALIB)]
EvalTasksOpt = Annotated[Optional[str], typer.Option("--eval", help="Score the transformed model on these tasks, the original as baseline.", rich_help_panel=EVAL)]
EvalLimitOpt = Annotated[Optional[int], typer.Option("--eval-limit", min=1, help="Documents per task for --eval.", rich_help_panel=EVAL)]


def _eval_plan(eval_tasks: str | None):
    """(tasks, task manager) for --eval, checked before any model loads; (None, None) without it."""
    from .evaluate import check_tasks, parse_tasks

    tasks = parse_tasks(eval_tasks) if eval_tasks else None
    return tasks, (check_tasks(tasks) if tasks else None)


def _eval_after_pass(loaded, plan, limit: int | None, baseline, column: str, original: str) -> list[dict]:
    """Score the transformed in-memory model, print it beside the baseline, return the rows."""
    from .evaluate import compare, evaluate_model

    tasks, manager = plan
    rows = compare(evaluate_model(loaded, tasks, limit=limit, manager=manager, label=f"the {column} model"), baseline)
    print_metrics(rows, column, original)
    return rows


def _pydantic_error(exc) -> UserError:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return UserError(f"{where + ': ' if where else ''}{first['msg'].removeprefix('Value error, ')}")


@app.command()
@handles_errors
def prune(
    model: ModelArg,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Folder to write the pruned model to.", rich_help_panel=IO, show_default=False)] = None,
    bi: Annotated[bool, typer.Option("--bi", help="Block-Influence layer removal (ShortGPT); the only method for now.")] = True,
    remove: Annotated[Optional[int], typer.Option("--remove", help="Number of layers to remove.", show_default=False)] = None,
    ratio: Annotated[Optional[float], typer.Option("--ratio", help="Fraction of layers to remove, in (0, 1).", show_default=False)] = None,
    metric: Annotated[str, typer.Option(help="bi (ShortGPT, per layer) or angular (Gromov et al., needs --block).")] = "bi",
    block: Annotated[bool, typer.Option("--block", help="Remove one contiguous block of layers.")] = False,
    scores_only: Annotated[bool, typer.Option("--scores-only", help="Print the layer scores; write no model.")] = False,
    plot: Annotated[Optional[Path], typer.Option(help="Save the score chart as a PNG.", rich_help_panel=IO)] = None,
    eval_tasks: EvalTasksOpt = None,
    eval_limit: EvalLimitOpt = None,
    calib: CalibOpt = "news",
    calib_samples: SamplesOpt = 8,
    calib_seq_len: SeqLenOpt = 512,
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    trust_remote_code: TrustOpt = False,
    json_path: JsonOpt = None,
) -> None:
    """Remove the least influential decoder layers and write a standard checkpoint."""
    import time

    from pydantic import ValidationError

    from .calibration import CalibConfig, calibration_batches
    from .evaluate import evaluate_model
    from .model_io import check_output_free, load_model, pass_record, peek_config, save_model
    from .passes.block_influence import BlockInfluenceConfig, remove_layers_, score_layers
    from .plotting import save_score_plot, score_table

    if not bi:
        raise UserError("only --bi (Block Influence) pruning exists for now")
    if metric not in ("bi", "angular"):
        raise UserError(f"unknown metric '{metric}'; choose bi or angular")
    try:
        cfg = BlockInfluenceConfig(remove=remove, ratio=ratio, metric=metric, block=block,
                                   calib=CalibConfig(source=calib, samples=calib_samples, seq_len=calib_seq_len, seed=seed))
    except ValidationError as exc:
        raise _pydantic_error(exc) from None
    if output is None and not scores_only:
        raise UserError("give --output DIR, or --scores-only to only print the scores")
    config, folder, _ = peek_config(model, trust_remote_code)
    n_layers = config["num_hidden_layers"]
    cfg.n_remove(n_layers)
    if not scores_only:
        check_output_free(output, force, folder)
    plan = _eval_plan(eval_tasks)
    tasks, manager = plan
    loaded = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    started = time.perf_counter()
    batches = calibration_batches(loaded.tokenizer, cfg.calib)
    scores, removed = score_layers(loaded.model, batches, cfg)
    seconds = time.perf_counter() - started
    label, index_label = ("angular distance", "block start") if metric == "angular" else ("block influence", "layer")
    out.print(score_table(scores, [removed[0]] if metric == "angular" else removed, label, index_label))
    out.print(f"layers to remove (0-based): {removed}  ({n_layers} -> {n_layers - len(removed)} layers)")
    if plot is not None:
        save_score_plot(plot, scores, [removed[0]] if metric == "angular" else removed, label, index_label)
        err.print(f"wrote {plot}")
    report = {"scores": scores, "score_kind": label, "removed_layers": removed, "layers_before": n_layers,
              "layers_after": n_layers - len(removed), "calibration_tokens": int(batches.numel())}
    payload: dict = {"model": model, "config": cfg.model_dump(), **report}
    if not scores_only:
        baseline = evaluate_model(loaded, tasks, limit=eval_limit, manager=manager) if tasks else None
        remove_layers_(loaded.model, removed)
        record = pass_record("block_influence", cfg.model_dump(), report, seconds, loaded.history)
        if tasks:
            rows = _eval_after_pass(loaded, plan, eval_limit, baseline, "pruned", model)
            record["report"]["eval"] = rows
            payload["eval"] = rows
        save_model(loaded, output, force=force, new_passes=[record])
        out.print(f"saved the {n_layers - len(removed)}-layer model to {output}")
    write_json(json_path, payload)


def _parse_split(text: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--split wants two numbers A,B (multipliers of --sparsity), got '{text}'") from None
    return a, b


@app.command("rotate-sparsify")
@handles_errors
def rotate_sparsify(
    model: ModelArg,
    sparsity: Annotated[float, typer.Option(help="Target sparsity S in [0, 1).", show_default=False)],
    output: OutputOpt,
    method: Annotated[str, typer.Option(help="larosa (rotated Top-K) or magnitude (Top-K without rotation).")] = "larosa",
    split: Annotated[str, typer.Option(help="A,B: q/k/v+gate/up inputs at A*S, o_proj/down_proj inputs at B*S.")] = "0.8,1.2",
    damp: Annotated[float, typer.Option(help="Covariance damping, a fraction of the mean eigenvalue.")] = 0.01,
    eval_tasks: EvalTasksOpt = None,
    eval_limit: EvalLimitOpt = None,
    calib: CalibOpt = "news",
    calib_samples: SamplesOpt = 40,  # 40 x 512 measured better than the paper's 10 x 2048 here (README)
    calib_seq_len: SeqLenOpt = 512,
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    trust_remote_code: TrustOpt = False,
    json_path: JsonOpt = None,
) -> None:
    """LaRoSA: fold layerwise rotations into the weights and Top-K the layer inputs per token."""
    import time

    from pydantic import ValidationError

    from .calibration import CalibConfig, calibration_batches
    from .evaluate import evaluate_model
    from .model_io import check_output_free, load_model, pass_record, peek_config, save_model
    from .modeling import uses_surgery_modeling
    from .passes.larosa import RotateSparsifyConfig, check_foldable, rotate_sparsify_

    if method not in ("larosa", "magnitude"):
        raise UserError(f"unknown method '{method}'; choose larosa or magnitude")
    try:
        cfg = RotateSparsifyConfig(sparsity=sparsity, method=method, split=_parse_split(split), damp=damp,
                                   calib=CalibConfig(source=calib, samples=calib_samples, seq_len=calib_seq_len, seed=seed))
    except ValidationError as exc:
        raise _pydantic_error(exc) from None
    config, folder, _ = peek_config(model, trust_remote_code)
    check_foldable(config.get("model_type"))
    if config.get("auto_map") and (not uses_surgery_modeling(config) or config.get("sparsity_in") is not None):
        raise UserError(f"{model} is already sparse or carries foreign modeling code; rotate-sparsify needs a dense model")
    check_output_free(output, force, folder)
    plan = _eval_plan(eval_tasks)
    tasks, manager = plan
    loaded = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    baseline = evaluate_model(loaded, tasks, limit=eval_limit, manager=manager) if tasks else None
    started = time.perf_counter()
    batches = calibration_batches(loaded.tokenizer, cfg.calib) if method == "larosa" else None
    report = rotate_sparsify_(loaded.model, batches, cfg)
    record = pass_record("rotate_sparsify", cfg.model_dump(), report, time.perf_counter() - started, loaded.history)
    table = Table(title=f"rotate-sparsify ({method})", show_header=False)
    for key in ("sparsity_in", "sparsity_out", "effective_sparsity", "rotated", "calibration_tokens"):
        if key in report:
            table.add_row(key.replace("_", " "), _fmt(report[key]) if isinstance(report[key], float) else str(report[key]))
    out.print(table)
    if tasks:
        record["report"]["eval"] = _eval_after_pass(loaded, plan, eval_limit, baseline, "sparse", model)
    save_model(loaded, output, force=force, new_passes=[record])
    out.print(f"saved the sparse model to {output} (load with trust_remote_code=True)")
    write_json(json_path, {"model": model, "config": cfg.model_dump(), **record["report"]})


def _parse_pairs(text: str) -> tuple[str, ...]:
    pairs = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in pairs if p not in ("vo", "qk")]
    if unknown or not pairs:
        raise UserError(f"--pairs takes vo and/or qk (comma-separated), got '{text}'")
    return pairs


def absorb_table(report: dict) -> Table:
    """Per layer: V and Q-K widths kept per KV head, attention parameters, and the spectrum's spread."""
    table = Table(title="absorb-decompose (per layer; widths per KV head)")
    for column in ("layer", "v kept", "v dropped", "qk kept", "attention params", "after", "σ_min/σ_max"):
        table.add_column(column, justify="right")
    for row in report["layers"]:
        dropped = sum(row["v_before"]) - sum(row["v_after"])
        spreads = [s[-1] / s[0] for s in row["spectra"] if s and s[0] > 0]
        table.add_row(str(row["layer"]), ",".join(map(str, row["v_after"])), str(dropped), ",".join(map(str, row["qk_after"])),
                      f"{row['params_before']:,}", f"{row['params_after']:,}", f"{min(spreads):.2e}" if spreads else "-")
    before, after = report["attention_params_before"], report["attention_params_after"]
    table.add_row("all", "", "", "", f"{before:,}", f"{after:,} (-{100 * report['attention_reduction']:.1f}%)", "", style="bold")
    return table


@app.command()
@handles_errors
def absorb(
    model: ModelArg,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Folder to write the model to.", rich_help_panel=IO, show_default=False)] = None,
    threshold: Annotated[Optional[float], typer.Option(help="Drop directions below T x the head's largest singular value.", show_default=False)] = None,
    keep_ratio: Annotated[Optional[float], typer.Option(help="Keep this fraction of every KV head's directions.", show_default=False)] = None,
    rank: Annotated[Optional[int], typer.Option(help="Keep at most r directions per KV head (qk: r dims).", show_default=False)] = None,
    pairs: Annotated[str, typer.Option(help="vo (exact absorb-decompose) and/or qk (drops RoPE frequency pairs: lossy).")] = "vo",
    criterion: Annotated[str, typer.Option(help="whitened (calibration-aware SVD), weight (CLOVER's weight-only SVD) or norm (vanilla dim dropping).")] = "whitened",
    damp: Annotated[float, typer.Option(help="Covariance damping, a fraction of its mean diagonal.")] = 0.01,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the per-layer table; write no model.")] = False,
    plot: Annotated[Optional[Path], typer.Option(help="Save the singular-value spectra as a PNG.", rich_help_panel=IO)] = None,
    eval_tasks: EvalTasksOpt = None,
    eval_limit: EvalLimitOpt = None,
    calib: CalibOpt = "news",
    calib_samples: SamplesOpt = 16,
    calib_seq_len: SeqLenOpt = 512,
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    trust_remote_code: TrustOpt = False,
    json_path: JsonOpt = None,
) -> None:
    """Absorb-Decompose (CLOVER): re-factor attention V-O pairs by SVD and drop their weakest directions.

    Without --threshold/--keep-ratio/--rank only directions of zero singular value go (lossless).
    """
    import time

    from pydantic import ValidationError

    from .calibration import CalibConfig, calibration_batches
    from .evaluate import evaluate_model
    from .model_io import check_output_free, load_model, pass_record, peek_config, save_model
    from .modeling import uses_surgery_modeling
    from .passes.absorb_decompose import AbsorbConfig, absorb_decompose_, check_absorbable, v_input_covariances
    from .plotting import save_spectra_plot

    if criterion not in ("whitened", "weight", "norm"):
        raise UserError(f"unknown criterion '{criterion}'; choose whitened, weight or norm")
    try:
        cfg = AbsorbConfig(threshold=threshold, keep_ratio=keep_ratio, rank=rank, pairs=_parse_pairs(pairs), criterion=criterion,
                           damp=damp, calib=CalibConfig(source=calib, samples=calib_samples, seq_len=calib_seq_len, seed=seed))
    except ValidationError as exc:
        raise _pydantic_error(exc) from None
    if output is None and not dry_run:
        raise UserError("give --output DIR, or --dry-run to only print the plan")
    config, folder, _ = peek_config(model, trust_remote_code)
    check_absorbable(config.get("model_type"), cfg)
    if config.get("auto_map") and not uses_surgery_modeling(config):
        raise UserError(f"{model} carries foreign modeling code; absorb works on standard or llmsurgery checkpoints")
    if not dry_run:
        check_output_free(output, force, folder)
    plan = _eval_plan(eval_tasks)
    tasks, manager = plan
    loaded = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    baseline = evaluate_model(loaded, tasks, limit=eval_limit, manager=manager) if tasks and not dry_run else None
    started = time.perf_counter()
    covs = None
    if cfg.needs_calibration:
        batches = calibration_batches(loaded.tokenizer, cfg.calib)
        covs = v_input_covariances(loaded.model, batches)
    report = absorb_decompose_(loaded.model, covs, cfg, apply=not dry_run)
    if cfg.needs_calibration:
        report["calibration_tokens"] = int(batches.numel())
    seconds = time.perf_counter() - started
    out.print(absorb_table(report))
    if report["lossy_qk"]:
        out.print("[yellow]note:[/yellow] qk drops RoPE frequency pairs, which is lossy at any setting")
    if plot is not None:
        save_spectra_plot(plot, report["layers"], f"{cfg.criterion} V-O singular values per KV head (dotted: dropped)")
        err.print(f"wrote {plot}")
    if not dry_run:
        record = pass_record("absorb", cfg.model_dump(), report, seconds, loaded.history)
        if tasks:
            record["report"]["eval"] = _eval_after_pass(loaded, plan, eval_limit, baseline, "absorbed", model)
        save_model(loaded, output, force=force, new_passes=[record])
        out.print(f"saved the absorbed model to {output} (load with trust_remote_code=True)")
    write_json(json_path, {"model": model, "config": cfg.model_dump(), **report})


@app.command()
@handles_errors
def convert(
    model: ModelArg,
    output: OutputOpt,
    force: ForceOpt = False,
    dtype: DtypeOpt = "float32",
    trust_remote_code: TrustOpt = False,
) -> None:
    """Save MODEL unchanged as a safetensors folder (a .gguf or built-in model becomes a plain checkpoint)."""
    from .model_io import check_output_free, load_model, save_model

    check_output_free(output, force)
    loaded = load_model(model, dtype=dtype, trust_remote_code=trust_remote_code)
    save_model(loaded, output, force=force)
    out.print(f"saved {model} to {output}")


@app.command()
@handles_errors
def inspect(model: ModelArg, json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False) -> None:
    """Architecture, shapes, parameters, bytes on disk, KV-cache bytes per token and surgery history."""
    from .inspection import describe

    info = describe(model)
    if json_out:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
        return
    table = Table(title=f"{model}", show_header=False)
    for key, value in info.items():
        if key != "history" and value is not None:
            table.add_row(key.replace("_", " "), f"{value:,}" if isinstance(value, int) else str(value))
    out.print(table)
    passes = (info["history"] or {}).get("passes", [])
    if info["history"]:
        src = info["history"]["source"]
        out.print(f"source: {src.get('id')} sha256={src.get('sha256', src.get('revision'))}")
    for i, entry in enumerate(passes, 1):
        out.print(f"  pass {i}: {entry['pass']} {entry['config']} ({entry['seconds']} s)")
    if info["history"] and not passes:
        out.print("  no passes (converted only)")


def run() -> None:
    """Console entry point: usage errors (unknown option, bad value) also get one line and exit 2."""
    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        err.print("aborted")
        code = 1
    except Exception as exc:  # click's UsageError and friends (typer vendors click)
        if not hasattr(exc, "format_message"):
            raise
        err.print(f"[bold red]error:[/bold red] {exc.format_message()}", highlight=False, soft_wrap=True)
        code = getattr(exc, "exit_code", 2)
    sys.exit(code if isinstance(code, int) else 0)
