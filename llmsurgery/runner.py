"""The one runner behind the pass commands, `llmsurgery run` and the Python API.

A `Job` names a model, an ordered list of pass configs, an output and an optional evaluation. `check_job`
refuses everything that can be told before any weight loads; `run_job` loads, scores the baseline, applies
the passes (`run_passes`), scores the result and saves. The pass command `X` and a one-pass recipe with the
same settings build the same `Job`, so they write the same tensors and the same history.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import UserError, first_line
from .passes import PASSES, PassConfig, Report
from .passes.base import CheckContext


@dataclass(frozen=True)
class EvalPlan:
    """lm-eval after the passes; with `baseline`, the input model is scored first (before any pass)."""

    tasks: tuple[str, ...]
    limit: int | None = None
    batch_size: int = 8
    baseline: bool = True
    load_in_8bit: bool = False
    load_in_4bit: bool = False

    @property
    def quantized(self) -> bool:
        return self.load_in_8bit or self.load_in_4bit


@dataclass
class Job:
    model: str
    passes: list[PassConfig]
    output: Path | None = None  # None: nothing is saved (dry runs, the Python API without an output)
    force: bool = False
    dtype: str = "auto"
    device: str = "cpu"
    trust_remote_code: bool = False
    eval: EvalPlan | None = None
    dry_run: bool = False  # the first pass only plans (prune --scores-only, absorb --dry-run)
    files: dict[str, Path | None] = field(
        default_factory=dict
    )  # what else the run writes (--json, --plot), by option
    reads: tuple[Path, ...] = ()  # what else the run reads (the recipe)
    recipe_yaml: str | None = None  # saved beside the model: the recipe that reproduces it
    stream: str = "auto"  # on: one decoder layer in memory at a time; auto: when the checkpoint is large; off
    fsdp: bool = False  # under a launcher: the trained passes shard the model over the processes
    where: Callable[[int, str], str] = lambda i, name: ""  # how errors locate a pass ("passes[1] (heal): ")


@dataclass
class Checked:
    config: dict
    folder: Path | None
    inputs: list[Path]  # files and folders the passes read besides the model
    tasks: object = None  # lm-eval's task manager, for the evaluation
    weights: list[Path] = field(default_factory=list)  # the model's weight files (local models)
    streamed: bool = False  # the job runs one decoder layer at a time


@dataclass
class Outcome:
    records: list[dict]
    eval: list[dict] | None = None
    config: dict = field(default_factory=dict)  # config.json of the result
    streamed: bool = False


def check_job(job: Job) -> Checked:
    """Everything about a job that can be told before loading weights; raises UserError on the first problem."""
    from .evaluate import check_tasks
    from .model_io import check_not_an_input, check_output_free, peek_config, resolve_device
    from .sharding import check as check_fsdp

    if not job.passes:
        raise UserError("no passes to run")
    resolve_device(job.device)
    check_fsdp(job.fsdp, [cfg.name for cfg in job.passes if cfg.trains], resolve_device(job.device))
    config, folder, weights = peek_config(job.model, job.trust_remote_code)
    inputs = check_passes(job.passes, config, folder, job.trust_remote_code, job.where) + list(job.reads)
    for option, path in job.files.items():
        if path is not None:
            check_not_an_input(path, [p for p in [folder, *inputs] if p is not None], f"--{option}")
    if job.output is not None and not job.dry_run:
        check_output_free(job.output, job.force, folder, inputs)
    tasks = check_tasks(list(job.eval.tasks)) if job.eval and not job.dry_run else None
    checked = Checked(config, folder, inputs, tasks, weights)
    checked.streamed = streams(job, checked)  # also refuses --stream on for passes that cannot stream
    return checked


def check_passes(
    passes: list[PassConfig],
    config: dict,
    folder,
    trust_remote_code: bool,
    where: Callable[[int, str], str] = lambda i, name: "",
    tokenizer=None,
) -> list[Path]:
    """Each pass's own check, on config.json as the passes before it leave it; then the calibration windows.

    tokenizer: the model's, when it is loaded already (else it is read from `folder`).
    Returns what the passes read besides the model (calibration files, teacher folders): no output may replace them.
    """
    current = config
    for i, cfg in enumerate(passes):
        try:
            cfg.check(CheckContext(current, folder, passes[:i], config))
            current = cfg.config_after(dict(current))
        except UserError as exc:
            raise UserError(f"{where(i, cfg.name)}{exc}") from None
    check_calibration(folder, passes, trust_remote_code, tokenizer)
    return pass_inputs(passes)


def pass_inputs(passes: list[PassConfig]) -> list[Path]:
    """Local files and folders the passes read: calibration files and given teachers (built-ins: their
    cached folder)."""
    from .sources import local_folder, resolve_source

    found = {
        Path(c.source).expanduser()
        for cfg in passes
        for c in cfg.windows()
        if Path(c.source).expanduser().is_file()
    }
    for cfg in passes:
        teacher = getattr(cfg, "teacher", None)
        if teacher:
            folder = local_folder(resolve_source(teacher))
            found |= {folder} if folder is not None else set()
    return sorted(found)


def check_calibration(folder, passes: list[PassConfig], trust_remote_code: bool, tokenizer=None) -> None:
    """Every calibration source holds the windows the passes will ask of it, counted with the model's own tokenizer."""
    from .calibration import check_calibration_sizes

    needs = [c for cfg in passes for c in cfg.windows()]
    if (folder is None and tokenizer is None) or not needs:
        return
    if tokenizer is None:
        from transformers import AutoTokenizer

        from .console import quiet_transformers

        try:
            with quiet_transformers():
                tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
        except Exception as exc:  # noqa: BLE001 - a tokenizer that cannot load is bad input
            raise UserError(f"could not load the tokenizer of {folder}: {first_line(exc)}") from None
    check_calibration_sizes(tokenizer, needs)


