"""The `llmsurgery` command line: parse, validate, call the library, print a summary."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import sys
import traceback
import warnings
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.markup import escape
from rich.table import Table

from . import __version__, defaults
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


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "(no message)"


def _fail(prefix: str, message: str, code: int) -> typer.Exit:
    if _state["debug"]:
        traceback.print_exc()
    err.print(f"[bold red]{prefix}:[/bold red] {escape(_one_line(message))}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def handles_errors(fn: Callable) -> Callable:
    """Bad input -> one line on stderr and exit 2; a failed gate -> exit 1; a kill (SIGINT, SIGTERM) -> exit 130.

    An OSError (a full disk, a permission) is the machine's answer to the user's input: exit 2 as well. Anything
    else is a bug: one line and exit 1; `--debug` shows the traceback of every one of them.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            raise _fail("error", str(exc), 2) from None
        except GateFailed as exc:
            raise _fail("gate failed", str(exc), 1) from None
        except KeyboardInterrupt:
            err.print("interrupted; nothing was written")
            raise typer.Exit(130) from None
        except OSError as exc:
            where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
            raise _fail("error", f"{exc.strerror or exc}{where}", 2) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - never a traceback on the user's terminal
            raise _fail("error", f"internal error ({type(exc).__name__}: {exc}); rerun with --debug for the traceback", 1) from None

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
        err.print(f"wrote {escape(str(path))}")


PLOT_FORMATS = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def check_files(output: Path | None = None, **paths: Path | None) -> None:
    """Files a command will write at the end (--json, --plot), checked before any work; they may go into `output`."""
    from .model_io import check_file_target

    given = [p.expanduser().resolve() for p in paths.values() if p is not None]
    if len(given) != len(set(given)):
        raise UserError(f"{' and '.join('--' + o for o in paths)} name the same file")
    for option, path in paths.items():
        if path is None:
            continue
        if output is not None and path.expanduser().resolve() == output.expanduser().resolve():
            raise UserError(f"--{option} {path} is the output folder; give a file name")
        into_output = output is not None and path.expanduser().resolve().parent == output.expanduser().resolve()
        if not (option == "json" and into_output):  # --json is written after the save, so the output folder exists by then
            check_file_target(path, f"--{option}")
        if option == "plot" and path.suffix.lower() not in PLOT_FORMATS:
            raise UserError(f"--plot {path}: the file name should end in {', '.join(PLOT_FORMATS)}")


@app.command("eval")
@handles_errors
def eval_cmd(
    model: ModelArg,
    tasks: Annotated[str, typer.Option(help="Comma-separated tasks: news_ppl, pydoc_ppl, news_cloze, or lm-eval names.", rich_help_panel=EVAL)] = "news_ppl,news_cloze",
    baseline: Annotated[Optional[str], typer.Option(help="A second model scored side by side.", rich_help_panel=EVAL)] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, max=defaults.MAX_WINDOWS, help="Score only the first N documents of each task.",
                                                 rich_help_panel=EVAL)] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=defaults.MAX_BATCH, help="lm-eval batch size.", rich_help_panel=EVAL)] = 8,
    load_in_8bit: Annotated[bool, typer.Option("--load-in-8bit", help="Quantize to int8 with bitsandbytes while loading.", rich_help_panel=LOAD)] = False,
    load_in_4bit: Annotated[bool, typer.Option("--load-in-4bit", help="Quantize to NF4 with bitsandbytes while loading.", rich_help_panel=LOAD)] = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    trust_remote_code: TrustOpt = False,
    json_path: JsonOpt = None,
) -> None:
    """Score MODEL with lm-eval, offline built-in tasks included; with --baseline, side by side."""
    check_files(json=json_path)
    from .evaluate import check_tasks, compare, evaluate_model, parse_tasks
    from .model_io import check_not_an_input, load_model, peek_config

    task_list = parse_tasks(tasks)
    manager = check_tasks(task_list)
    folders = [peek_config(spec, trust_remote_code)[1] for spec in ((model, baseline) if baseline else (model,))]  # both first
    if json_path is not None:
        check_not_an_input(json_path, [f for f in folders if f is not None], "--json")
    load = functools.partial(load_model, dtype=dtype, device=device, load_in_8bit=load_in_8bit,
                             load_in_4bit=load_in_4bit, trust_remote_code=trust_remote_code)
    base_metrics = None
    if baseline:
        base_metrics = evaluate_model(load(baseline), task_list, limit=limit, batch_size=batch_size, manager=manager)
    metrics = evaluate_model(load(model), task_list, limit=limit, batch_size=batch_size, manager=manager)
    rows = compare(metrics, base_metrics)
    print_metrics(rows, model, baseline)
    write_json(json_path, {"model": model, "baseline": baseline, "tasks": task_list, "limit": limit, "results": rows})


