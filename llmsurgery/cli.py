"""The `llmsurgery` command line: parse, validate, call the library, print a summary."""

from __future__ import annotations

import functools
import inspect
import json
import logging
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
from .console import err, fmt, out
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
ModelArg = Annotated[
    str,
    typer.Argument(
        help="A model folder, a .gguf file, a built-in name (smollm2-135m, gemma3-270m) or a hub id.",
        show_default=False,
    ),
]
DtypeOpt = Annotated[
    str,
    typer.Option(
        help="auto (the checkpoint's own: bfloat16 stays bfloat16; the built-ins are float32), float32, bfloat16 "
        "or float16.",
        rich_help_panel=LOAD,
    ),
]
StreamOpt = Annotated[
    str,
    typer.Option(
        help="on: one decoder layer in memory at a time (prune, rotate-sparsify, absorb, kv-compress --no-train "
        "--uniform); auto: when the checkpoint is larger "
        "than half the memory available; off: load the whole model.",
        rich_help_panel=LOAD,
    ),
]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda or auto.", rich_help_panel=LOAD)]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Run modeling code shipped with a model not written by llmsurgery.",
        rich_help_panel=LOAD,
    ),
]
OutputOpt = Annotated[
    Path,
    typer.Option(
        "--output",
        "-o",
        help="Folder to write the model to (must not exist).",
        rich_help_panel=IO,
        show_default=False,
    ),
]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Replace an existing output folder.", rich_help_panel=IO)
]
JsonOpt = Annotated[
    Optional[Path],
    typer.Option("--json", help="Also write the results as JSON to this file.", rich_help_panel=IO),
]