def apply_passes(
    loaded,
    passes: list[PassConfig],
    *,
    dry_run: bool = False,
    on_report: Callable[[PassConfig, Report], None] | None = None,
) -> list[dict]:
    """Apply passes in order to a loaded model, appending each history record to `loaded.pending`; returns those.

    A heal after other passes with no teacher of its own distils towards the model as loaded: a second
    module tree over the same tensors (`distill.shared_copy`), made before the first pass and dropped after
    the last. A heal that comes first finds its teacher itself (`distill.heal_loaded_`).
    dry_run: only the first pass, told not to change the model (prune --scores-only, absorb --dry-run).
    """
    from .calibration import Calibration
    from .model_io import pass_record

    if any(getattr(cfg, "teacher", "") is None and i > 0 for i, cfg in enumerate(passes)):
        from .passes.heal.maths import shared_copy

        loaded.original = shared_copy(loaded.model)
    calibration = Calibration(loaded.tokenizer)
    try:
        for cfg in passes:
            started = time.perf_counter()
            report = cfg.apply_(loaded, calibration, dry_run=dry_run)
            so_far = {"passes": [*loaded.history.get("passes", []), *loaded.pending]}
            loaded.pending.append(
                pass_record(cfg.name, cfg.record(), report.record(), time.perf_counter() - started, so_far)
            )
            if on_report is not None:
                on_report(cfg, report)
            if dry_run:
                break
    finally:
        loaded.original = None
    return loaded.pending


def run_job(
    job: Job, on_report: Callable[[PassConfig, Report], None] | None = None, checked: Checked | None = None
) -> Outcome:
    """Check (unless `checked` is given), load, (baseline), passes, (evaluation), save; the history holds the scores."""
    from . import sharding

    checked = checked or check_job(job)
    if checked.streamed:
        return run_streamed(job, checked, on_report)
    with sharding.asked(job.fsdp):
        return _run_whole(job, checked, on_report)


def _run_whole(job: Job, checked: Checked, on_report) -> Outcome:
    from . import data_parallel, sharding
    from .evaluate import compare, evaluate_model
    from .model_io import load_model, save_model

    check_memory(job, checked)
    # sharded (FSDP): the model loads in CPU memory and each process moves its shards onto its own device
    device = "cpu" if sharding.active() and any(cfg.trains for cfg in job.passes) else job.device
    load = {"dtype": job.dtype, "device": device, "trust_remote_code": job.trust_remote_code}
    plan = None if job.dry_run else job.eval
    quant = (
        {"load_in_8bit": plan.load_in_8bit, "load_in_4bit": plan.load_in_4bit}
        if plan and plan.quantized
        else {}
    )
    scoring = {"limit": plan.limit, "batch_size": plan.batch_size, "manager": checked.tasks} if plan else {}
    loaded = load_model(job.model, **load)
    baseline = None
    if plan and plan.baseline:
        source = load_model(job.model, **load, **quant) if quant else loaded
        baseline = evaluate_model(source, list(plan.tasks), label="the original model", **scoring)
        del source
    records = apply_passes(loaded, job.passes, dry_run=job.dry_run, on_report=on_report)
    rows = None
    if plan and not quant:  # scored in memory, so the scores go into the saved history
        rows = compare(
            evaluate_model(loaded, list(plan.tasks), label="the transformed model", **scoring), baseline
        )
        records[-1]["eval"] = rows
    if job.output is not None and not job.dry_run:  # data parallel: rank 0 writes, the others wait for it
        data_parallel.once(
            lambda: save_model(
                loaded, job.output, force=job.force, new_passes=records, recipe_yaml=job.recipe_yaml
            )
        )
    if plan and quant:  # bitsandbytes quantizes while loading: score the saved model
        target = load_model(str(job.output), **load, **quant)
        rows = compare(
            evaluate_model(target, list(plan.tasks), label="the transformed model", **scoring), baseline
        )
    return Outcome(records, rows, loaded.model.config.to_dict())