HEAL = "Healing (with --heal)"
CalibOpt = Annotated[str, typer.Option("--calib", help="Calibration text: news, pydoc, a .txt/.jsonl file, or hf:NAME[@CONFIG]:SPLIT[:FIELD].", rich_help_panel=CALIB)]
SamplesOpt = Annotated[int, typer.Option("--calib-samples", min=1, help="Number of calibration windows.", rich_help_panel=CALIB)]
SeqLenOpt = Annotated[int, typer.Option("--calib-seq-len", min=2, help="Tokens per calibration window.", rich_help_panel=CALIB)]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed choosing the calibration windows.", rich_help_panel=CALIB)]
EvalTasksOpt = Annotated[Optional[str], typer.Option("--eval", help="Score the transformed model on these tasks, the original as baseline.", rich_help_panel=EVAL)]
EvalLimitOpt = Annotated[Optional[int], typer.Option("--eval-limit", min=1, max=defaults.MAX_WINDOWS, help="Documents per task for --eval.", rich_help_panel=EVAL)]


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


_CALIB_OPTIONS = {"source": "calib", "samples": "calib-samples", "seq_len": "calib-seq-len", "seed": "seed"}


def _pydantic_error(exc) -> UserError:
    """A config's first validation error, located by the option's command-line name (`--split: ...`)."""
    first = exc.errors()[0]
    names = [str(p) for p in first["loc"] if isinstance(p, str)]
    option = None
    if len(names) >= 2 and names[0].endswith("calib"):
        prefix = names[0].removesuffix("calib").removesuffix("_")
        option = f"{prefix}-{_CALIB_OPTIONS.get(names[1], names[1]).removeprefix('calib-')}" if prefix else _CALIB_OPTIONS.get(names[1], names[1])
    elif names:
        option = names[0].replace("_", "-")
    return UserError(f"{'--' + option + ': ' if option else ''}{first['msg'].removeprefix('Value error, ')}")


def _transform(name: str, cfg, model: str, output: Path | None, *, force: bool, dtype: str, device: str, trust_remote_code: bool,
               eval_tasks: str | None, eval_limit: int | None, column: str, summary: Callable[[dict], None], dry_run: bool = False,
               then: tuple = (), files: dict | None = None) -> list[dict]:
    """What every transforming command shares: check, load, (baseline), apply the pass(es), summary, (eval), save.

    then: further (pass name, config, summary) to run after the first before saving (prune --heal). Returns the records.
    files: {option: path} the command writes besides the output (--json, --plot), checked against every input.
    """
    from .evaluate import evaluate_model
    from .model_io import check_not_an_input, check_output_free, load_model, peek_config, save_model
    from .pipeline import check_passes, run_passes

    steps, files = [(name, cfg, summary), *then], files or {}
    config, folder, _ = peek_config(model, trust_remote_code)
    inputs = check_passes([(step_name, step_cfg) for step_name, step_cfg, _ in steps], config, folder, trust_remote_code)
    for option, path in files.items():
        if path is not None:
            check_not_an_input(path, [p for p in [folder, *inputs] if p is not None], f"--{option}")
    if not dry_run:
        check_output_free(output, force, folder, inputs)
    plan = _eval_plan(None if dry_run else eval_tasks)
    tasks, manager = plan
    loaded = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    baseline = evaluate_model(loaded, tasks, limit=eval_limit, manager=manager) if tasks else None
    records = run_passes(loaded, [(step_name, step_cfg) for step_name, step_cfg, _ in steps], dry_run=dry_run,
                         on_report=lambda i, report: steps[i][2](report))
    if not dry_run:
        if tasks:
            records[-1]["report"]["eval"] = _eval_after_pass(loaded, plan, eval_limit, baseline, column, model)
        save_model(loaded, output, force=force, new_passes=records)
    return records


