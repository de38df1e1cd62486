"""The one runner behind the pass commands, `llmsurgery run` and the Python API.

A `Job` is its options (`job.JobOptions`: model, output, loading, evaluation) and an ordered list of pass
configs. `check_job` refuses everything that can be told before any weight loads and returns a `Plan`: the
job resolved once (device, dtype, the checked model with its headers read and meta model built, the tokenizer,
the calibration token streams, whole or streamed). `run_job` consumes the plan: load, score the baseline, apply
the passes (`apply_passes`), score the result, save; nothing is read, hashed or tokenized twice. The pass
command `X` and a one-pass recipe with the same settings build the same `Job`, so they write the same tensors
and the same history.
"""

from __future__ import annotations

import functools
import inspect
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .corpora import source_parts
from .errors import UserError, validation_line
from .job import EvalOptions, JobOptions
from .passes import PASSES, PassConfig, Report
from .passes.base import CheckContext, RunContext

STREAM_ABOVE = 0.5  # --stream auto streams a checkpoint larger than this share of the memory available


@dataclass
class Job:
    options: JobOptions
    passes: list[PassConfig]
    dry_run: bool = False  # the first pass only plans (prune --scores-only, absorb --dry-run)
    files: dict[str, Path | None] = field(default_factory=dict)  # what else the run writes (--json, --plot)
    reads: tuple[Path, ...] = ()  # what else the run reads (the recipe)
    recipe_yaml: str | None = None  # saved beside the model: the recipe that reproduces it
    where: Callable[[int, str], str] = lambda i, name: ""  # how errors locate a pass ("passes[1] (heal): ")

    @property
    def eval(self) -> EvalOptions | None:
        """The evaluation this run does (none in a dry run)."""
        return None if self.dry_run else self.options.eval

    @property
    def saves(self) -> bool:
        return self.options.output is not None and not self.dry_run


@dataclass
class Plan:
    """A checked job, resolved once: what loading, calibration, the passes and saving read."""

    job: Job
    device: str  # cpu or cuda
    dtype: Any  # the torch dtype the model computes in
    model: Any  # model_io.CheckedModel: config, folder, weight files, shapes, meta-built config, source
    models: Any  # model_io.CheckedModels: every model the job names, each checked once
    tokenizer: Any  # None for a hub model (it loads with the model)
    streams: Any  # calibration.TokenStreams of that tokenizer (None until the model loads, for a hub model)
    inputs: list[Path]  # files and folders the passes read besides the model
    tasks: Any = None  # lm-eval's task manager, for the evaluation
    sharded: bool = False  # the trained passes shard the model over the processes (FSDP)
    stream_problem: str | None = None  # why the job cannot run layer by layer (None: it can)
    streamed: bool = False  # the job runs one decoder layer at a time

    def load(self, spec: str | None = None, device: str | None = None, quantized: bool = False):
        """The job's model (or another it names, such as heal's teacher) loaded with the job's settings."""
        from .model_io import load_model

        options, ev = self.job.options, self.job.eval
        spec = spec or options.model
        quant = {"load_in_8bit": ev.load_in_8bit, "load_in_4bit": ev.load_in_4bit} if quantized else {}
        return load_model(
            spec,
            dtype=options.dtype if spec == options.model else str(self.dtype).removeprefix("torch."),
            device=device or self.device,
            trust_remote_code=options.trust_remote_code,
            checked=self.models.get(spec),
            tokenizer=self.tokenizer if spec == options.model else None,
            **quant,
        )

    def run_context(self, device: str | None = None) -> RunContext:
        """What the passes are handed: the token streams, the dry run, FSDP, and how to load another model."""
        return RunContext(
            self.streams, self.job.dry_run, self.sharded, functools.partial(self.load, device=device)
        )


@dataclass
class Outcome:
    records: list[dict]
    eval: list[dict] | None = None
    config: dict = field(default_factory=dict)  # config.json of the result
    streamed: bool = False


