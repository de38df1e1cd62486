"""Score in-memory models through lm-eval (`HFLM`), offline built-in tasks or standard ones."""

from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass

from .builtin_tasks import BUILTIN_TASKS, task_dir
from .console import status
from .errors import UserError

METRIC_SUFFIX = ",none"
_SKIP_METRICS = ("_stderr", "alias", "samples", "sample_len")


@dataclass(frozen=True)
class Metric:
    task: str
    name: str
    value: float
    higher_is_better: bool | None


def parse_tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise UserError("--tasks needs at least one task name")
    return tasks


def _quiet_libraries() -> None:
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()


def _task_manager():
    _quiet_libraries()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(task_dir()))


def check_tasks(tasks: list[str]):
    """A TaskManager that knows every task in `tasks`, or a UserError naming the unknown ones."""
    manager = _task_manager()
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise UserError(
            f"unknown task(s): {', '.join(unknown)}; built-in offline tasks: {', '.join(BUILTIN_TASKS)} "
            "(or any lm-eval task name)"
        )
    return manager


# The metrics lm-eval reports for a task that lists none of its own, by output type.
_DEFAULT_METRICS = {
    "loglikelihood": ("perplexity", "acc"),
    "multiple_choice": ("acc", "acc_norm"),
    "loglikelihood_rolling": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
    "generate_until": ("exact_match",),
}


def reported_metrics(manager, task: str) -> list[str] | None:
    """The metric names a task reports, read from its config without building it; None when that cannot be
    told (groups)."""
    entry = getattr(manager, "task_index", {}).get(task)
    cfg = getattr(entry, "cfg", None)
    if not isinstance(cfg, dict) or "include" in cfg:
        return None
    if cfg.get("metric_list"):
        return [
            m["metric"]
            for m in cfg["metric_list"]
            if isinstance(m, dict) and isinstance(m.get("metric"), str)
        ] or None
    return list(_DEFAULT_METRICS.get(cfg.get("output_type"), ())) or None


def check_gate_metrics(manager, gates: dict) -> None:
    """A gate on a metric its task does not report is refused before any work (it could only fail at the end)."""
    for name in gates:
        task, _, metric = name.partition(".")
        known = reported_metrics(manager, task)
        if known is not None and metric.split(",")[0] not in known:
            raise UserError(f"eval.gates.{name}: task {task} reports {', '.join(known)}, not {metric}")


def _silent_tqdm(*args, **kwargs):
    from tqdm import tqdm

    kwargs["disable"] = True
    return tqdm(*args, **kwargs)


@contextmanager
def _without_library_bars():
    """lm-eval draws raw tqdm bars (with `disable` set explicitly, so TQDM_DISABLE cannot reach them) that would
    interleave with llmsurgery's own status line: its modules see a disabled tqdm while a model is scored."""
    import importlib

    modules = [
        importlib.import_module(name)
        for name in ("lm_eval.api.model", "lm_eval.api.task", "lm_eval.models.huggingface")
    ]
    saved = [(module, module.tqdm) for module in modules if hasattr(module, "tqdm")]
    for module, _ in saved:
        module.tqdm = _silent_tqdm
    try:
        yield
    finally:
        for module, original in saved:
            module.tqdm = original


def evaluate_model(
    loaded,
    tasks: list[str],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    manager=None,
    label: str | None = None,
) -> list[Metric]:
    """Run lm-eval on an already loaded model; returns one Metric per (task, metric)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import lm_eval
    import lm_eval.evaluator
    from lm_eval.models.huggingface import HFLM

    manager = manager or check_tasks(tasks)
    lm_eval.evaluator.get_git_commit_hash = lambda: (
        None
    )  # it shells out to git, which prints "fatal: not a git repository"
    model = loaded.model
    lm = HFLM(pretrained=model, tokenizer=loaded.tokenizer, batch_size=batch_size, device=str(model.device))
    with status(f"Evaluating {label or loaded.source.spec} on {', '.join(tasks)}"), _without_library_bars():
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            limit=limit,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=0,
            verbosity="ERROR",
        )
    return _metrics(results)


def _metrics(results: dict) -> list[Metric]:
    higher = results.get("higher_is_better", {})
    found = []
    for task, values in results["results"].items():
        for key, value in values.items():
            name = key.removesuffix(METRIC_SUFFIX)
            if any(s in key for s in _SKIP_METRICS) or not isinstance(value, (int, float)):
                continue
            found.append(Metric(task, name, float(value), higher.get(task, {}).get(name)))
    return found


def compare(model: list[Metric], baseline: list[Metric] | None) -> list[dict]:
    """Rows of task, metric, value, and (with a baseline) its value, difference and ratio."""
    base = {(m.task, m.name): m.value for m in baseline or []}
    rows = []
    for m in model:
        row = {"task": m.task, "metric": m.name, "value": m.value, "higher_is_better": m.higher_is_better}
        if (m.task, m.name) in base:
            b = base[(m.task, m.name)]
            row |= {"baseline": b, "diff": m.value - b, "ratio": m.value / b if b else math.nan}
        rows.append(row)
    return rows