def _config(build: Callable):
    """Build a pass config from command options; a validation error becomes one line."""
    from pydantic import ValidationError

    try:
        return build()
    except ValidationError as exc:
        raise _pydantic_error(exc) from None


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
    heal: Annotated[bool, typer.Option("--heal", help="Then heal: distil the pruned model towards the original (see `llmsurgery heal`).", rich_help_panel=HEAL)] = False,
    heal_steps: Annotated[int, typer.Option(min=1, help="Healing steps.", rich_help_panel=HEAL)] = defaults.HEAL_STEPS,
    heal_lr: Annotated[float, typer.Option(help="Peak healing learning rate.", rich_help_panel=HEAL)] = defaults.HEAL_LR,
    heal_train: Annotated[str, typer.Option(help="What healing trains (see `llmsurgery heal --help`).", rich_help_panel=HEAL)] = ",".join(defaults.HEAL_TRAIN),
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
    """Remove the least influential decoder layers and write a standard checkpoint (--heal: then distil it)."""
    check_files(output, json=json_path, plot=plot)
    from .calibration import CalibConfig
    from .passes.block_influence import BlockInfluenceConfig
    from .plotting import save_score_plot, score_table

    if not bi:
        raise UserError("only --bi (Block Influence) pruning exists for now")
    if metric not in ("bi", "angular"):
        raise UserError(f"unknown metric '{metric}'; choose bi or angular")
    cfg = _config(lambda: BlockInfluenceConfig(remove=remove, ratio=ratio, metric=metric, block=block,
                                               calib=CalibConfig(source=calib, samples=calib_samples, seq_len=calib_seq_len, seed=seed)))
    if output is None and not scores_only:
        raise UserError("give --output DIR, or --scores-only to only print the scores")
    label, index_label = ("angular distance", "block start") if metric == "angular" else ("block influence", "layer")

    def summary(report: dict) -> None:
        scores, removed = report["scores"], report["removed_layers"]
        chosen = [removed[0]] if metric == "angular" else removed
        out.print(score_table(scores, chosen, label, index_label))
        out.print(f"layers to remove (0-based): {removed}  ({report['layers_before']} -> {report['layers_after']} layers)")
        if plot is not None:
            save_score_plot(plot, scores, chosen, label, index_label)
            err.print(f"wrote {escape(str(plot))}")

    then = ()
    if heal and not scores_only:
        heal_cfg = _heal_config(steps=heal_steps, lr=heal_lr, train=heal_train, calib=calib, seed=seed)
        then = (("heal", heal_cfg, _heal_summary),)
    records = _transform("prune-bi", cfg, model, output, force=force, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                         eval_tasks=eval_tasks, eval_limit=eval_limit, column="healed" if then else "pruned", summary=summary,
                         dry_run=scores_only, then=then, files={"json": json_path, "plot": plot})
    record = records[0]
    if not scores_only:
        out.print(f"saved the {record['report']['layers_after']}-layer {'healed ' if then else ''}model to {escape(str(output))}")
    write_json(json_path, {"model": model, "config": cfg.model_dump(), **record["report"], "score_kind": label,
                           **({"heal": records[1]["report"]} if then else {})})


