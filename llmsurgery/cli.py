"""The `llmsurgery` command line: parse, call the library, print what it found.

Each command's options are declared once, outside this module: a pass's in its config (`passes/<name>`), the
job options every pass command shares in `job.JobOptions`, `eval`'s in `job.EvalJob`. `cli_options` turns them
into Typer options; the runner does the work; reports print themselves.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.markup import escape

from . import __version__
from .cli_options import config_from_options, job_options, job_parameters, option_parameters
from .console import err, metrics_table, out, report_failure
from .errors import GateFailed, UserError
from .job import IO, MODEL_HELP, EvalJob, ExportJob

app = typer.Typer(
    help="Model surgery and compression for causal language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
_state = {"debug": False}
_KW = inspect.Parameter.KEYWORD_ONLY

ModelArg = Annotated[str, typer.Argument(help=MODEL_HELP, show_default=False)]
JsonOpt = Annotated[
    Optional[Path],
    typer.Option("--json", help="Also write the results as JSON to this file.", rich_help_panel=IO),
]
PlotOpt = Annotated[
    Optional[Path],
    typer.Option(help="Save a chart of the scores (.png, .pdf, .svg, .jpg).", rich_help_panel=IO),
]
RecipeOutputOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--output",
        "-o",
        help="Output folder (overrides the recipe's).",
        rich_help_panel=IO,
        show_default=False,
    ),
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--set", help="Override a recipe value: KEY=VALUE (e.g. eval.limit=5, passes[1].sparsity=0.3)."
    ),
]
HEAL = "Healing (with --heal)"


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


def handles_errors(fn: Callable) -> Callable:
    """A command whose failures end in one line and their exit code (`console.report_failure`), never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - never a traceback on the user's terminal
            raise typer.Exit(report_failure(exc, _state["debug"])) from None

    return wrapper


def write_json(path: Path | None, payload: dict) -> None:
    from .data_parallel import is_main

    if path is not None and is_main():
        path.write_text(json.dumps(payload, indent=2, default=str))
        err.print(f"wrote {escape(str(path))}")


def derived_command(
    name: str, params: list[inspect.Parameter], doc: str, body: Callable[[dict], None], model=ModelArg
) -> None:
    """A command taking MODEL and `params` (derived from option models); `body` gets the parsed values."""

    def command(**options):
        body(options)

    first = inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=model)
    command.__signature__ = inspect.Signature([first, *params])
    command.__doc__ = doc
    command.__name__ = name.replace("-", "_")
    app.command(name)(handles_errors(command))


# ----------------------------------------------------------------------------- eval


def _eval(options: dict) -> None:
    from .evaluate import score_models
    from .model_io import check_file_targets

    json_path = options.pop("json_path")
    check_file_targets(json=json_path)
    job = job_options(options, EvalJob)
    rows = score_models(job, [json_path] if json_path is not None else [])
    out.print(metrics_table(rows, job.model, job.baseline))
    payload = {"model": job.model, "baseline": job.baseline, "tasks": job.tasks, "limit": job.limit}
    write_json(json_path, payload | {"backend": job.backend, "results": rows})


JSON_PATH = inspect.Parameter("json_path", _KW, default=None, annotation=JsonOpt)
derived_command("eval", [*option_parameters(EvalJob), JSON_PATH], EvalJob.__doc__, _eval)


# ----------------------------------------------------------------------------- the pass commands


def _flag(name: str, help: str, default: bool = False, panel: str | None = None) -> inspect.Parameter:
    """A command's own on/off option `--name` (a keyword parameter of its derived signature)."""
    option = typer.Option(f"--{name.replace('_', '-')}", help=help, rich_help_panel=panel)
    return inspect.Parameter(name, _KW, default=default, annotation=Annotated[bool, option])


def _own_options(config: type, then_heal: bool) -> list[inspect.Parameter]:
    """The options a pass's config declares beside its fields: its dry run, --plot, (--heal)."""
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
    return found


def pass_command(config: type, name: str | None = None, first: tuple[inspect.Parameter, ...] = ()) -> None:
    """The command of `config`'s pass: options from its fields, then `first` (prune's --bi), then those it
    declares (`_own_options`), then the job options (`cli_options.job_parameters`) and --json."""
    then_heal = config.pass_name() == "prune-bi"
    argument = typer.Argument(help=config.model_help, show_default=False) if config.model_help else None
    params = [*option_parameters(config), *first, *_own_options(config, then_heal)]
    params += job_parameters(
        trains=config.may_train or then_heal, output_required=config.dry_run_flag is None
    )
    doc = config.command_help or (config.__doc__ or config.pass_name()).strip()
    body = functools.partial(_run_pass_command, config)
    model = Annotated[str, argument] if argument else ModelArg
    derived_command(name or config.pass_name(), [*params, JSON_PATH], doc, body, model)


def _passes_of(config: type, cfg, options: dict, dry_run: bool) -> list:
    """The passes a command runs: its own, and for prune --heal a heal with prune's calibration."""
    from .passes import Heal

    if not options.get("heal") or dry_run:
        return [cfg]
    heal = config_from_options(Heal, options, prefix="heal-", calib_source=cfg.calib_source, seed=cfg.seed)
    return [cfg, heal]