STREAM_CHOICES = ("auto", "on", "off")
STREAM_ABOVE = 0.5  # auto streams a checkpoint larger than this share of the memory available


def streams(job: Job, checked: Checked) -> bool:
    """Whether the job runs layer by layer: asked for (`--stream on`), or auto and the checkpoint is large.

    One pass per streamed job, on a standard (untransformed) local safetensors folder; auto does not stream a
    job that evaluates (the evaluation loads the whole model anyway, and the in-memory path checks for room).
    """
    if job.stream not in STREAM_CHOICES:
        raise UserError(f"unknown --stream '{job.stream}'; choose one of {', '.join(STREAM_CHOICES)}")
    if job.stream == "off":
        return False
    problem = stream_problem(job, checked)
    if job.stream == "on":
        if problem:
            raise UserError(f"--stream on: {problem}")
        if job.eval and job.eval.quantized:
            raise UserError(
                "--stream on: a streamed run scores unquantized; drop load-in-8bit / load-in-4bit"
            )
        if job.eval and not job.dry_run:
            need, available, _, _ = memory_estimate(job, checked, 1.25)
            if need > available:
                raise UserError(
                    f"--stream on with an evaluation: scoring loads the whole model (about "
                    f"{need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available); drop the evaluation"
                )
        return True
    if problem or job.eval:
        return False
    return sum(path.stat().st_size for path in checked.weights) > STREAM_ABOVE * available_memory()


def stream_problem(job: Job, checked: Checked) -> str | None:
    """Why the job cannot run layer by layer, or None."""
    blockers = [cfg.name for cfg in job.passes if not cfg.streamable]
    if blockers:
        return (
            f"only {', '.join(streaming_passes())} run layer by layer so far; "
            f"{', '.join(blockers)} needs the whole model in memory"
        )
    if len(job.passes) > 1:
        return "one pass at a time runs layer by layer; run the passes one after the other"
    if any(checked.config.get(k) for k in ("auto_map", "attention_layout", "sparsity_in")):
        return "only a standard (untransformed) checkpoint runs layer by layer"
    if (
        checked.folder is None
        or not checked.weights
        or any(p.suffix != ".safetensors" for p in checked.weights)
    ):
        return "layer by layer needs a local folder of safetensors weights"
    return None


def streaming_passes() -> list[str]:
    """The passes (and settings) that run one decoder layer at a time, for messages."""
    return [c.stream_note or name for name, c in PASSES.items() if c.stream_note or c.streamable is True]


def available_memory() -> int:
    """Bytes this process may still use: MemAvailable, or its memory cgroup's headroom (v1 or v2) when lower.

    The cgroup's inactive file cache counts as free (the kernel reclaims it first), as docker and kubelet count.
    """
    found = [1 << 62]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "memory":  # cgroup v1
                base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
                names = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
            elif controllers == "":  # cgroup v2
                base = Path("/sys/fs/cgroup") / path.lstrip("/")
                names = ("memory.max", "memory.current", "inactive_file")
            else:
                continue
            limit = base / names[0]
            if limit.is_file() and limit.read_text().strip() != "max":
                stat = dict(line.split() for line in (base / "memory.stat").read_text().splitlines())
                used = int((base / names[1]).read_text()) - int(stat.get(names[2], 0))
                found.append(int(limit.read_text()) - used)
    except (OSError, ValueError):
        pass
    return min(found)