def _heal_config(*, steps: int, lr: float, train: str, calib: str, seed: int, teacher: str | None = None,
                 removed: str | None = None, batch_size: int = defaults.HEAL_BATCH_SIZE,
                 samples: int = defaults.HEAL_WINDOWS[0], seq_len: int = defaults.HEAL_WINDOWS[1]):
    from .calibration import CalibConfig
    from .passes.heal import HealConfig

    layers = None
    if removed is not None:
        try:
            layers = tuple(int(v) for v in removed.split(",") if v.strip())
        except ValueError:
            raise UserError(f"--removed takes 0-based layer numbers, comma-separated, got '{removed}'") from None
    return _config(lambda: HealConfig(steps=steps, lr=lr, batch_size=batch_size, train=tuple(t.strip() for t in train.split(",") if t.strip()),
                                      teacher=teacher, removed=layers, seed=seed,
                                      calib=CalibConfig(source=calib, samples=samples, seq_len=seq_len, seed=seed + 3)))


def _heal_summary(report: dict) -> None:
    table = Table(title="heal (distillation towards the teacher)", show_header=False)
    table.add_row("teacher", str(report["teacher"]))
    table.add_row("removed layers (teacher numbering)", ", ".join(map(str, report["removed_layers"])) or "none")
    table.add_row("trained", f"{report['trained_parameter_count']:,} parameters in {len(report['trained_modules'])} modules")
    table.add_row("steps / tokens", f"{report['steps']} / {report['tokens']:,}")
    curve = report["loss_curve"]
    table.add_row("KL, first / last 10 steps", f"{sum(curve[:10]) / len(curve[:10]):.4f} / {sum(curve[-10:]) / len(curve[-10:]):.4f}")
    table.add_row("held-out KL before / after", f"{report['held_out_kl_before']:.4f} / {report['held_out_kl_after']:.4f}"
                  + ("" if report["kept"] else "  (worse: the old weights were kept)"))
    out.print(table)


