"""YAML recipes: a model, calibration, an ordered list of passes, an output folder and quality gates.

`load_recipe` validates everything that can be checked without loading weights (unknown keys, types,
ranges, pass compatibility, task names, gates) and reports the first problem with its location
(`passes[1].sparsity: ...`). `run_recipe` executes it; gates decide the exit code.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from . import defaults
from .errors import UserError, validation_line
from .job import EvalOptions, JobOptions, Strict, saved_options
from .passes import PASSES
from .passes.base import CALIB_SOURCE_HELP

RECIPE_VERSION = 1

PassEntry = Annotated[Union[tuple(PASSES.values())], Field(discriminator="pass_")]
# recipe-level `calibration:` keys and the pass options they fill in where a pass gives none
CALIBRATION_DEFAULTS = {
    "source": "calib",
    "samples": "calib-samples",
    "seq-len": "calib-seq-len",
    "seed": "seed",
}


class CalibrationDefaults(Strict):
    """A recipe's `calibration:` block: defaults for every pass's calibration options (calib, calib-samples,
    calib-seq-len, seed) that the pass does not set."""

    source: str | None = Field(None, description=CALIB_SOURCE_HELP)
    samples: int | None = Field(
        None, ge=1, le=defaults.MAX_WINDOWS, description="number of calibration windows"
    )
    seq_len: int | None = Field(
        None, alias="seq-len", ge=2, le=defaults.MAX_SEQ_LEN, description="tokens per calibration window"
    )
    seed: int | None = Field(
        None, ge=0, lt=defaults.MAX_SEED, description="seed choosing the calibration windows"
    )


class Gate(Strict):
    """Bounds on one metric: absolute (max/min) or relative to the baseline (ratio = value / baseline)."""

    max: float | None = None
    min: float | None = None
    max_ratio: float | None = Field(None, gt=0)
    min_ratio: float | None = Field(None, gt=0)
    min_recovery: float | None = Field(
        None, gt=0, description="value / baseline must be at least this (higher-is-better metrics)"
    )

    @model_validator(mode="after")
    def _something(self):
        if all(v is None for v in self.model_dump().values()):
            raise ValueError("a gate needs at least one of max, min, max_ratio, min_ratio, min_recovery")
        return self

    @property
    def relative(self) -> bool:
        return any(v is not None for v in (self.max_ratio, self.min_ratio, self.min_recovery))


class EvalBlock(EvalOptions):
    """A recipe's `eval:` block: the job's evaluation and the quality gates that decide the exit code."""

    gates: dict[str, Gate] = {}

    @field_validator("gates")
    @classmethod
    def _gate_names(cls, gates):
        for name in gates:
            if not re.fullmatch(r"[\w\-]+\.[\w\-,]+", name):
                raise ValueError(f"gate '{name}' must be named TASK.METRIC (e.g. news_ppl.word_perplexity)")
        return gates

    @model_validator(mode="after")
    def _consistent(self):
        for name, gate in self.gates.items():
            if name.split(".")[0] not in self.tasks:
                raise ValueError(f"gate '{name}' names a task that is not in eval.tasks")
            if gate.relative and not self.baseline:
                raise ValueError(f"gate '{name}' compares with the baseline: set baseline: true")
        return self


class Recipe(JobOptions):
    """A recipe: the job options (`job.JobOptions`, spelled as on the command line), calibration defaults, the
    passes in order and the evaluation with its gates."""

    version: Literal[1] = Field(description="recipe format version")
    calibration: CalibrationDefaults = CalibrationDefaults()
    passes: list[PassEntry] = Field(min_length=1)
    eval: EvalBlock | None = None


def _location(loc: tuple) -> str:
    parts: list[str] = []
    for i, p in enumerate(loc):
        if isinstance(p, int):
            parts[-1] = f"{parts[-1]}[{p}]" if parts else f"[{p}]"
        elif i > 0 and loc[0] == "passes" and i == 2 and p in PASSES:
            continue  # the discriminator tag pydantic adds
        else:
            parts.append(str(p))
    return ".".join(parts)


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML would silently keep the last)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, (str, int, float, bool)):
            continue
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key '{key}' appears twice in one mapping", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_yaml(text: str, where: str):
    """YAML as data, duplicate keys refused, errors as one located line."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise UserError(f"{where}: not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None


