"""Configuration: one dataclass per job, filled from defaults < a TOML file < command-line flags.

Every job (train, generate, export, ...) has a dataclass in this package whose fields are its knobs; the
field's docstring-comment is the flag's help. `load_config` applies the precedence, refuses unknown keys with
the nearest valid name (a typo must never be silently ignored), and lets the dataclass's own validation list
every problem at once in one ConfigError. `to_toml` writes the effective config back out, so that any adapter
says how it was made and `--config` on that text reproduces the run. The grammars of the values the configs
parse (`spec`: adapter sets and sweeps; `schedulers`: sampler names) live here too, so the package imports
nothing of difflora above errors: every other package may read a config.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import itertools
import sys
import textwrap
import types
import typing
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

from difflora.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

C = TypeVar("C")


class Problems:
    """Collects validation problems so a config reports all of them at once, naming the flag of each."""

    def __init__(self) -> None:
        self._items: list[str] = []

    def add(self, field: str, message: str) -> None:
        self._items.append(f"--{field.replace('_', '-')}: {message}")

    def check(self, condition: bool, field: str, message: str) -> None:
        if not condition:
            self.add(field, message)

    def raise_if_any(self, what: str) -> None:
        if self._items:
            listing = "\n  ".join(self._items)
            raise ConfigError(f"Invalid {what} configuration:\n  {listing}")


def coerce_to_tuples(config: Any, *names: str) -> None:
    """Store the named fields of a frozen config as tuples (callers may pass lists; None stays None). Only a
    config's own __post_init__ calls this: after it, a config never changes."""
    for name in names:
        value = getattr(config, name)
        if value is not None:
            object.__setattr__(config, name, tuple(value))


@cache
def field_help(cls: type) -> dict[str, str]:
    """Each field of the config dataclass `cls` with its help: the string literal under its annotation in
    the class body (read with ast, whitespace collapsed). A field without one is a TypeError, so a knob can
    never reach the command line (or the docs) unexplained."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    helps: dict[str, str] = {}
    for node, following in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            helps[node.target.id] = " ".join(following.value.value.split())
    missing = [field.name for field in dataclasses.fields(cls) if field.name not in helps]
    if missing:
        raise TypeError(f"{cls.__name__} fields without a docstring under them: {missing}")
    return helps


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML config file; a [section] table (e.g. [train]) is flattened if it is the only content."""
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"Config file not found: {path}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"Config file {path} is not valid TOML: {error}") from None
    except UnicodeDecodeError as error:  # tomllib decodes the bytes itself; TOML files are UTF-8
        raise ConfigError(
            f"Config file {path} is not UTF-8 text (byte {error.start}); save it as UTF-8."
        ) from None
    except OSError as error:
        raise ConfigError(f"Cannot read config file {path}: {error.strerror or error}") from None
    return data


def load_config(
    cls: type[C],
    *,
    toml_path: Path | str | None = None,
    overrides: Mapping[str, Any] | None = None,
    section: str | None = None,
) -> C:
    """Build `cls` from its defaults, then the TOML file (optionally its [section] table), then the
    overrides whose value is not None (click options default to None so "given" is detectable)."""
    data: Mapping[str, Any] = {}
    if toml_path is not None:
        data = read_toml(Path(toml_path))
        if section is not None and isinstance(data.get(section), dict):
            data = data[section]
    return build_config(cls, data, overrides, source=str(toml_path))


def build_config(
    cls: type[C], data: Mapping[str, Any], overrides: Mapping[str, Any] | None = None, *, source: str
) -> C:
    """`cls` from its defaults, then `data` (a TOML table read from `source`: unknown keys and wrong types
    refused, all problems at once), then the overrides whose value is not None."""
    values: dict[str, Any] = {}
    if data:
        _refuse_unknown(cls, data, source=source)
        coerced = {key: _coerce(cls, key, value) for key, value in data.items()}
        _refuse_wrong_types(cls, coerced, source=source)
        values.update(coerced)
    if overrides:
        given = {key: value for key, value in overrides.items() if value is not None}
        _refuse_unknown(cls, given, source="command line")
        values.update(given)
    try:
        return cls(**values)
    except TypeError as error:  # a value of the wrong shape reaching a dataclass without validation
        raise ConfigError(f"Invalid configuration for {cls.__name__}: {error}") from None


def _refuse_unknown(cls: type, data: Mapping[str, Any], *, source: str) -> None:
    names = [field.name for field in dataclasses.fields(cls)]
    problems = []
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            problems.append(f"unknown key '{key}' (from {source}).{hint}")
    if problems:
        valid = ", ".join(sorted(names))
        raise ConfigError("\n  ".join(["Unknown configuration keys:", *problems]) + f"\nValid keys: {valid}")


def _coerce(cls: type, key: str, value: Any) -> Any:
    """TOML has no tuples or paths: turn lists into tuples where the field is a tuple, and a single value
    into a one-item tuple (`adapters = "style:0.7"`, not a tuple of its characters)."""
    field_type = _field_types(cls).get(key)
    origin = typing.get_origin(field_type)
    if origin in (types.UnionType, typing.Union):
        origins = {typing.get_origin(arg) for arg in typing.get_args(field_type)}
        origin = tuple if tuple in origins else origin
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if origin is tuple and isinstance(value, str | int | float) and not isinstance(value, bool):
        return (value,)
    return value


def _refuse_wrong_types(cls: type, data: Mapping[str, Any], *, source: str) -> None:
    """Every value of the type its field declares, or one ConfigError listing each that is not: the
    dataclass's own checks compare numbers and read strings, and must not meet a table where a number goes."""
    hints = _field_types(cls)
    problems = Problems()
    for key, value in data.items():
        expected = hints.get(key)
        if expected is not None and not _fits(expected, value):
            shown = list(value) if isinstance(value, tuple) else value  # as the file wrote it: a list
            problems.add(key, f"expected {_describe(expected)}, got {shown!r} (from {source})")
    problems.raise_if_any(cls.__name__.removesuffix("Config").lower())


def _fits(expected: Any, value: Any) -> bool:
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (types.UnionType, typing.Union):
        return any(_fits(arg, value) for arg in args if arg is not type(None))
    if origin is typing.Literal:
        return value in args
    if origin is tuple:
        item = args[0] if args else Any
        return isinstance(value, tuple) and all(_fits(item, v) for v in value)
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:  # bool is an int to Python, never to a user; TOML integers are 64-bit
        return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63
    if expected is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if expected is str:
        return isinstance(value, str)
    return True  # a type this check does not know: the dataclass validates it


def _describe(expected: Any) -> str:
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe(arg) for arg in args if arg is not type(None))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if origin is tuple:
        plurals = {int: "integers", float: "numbers", str: "strings"}
        return f"a list of {plurals.get(args[0], 'values') if args else 'values'}"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(expected, getattr(expected, "__name__", str(expected)))


def _field_types(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):
        return {}


def config_to_dict(config: Any) -> dict[str, Any]:
    """The config as plain TOML-able values (paths as strings, tuples as lists, None dropped)."""
    result: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if value is None:
            continue
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = [str(v) if isinstance(v, Path) else v for v in value]
        result[field.name] = value
    return result


def to_toml(config: Any, *, section: str | None = None) -> str:
    """Serialise a config dataclass as TOML (flat scalars and lists of scalars)."""
    lines = [f"[{section}]"] if section else []
    for key, value in config_to_dict(config).items():
        lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def parse_toml_text(text: str) -> dict[str, Any]:
    """Parse TOML text (e.g. a config stored in an adapter's metadata)."""
    return tomllib.loads(text)