def check_job(job: Job) -> Plan:
    """Everything about a job that can be told before loading weights, resolved into a `Plan`; raises
    UserError on the first problem."""
    from .evaluate import check_tasks
    from .model_io import (
        CheckedModels,
        check_not_an_input,
        check_output_free,
        load_tokenizer,
        resolve_device,
        resolve_dtype,
    )
    from .sharding import check as check_fsdp
    from .sharding import shards

    options = job.options
    if not job.passes:
        raise UserError("no passes to run")
    device = resolve_device(options.device)
    check_fsdp(options.fsdp, [cfg.name for cfg in job.passes if cfg.trains], device)
    models = CheckedModels(options.trust_remote_code)
    model = models.get(options.model)
    check_passes(job.passes, model.config, model.folder, models, job.where)
    tokenizer = streams = None
    if model.folder is not None:
        from .calibration import TokenStreams

        tokenizer = load_tokenizer(model)
        streams = TokenStreams(tokenizer)
        streams.check([c for cfg in job.passes for c in cfg.windows()])
    inputs = pass_inputs(job.passes, models) + list(job.reads)
    for option, path in job.files.items():
        if path is not None:
            check_not_an_input(path, [p for p in [model.folder, *inputs] if p is not None], f"--{option}")
    if job.saves:
        check_output_free(options.output, options.force, model.folder, inputs)
    tasks = check_tasks(list(job.eval.tasks)) if job.eval else None
    if job.eval and job.eval.quantized and not job.saves:
        raise UserError("a quantized evaluation scores the saved model: give an output folder")
    dtype = resolve_dtype(options.dtype, model.config)
    plan = Plan(job, device, dtype, model, models, tokenizer, streams, inputs, tasks, shards(options.fsdp))
    plan.stream_problem = stream_problem(job, model)
    plan.streamed = streams_layer_by_layer(plan)  # also refuses --stream on for passes that cannot stream
    return plan


def check_passes(
    passes: list[PassConfig],
    config: dict,
    folder,
    models,
    where: Callable[[int, str], str] = lambda i, name: "",
) -> None:
    """Each pass's own check, on config.json as the passes before it leave it (`models`: the models they name,
    each checked once)."""
    current = config
    for i, cfg in enumerate(passes):
        try:
            cfg.check(CheckContext(current, folder, passes[:i], config, models))
            current = cfg.config_after(dict(current))
        except UserError as exc:
            raise UserError(f"{where(i, cfg.name)}{exc}") from None


def pass_inputs(passes: list[PassConfig], models) -> list[Path]:
    """Local files and folders the passes read: calibration files and given teachers (built-ins: their
    cached folder). No output may replace them."""
    found = {
        Path(part).expanduser()
        for cfg in passes
        for c in cfg.windows()
        for part in source_parts(c.source)
        if Path(part).expanduser().is_file()
    }
    for cfg in passes:
        teacher = getattr(cfg, "teacher", None)
        if teacher:
            folder = models.get(teacher).folder
            found |= {folder} if folder is not None else set()
    return sorted(found)


def apply_passes(
    loaded,
    passes: list[PassConfig],
    run: RunContext,
    on_report: Callable[[PassConfig, Report], None] | None = None,
) -> list[dict]:
    """Apply passes in order to a loaded model, appending each history record to `loaded.pending`; returns those.

    A heal after other passes with no teacher of its own distils towards the model as loaded: a second
    module tree over the same tensors (`heal.maths.shared_copy`), made before the first pass and dropped after
    the last. A heal that comes first finds its teacher itself (`heal.maths.heal_loaded_`).
    run.dry_run: only the first pass, told not to change the model (prune --scores-only, absorb --dry-run).
    """
    from .model_io import pass_record

    if any(getattr(cfg, "teacher", "") is None and i > 0 for i, cfg in enumerate(passes)):
        from .passes.heal.maths import shared_copy

        loaded.original = shared_copy(loaded.model)
    try:
        for cfg in passes:
            started = time.perf_counter()
            report = cfg.apply_(loaded, run)
            so_far = {"passes": [*loaded.history.get("passes", []), *loaded.pending]}
            loaded.pending.append(
                pass_record(cfg.name, cfg.record(), report.record(), time.perf_counter() - started, so_far)
            )
            if on_report is not None:
                on_report(cfg, report)
            if run.dry_run:
                break
    finally:
        loaded.original = None
    return loaded.pending


class Scores:
    """A job's evaluation: the original scored before the passes (with `baseline`), the result after."""

    def __init__(self, plan: Plan) -> None:
        self.plan, self.ev = plan, plan.job.eval
        self.baseline = None

    def original(self, loaded=None) -> None:
        """Score the input model (`loaded`, unless the evaluation quantizes: then a quantized copy)."""
        from .evaluate import evaluate_model

        if self.ev and self.ev.baseline:
            source = (
                loaded
                if loaded is not None and not self.ev.quantized
                else self.plan.load(quantized=self.ev.quantized)
            )
            self.baseline = evaluate_model(
                source, self.ev.tasks, label="the original model", **self._scoring()
            )

    def result(self, target=None) -> list[dict]:
        """Rows comparing the transformed model (`target`; None: the saved output, loaded) with the baseline."""
        from .evaluate import compare, evaluate_model
        from .model_io import load_model

        if target is None:
            options, quant = (
                self.plan.job.options,
                self.ev.model_dump(include={"load_in_8bit", "load_in_4bit"}),
            )
            target = load_model(
                str(options.output),
                dtype=options.dtype,
                device=options.device,
                trust_remote_code=options.trust_remote_code,
                **quant,
            )
        rows = evaluate_model(target, self.ev.tasks, label="the transformed model", **self._scoring())
        return compare(rows, self.baseline)

    def _scoring(self) -> dict:
        return {"limit": self.ev.limit, "batch_size": self.ev.batch_size, "manager": self.plan.tasks}


