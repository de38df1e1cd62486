"""Shared rich console: tables go to stdout, progress and status to stderr."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

out = Console()
err = Console(stderr=True)

T = TypeVar("T")


@contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner while the block runs, then a tick; `message` is plain text (paths may hold brackets)."""
    with err.status(escape(message)):
        yield
    err.print(f"[green]✓[/green] {escape(message)}")


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """A rich progress bar on stderr over `items`: done / total, time so far and the time left."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=False) as progress:
        yield from progress.track(items, total=total, description=description)


@contextmanager
def stepper(description: str, total: int) -> Iterator:
    """A progress bar with a live note (e.g. the loss): call `step(note)` once per step."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[note]}"),
    )
    with Progress(*columns, console=err, transient=False) as progress:
        task = progress.add_task(description, total=total, note="")
        yield lambda note="": progress.update(task, advance=1, note=note)


@contextmanager
def quiet_transformers():
    """Keep transformers' own tables and warnings (LOAD REPORT, ...) off the user's terminal; errors still raise."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def key_value_table(title: str, rows: Iterable[tuple[str, str]]):
    """A two-column table without a header: what the pass summaries print."""
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for key, value in rows:
        table.add_row(key, value)
    return table


def fmt(value) -> str:
    """A number as the summaries print it: 4 significant digits, "-" for none or NaN."""
    import math

    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.4e}"


def ends_mean(curve: list[float], n: int = 10) -> str:
    """ "first / last" : the means of a loss curve's first and last n steps."""
    return f"{sum(curve[:n]) / len(curve[:n]):.4f} / {sum(curve[-n:]) / len(curve[-n:]):.4f}"


def metrics_table(rows: list[dict], model: str, baseline: str | None):
    """The evaluation rows (`evaluate.compare`) as a table; with a baseline, its value, difference and ratio."""
    from rich.table import Table

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
    return table


def report_failure(exc: BaseException, debug: bool = False) -> int:
    """One line on stderr for what ended a command; returns its exit code.

    Bad input -> 2, a failed gate -> 1, a kill (SIGINT, SIGTERM) -> 130. An OSError (a full disk, a permission)
    is the machine's answer to the user's input: 2 as well. Usage errors (unknown option, bad value) carry their
    own code. Anything else is a bug: 1; `debug` (`--debug`) shows the traceback of every one of them.
    """
    import sys
    import traceback

    import typer

    from .errors import GateFailed, UserError

    if isinstance(exc, KeyboardInterrupt):
        err.print("interrupted; nothing was written")
        return 130
    if isinstance(exc, typer.Abort):
        err.print("aborted")
        return 1
    if debug or "--debug" in sys.argv:
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
    _print_error(f"[bold red]{prefix}:[/bold red] {escape(' '.join(str(message).split()) or '(no message)')}")
    return code


def _print_error(line: str) -> None:
    """An error line on stderr; under a launcher the other processes (quiet otherwise) name their rank."""
    import os

    rank = int(os.environ.get("RANK", "0"))
    if err.quiet and rank:
        err.quiet = False
        err.print(f"rank {rank}: {line}", highlight=False, soft_wrap=True)
        err.quiet = True
        return
    err.print(line, highlight=False, soft_wrap=True)
