"""What a config dataclass's fields are, read once for every interface that offers them: the CLI's flags
(difflora.cli.options) and the web UI's training form (difflora.webui.forms) are both generated from
`field_specs`, so a knob's type, default, choices and help are written once, in the dataclass."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from difflora.config import field_help


@dataclass(frozen=True)
class FieldSpec:
    """One field as an interface offers it. `kind`: bool, int, float, str, choice (a Literal) or list
    (a tuple of `item`); `optional`: None is a valid value (the run derives it); `choices`: the valid values
    of a choice field, or the listed ones of a str field whose checking the config does."""

    name: str
    kind: str
    item: str | None
    optional: bool
    default: Any
    choices: tuple[str, ...]
    help: str


def base_type(hint: Any) -> Any:
    """`int | None` -> int; other hints unchanged."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def field_default(field: dataclasses.Field) -> Any:
    """The field's default value (its factory called)."""
    factory = field.default_factory
    return factory() if factory is not dataclasses.MISSING else field.default


def field_specs(
    cls: type, *, skip: Collection[str] = (), choices: Mapping[str, Sequence[str]] | None = None
) -> list[FieldSpec]:
    """A FieldSpec per field of `cls` in field order, except those in `skip`. A type no interface can
    offer is a TypeError naming the field."""
    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    specs = []
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        hint = hints[field.name]
        kind, item, listed = _kind(field.name, base_type(hint))
        optional = type(None) in typing.get_args(hint)
        listed = listed or tuple((choices or {}).get(field.name, ()))
        specs.append(
            FieldSpec(field.name, kind, item, optional, field_default(field), listed, helps[field.name])
        )
    return specs


def _kind(name: str, base: Any) -> tuple[str, str | None, tuple[str, ...]]:
    if base is bool:
        return "bool", None, ()
    if typing.get_origin(base) is tuple:
        return "list", typing.get_args(base)[0].__name__, ()
    if typing.get_origin(base) is typing.Literal:
        return "choice", None, tuple(str(value) for value in typing.get_args(base))
    if base in (str, int, float):
        return base.__name__, None, ()
    raise TypeError(f"no interface for {name}: {base}")