def run_job(
    job: Job, on_report: Callable[[PassConfig, Report], None] | None = None, plan: Plan | None = None
) -> Outcome:
    """Check (unless the `plan` is given), load, (baseline), passes, (evaluation), save; the history holds the
    scores."""
    plan = plan or check_job(job)
    return run_streamed(plan, on_report) if plan.streamed else _run_whole(plan, on_report)


def _run_whole(plan: Plan, on_report) -> Outcome:
    from . import data_parallel
    from .memory import check_memory
    from .model_io import save_model

    job, ev = plan.job, plan.job.eval
    check_memory(plan)
    # sharded (FSDP): the model loads in CPU memory and each process moves its shards onto its own device
    device = "cpu" if plan.sharded and any(cfg.trains for cfg in job.passes) else plan.device
    loaded = plan.load(device=device)
    if plan.streams is None:  # a hub model: its tokenizer came with it
        from .calibration import TokenStreams

        plan.streams = TokenStreams(loaded.tokenizer)
    scores = Scores(plan)
    scores.original(loaded)
    records = apply_passes(loaded, job.passes, plan.run_context(device), on_report)
    rows = None
    if ev and not ev.quantized:  # scored in memory, so the scores go into the saved history
        rows = records[-1]["eval"] = scores.result(loaded)
    if job.saves:  # data parallel: rank 0 writes, the others wait for it
        output, force, recipe = job.options.output, job.options.force, job.recipe_yaml
        data_parallel.once(
            lambda: save_model(loaded, output, force=force, new_passes=records, recipe_yaml=recipe)
        )
    if ev and ev.quantized:  # bitsandbytes quantizes while loading: score the saved model
        rows = scores.result()
        _record_saved_scores(job, rows)
    return Outcome(records, rows, loaded.model.config.to_dict())


def streams_layer_by_layer(plan: Plan) -> bool:
    """Whether the job runs layer by layer: asked for (`--stream on`), or auto and the checkpoint is large.

    One pass per streamed job, on a standard (untransformed) local safetensors folder; auto does not stream a
    job that evaluates (the evaluation loads the whole model anyway, and the in-memory path checks for room).
    """
    from .memory import available_memory, estimate

    job = plan.job
    if job.options.stream == "off":
        return False
    if job.options.stream == "on":
        if plan.stream_problem:
            raise UserError(f"--stream on: {plan.stream_problem}")
        if job.eval and job.eval.quantized:
            raise UserError(
                "--stream on: a streamed run scores unquantized; drop load-in-8bit / load-in-4bit"
            )
        if job.eval and not job.saves:
            raise UserError("--stream on with an evaluation scores the saved model: give an output folder")
        if job.eval:
            need, available, _ = estimate(plan.model.shapes, plan.dtype, plan.device, 1.25)
            if need > available:
                raise UserError(
                    f"--stream on with an evaluation: scoring loads the whole model (about "
                    f"{need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available); drop the evaluation"
                )
        return True
    if plan.stream_problem or job.eval:
        return False
    return sum(path.stat().st_size for path in plan.model.weights) > STREAM_ABOVE * available_memory()


def stream_problem(job: Job, model) -> str | None:
    """Why the job cannot run layer by layer on `model` (a `model_io.CheckedModel`), or None."""
    blockers = [cfg.name for cfg in job.passes if not cfg.streamable]
    if blockers:
        return (
            f"only {', '.join(streaming_passes())} run layer by layer so far; "
            f"{', '.join(blockers)} needs the whole model in memory"
        )
    if len(job.passes) > 1:
        return "one pass at a time runs layer by layer; run the passes one after the other"
    if any(model.config.get(k) for k in ("auto_map", "attention_layout", "sparsity_in")):
        return "only a standard (untransformed) checkpoint runs layer by layer"
    if model.folder is None or not model.weights or any(p.suffix != ".safetensors" for p in model.weights):
        return "layer by layer needs a local folder of safetensors weights"
    return None


def streaming_passes() -> list[str]:
    """The passes (and settings) that run one decoder layer at a time, for messages."""
    return [c.streams_as for c in PASSES.values() if c.streams_as]