def _run_pass_command(config: type, options: dict) -> None:
    from .model_io import check_file_targets
    from .recipe import command_recipe
    from .runner import Job, run_job

    output, json_path, plot = options["output"], options["json_path"], options.get("plot")
    check_file_targets(output, json=json_path, plot=plot)
    if not options.get("bi", True):
        raise UserError("only --bi (Block Influence) pruning exists for now")
    cfg = config_from_options(config, options)
    dry_run = bool(config.dry_run_flag and options[config.dry_run_flag.replace("-", "_")])
    if output is None and not dry_run:
        raise UserError(f"give --output DIR, or --{config.dry_run_flag} to only print")
    passes = _passes_of(config, cfg, options, dry_run)

    def summary(done, report) -> None:
        for part in report.summary(done):
            out.print(part)
        if plot is not None and done.plots:
            report.plot(done, plot)
            err.print(f"wrote {escape(str(plot))}")

    job = Job(job_options(options), passes, dry_run=dry_run, files={"json": json_path, "plot": plot})
    job.recipe_yaml = command_recipe(job)
    outcome = run_job(job, on_report=summary)
    if outcome.eval is not None:
        out.print(metrics_table(outcome.eval, passes[-1].column, options["model"]))
    if not dry_run:
        layers = outcome.config["num_hidden_layers"]
        what = f"{layers}-layer {passes[-1].saved_as}" if cfg.name == "prune-bi" else passes[-1].saved_as
        trust = " (load with trust_remote_code=True)" if "auto_map" in outcome.config else ""
        out.print(f"saved the {what} to {escape(str(output))}{trust}")
    records = outcome.records
    payload = {"model": options["model"], "config": cfg.record(), **records[0]["report"]}
    payload |= {"eval": outcome.eval} if outcome.eval is not None else {}
    payload |= {records[1]["pass"]: records[1]["report"]} if len(records) > 1 else {}
    write_json(json_path, payload)


def _register_pass_commands() -> None:
    from .passes import PASSES

    bi = _flag("bi", "Block-Influence layer removal (ShortGPT); the only method for now.", default=True)
    for name, config in PASSES.items():
        if name == "prune-bi":  # users type `llmsurgery prune --bi`
            pass_command(config, "prune", first=(bi,))
        else:
            pass_command(config)


_register_pass_commands()


# ----------------------------------------------------------------------------- recipes, convert, inspect

recipe_app = typer.Typer(help="Validate recipes and print their JSON schema.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")


@app.command("run")
@handles_errors
def run_cmd(
    recipe: Annotated[
        Path,
        typer.Argument(
            help="A YAML recipe (see recipes/ and `llmsurgery recipe schema`).", show_default=False
        ),
    ],
    output: RecipeOutputOpt = None,
    overrides: SetOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing output folder.", rich_help_panel=IO)
    ] = False,
    json_path: JsonOpt = None,
) -> None:
    """Run a recipe: its passes in order, then its evaluation; exit 1 if a quality gate fails."""
    from .model_io import check_file_targets
    from .recipe import run_recipe

    check_file_targets(output, json=json_path)
    results = run_recipe(recipe, output, overrides or [], force, files={"json": json_path})
    out.print(f"saved {' -> '.join(results['passes'])} to {escape(str(results['output']))}")
    if "eval" in results:
        baseline = "original" if any("baseline" in r for r in results["eval"]) else None
        out.print(metrics_table(results["eval"], "transformed", baseline))
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


def _convert(options: dict) -> None:
    from .data_parallel import once
    from .model_io import check_model, check_output_free, load_model, save_model

    given = job_options(options)
    checked = check_model(given.model, given.trust_remote_code)
    check_output_free(given.output, given.force, checked.folder)
    loaded = load_model(
        given.model, dtype=given.dtype, trust_remote_code=given.trust_remote_code, checked=checked
    )
    once(lambda: save_model(loaded, given.output, force=given.force))
    out.print(f"saved {escape(given.model)} to {escape(str(given.output))}")


CONVERT = (
    "Save MODEL unchanged as a safetensors folder (a .gguf or built-in model becomes a plain checkpoint)."
)
derived_command(
    "convert",
    job_parameters(True, True, ("output", "force", "dtype", "trust_remote_code")),
    CONVERT,
    _convert,
)


def _export(options: dict) -> None:
    from .export import export_gguf
    from .export.refusals import check_format

    given = job_options(options, ExportJob)
    check_format(given.format)
    result = export_gguf(given.model, given.output, outtype=given.outtype, force=given.force)
    for note in result.notes:
        err.print(f"note: {escape(note)}")
    out.print(
        f"wrote {escape(str(result.path))}: {result.architecture}, {result.layers} layers, {result.tensors} tensors "
        f"({result.outtype}), {result.bytes / 2**20:.1f} MiB; tokenizer {escape(result.tokenizer)}"
    )


derived_command("export", option_parameters(ExportJob), ExportJob.__doc__, _export)


@app.command("inspect")
@handles_errors
def inspect_cmd(
    model: ModelArg,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Architecture, shapes, parameters, bytes on disk, KV-cache bytes per token and surgery history."""
    from .inspection import describe, description_table

    info = describe(model)
    if json_out:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
        return
    for part in description_table(model, info):
        out.print(part)


# ----------------------------------------------------------------------------- the entry point


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
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001
        code = report_failure(exc, _state["debug"])
    if "torch.distributed" in sys.modules:
        from . import data_parallel

        data_parallel.leave()
    sys.exit(code if isinstance(code, int) else 0)
