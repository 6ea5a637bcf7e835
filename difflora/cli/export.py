"""`difflora export ADAPTER`: write an adapter in the layout ComfyUI, A1111/Forge and diffusers load."""

from __future__ import annotations

from pathlib import Path

import click

from difflora.config import load_config
from difflora.config.export import EXPORT_DTYPES, EXPORT_FORMATS, ExportConfig


@click.command("export")
@click.argument("adapter", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "-o", "--output", default=None, help="Output file [default: <adapter>.<format>.safetensors beside it]."
)
@click.option(
    "--format",
    "format_",
    type=click.Choice(EXPORT_FORMATS),
    default=None,
    help="comfyui (kohya names: ComfyUI, A1111/Forge, diffusers) or diffusers (PEFT layout) [default: comfyui].",
)
@click.option(
    "--dtype", type=click.Choice(EXPORT_DTYPES), default=None, help="Tensor precision [default: fp16]."
)
@click.option("--overwrite", is_flag=True, default=None, help="Replace an existing output file.")
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="TOML file of export settings ([export] table or top level).")  # fmt: skip
def export_command(adapter: Path, output: str | None, format_: str | None, dtype: str | None,
                   overwrite: bool | None, config_path: Path | None) -> None:  # fmt: skip
    """Export ADAPTER for ComfyUI / A1111 / Forge (default) or diffusers, and say where it loads."""
    from difflora.formats.consumers.verdicts import file_verdicts, format_verdicts
    from difflora.formats.export import export_adapter

    overrides = {
        "adapter": str(adapter),
        "output": output,
        "format": format_,
        "dtype": dtype,
        "overwrite": overwrite,
    }
    config = load_config(ExportConfig, toml_path=config_path, overrides=overrides, section="export")
    written = export_adapter(config)
    click.echo(f"Wrote {written}")
    for line in format_verdicts(file_verdicts(written)):
        click.echo(f"  {line}")