def run_streamed(plan: Plan, on_report=None) -> Outcome:
    """The job one decoder layer at a time: read lazily, transform, write the output shard by shard.

    The pass writes the layers (`apply_streamed_`); `model_io.streamed_save` writes the rest. Tensors are in the
    compute dtype (`--dtype auto`: the checkpoint's own).
    """
    import copy

    from . import data_parallel
    from .model_io import pass_record, streamed_save
    from .streaming import StreamedModel

    job, (cfg,) = plan.job, plan.job.passes
    scores = Scores(plan)
    scores.original()
    streamed = StreamedModel(plan.model.folder, copy.deepcopy(plan.model.hf_config), plan.dtype, plan.device)
    run = plan.run_context()

    def apply(writer) -> list[dict]:
        started = time.perf_counter()
        report = cfg.apply_streamed_(streamed, run, writer)
        seconds = time.perf_counter() - started
        if on_report is not None:
            on_report(cfg, report)
        return [pass_record(cfg.name, cfg.record(), report.record(), seconds, plan.model.history())]

    writes = job.saves and data_parallel.is_main()  # under a launcher the main process writes
    try:
        if not writes:
            records = apply(None)
        else:
            with streamed_save(
                job.options.output, streamed, plan.model, plan.tokenizer, job.recipe_yaml
            ) as save:
                records = save.records = apply(save.writer)
    finally:
        streamed.close()
        if job.saves:
            data_parallel.barrier()  # the others wait for the output; also when writing failed
    rows = scores.result() if job.eval else None
    _record_saved_scores(job, rows)
    return Outcome(records, rows, streamed.config.to_dict(), streamed=True)


def _record_saved_scores(job: Job, rows: list | None) -> None:
    """Scores of the saved model into its history and card (the main process; the others wait)."""
    from . import data_parallel
    from .model_io import record_scores

    if rows and job.saves:
        output = job.options.output
        data_parallel.once(lambda: record_scores(output, rows))


def _api_signature(fn: Callable) -> Callable:
    """`run_passes` takes the job options (`JobOptions`, but the model) as keyword arguments: its signature
    says so, for help() and editors."""
    from .job import job_fields

    params = list(inspect.signature(fn).parameters.values())[:2]
    params += [
        inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=info.default, annotation=info.annotation
        )
        for name, info in job_fields().items()
    ]
    fn.__signature__ = inspect.Signature(params, return_annotation=list[Report])
    return fn


@_api_signature
def run_passes(model, passes: list[PassConfig], **options) -> list[Report]:
    """The Python API: apply `passes` to `model` (a loaded model from `llmsurgery.load`, or anything `load` takes).

    The keyword arguments are the job options (`job.JobOptions`: output, force, dtype, device, stream, fsdp,
    trust_remote_code, eval), as on the command line and in recipes. The same checks run first (the passes
    against the model's config, the calibration sources, the output). With `output`, the model is saved there
    with its history. Returns the typed reports.
    """
    from .model_io import LoadedModel

    reports: list[Report] = []
    keep = lambda cfg, report: reports.append(report)  # noqa: E731
    if not isinstance(model, LoadedModel):
        run_job(Job(_options(str(model), options), list(passes)), on_report=keep)
        return reports
    _run_loaded(model, list(passes), _options(str(model.folder or model.source.spec), options), keep)
    return reports


def _options(model: str, given: dict) -> JobOptions:
    from pydantic import ValidationError

    try:
        return JobOptions(model=model, **given)
    except ValidationError as exc:
        raise UserError(validation_line(exc)) from None


def _run_loaded(model, passes: list[PassConfig], options: JobOptions, on_report) -> None:
    """`run_passes` on a model already in memory: the options that load a model do not apply to it."""
    from . import data_parallel
    from .calibration import TokenStreams
    from .model_io import CheckedModels, check_output_free, load_model, save_model
    from .sharding import check, shards

    loads = [n for n in ("dtype", "device", "stream", "trust_remote_code") if n in options.model_fields_set]
    if loads or options.eval is not None:
        what = ", ".join(loads + (["eval"] if options.eval is not None else []))
        raise UserError(
            f"{what}: for a model run_passes loads itself; give its name or folder instead of a loaded model"
        )
    models, streams = CheckedModels(), TokenStreams(model.tokenizer)
    check_passes(passes, model.model.config.to_dict(), model.folder, models)
    streams.check([c for cfg in passes for c in cfg.windows()])
    if options.output is not None:
        check_output_free(options.output, options.force, model.folder, pass_inputs(passes, models))
    param = next(model.model.parameters())  # another model (heal's teacher) loads as this one is
    dtype, device = str(param.dtype).removeprefix("torch."), param.device.type
    check(
        options.fsdp, [cfg.name for cfg in passes if cfg.trains], device
    )  # as check_job does for a named model

    def load(spec: str):
        return load_model(spec, dtype=dtype, device=device, checked=models.get(spec))

    records = apply_passes(
        model, passes, RunContext(streams, sharded=shards(options.fsdp), load=load), on_report
    )
    if options.output is not None:
        output, force = options.output, options.force
        data_parallel.once(lambda: save_model(model, output, force=force, new_passes=records))