@app.command()
@handles_errors
def heal(
    model: Annotated[str, typer.Argument(help="The pruned model (folder, .gguf, built-in name or hub id).", show_default=False)],
    output: OutputOpt,
    teacher: Annotated[Optional[str], typer.Option(help="The original model to distil from (default: the source in the model's history).",
                                                   show_default=False)] = None,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps (a batch of --batch-size windows each).")] = defaults.HEAL_STEPS,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate (10% linear warm-up, cosine decay).")] = defaults.HEAL_LR,
    batch_size: Annotated[int, typer.Option(min=1, help="Windows per step.")] = defaults.HEAL_BATCH_SIZE,
    train: Annotated[str, typer.Option(help="What trains, comma-separated: norms, mlp-near-gaps, layers-near-gaps, all-mlp, all.")] = ",".join(defaults.HEAL_TRAIN),
    removed: Annotated[Optional[str], typer.Option(help="The teacher's layers the student lacks, 0-based (default: from the history, "
                                                        "else by matching weights).", show_default=False)] = None,
    eval_tasks: EvalTasksOpt = None,
    eval_limit: EvalLimitOpt = None,
    calib: CalibOpt = "news",
    calib_samples: SamplesOpt = defaults.HEAL_WINDOWS[0],
    calib_seq_len: SeqLenOpt = defaults.HEAL_WINDOWS[1],
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    trust_remote_code: TrustOpt = False,
    json_path: JsonOpt = None,
) -> None:
    """Distil a pruned model towards its original (KL on logits), training only a few tensors; writes a standard checkpoint."""
    check_files(output, json=json_path)
    cfg = _heal_config(steps=steps, lr=lr, train=train, calib=calib, seed=seed, teacher=teacher, removed=removed,
                       batch_size=batch_size, samples=calib_samples, seq_len=calib_seq_len)
    record, = _transform("heal", cfg, model, output, force=force, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                         eval_tasks=eval_tasks, eval_limit=eval_limit, column="healed", summary=_heal_summary,
                         files={"json": json_path})
    out.print(f"saved the healed model to {escape(str(output))}")
    write_json(json_path, {"model": model, "config": cfg.model_dump(), **record["report"]})


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
    check_files(output, json=json_path)
    from .calibration import CalibConfig
    from .passes.larosa import RotateSparsifyConfig

    if method not in ("larosa", "magnitude"):
        raise UserError(f"unknown method '{method}'; choose larosa or magnitude")
    cfg = _config(lambda: RotateSparsifyConfig(sparsity=sparsity, method=method, split=_parse_split(split), damp=damp,
                                               calib=CalibConfig(source=calib, samples=calib_samples, seq_len=calib_seq_len, seed=seed)))

    def summary(report: dict) -> None:
        table = Table(title=f"rotate-sparsify ({method})", show_header=False)
        for key in ("sparsity_in", "sparsity_out", "effective_sparsity", "rotated", "calibration_tokens"):
            if key in report:
                table.add_row(key.replace("_", " "), _fmt(report[key]) if isinstance(report[key], float) else str(report[key]))
        out.print(table)

    record, = _transform("rotate-sparsify", cfg, model, output, force=force, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                        eval_tasks=eval_tasks, eval_limit=eval_limit, column="sparse", summary=summary,
                        files={"json": json_path})
    out.print(f"saved the sparse model to {escape(str(output))} (load with trust_remote_code=True)")
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
    check_files(output, json=json_path, plot=plot)
    from .calibration import CalibConfig
    from .passes.absorb_decompose import AbsorbConfig
    from .plotting import save_spectra_plot

    if criterion not in ("whitened", "weight", "norm"):
        raise UserError(f"unknown criterion '{criterion}'; choose whitened, weight or norm")
    cfg = _config(lambda: AbsorbConfig(threshold=threshold, keep_ratio=keep_ratio, rank=rank, pairs=_parse_pairs(pairs), criterion=criterion,
                                       damp=damp, calib=CalibConfig(source=calib, samples=calib_samples, seq_len=calib_seq_len, seed=seed)))
    if output is None and not dry_run:
        raise UserError("give --output DIR, or --dry-run to only print the plan")

    def summary(report: dict) -> None:
        out.print(absorb_table(report))
        if report["lossy_qk"]:
            out.print("[yellow]note:[/yellow] qk drops RoPE frequency pairs, which is lossy at any setting")
        if plot is not None:
            save_spectra_plot(plot, report["layers"], f"{cfg.criterion} V-O singular values per KV head (dotted: dropped)")
            err.print(f"wrote {escape(str(plot))}")

    record, = _transform("absorb", cfg, model, output, force=force, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                        eval_tasks=eval_tasks, eval_limit=eval_limit, column="absorbed", summary=summary, dry_run=dry_run,
                        files={"json": json_path, "plot": plot})
    if not dry_run:
        out.print(f"saved the absorbed model to {escape(str(output))} (load with trust_remote_code=True)")
    write_json(json_path, {"model": model, "config": cfg.model_dump(), **record["report"]})


