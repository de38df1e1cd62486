"""Typer options derived from a pass's config: spelling (alias), default, help and bounds come from its fields.

`option_parameters` gives the `inspect.Parameter`s a command's signature holds; `config_from_options` builds
the config back from the parsed values, so the range checks are pydantic's, the same as in recipes.
"""

from __future__ import annotations

import inspect
import types
import typing
from typing import Annotated, Any, Literal, Optional

import annotated_types
import typer
from pydantic import ValidationError
from pydantic.fields import FieldInfo
from rich.markup import escape

from .errors import UserError
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


def _help(info: FieldInfo, choices: tuple | None) -> str:
    text = (info.description or "").rstrip(".")
    if not choices or text.split(" ")[0] not in choices:
        text = text[:1].upper() + text[1:]
    extra = [f"one of {', '.join(choices)}"] if choices and not all(c in text for c in choices) else []
    bounds = bounds_text(info)
    extra += [bounds] if bounds else []
    return escape(text + (f" [{'; '.join(extra)}]" if extra else "") + ".")  # rich would read [...] as markup


def option_parameters(
    config: type[PassConfig], prefix: str = "", exclude: tuple[str, ...] = (), panel: str | None = None
) -> list[inspect.Parameter]:
    """One keyword parameter per config field (but `pass_` and `exclude`): `--{prefix}{alias}`, its help, its default.

    panel: the --help panel of every option (default: the field's own, else the command's main one).

    Lists are one comma-separated string (the config splits it); choices are plain strings (the config checks
    them); booleans that default to true get a `--no-` form.
    """
    params = []
    fields = [(n, i) for n, i in config.model_fields.items() if n != "pass_" and n not in exclude]
    fields.sort(
        key=lambda item: (item[1].json_schema_extra or {}).get("panel") is not None
    )  # the pass's own knobs first
    for name, info in fields:
        flag = f"--{prefix}{option_name(name, info)}"
        choices = _choices(info.annotation)
        default = info.default
        required = info.is_required()
        if _is_sequence(info.annotation):
            annotation = Optional[str] if default is None else str
            default = None if default is None else ",".join(map(str, default))
        elif info.annotation is bool:
            annotation = bool
            flag = f"{flag}/--{prefix}no-{option_name(name, info)}" if default else flag
        else:
            annotation = info.annotation
            if choices:
                annotation = Optional[str] if default is None else str
        option = typer.Option(
            flag,
            help=_help(info, choices),
            show_default=default is not None and not required,
            rich_help_panel=panel or (info.json_schema_extra or {}).get("panel"),
        )
        params.append(
            inspect.Parameter(
                f"{prefix.replace('-', '_')}{name}",
                inspect.Parameter.KEYWORD_ONLY,
                default=inspect.Parameter.empty if required else default,
                annotation=Annotated[annotation, option],
            )
        )
    return params


def config_from_options(
    config: type[PassConfig], values: dict[str, Any], prefix: str = "", **fixed: Any
) -> PassConfig:
    """The config from a command's parsed options (`fixed`: fields set by the command itself, by field name).

    A validation error becomes one line naming the option: `--split: ...`.
    """
    data = {}
    for name, info in config.model_fields.items():
        key = f"{prefix.replace('-', '_')}{name}"
        if name in fixed:
            data[option_name(name, info)] = fixed[name]
        elif key in values:
            data[option_name(name, info)] = values[key]
    try:
        return config.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        option = next((str(p) for p in first["loc"] if isinstance(p, str)), None)
        where = f"--{prefix}{option}: " if option else ""
        raise UserError(f"{where}{first['msg'].removeprefix('Value error, ')}") from None
