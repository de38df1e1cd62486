"""Score in-memory models through lm-eval (`HFLM`), offline built-in tasks or standard ones."""

from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass

from . import data_parallel
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
    from lm_eval.models.huggingface import HFLM

    model = loaded.model
    lm = HFLM(pretrained=model, tokenizer=loaded.tokenizer, batch_size=batch_size, device=str(model.device))
    if data_parallel.world_size() > 1:  # under a launcher: each process scores its share of the requests
        if limit is not None and limit < data_parallel.world_size():
            raise UserError(
                f"--limit {limit} leaves some of the {data_parallel.world_size()} processes without a document; "
                "score at least one document per process"
            )
        lm._rank, lm._world_size = data_parallel.rank(), data_parallel.world_size()
        lm.accelerator = data_parallel.Collectives()
    results = _simple_evaluate(label or loaded.source.spec, tasks, limit, manager, model=lm)
    return data_parallel.from_main(_metrics(results) if data_parallel.is_main() else None)


def _simple_evaluate(label: str, tasks: list[str], limit: int | None, manager, **model) -> dict | None:
    """lm-eval's simple_evaluate, quiet, without samples or bootstrap (None on processes other than rank 0)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import lm_eval
    import lm_eval.evaluator

    manager = manager or check_tasks(tasks)
    # it shells out to git, which prints "fatal: not a git repository"
    lm_eval.evaluator.get_git_commit_hash = lambda: None
    with status(f"Evaluating {label} on {', '.join(tasks)}"), _without_library_bars():
        return lm_eval.simple_evaluate(
            **model,
            tasks=tasks,
            limit=limit,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=0,
            verbosity="ERROR",
        )


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


# What needs llmsurgery's own modeling code (trust_remote_code / its installed classes): vllm cannot run it.
_OWN_RUNTIME_KEYS = ("auto_map", "attention_layout", "sparsity_in")


def check_backend(backend: str, gpus: int, quantized: bool) -> None:
    """`eval --backend`: hf or vllm; vllm's parallel options (`gpus`: their product) only with vllm, which runs its
    own processes and loads its own way."""
    if backend not in ("hf", "vllm"):
        raise UserError(f"unknown --backend '{backend}'; choose hf or vllm")
    if backend == "hf" and gpus > 1:
        raise UserError("--tensor-parallel and --data-parallel are for --backend vllm")
    if backend == "hf":
        return
    from .data_parallel import launched

    if launched():
        raise UserError(
            "--backend vllm runs its own processes: start it once (no torchrun / accelerate launch) "
            "and use --tensor-parallel / --data-parallel"
        )
    if quantized:
        raise UserError("--backend vllm loads its own way; drop --load-in-8bit / --load-in-4bit")


def check_vllm(spec: str, config: dict, folder, weights) -> None:
    """--backend vllm takes a standard-architecture safetensors folder (prune, heal, convert), and vllm itself."""
    import importlib.util

    if any(config.get(key) for key in _OWN_RUNTIME_KEYS):
        raise UserError(
            f"{spec} needs llmsurgery's own modeling code (absorb, kv-compress, rotate-sparsify outputs), "
            "which vllm cannot run; score it with --backend hf"
        )
    if folder is None or not weights or any(p.suffix != ".safetensors" for p in weights):
        raise UserError(
            f"--backend vllm reads a local safetensors folder; {spec} is not one "
            "(write one with `llmsurgery convert`)"
        )
    if importlib.util.find_spec("vllm") is None:
        raise UserError(
            "--backend vllm needs the vllm package, which is not installed (pip install vllm, on a machine "
            "with a CUDA GPU); or score with --backend hf"
        )


def evaluate_vllm(
    folder,
    *,
    tasks: list[str],
    limit: int | None,
    batch_size: int,
    manager,
    dtype: str,
    tensor_parallel: int,
    data_parallel: int,
) -> list[Metric]:
    """lm-eval's vllm backend on a standard checkpoint folder (`check_vllm` first)."""
    model_args = {
        "pretrained": str(folder),
        "dtype": dtype,
        "tensor_parallel_size": tensor_parallel,
        "data_parallel_size": data_parallel,
    }
    label = f"{folder} with vllm"
    return _metrics(
        _simple_evaluate(
            label, tasks, limit, manager, model="vllm", model_args=model_args, batch_size=batch_size
        )
    )


def score_models(job, writes: list | None = None) -> list[dict]:
    """`llmsurgery eval` (a `job.EvalJob`): score its model, and its baseline first when it names one; returns
    the rows of `compare`. Both models are checked before either loads; `writes`: files the command writes,
    which may not replace an input."""
    from .model_io import check_model, check_not_an_input, load_model

    manager = check_tasks(job.tasks)
    specs = [job.model, job.baseline] if job.baseline else [job.model]
    checked = [check_model(spec, job.trust_remote_code) for spec in specs]  # both first
    for path in writes or []:
        check_not_an_input(path, [c.folder for c in checked if c.folder is not None], "--json")
    quantized = {"load_in_8bit": job.load_in_8bit, "load_in_4bit": job.load_in_4bit}
    check_backend(job.backend, job.tensor_parallel * job.data_parallel, any(quantized.values()))
    scoring = {"tasks": job.tasks, "limit": job.limit, "batch_size": job.batch_size, "manager": manager}
    if job.backend == "vllm":
        for c in checked:
            check_vllm(c.spec, c.config, c.folder, c.weights)
        parallel = {"tensor_parallel": job.tensor_parallel, "data_parallel": job.data_parallel}

        def score(c) -> list[Metric]:
            return evaluate_vllm(c.folder, dtype=job.dtype, **parallel, **scoring)
    else:
        loading = {"dtype": job.dtype, "device": job.device, "trust_remote_code": job.trust_remote_code}

        def score(c) -> list[Metric]:
            loaded = load_model(c.spec, **loading, **quantized, checked=c)
            return evaluate_model(loaded, **scoring)

    base = score(checked[1]) if job.baseline else None
    return compare(score(checked[0]), base)