@app.command("kv-compress")
@handles_errors
def kv_compress(
    model: ModelArg,
    budget: Annotated[float, typer.Option(help="Cached K+V dims to keep, a fraction in (0, 1] of the original.", show_default=False)],
    output: OutputOpt,
    train: Annotated[bool, typer.Option("--train/--no-train", help="Matryoshka-train the projections (else PCA only).")] = True,
    uniform: Annotated[bool, typer.Option("--uniform", help="One rank for every head instead of the rank search.")] = False,
    train_steps: Annotated[int, typer.Option(min=1, help="Training steps (batch of --batch-size windows each).")] = defaults.KV_TRAIN_STEPS,
    lr: Annotated[float, typer.Option(help="AdamW learning rate of the projections and means.")] = defaults.KV_LR,
    batch_size: Annotated[int, typer.Option(min=1, help="Training windows per step.")] = defaults.KV_BATCH_SIZE,
    rank_step: Annotated[Optional[int], typer.Option(min=1, help="Rank granularity (default head_dim / 8).", show_default=False)] = None,
    v_init: Annotated[str, typer.Option(help="pca (the paper) or vo (whitened V-O absorb-decompose basis).")] = "pca",
    train_samples: Annotated[int, typer.Option(min=1, help="Training windows (cycled through).", rich_help_panel=CALIB)] = defaults.KV_TRAIN_WINDOWS[0],
    train_seq_len: Annotated[int, typer.Option(min=2, help="Tokens per training window.", rich_help_panel=CALIB)] = defaults.KV_TRAIN_WINDOWS[1],
    search_samples: Annotated[int, typer.Option(min=1, help="Windows scoring the rank search.", rich_help_panel=CALIB)] = defaults.KV_SEARCH_WINDOWS[0],
    search_seq_len: Annotated[int, typer.Option(min=2, help="Tokens per search window.", rich_help_panel=CALIB)] = defaults.KV_SEARCH_WINDOWS[1],
    eval_tasks: EvalTasksOpt = None,
    eval_limit: EvalLimitOpt = None,
    calib: CalibOpt = "news",
    calib_samples: Annotated[int, typer.Option("--calib-samples", min=1, help="Windows for the PCA statistics.", rich_help_panel=CALIB)] = defaults.KV_PCA_WINDOWS[0],
    calib_seq_len: SeqLenOpt = defaults.KV_PCA_WINDOWS[1],
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    trust_remote_code: TrustOpt = False,
    json_path: JsonOpt = None,
) -> None:
    """MatryoshkaKV: orthogonal per-KV-head projections (PCA init, Matryoshka training) that shrink the KV cache."""
    check_files(output, json=json_path)
    from .calibration import CalibConfig
    from .passes.matryoshka_kv import KVCompressConfig

    if v_init not in ("pca", "vo"):
        raise UserError(f"unknown --v-init '{v_init}'; choose pca or vo")
    cfg = _config(lambda: KVCompressConfig(
        budget=budget, train=train, uniform=uniform, train_steps=train_steps, lr=lr, batch_size=batch_size, rank_step=rank_step,
        v_init=v_init, seed=seed, calib=CalibConfig(source=calib, samples=calib_samples, seq_len=calib_seq_len, seed=seed),
        train_calib=CalibConfig(source=calib, samples=train_samples, seq_len=train_seq_len, seed=seed + 1),
        search_calib=CalibConfig(source=calib, samples=search_samples, seq_len=search_seq_len, seed=seed + 2)))

    def summary(report: dict) -> None:
        table = Table(title="kv-compress (MatryoshkaKV)", show_header=False)
        table.add_row("budget asked / reached", f"{cfg.budget:.4g} / {report['budget_reached']:.4g}")
        table.add_row("keys / values share", f"{report['keys_share']:.3f} / {report['values_share']:.3f}")
        table.add_row("ranks", "uniform" if uniform else "searched on output KL (from uniform)")
        if "loss_curve" in report:
            curve = report["loss_curve"]
            table.add_row("training loss, first / last 10 steps", f"{sum(curve[:10]) / len(curve[:10]):.4f} / {sum(curve[-10:]) / len(curve[-10:]):.4f}")
        out.print(table)

    record, = _transform("kv-compress", cfg, model, output, force=force, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                        eval_tasks=eval_tasks, eval_limit=eval_limit, column="compressed", summary=summary,
                        files={"json": json_path})
    out.print(f"saved the KV-compressed model to {escape(str(output))} (load with trust_remote_code=True)")
    write_json(json_path, {"model": model, "config": cfg.model_dump(), **record["report"]})


recipe_app = typer.Typer(help="Validate recipes and print their JSON schema.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe value: KEY=VALUE (e.g. eval.limit=5, passes[1].sparsity=0.3).")]


