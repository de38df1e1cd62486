"""Typer options derived from pydantic models: spelling (alias), default, help and bounds come from the fields.

A pass's options come from its config (`option_parameters`, back with `config_from_options`); the job options
every pass command shares from `job.JobOptions` (`job_parameters`, back with `job_options`). The range checks
are pydantic's, the same as in recipes and the Python API.
"""

from __future__ import annotations

import inspect
import types
import typing
from typing import Annotated, Any, Literal, Optional

import annotated_types
import typer
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from rich.markup import escape

from .errors import UserError, validation_line
from .job import EVALUATION, EvalOptions, JobOptions, job_fields
from .passes import PassConfig

_BOUNDS = (
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Ge, "ge", ">="),
    (annotated_types.Lt, "lt", "<"),
    (annotated_types.Le, "le", "<="),
)


def option_name(name: str, info: FieldInfo) -> str:
    return info.alias or name.replace("_", "-")


def _members(annotation) -> list:
    """The types of a union but None (`int | None` -> [int]), or the type itself."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(annotation) if a is not type(None)]
    return [annotation]


def _choices(annotation) -> tuple | None:
    for arg in _members(annotation):
        if typing.get_origin(arg) is Literal:
            return typing.get_args(arg)
        inner = typing.get_args(arg)
        if typing.get_origin(arg) is tuple and inner and typing.get_origin(inner[0]) is Literal:
            return typing.get_args(inner[0])
    return None


def _is_sequence(annotation) -> bool:
    return any(typing.get_origin(a) in (tuple, list) for a in _members(annotation))


def bounds_text(info: FieldInfo) -> str:
    """The field's range as help text, e.g. "0 < x < 1"."""
    lower = upper = None
    for meta in info.metadata:
        for kind, attr, sign in _BOUNDS:
            if isinstance(meta, kind):
                value = getattr(meta, attr)
                text = f"{value:,}" if isinstance(value, int) and value >= 10_000 else f"{value:g}"
                if attr in ("gt", "ge"):
                    lower = f"{text} {sign.replace('>', '<')} "
                else:
                    upper = f" {sign} {text}"
    return f"{lower or ''}x{upper or ''}" if lower or upper else ""


def _help(info: FieldInfo, choices: tuple | None, text: str | None = None) -> str:
    text = (text or info.description or "").rstrip(".")
    first = text.split(" ")[0]
    if first.isalpha() and first not in (
        choices or ()
    ):  # a choice, or a name such as lm-eval, keeps its case
        text = text[:1].upper() + text[1:]
    extra = [f"one of {', '.join(choices)}"] if choices and not all(c in text for c in choices) else []
    bounds = bounds_text(info)
    extra += [bounds] if bounds else []
    return escape(text + (f" [{'; '.join(extra)}]" if extra else "") + ".")  # rich would read [...] as markup


def field_option(
    param: str,
    name: str,
    info: FieldInfo,
    *,
    flag: str | None = None,
    panel: str | None = None,
    required: bool | None = None,
    help: str | None = None,
) -> inspect.Parameter:
    """The keyword parameter of one model field: `--{flag}` (default: the field's spelling), its help, default.

    Lists are one comma-separated string (the model splits it); choices are plain strings (the model checks
    them); booleans that default to true get a `--no-` form. required: whether the command must be given the
    option (default: whether the field is).
    """
    extra = info.json_schema_extra or {}
    spelling = flag or option_name(name, info)
    flags = [f"--{spelling}", *extra.get("flags", [])]
    choices = _choices(info.annotation) or tuple(extra.get("enum", ())) or None
    default = None if info.is_required() else info.default
    required = info.is_required() if required is None else required
    if _is_sequence(info.annotation):
        annotation = Optional[str] if default is None else str
        default = None if default is None else ",".join(map(str, default))
    elif info.annotation is bool:
        annotation = bool
        flags[0] = f"{flags[0]}/--no-{spelling}" if default else flags[0]
    else:
        annotation = Optional[str] if choices and default is None else str if choices else info.annotation
    option = typer.Option(
        *flags,
        help=_help(info, choices, help),
        show_default=default is not None and not required,
        rich_help_panel=panel or extra.get("panel"),
    )
    return inspect.Parameter(
        param,
        inspect.Parameter.KEYWORD_ONLY,
        default=inspect.Parameter.empty if required else default,
        annotation=Annotated[annotation, option],
    )