def memory_estimate(job: Job, checked: Checked, factor: float) -> tuple[int, int, int, str]:
    """(bytes the whole model would need, bytes available, parameters, dtype name) for a local checkpoint."""
    import math

    from .checkpoint import checkpoint_shapes
    from .model_io import resolve_device, resolve_dtype

    params = sum(math.prod(shape) for shape in checkpoint_shapes(checked.weights).values())
    dtype = resolve_dtype(job.dtype, checked.config)
    need = int(params * dtype.itemsize * factor) + (1 << 29)
    if resolve_device(job.device) == "cpu":  # data parallel: the processes on this machine share it
        available = available_memory() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    else:
        available = gpu_memory()
    return need, available, params, str(dtype).removeprefix("torch.")


def gpu_memory() -> int:
    """Bytes free on the GPU a whole model loads onto (this process's own under a launcher)."""
    import torch

    return torch.cuda.mem_get_info(torch.cuda.current_device())[0]


def check_memory(job: Job, checked: Checked) -> None:
    """Refuse, before loading, a job whose whole model would not fit the memory it may use.

    The estimate is the weights at the compute dtype times the largest `memory_factor` of the passes (the
    copies, gradients and optimizer state each needs) plus 0.5 GiB for the runtime and activations. On the
    CPU it is held against what this process may use (its share, under a launcher); with --device cuda,
    against the free memory of its GPU. Sharded (--fsdp), a process holds 1/N of the trained passes' share.
    """
    from . import data_parallel, sharding
    from .model_io import resolve_device

    if not checked.weights:
        return
    on_gpu = resolve_device(job.device) == "cuda"
    factor = max(cfg.memory_factor for cfg in job.passes)
    trains = any(cfg.trains for cfg in job.passes)
    sharded = sharding.active() and trains
    if sharded:  # each process's shards, with their training state, on its GPU or beside the loaded model
        shards = factor / data_parallel.world_size()
        if on_gpu:  # the model (and heal's teacher) load whole in CPU memory first, in every process
            host = memory_estimate(job, checked, factor)[0]
            share = available_memory() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            if host > share:
                raise UserError(
                    f"with --fsdp each process loads the whole model in CPU memory before sharding it: about "
                    f"{host / 2**30:.1f} GiB, but {share / 2**30:.1f} GiB is available to each; "
                    "use fewer processes per machine or a machine with more memory"
                )
        factor = shards if on_gpu else factor + shards
    need, available, params, dtype = memory_estimate(job, checked, factor)
    if need <= available:
        return
    streamed = [cfg.stream_note for cfg in job.passes if cfg.stream_note]
    if stream_problem(job, checked) is None:
        remedy = "run it with --stream on" + (" (without the evaluation)" if job.eval else "")
    else:
        remedy = (
            ("use a larger GPU" if on_gpu else "use a GPU (--device cuda)")
            + (", shard it over several GPUs (--fsdp under torchrun)" if trains and not sharded else "")
            + "".join(f", {note} (runs layer by layer)" for note in streamed)
            + " or a bigger machine"
        )
    names = ", ".join(dict.fromkeys(cfg.name for cfg in job.passes))
    count = f"{params / 1e9:.2f}B" if params >= 1e8 else f"{params / 1e6:.2f}M"
    where = "is free on the GPU" if on_gpu else "is available"
    raise UserError(
        f"{names} would hold the whole model in memory: about {need / 2**30:.1f} GiB "
        f"({count} parameters in {dtype}), but {available / 2**30:.1f} GiB {where}; {remedy}"
    )