@app.command("run")
@handles_errors
def run_cmd(
    recipe: Annotated[Path, typer.Argument(help="A YAML recipe (see recipes/ and `llmsurgery recipe schema`).", show_default=False)],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output folder (overrides the recipe's).", rich_help_panel=IO, show_default=False)] = None,
    overrides: SetOpt = None,
    force: ForceOpt = False,
    json_path: JsonOpt = None,
) -> None:
    """Run a recipe: its passes in order, then its evaluation; exit 1 if a quality gate fails."""
    check_files(output, json=json_path)
    from .recipe import run_recipe

    results = run_recipe(recipe, output, overrides or [], force, files={"json": json_path})
    out.print(f"saved {' -> '.join(results['passes'])} to {escape(str(results['output']))}")
    if "eval" in results:
        print_metrics(results["eval"], "transformed", "original" if any("baseline" in r for r in results["eval"]) else None)
        for name, gate in results["gates"].items():
            failed = [f for f in results["failed_gates"] if f.startswith(name + ":")]
            out.print(f"gate {name} {gate}: " + ("[bold red]FAILED[/bold red] " + "; ".join(failed) if failed else "[green]passed[/green]"))
    write_json(json_path, results)
    if results.get("failed_gates"):
        raise GateFailed("; ".join(results["failed_gates"]))


@recipe_app.command("validate")
@handles_errors
def recipe_validate(
    recipe: Annotated[Path, typer.Argument(help="A YAML recipe.", show_default=False)],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output folder (overrides the recipe's), as for `run`.",
                                                   rich_help_panel=IO, show_default=False)] = None,
    overrides: SetOpt = None,
    force: Annotated[bool, typer.Option("--force", help="As for `run`: an existing output folder would be replaced.", rich_help_panel=IO)] = False,
) -> None:
    """Check a recipe without running it: everything `run` with the same arguments would refuse before working.

    Keys, types, ranges, pass compatibility, the model's files, calibration sources, tasks, gate metrics, device, output.
    """
    from .recipe import prepare_recipe

    parsed, *_ = prepare_recipe(recipe, output, overrides or [], force)
    passes = ", ".join(p.pass_ for p in parsed.passes)
    gates = len(parsed.eval.gates) if parsed.eval else 0
    out.print(f"{recipe}: valid (version {parsed.version}; {parsed.model}: {passes}; {gates} gate(s))")


@recipe_app.command("schema")
def recipe_schema() -> None:
    """Print the recipe JSON schema (for editors)."""
    from .recipe import Recipe

    sys.stdout.write(json.dumps(Recipe.model_json_schema(by_alias=True), indent=2) + "\n")


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
    from .model_io import check_output_free, load_model, peek_config, save_model

    check_output_free(output, force, peek_config(model, trust_remote_code)[1])
    loaded = load_model(model, dtype=dtype, trust_remote_code=trust_remote_code)
    save_model(loaded, output, force=force)
    out.print(f"saved {escape(model)} to {escape(str(output))}")


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


def _interrupt(signum, frame) -> None:
    """SIGTERM and SIGHUP end a run the way Ctrl-C does: the temporary output is removed, nothing is written."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # a second signal must not interrupt the clean-up
    raise KeyboardInterrupt


def _quiet_third_parties() -> None:
    """llmsurgery draws its own progress; the libraries' bars, tables and warnings stay off the terminal."""
    for key, value in (("TQDM_DISABLE", "1"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TRANSFORMERS_VERBOSITY", "error"),
                       ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)
    if "--debug" not in sys.argv:
        warnings.simplefilter("ignore")
        # Libraries' log records (bitsandbytes, lm-eval, datasets) would reach stderr through logging's last-resort
        # handler: a handler on the root logger stops that. llmsurgery itself speaks through its rich consoles.
        logging.getLogger().addHandler(logging.NullHandler())


def run() -> None:
    """Console entry point: usage errors (unknown option, bad value) also get one line and exit 2."""
    _quiet_third_parties()
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        err.print("aborted")
        code = 1
    except KeyboardInterrupt:
        err.print("interrupted; nothing was written")
        code = 130
    except Exception as exc:  # click's UsageError and friends (typer vendors click)
        if "--debug" in sys.argv:
            traceback.print_exc()
        if hasattr(exc, "format_message"):
            message, code = exc.format_message(), getattr(exc, "exit_code", 2)
        else:
            message, code = f"internal error ({type(exc).__name__}: {exc}); rerun with --debug for the traceback", 1
        err.print(f"[bold red]error:[/bold red] {escape(_one_line(message))}", highlight=False, soft_wrap=True)
    sys.exit(code if isinstance(code, int) else 0)