def _version(value: bool) -> None:
    if value:
        out.print(f"llmsurgery {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    _state["debug"] = debug


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "(no message)"


def report_failure(exc: BaseException) -> int:
    """One line on stderr for what ended a command; returns its exit code.

    Bad input -> 2, a failed gate -> 1, a kill (SIGINT, SIGTERM) -> 130. An OSError (a full disk, a permission)
    is the machine's answer to the user's input: 2 as well. Usage errors (unknown option, bad value) carry their
    own code. Anything else is a bug: 1; `--debug` shows the traceback of every one of them.
    """
    if isinstance(exc, KeyboardInterrupt):
        err.print("interrupted; nothing was written")
        return 130
    if isinstance(exc, typer.Abort):
        err.print("aborted")
        return 1
    if _state["debug"] or "--debug" in sys.argv:
        traceback.print_exc()
    prefix, code = "error", 2
    if isinstance(exc, UserError):
        message = str(exc)
    elif isinstance(exc, GateFailed):
        prefix, message, code = "gate failed", str(exc), 1
    elif isinstance(exc, OSError):
        message = f"{exc.strerror or exc}" + (f" ({exc.filename})" if getattr(exc, "filename", None) else "")
    elif hasattr(exc, "format_message"):  # click's UsageError and friends (typer vendors click)
        message, code = exc.format_message(), getattr(exc, "exit_code", 2)
    else:
        message, code = (
            f"internal error ({type(exc).__name__}: {exc}); rerun with --debug for the traceback",
            1,
        )
    _print_error(f"[bold red]{prefix}:[/bold red] {escape(_one_line(message))}")
    return code


def _print_error(line: str) -> None:
    """An error line on stderr; under a launcher the other processes (quiet otherwise) name their rank."""
    rank = int(os.environ.get("RANK", "0"))
    if err.quiet and rank:
        err.quiet = False
        err.print(f"rank {rank}: {line}", highlight=False, soft_wrap=True)
        err.quiet = True
        return
    err.print(line, highlight=False, soft_wrap=True)


def handles_errors(fn: Callable) -> Callable:
    """A command whose failures end in one line and their exit code (`report_failure`), never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - never a traceback on the user's terminal
            raise typer.Exit(report_failure(exc)) from None

    return wrapper


def print_metrics(rows: list[dict], model: str, baseline: str | None) -> None:
    table = Table(title="Evaluation", show_lines=False)
    for column in ("task", "metric", model):
        table.add_column(column, justify="right" if column == model else "left")
    if baseline:
        for column in (f"{baseline} (baseline)", "diff", "ratio"):
            table.add_column(column, justify="right")
    for row in rows:
        cells = [row["task"], row["metric"], fmt(row["value"])]
        if baseline:
            cells += [fmt(row.get("baseline")), fmt(row.get("diff")), fmt(row.get("ratio"))]
        table.add_row(*cells)
    out.print(table)


def write_json(path: Path | None, payload: dict) -> None:
    from .data_parallel import is_main

    if path is not None and is_main():
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
        into_output = (
            output is not None and path.expanduser().resolve().parent == output.expanduser().resolve()
        )
        if not (
            option == "json" and into_output
        ):  # --json is written after the save, so the output folder exists by then
            check_file_target(path, f"--{option}")
        if option == "plot" and path.suffix.lower() not in PLOT_FORMATS:
            raise UserError(f"--plot {path}: the file name should end in {', '.join(PLOT_FORMATS)}")


@app.command("eval")
@handles_errors
def eval_cmd(
    model: ModelArg,
    tasks: Annotated[
        str,
        typer.Option(
            help="Comma-separated tasks: news_ppl, pydoc_ppl, news_cloze, or lm-eval names.",
            rich_help_panel=EVAL,
        ),
    ] = "news_ppl,news_cloze",
    baseline: Annotated[
        Optional[str], typer.Option(help="A second model scored side by side.", rich_help_panel=EVAL)
    ] = None,
    limit: Annotated[
        Optional[int],
        typer.Option(
            min=1,
            max=defaults.MAX_WINDOWS,
            help="Score only the first N documents of each task.",
            rich_help_panel=EVAL,
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option(min=1, max=defaults.MAX_BATCH, help="lm-eval batch size.", rich_help_panel=EVAL)
    ] = 8,
    load_in_8bit: Annotated[
        bool,
        typer.Option(
            "--load-in-8bit", help="Quantize to int8 with bitsandbytes while loading.", rich_help_panel=LOAD
        ),
    ] = False,
    load_in_4bit: Annotated[
        bool,
        typer.Option(
            "--load-in-4bit", help="Quantize to NF4 with bitsandbytes while loading.", rich_help_panel=LOAD
        ),
    ] = False,
    backend: Annotated[
        str,
        typer.Option(
            help="lm-eval backend: hf (transformers, any model) or vllm (standard architectures, GPUs).",
            rich_help_panel=EVAL,
        ),
    ] = "hf",
    tensor_parallel: Annotated[
        int, typer.Option(min=1, max=1024, help="vllm: GPUs per model copy.", rich_help_panel=EVAL)
    ] = 1,
    data_parallel: Annotated[
        int,
        typer.Option(min=1, max=1024, help="vllm: model copies scoring in parallel.", rich_help_panel=EVAL),
    ] = 1,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    trust_remote_code: TrustOpt = False,
    json_path: JsonOpt = None,
) -> None:
    """Score MODEL with lm-eval, offline built-in tasks included; with --baseline, side by side."""
    check_files(json=json_path)
    from .evaluate import (
        check_backend,
        check_tasks,
        check_vllm,
        compare,
        evaluate_model,
        evaluate_vllm,
        parse_tasks,
    )
    from .model_io import check_not_an_input, load_model, peek_config

    task_list = parse_tasks(tasks)
    manager = check_tasks(task_list)
    specs = (model, baseline) if baseline else (model,)
    peeked = [peek_config(spec, trust_remote_code) for spec in specs]  # both first
    folders = [folder for _, folder, _ in peeked]
    if json_path is not None:
        check_not_an_input(json_path, [f for f in folders if f is not None], "--json")
    check_backend(backend, tensor_parallel * data_parallel, load_in_8bit or load_in_4bit)
    scoring = {"tasks": task_list, "limit": limit, "batch_size": batch_size, "manager": manager}
    if backend == "vllm":
        for spec, (config, folder, weights) in zip(specs, peeked):
            check_vllm(spec, config, folder, weights)
        parallel = {"tensor_parallel": tensor_parallel, "data_parallel": data_parallel}

        def score(i: int):
            return evaluate_vllm(folders[i], dtype=dtype, **parallel, **scoring)
    else:
        load = functools.partial(
            load_model,
            dtype=dtype,
            device=device,
            load_in_8bit=load_in_8bit,
            load_in_4bit=load_in_4bit,
            trust_remote_code=trust_remote_code,
        )

        def score(i: int):
            return evaluate_model(load(specs[i]), **scoring)

    base_metrics = score(1) if baseline else None
    rows = compare(score(0), base_metrics)
    print_metrics(rows, model, baseline)
    payload = {"model": model, "baseline": baseline, "tasks": task_list, "limit": limit, "backend": backend}
    write_json(json_path, payload | {"results": rows})


HEAL = "Healing (with --heal)"
EvalTasksOpt = Annotated[
    Optional[str],
    typer.Option(
        "--eval",
        help="Score the transformed model on these tasks, the original as baseline.",
        rich_help_panel=EVAL,
    ),
]
EvalLimitOpt = Annotated[
    Optional[int],
    typer.Option(
        "--eval-limit",
        min=1,
        max=defaults.MAX_WINDOWS,
        help="Documents per task for --eval.",
        rich_help_panel=EVAL,
    ),
]
PlotOpt = Annotated[
    Optional[Path],
    typer.Option(help="Save a chart of the scores (.png, .pdf, .svg, .jpg).", rich_help_panel=IO),
]
_KW = inspect.Parameter.KEYWORD_ONLY


def _common_parameters(output_required: bool) -> list[inspect.Parameter]:
    """The options every pass command shares, after its own: evaluation, output, loading, --json."""
    output = (
        OutputOpt
        if output_required
        else Annotated[
            Optional[Path],
            typer.Option(
                "--output", "-o", help="Folder to write the model to.", rich_help_panel=IO, show_default=False
            ),
        ]
    )
    return [
        inspect.Parameter("eval_tasks", _KW, default=None, annotation=EvalTasksOpt),
        inspect.Parameter("eval_limit", _KW, default=None, annotation=EvalLimitOpt),
        inspect.Parameter(
            "output", _KW, default=inspect.Parameter.empty if output_required else None, annotation=output
        ),
        inspect.Parameter("force", _KW, default=False, annotation=ForceOpt),
        inspect.Parameter("dtype", _KW, default="auto", annotation=DtypeOpt),
        inspect.Parameter("device", _KW, default="cpu", annotation=DeviceOpt),
        inspect.Parameter("trust_remote_code", _KW, default=False, annotation=TrustOpt),
        inspect.Parameter("stream", _KW, default="auto", annotation=StreamOpt),
        inspect.Parameter("json_path", _KW, default=None, annotation=JsonOpt),
    ]


def _flag(name: str, help: str, default: bool = False, panel: str | None = None) -> inspect.Parameter:
    """A command's own on/off option `--name` (a keyword parameter of its derived signature)."""
    option = typer.Option(f"--{name.replace('_', '-')}", help=help, rich_help_panel=panel)
    return inspect.Parameter(name, _KW, default=default, annotation=Annotated[bool, option])


def _own_options(config: type, then_heal: bool = False) -> list[inspect.Parameter]:
    """The options a pass's config declares beside its fields: its dry run, --plot, (--heal), --fsdp."""
    from .cli_options import option_parameters
    from .passes import Heal

    found = []
    if config.dry_run_flag:
        found.append(_flag(config.dry_run_flag.replace("-", "_"), config.dry_run_help))
    if config.plots:
        found.append(inspect.Parameter("plot", _KW, default=None, annotation=PlotOpt))
    if then_heal:
        helps = "Then heal: distil the pruned model towards the original (see `llmsurgery heal`)."
        found.append(_flag("heal", helps, panel=HEAL))
        exclude = ("teacher", "removed", "calib_source", "seed")
        found += option_parameters(Heal, prefix="heal-", exclude=exclude, panel=HEAL)
    if config.may_train or then_heal:
        helps = (
            "Under torchrun / accelerate launch: shard the model over the processes while it trains (FSDP), "
            "so that several GPUs hold what one cannot."
        )
        found.append(_flag("fsdp", helps, panel=LOAD))
    return found


def pass_command(config: type, name: str | None = None, first: tuple[inspect.Parameter, ...] = ()) -> None:
    """The command of `config`'s pass: options from its fields (`cli_options`), then `first` (prune's --bi),
    then those it declares (`_own_options`). The runner does the work; the reports print themselves."""
    from .cli_options import option_parameters

    then_heal = config.pass_name() == "prune-bi"
    argument = typer.Argument(help=config.model_help, show_default=False) if config.model_help else None
    model = inspect.Parameter(
        "model",
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        annotation=Annotated[str, argument] if argument else ModelArg,
    )
    params = [model, *option_parameters(config), *first, *_own_options(config, then_heal)]
    params += _common_parameters(output_required=config.dry_run_flag is None)

    def command(**options):
        _run_pass_command(config, options)

    command.__signature__ = inspect.Signature(params)
    command.__doc__ = config.command_help or (config.__doc__ or config.pass_name()).strip()
    command.__name__ = config.pass_name().replace("-", "_")
    app.command(name or config.pass_name())(handles_errors(command))


def _passes_of(config: type, cfg, options: dict) -> list:
    """The passes a command runs: its own, and for prune --heal a heal with prune's calibration."""
    from .cli_options import config_from_options
    from .passes import Heal

    if not options.get("heal") or options.get(_dry_run_key(config)):
        return [cfg]
    return [
        cfg,
        config_from_options(Heal, options, prefix="heal-", calib_source=cfg.calib_source, seed=cfg.seed),
    ]


def _dry_run_key(config: type) -> str | None:
    return config.dry_run_flag.replace("-", "_") if config.dry_run_flag else None


def _run_pass_command(config: type, options: dict) -> None:
    from .cli_options import config_from_options
    from .evaluate import parse_tasks
    from .runner import EvalPlan, Job, run_job

    output, json_path, plot = options["output"], options["json_path"], options.get("plot")
    check_files(output, json=json_path, plot=plot)
    if not options.get("bi", True):
        raise UserError("only --bi (Block Influence) pruning exists for now")
    cfg = config_from_options(config, options)
    passes = _passes_of(config, cfg, options)
    dry_run = bool(options.get(_dry_run_key(config)))
    if output is None and not dry_run:
        raise UserError(f"give --output DIR, or --{config.dry_run_flag} to only print")

    def summary(done, report) -> None:
        for part in report.summary(done):
            out.print(part)
        if plot is not None and done.plots:
            report.plot(done, plot)
            err.print(f"wrote {escape(str(plot))}")

    tasks = options["eval_tasks"]
    job = Job(
        options["model"],
        passes,
        output,
        options["force"],
        options["dtype"],
        options["device"],
        options["trust_remote_code"],
        EvalPlan(tuple(parse_tasks(tasks)), options["eval_limit"]) if tasks else None,
        dry_run=dry_run,
        files={"json": json_path, "plot": plot},
        stream=options["stream"],
        fsdp=options.get("fsdp", False),
    )
    job.recipe_yaml = command_recipe(job)
    outcome = run_job(job, on_report=summary)
    if outcome.eval is not None:
        print_metrics(outcome.eval, passes[-1].column, options["model"])
    if not dry_run:
        layers = outcome.config["num_hidden_layers"]
        what = (
            f"{layers}-layer {passes[-1].saved_as}" if passes[0].name == "prune-bi" else passes[-1].saved_as
        )
        trust = " (load with trust_remote_code=True)" if "auto_map" in outcome.config else ""
        out.print(f"saved the {what} to {escape(str(output))}{trust}")
    records = outcome.records
    payload = {"model": options["model"], "config": cfg.record(), **records[0]["report"]}
    payload |= {"eval": outcome.eval} if outcome.eval is not None else {}
    payload |= {records[1]["pass"]: records[1]["report"]} if len(records) > 1 else {}
    write_json(json_path, payload)


def command_recipe(job) -> str:
    """The recipe `llmsurgery run` would follow to make the same model, saved beside it."""
    from .recipe import recipe_text
    from .sources import resolve_source

    data = {"version": 1, "model": job.model, "dtype": job.dtype, "device": job.device}
    data |= {"trust-remote-code": True} if job.trust_remote_code else {}
    data |= {"stream": job.stream} if job.stream != "auto" else {}
    data |= {"fsdp": True} if job.fsdp else {}
    data["passes"] = [cfg.recipe_entry() for cfg in job.passes]
    if job.eval:
        data["eval"] = {"tasks": list(job.eval.tasks)} | ({"limit": job.eval.limit} if job.eval.limit else {})
    source = resolve_source(job.model)
    path = (
        str(Path(source.path).resolve())
        if getattr(source, "path", None) and source.kind in ("folder", "gguf")
        else None
    )
    return recipe_text(data, path)


def _register_pass_commands() -> None:
    from .passes import PASSES

    bi = _flag("bi", "Block-Influence layer removal (ShortGPT); the only method for now.", default=True)
    for name, config in PASSES.items():
        if name == "prune-bi":  # users type `llmsurgery prune --bi`
            pass_command(config, "prune", first=(bi,))
        else:
            pass_command(config)


_register_pass_commands()


recipe_app = typer.Typer(help="Validate recipes and print their JSON schema.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--set", help="Override a recipe value: KEY=VALUE (e.g. eval.limit=5, passes[1].sparsity=0.3)."
    ),
]