def run_streamed(job: Job, checked: Checked, on_report=None) -> Outcome:
    """The job one decoder layer at a time: read lazily, transform, write the output shard by shard.

    The pass writes the layers (`apply_streamed_`); embedding, norm and head are copied; config.json is the
    pass's `streamed.config`. Tensors are in the compute dtype (`--dtype auto`: the checkpoint's own).
    """
    from transformers import AutoConfig, AutoTokenizer

    from . import data_parallel
    from .atomic import replacing_folder
    from .calibration import Calibration
    from .console import quiet_transformers, status
    from .evaluate import evaluate_model
    from .model_io import (
        _remote_code_files,
        load_model,
        pass_record,
        resolve_device,
        resolve_dtype,
        source_history,
        write_beside_weights,
    )
    from .streaming import ShardWriter, StreamedModel

    folder, (cfg,) = checked.folder, job.passes
    dtype, device = resolve_dtype(job.dtype, checked.config), resolve_device(job.device)
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=job.trust_remote_code)
            config = AutoConfig.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - a folder that cannot load is bad input
        raise UserError(f"could not load {job.model}: {first_line(exc)}") from None
    plan = None if job.dry_run else job.eval
    scoring = {"limit": plan.limit, "batch_size": plan.batch_size, "manager": checked.tasks} if plan else {}
    baseline = None
    if plan and plan.baseline:
        original = load_model(job.model, dtype=job.dtype, device=job.device)
        baseline = evaluate_model(original, list(plan.tasks), label="the original model", **scoring)
        del original
    streamed = StreamedModel(folder, config, dtype, device)
    weights = [folder / f for f in sorted(set(streamed.ckpt.weight_map.values()))]
    history = source_history(job.model, folder, weights, checked.config)
    calibration = Calibration(tokenizer)

    def apply(writer) -> list[dict]:
        started = time.perf_counter()
        report = cfg.apply_streamed_(streamed, calibration, writer)
        seconds = time.perf_counter() - started
        if on_report is not None:
            on_report(cfg, report)
        return [pass_record(cfg.name, cfg.record(), report.record(), seconds, history)]

    try:
        if job.dry_run or job.output is None:
            return Outcome(apply(None), None, streamed.config.to_dict(), streamed=True)
        if not data_parallel.is_main():  # under a launcher the main process writes; the others wait for it
            records = apply(None)
            data_parallel.barrier()
            return _scored(job, plan, scoring, baseline, records, streamed.config.to_dict())
        with replacing_folder(job.output.expanduser()) as tmp:
            tmp.mkdir(parents=True, exist_ok=True)
            writer = ShardWriter(tmp)
            records = apply(writer)
            with status(f"Saving to {job.output}"):
                rest = streamed.layer_prefix
                streamed.copy_tensors(writer, lambda name: None if name.startswith(rest) else name)
                writer.close()
                after = streamed.config
                after.dtype = dtype
                # what save_pretrained of the class the model loads as would write
                after.architectures = checked.config.get("architectures") or [causal_lm_class(config)]
                after.save_pretrained(tmp)
                if (folder / "generation_config.json").is_file():
                    shutil.copyfile(folder / "generation_config.json", tmp / "generation_config.json")
                history["passes"] = list(history.get("passes", [])) + records
                code = _remote_code_files(after.to_dict(), folder)
                write_beside_weights(tmp, history, after.to_dict(), tokenizer, records, job.recipe_yaml, code)
    finally:
        streamed.close()
        if data_parallel.is_main() and not (job.dry_run or job.output is None):
            data_parallel.barrier()  # also when writing failed: the others are waiting
    return _scored(job, plan, scoring, baseline, records, after.to_dict())


def _scored(job: Job, plan, scoring: dict, baseline, records: list[dict], config: dict) -> Outcome:
    """A streamed job's outcome, with the written output scored when the job evaluates."""
    from .evaluate import compare, evaluate_model
    from .model_io import load_model

    rows = None
    if plan:
        target = load_model(str(job.output), dtype=job.dtype, device=job.device)
        rows = compare(
            evaluate_model(target, list(plan.tasks), label="the transformed model", **scoring), baseline
        )
    return Outcome(records, rows, config, streamed=True)


def causal_lm_class(config) -> str:
    """The name of transformers' causal-LM class for a config (what `architectures` names)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM._model_mapping[type(config)].__name__


def run_passes(
    model, passes: list[PassConfig], *, output: str | Path | None = None, force: bool = False
) -> list[Report]:
    """The Python API: apply `passes` to `model` (a loaded model from `llmsurgery.load`, or anything `load` takes).

    The same checks as the command line run first (the passes against the model's config, the calibration
    sources, the output). With `output`, the model is saved there with its history. Returns the typed reports.
    """
    from .model_io import LoadedModel, check_output_free, save_model

    reports: list[Report] = []
    output = Path(output) if output is not None else None
    if not isinstance(model, LoadedModel):
        run_job(
            Job(str(model), list(passes), output, force), on_report=lambda cfg, report: reports.append(report)
        )
        return reports
    config = model.model.config.to_dict()
    inputs = check_passes(list(passes), config, model.folder, False, tokenizer=model.tokenizer)
    if output is not None:
        check_output_free(output, force, model.folder, inputs)
    records = apply_passes(model, list(passes), on_report=lambda cfg, report: reports.append(report))
    if output is not None:
        from . import data_parallel

        data_parallel.once(lambda: save_model(model, output, force=force, new_passes=records))
    return reports
