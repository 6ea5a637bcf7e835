"""`difflora export ADAPTER`: write an adapter in the layout ComfyUI, A1111/Forge and diffusers load, with one
flag per ExportConfig field (difflora.cli.options)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from difflora.cli.options import config_file_option, config_from_flags, config_options
from difflora.config.export import ExportConfig


@click.command("export")
@click.argument("adapter", type=click.Path(path_type=Path, dir_okay=False))
@config_options(
    ExportConfig, skip=("adapter",), names={"output": ("-o", "--output"), "overwrite": ("--overwrite",)}
)
@config_file_option("export")
def export_command(adapter: Path, config_file: Path | None, **flags: Any) -> None:
    """Export ADAPTER for ComfyUI / A1111 / Forge (default) or diffusers, and say where it loads."""
    from difflora.formats.consumers.verdicts import file_verdicts, format_verdicts
    from difflora.formats.export import export_adapter

    flags["adapter"] = str(adapter)
    config = config_from_flags(ExportConfig, flags, config_file=config_file, section="export")
    written = export_adapter(config)
    click.echo(f"Wrote {written}")
    for line in format_verdicts(file_verdicts(written)):
        click.echo(f"  {line}")
