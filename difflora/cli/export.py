"""`difflora export ADAPTER`: write an adapter in the layout ComfyUI, A1111/Forge and diffusers load, with one
flag per ExportConfig field (difflora.cli.options)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from difflora.cli.options import config_file_option, config_from_flags, config_options
from difflora.config.export import ExportConfig


@click.command("export")
@click.argument("adapter")
@config_options(
    ExportConfig, skip=("adapter",), names={"output": ("-o", "--output"), "overwrite": ("--overwrite",)}
)
@config_file_option("export")
def export_command(adapter: str, config_file: Path | None, **flags: Any) -> None:
    """Export ADAPTER for ComfyUI / A1111 / Forge (default) or diffusers, and say where it loads. ADAPTER is a
    file, or FILE[:WEIGHT[:TE_WEIGHT]][@BLOCKS] to bake weights and block weights into the written file."""
    from difflora.composition.weighted import export_spec
    from difflora.formats.consumers.verdicts import file_verdicts, format_verdicts

    flags["adapter"] = str(adapter)
    config = config_from_flags(ExportConfig, flags, config_file=config_file, section="export")
    written = export_spec(config)
    click.echo(f"Wrote {written}")
    for line in format_verdicts(file_verdicts(written)):
        click.echo(f"  {line}")
