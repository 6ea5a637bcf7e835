"""`difflora train DIR`: one flag per TrainConfig field, generated from the dataclass so a new knob can never
be a key without a flag (or the reverse). Every flag defaults to None, so load_config can tell "given" from
"not given": defaults < `--config FILE.toml` < flags.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any

import click

from difflora.config import load_config
from difflora.config.train import TrainConfig, field_help

_POSITIONAL = "data_dir"


def _base_type(hint: Any) -> Any:
    """`int | None` -> int; other hints unchanged."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def _option(field: dataclasses.Field, hint: Any, help_text: str):
    flag = "--" + field.name.replace("_", "-")
    base = _base_type(hint)
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
    text = " ".join(str(d) for d in default) if isinstance(default, tuple) else str(default)
    hidden = default is None or default is False or default in ((), "")
    shown = "" if hidden else f" [default: {text}]"
    if base is bool:
        no_flag = "--no-" + field.name.replace("_", "-")
        return click.option(f"{flag}/{no_flag}", field.name, default=None, help=help_text + shown)
    if typing.get_origin(base) is tuple:
        item = typing.get_args(base)[0]
        return click.option(
            flag,
            field.name,
            multiple=True,
            type=item,
            default=None,
            help=help_text + " (repeat the flag)" + shown,
        )
    if typing.get_origin(base) is typing.Literal:
        choice = click.Choice([str(c) for c in typing.get_args(base)])
        return click.option(flag, field.name, type=choice, default=None, help=help_text + shown)
    return click.option(flag, field.name, type=base, default=None, help=help_text + shown)


def _train_options(function):
    hints = typing.get_type_hints(TrainConfig)
    helps = field_help(TrainConfig)
    for field in reversed(dataclasses.fields(TrainConfig)):
        if field.name != _POSITIONAL:
            function = _option(field, hints[field.name], helps[field.name])(function)
    return function


@click.command("train")
@click.argument(_POSITIONAL, required=False, type=click.Path(path_type=Path))
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path),
    default=None,
    help="TOML file of settings (keys = flag names with _, optionally under [train]); flags override it.",
)
@_train_options
def train_command(data_dir: Path | None, config_file: Path | None, **flags: Any) -> None:
    """Train a LoRA adapter on the images (and captions) in DATA_DIR.

    Writes <output-dir>/<name>.safetensors (default ./adapters/<folder name>.safetensors) and a run
    directory beside it with the plan, loss log and curve, samples and checkpoints.
    """
    from difflora.training.trainer import train

    overrides = {k: (v if v != () else None) for k, v in flags.items()}
    overrides[_POSITIONAL] = str(data_dir) if data_dir is not None else None
    config = load_config(TrainConfig, toml_path=config_file, overrides=overrides, section="train")
    adapter = train(config)
    if (
        os.environ.get("RANK", "0") == "0"
    ):  # under accelerate launch / torchrun: one line, not one per process
        click.echo(f"Adapter: {adapter}")