_KEY_TOKEN = re.compile(r"[^.\[\]]+|\[\d+\]")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`--set a.b[2].c=value` (value read as YAML) on the raw recipe."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set wants KEY=VALUE, got '{item}'")
        if _KEY_TOKEN.sub("", key).strip(".") or key.startswith(("[", ".")) or ".." in key:
            raise UserError(
                f"--set {key}: KEY is a dotted path into the recipe, e.g. eval.limit or passes[1].sparsity"
            )
        value = load_yaml(raw, f"--set {key}")
        tokens = _join_dotted_keys(
            data, [int(t[1:-1]) if t.startswith("[") else t for t in _KEY_TOKEN.findall(key)]
        )
        target = data
        for depth, token in enumerate(tokens[:-1]):
            try:
                target = target[token] if isinstance(token, int) else target.setdefault(token, {})
            except (IndexError, KeyError, TypeError, AttributeError):
                raise UserError(
                    f"--set {key}: no such place in the recipe ({_location(tuple(tokens[: depth + 1]))})"
                ) from None
        if isinstance(tokens[-1], int) != isinstance(target, list):
            raise UserError(f"--set {key}: no such place in the recipe ({_location(tuple(tokens))})")
        try:
            target[tokens[-1]] = value
        except (IndexError, TypeError):
            raise UserError(
                f"--set {key}: no such place in the recipe ({_location(tuple(tokens))})"
            ) from None
    return data


def _join_dotted_keys(data, tokens: list) -> list:
    """Gate names hold a dot (news_ppl.word_perplexity): rejoin tokens that name an existing key."""
    joined, target, i = [], data, 0
    while i < len(tokens):
        step = 1
        if isinstance(target, dict):
            for j in range(len(tokens), i + 1, -1):
                name = ".".join(str(t) for t in tokens[i:j])
                if all(isinstance(t, str) for t in tokens[i:j]) and name in target:
                    step = j - i
                    break
        token = ".".join(str(t) for t in tokens[i : i + step]) if step > 1 else tokens[i]
        joined.append(token)
        try:
            target = target[token]
        except (KeyError, IndexError, TypeError):
            target = None
        i += step
    return joined


def _check_pass_tags(passes, where: str) -> None:
    """Name the `pass:` key and the pass names, instead of pydantic's discriminator jargon."""
    if not isinstance(passes, list):
        return
    names = ", ".join(PASSES)
    for i, entry in enumerate(passes):
        if not isinstance(entry, dict):
            raise UserError(
                f"{where}: passes[{i}]: each pass is a mapping starting with `pass:` (one of {names})"
            )
        if "pass" not in entry:
            hint = ""
            if len(entry) == 1 and next(iter(entry)) in PASSES:
                hint = f"; write `- pass: {next(iter(entry))}` with its options beside it"
            raise UserError(f"{where}: passes[{i}]: no `pass:` key naming the pass (one of {names}){hint}")
        if entry["pass"] not in PASSES:
            raise UserError(
                f"{where}: passes[{i}].pass: unknown pass '{entry['pass']}'; choose one of {names}"
            )


def _with_calibration_defaults(data: dict) -> dict:
    """Recipe-level `calibration:` values fill the calibration options a pass entry does not set."""
    calib, passes = data.get("calibration"), data.get("passes")
    if not isinstance(calib, dict) or not isinstance(passes, list):
        return data
    fills = {option: calib[key] for key, option in CALIBRATION_DEFAULTS.items() if calib.get(key) is not None}
    return data | {
        "passes": [
            entry | {k: v for k, v in fills.items() if k not in entry} if isinstance(entry, dict) else entry
            for entry in passes
        ]
    }


