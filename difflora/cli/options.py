"""Click options generated from a config dataclass: one flag per field, whose help is the field's docstring
and whose shown default is the dataclass's, so a knob, its flag and its default are each written once.

Every flag defaults to None (a repeatable one to ()), so `load_config` can tell "given" from "not given":
defaults < `--config FILE.toml` < flags. Types map as: `X | None` -> X, bool -> `--x/--no-x`,
`tuple[X, ...]` -> a repeatable flag, Literal -> click.Choice.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from difflora.config import field_help, load_config
from difflora.config.fields import base_type, field_default

F = TypeVar("F", bound=Callable[..., Any])
C = TypeVar("C")


def config_options(
    cls: type,
    *,
    skip: Collection[str] = (),
    names: Mapping[str, Sequence[str]] | None = None,
    choices: Mapping[str, Sequence[str]] | None = None,
) -> Callable[[F], F]:
    """A decorator adding one option per field of `cls` (in field order), except those in `skip` (the
    command's positional arguments). `names` replaces a field's flags, e.g. {"num_images": ("-n",
    "--num-images")}; a bool field named without a `--x/--no-x` pair becomes an on-switch only. `choices`
    lists the valid values of a str field in its help but leaves checking them to the config, which reports
    every problem at once (a click.Choice would stop at the first)."""
    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    unknown = {*skip, *(names or {}), *(choices or {})} - {field.name for field in dataclasses.fields(cls)}
    if unknown:  # a misspelt field would otherwise silently keep its generated flag
        raise TypeError(f"{cls.__name__} has no fields {sorted(unknown)}")
    options = [
        field_option(
            field,
            hints[field.name],
            helps[field.name],
            flags=(names or {}).get(field.name),
            choices=(choices or {}).get(field.name),
        )
        for field in dataclasses.fields(cls)
        if field.name not in skip
    ]

    def decorate(function: F) -> F:
        for option in reversed(options):  # click lists the last-applied option first
            function = option(function)
        return function

    return decorate


def field_option(
    field: dataclasses.Field,
    hint: Any,
    help_text: str,
    *,
    flags: Sequence[str] | None = None,
    choices: Sequence[str] | None = None,
) -> Callable[[F], F]:
    """The click option of one config field (see `config_options`)."""
    flag = "--" + field.name.replace("_", "-")
    declared = list(flags or [flag])
    base = base_type(hint)
    settings: dict[str, Any] = {"default": None}
    if base is bool:
        if flags is None and not field.name.startswith("no_"):  # no --no-no-upscale
            declared = [f"{flag}/--no-{flag[2:]}"]
        elif flags is None or not any("/" in name for name in declared):
            settings.update(is_flag=True, flag_value=True)
    elif typing.get_origin(base) is tuple:
        settings.update(multiple=True, type=typing.get_args(base)[0])
        help_text += " (repeat the flag)"
    elif typing.get_origin(base) is typing.Literal:
        settings["type"] = click.Choice([str(value) for value in typing.get_args(base)])
    elif base in (str, int, float):
        settings.update(type=base, metavar=f"[{'|'.join(choices)}]" if choices else None)
    else:
        raise TypeError(f"no command-line flag for {field.name}: {hint}")
    return click.option(*declared, field.name, help=help_text + shown_default(field), **settings)


def shown_default(field: dataclasses.Field) -> str:
    """The help's `[default: X]` suffix, read from the dataclass; nothing for an empty default (None, False,
    (), ""), whose meaning the field's help states."""
    default = field_default(field)
    if default is None or default is False or default in ((), ""):
        return ""
    text = " ".join(str(item) for item in default) if isinstance(default, tuple) else str(default)
    return f" [default: {text}]"


def config_file_option(section: str) -> Callable[[F], F]:
    """`--config FILE.toml` (dest `config_file`): the command's settings, flat or under a [section] table."""
    return click.option(
        "--config",
        "config_file",
        type=click.Path(path_type=Path, dir_okay=False),
        default=None,
        help=f"TOML file of settings (keys = flag names with _, optionally under [{section}]); "
        "flags override it.",
    )


def config_from_flags(cls: type[C], flags: Mapping[str, Any], *, config_file: Path | None, section: str) -> C:
    """`cls` from its defaults, then `config_file`, then the flags that were given (None or () is not)."""
    overrides = {key: (None if value == () else value) for key, value in flags.items()}
    return load_config(cls, toml_path=config_file, overrides=overrides, section=section)