@app.command("run")
@handles_errors
def run_cmd(
    recipe: Annotated[
        Path,
        typer.Argument(
            help="A YAML recipe (see recipes/ and `llmsurgery recipe schema`).", show_default=False
        ),
    ],
    output: Annotated[
        Optional[Path],
        typer.Option(
            "--output",
            "-o",
            help="Output folder (overrides the recipe's).",
            rich_help_panel=IO,
            show_default=False,
        ),
    ] = None,
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
        print_metrics(
            results["eval"],
            "transformed",
            "original" if any("baseline" in r for r in results["eval"]) else None,
        )
        for name, gate in results["gates"].items():
            failed = [f for f in results["failed_gates"] if f.startswith(name + ":")]
            out.print(
                f"gate {name} {gate}: "
                + ("[bold red]FAILED[/bold red] " + "; ".join(failed) if failed else "[green]passed[/green]")
            )
    write_json(json_path, results)
    if results.get("failed_gates"):
        raise GateFailed("; ".join(results["failed_gates"]))


@recipe_app.command("validate")
@handles_errors
def recipe_validate(
    recipe: Annotated[Path, typer.Argument(help="A YAML recipe.", show_default=False)],
    output: Annotated[
        Optional[Path],
        typer.Option(
            "--output",
            "-o",
            help="Output folder (overrides the recipe's), as for `run`.",
            rich_help_panel=IO,
            show_default=False,
        ),
    ] = None,
    overrides: SetOpt = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="As for `run`: an existing output folder would be replaced.", rich_help_panel=IO
        ),
    ] = False,
) -> None:
    """Check a recipe without running it: everything `run` with the same arguments would refuse before working.

    Keys, types, ranges, pass compatibility, the model's files, calibration sources, tasks, gate metrics,
    device, output.
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
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustOpt = False,
) -> None:
    """Save MODEL unchanged as a safetensors folder (a .gguf or built-in model becomes a plain checkpoint)."""
    from .data_parallel import once
    from .model_io import check_output_free, load_model, peek_config, save_model

    check_output_free(output, force, peek_config(model, trust_remote_code)[1])
    loaded = load_model(model, dtype=dtype, trust_remote_code=trust_remote_code)
    once(lambda: save_model(loaded, output, force=force))
    out.print(f"saved {escape(model)} to {escape(str(output))}")


@app.command()
@handles_errors
def export(
    model: ModelArg,
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", help="The file to write (FILE.gguf).", rich_help_panel=IO, show_default=False
        ),
    ],
    file_format: Annotated[
        str, typer.Option("--format", help="gguf (llama.cpp, ollama, LM Studio).")
    ] = "gguf",
    outtype: Annotated[
        str, typer.Option("--outtype", help="Weight storage: f32, f16, bf16 or q8_0 (norms stay f32).")
    ] = "f16",
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing file.", rich_help_panel=IO)
    ] = False,
) -> None:
    """Write MODEL as one GGUF file that llama.cpp and ollama run (standard architectures: prune, heal, convert)."""
    from .export import export_gguf
    from .export.refusals import check_format

    check_format(file_format)
    result = export_gguf(model, output, outtype=outtype, force=force)
    for note in result.notes:
        err.print(f"note: {escape(note)}")
    out.print(
        f"wrote {escape(str(result.path))}: {result.architecture}, {result.layers} layers, {result.tensors} tensors "
        f"({result.outtype}), {result.bytes / 2**20:.1f} MiB; tokenizer {escape(result.tokenizer)}"
    )


@app.command()
@handles_errors
def inspect(
    model: ModelArg,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
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
    for key, value in (
        ("TQDM_DISABLE", "1"),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
        ("TOKENIZERS_PARALLELISM", "false"),
    ):
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
    if "WORLD_SIZE" in os.environ or os.environ.get(
        "ACCELERATE_USE_CPU"
    ):  # under torchrun / accelerate launch
        from . import data_parallel

        data_parallel.start_processes()
    try:
        code = app(standalone_mode=False)
    except Exception as exc:  # noqa: BLE001
        code = report_failure(exc)
    except KeyboardInterrupt as exc:
        code = report_failure(exc)
    if "torch.distributed" in sys.modules:
        from . import data_parallel

        data_parallel.leave()
    sys.exit(code if isinstance(code, int) else 0)