def parse_recipe(data, where: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise UserError(f"{where}: a recipe is a YAML mapping (version, model, passes, ...)")
    _check_pass_tags(data.get("passes"), where)
    try:
        return Recipe.model_validate(_with_calibration_defaults(data))
    except ValidationError as exc:
        raise UserError(f"{where}: {validation_line(exc, _location)}") from None


def read_recipe(path: Path, overrides: list[str] | None = None) -> tuple[Recipe, dict]:
    """(validated recipe, raw data with overrides applied) from a YAML file."""
    if not path.is_file():
        raise UserError(
            f"recipe {path} does not exist" if not path.exists() else f"recipe {path} is not a file"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"recipe {path} is not a text file (not UTF-8)") from None
    if "\x00" in text:
        raise UserError(f"recipe {path} is not a text file (it holds NUL bytes)")
    data = load_yaml(text, str(path))
    if data is not None and not isinstance(data, dict):
        raise UserError(f"{path}: a recipe is a YAML mapping (version, model, passes, ...)")
    data = apply_overrides(data or {}, overrides or [])
    return parse_recipe(data, str(path)), data


def recipe_job(
    recipe: Recipe,
    data: dict,
    output: Path | None,
    force: bool,
    reads: tuple[Path, ...] = (),
    files: dict | None = None,
):
    """The runner's job for a recipe (the same one the pass commands build from their options)."""
    from .runner import Job

    options = recipe.model_copy(update={"output": output, "force": force or recipe.force})
    return Job(
        options,
        list(recipe.passes),
        files=files or {},
        reads=reads,
        recipe_yaml=recipe_text(data, _model_path(recipe.model)),
        where=lambda i, name: f"passes[{i}] ({name}): ",
    )


def _model_path(spec: str) -> str | None:
    """A local model's absolute path (what a saved recipe names), None for built-in names and hub ids."""
    from .sources import resolve_source

    source = resolve_source(spec)
    return (
        str(Path(source.path).resolve())
        if source.path is not None and source.kind in ("folder", "gguf")
        else None
    )


def command_recipe(job) -> str:
    """The recipe `llmsurgery run` would follow to make the same model as a pass command's job, saved beside it."""
    data = {"version": 1} | saved_options(job.options)
    eval_block = data.pop("eval", None)
    data["passes"] = [cfg.recipe_entry() for cfg in job.passes]
    if eval_block:
        data["eval"] = eval_block
    return recipe_text(data, _model_path(job.options.model))


def check_recipe(job):
    """Everything checkable before loading weights (the runner's checks, the device located)."""
    from .model_io import resolve_device
    from .runner import check_job

    try:
        resolve_device(job.options.device)
    except UserError as exc:
        raise UserError(f"device: {exc}") from None
    return check_job(job)


def recipe_text(data: dict, model_path: str | None) -> str:
    """The recipe as run (overrides applied, a local model path made absolute), for the output folder."""
    data = copy.deepcopy(data)
    data.pop("output", None)
    # replacing a folder is asked for on each run, never inherited from a saved recipe
    data.pop("force", None)
    if model_path is not None:
        data["model"] = model_path
    return (
        "# Written by llmsurgery: `llmsurgery run THIS_FILE --output DIR` reproduces the model next to it.\n"
        + yaml.safe_dump(data, sort_keys=False)
    )


def gate_failures(rows: list[dict], gates: dict[str, Gate]) -> list[str]:
    """One message per violated bound, naming the metric, the bound and by how much."""
    values = {f"{r['task']}.{r['metric']}": r for r in rows}
    failures = []
    for name, gate in gates.items():
        row = values.get(name)
        if row is None:
            failures.append(f"{name}: no such metric in the results ({', '.join(sorted(values))})")
            continue
        value, ratio = row["value"], row.get("ratio")
        checks = [
            ("max", value, gate.max, lambda v, b: v <= b),
            ("min", value, gate.min, lambda v, b: v >= b),
            ("max_ratio", ratio, gate.max_ratio, lambda v, b: v <= b),
            ("min_ratio", ratio, gate.min_ratio, lambda v, b: v >= b),
            ("min_recovery", ratio, gate.min_recovery, lambda v, b: v >= b),
        ]
        for bound_name, actual, bound, ok in checks:
            if bound is not None and (actual is None or not ok(actual, bound)):
                what = "ratio to baseline" if "ratio" in bound_name or "recovery" in bound_name else "value"
                failures.append(
                    f"{name}: {what} {actual:.4g} vs {bound_name} {bound:g} (off by {abs(actual - bound):.4g})"
                )
    return failures


def prepare_recipe(
    path: Path,
    output: Path | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
    files: dict | None = None,
):
    """Read and check a recipe as `run` will run it: (recipe, runner job, runner plan).

    `recipe validate` calls this too, so it refuses exactly what `run` would refuse before any work.
    """
    from .evaluate import check_gate_metrics

    recipe, data = read_recipe(path, overrides)
    output = output or (Path(recipe.output) if recipe.output else None)
    if output is None:
        raise UserError(f"{path}: give an output folder (output: in the recipe, or --output)")
    job = recipe_job(recipe, data, output, force, (path,), files)
    plan = check_recipe(job)
    if recipe.eval:
        check_gate_metrics(plan.tasks, recipe.eval.gates)
    return recipe, job, plan


def run_recipe(
    path: Path,
    output: Path | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
    files: dict | None = None,
) -> dict:
    """Run a recipe end to end; returns the results, failed gates listed under "failed_gates" (the CLI exits
    1 on them)."""
    from .runner import run_job

    recipe, job, plan = prepare_recipe(path, output, overrides, force, files)
    outcome = run_job(job, plan=plan)
    results: dict = {
        "recipe": str(path),
        "output": str(job.options.output),
        "passes": [r["pass"] for r in outcome.records],
    }
    if recipe.eval:
        results |= {
            "eval": outcome.eval,
            "gates": {name: gate.model_dump(exclude_none=True) for name, gate in recipe.eval.gates.items()},
            "failed_gates": gate_failures(outcome.eval, recipe.eval.gates),
        }
    return results
