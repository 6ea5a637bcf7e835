"""The `difflora` command: a click group whose commands are thin layers over the Python API.

Each command lives in its own module here, parses its flags into a config dataclass and calls one library
function. Library errors (DiffloraError) become one clean message and a non-zero exit code, Ctrl-C one line
and exit code 130; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import logging
import os
import sys

import click

from difflora import __version__
from difflora.errors import DiffloraError, Interrupted


class DiffloraGroup(click.Group):
    """Turns expected failures into clean messages; unexpected ones keep their traceback."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except DiffloraError as error:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.secho(f"Error: {error}", fg="red", err=True)
            ctx.exit(error.exit_code)
        except KeyboardInterrupt:
            # A command that can say what it completed raises Interrupted (a DiffloraError) instead. Every
            # write is atomic, so whatever the interruption hit, no half-written file is left behind.
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.secho("Interrupted: no half-written file was left.", fg="red", err=True)
            ctx.exit(Interrupted.exit_code)


@click.group(cls=DiffloraGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="difflora")
@click.option("--debug", is_flag=True, help="Show full tracebacks and debug logs.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Train, compose and export LoRA adapters for Stable Diffusion models.

    Works offline out of the box on an embedded tiny model; pass --model for your own.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    _configure_logging(debug)


# Libraries whose INFO/WARNING logs are noise to a user of the command (bitsandbytes and kernels: see
# difflora/chatter.py, which drops their known harmless lines for the Python API too).
NOISY_LIBRARIES = (
    "diffusers",
    "transformers",
    "accelerate",
    "peft",
    "bitsandbytes",
    "kernels",
    "urllib3",
    "httpx",
    "PIL",
)


def _configure_logging(debug: bool) -> None:
    level = logging.DEBUG if debug else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    for noisy in NOISY_LIBRARIES:
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main() -> None:
    cli(prog_name="difflora")


def _register() -> None:
    """Each command module registers itself here (one line each)."""
    from difflora.cli.check import check_command
    from difflora.cli.env import env_command
    from difflora.cli.export import export_command
    from difflora.cli.generate import generate_command
    from difflora.cli.inspect import inspect_command
    from difflora.cli.merge import merge_command
    from difflora.cli.serve import serve_command
    from difflora.cli.train import train_command

    cli.add_command(inspect_command)
    cli.add_command(check_command)
    cli.add_command(env_command)
    cli.add_command(export_command)
    cli.add_command(generate_command)
    cli.add_command(merge_command)
    cli.add_command(serve_command)
    cli.add_command(train_command)


_register()