def option_parameters(
    config: type[BaseModel], prefix: str = "", exclude: tuple[str, ...] = (), panel: str | None = None
) -> list[inspect.Parameter]:
    """One keyword parameter per field of `config` (a pass config, or another options model) but `pass_`,
    `model` and `exclude`: `--{prefix}{spelling}`, its help, its default (`field_option`).

    panel: the --help panel of every option (default: the field's own, else the command's main one).
    """
    fields = [(n, i) for n, i in config.model_fields.items() if n not in ("pass_", "model", *exclude)]
    fields.sort(
        key=lambda item: (item[1].json_schema_extra or {}).get("panel") is not None
    )  # the pass's own knobs first
    param = prefix.replace("-", "_")
    return [
        field_option(f"{param}{name}", name, info, flag=f"{prefix}{option_name(name, info)}", panel=panel)
        for name, info in fields
    ]


def job_parameters(
    trains: bool = True, output_required: bool = False, only: tuple[str, ...] | None = None
) -> list[inspect.Parameter]:
    """The job options a command takes (`job.JobOptions`, all but the model unless `only` names some), in --help
    order. The evaluation is `--eval TASKS` and `--eval-limit N`; `--fsdp` only when the pass may train."""
    params = []
    for name, info in job_fields(trains).items():
        if only is not None and name not in only:
            continue
        if name != "eval":
            params.append(
                field_option(name, name, info, required=output_required if name == "output" else None)
            )
            continue
        for part in ("tasks", "limit"):
            sub = EvalOptions.model_fields[part]
            extra = sub.json_schema_extra
            params.append(
                field_option(
                    f"eval_{part}",
                    part,
                    sub,
                    flag=extra["flag"],
                    help=extra["help"],
                    panel=EVALUATION,
                    required=False,
                )
            )
    return params


def _validated(model: type[BaseModel], data: dict, flags: dict[tuple, str]):
    """`model` from the parsed options; a validation error becomes one line naming the option: `--split: ...`."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise UserError(
            validation_line(exc, lambda loc: flags.get(tuple(p for p in loc if isinstance(p, str)), ""))
        ) from None


def job_options(values: dict[str, Any], model: type[BaseModel] = JobOptions) -> Any:
    """The job options (`model`: JobOptions, or another options model such as `job.EvalJob`) from a command's
    parsed values; for JobOptions, `--eval`/`--eval-limit` make its evaluation."""
    data = {name: values[name] for name in model.model_fields if name in values and name != "eval"}
    flags = {
        (key,): f"--{option_name(name, info)}"
        for name, info in model.model_fields.items()
        for key in (name, info.alias)
    }
    if model is JobOptions and values.get("eval_tasks"):
        data["eval"] = {"tasks": values["eval_tasks"], "limit": values.get("eval_limit")}
        flags |= {("eval", "tasks"): "--eval", ("eval", "limit"): "--eval-limit"}
    return _validated(model, data, flags)


def config_from_options(
    config: type[PassConfig], values: dict[str, Any], prefix: str = "", **fixed: Any
) -> PassConfig:
    """The config from a command's parsed options (`fixed`: fields set by the command itself, by field name).

    A validation error becomes one line naming the option: `--split: ...`.
    """
    data, flags = {}, {}
    for name, info in config.model_fields.items():
        key = f"{prefix.replace('-', '_')}{name}"
        flags[(option_name(name, info),)] = f"--{prefix}{option_name(name, info)}"
        if name in fixed:
            data[option_name(name, info)] = fixed[name]
        elif key in values:
            data[option_name(name, info)] = values[key]
    return _validated(config, data, flags)
