"""`difflora merge a:0.7,b:0.3 -o out.safetensors`: several adapters as one. A thin layer over difflora.merge,
with one flag per MergeConfig field (difflora.cli.options)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from difflora.cli.options import config_file_option, config_from_flags, config_options
from difflora.config import to_toml
from difflora.config.merge import MergeConfig


@click.command("merge")
@click.argument("adapters", nargs=-1)
@config_options(MergeConfig, skip=("adapters",), names={"output": ("-o", "--output")})
@config_file_option("merge")
def merge_command(adapters: tuple[str, ...], config_file: Path | None, **flags: Any) -> None:
    """Merge ADAPTERS (NAME[:WEIGHT[:TE_WEIGHT]],...) into one adapter file.

    Exact by default: the file's update equals the weighted sum of the adapters' updates (ranks are
    concatenated). --rank K makes it smaller and reports each layer's relative error. --into-base MODEL
    writes MODEL with the adapters baked in instead (W0 + Σ wᵢ·ΔWᵢ, MODEL's layout and dtype).
    """
    from difflora.composition.bake import bake
    from difflora.composition.merge import merge

    flags["adapters"] = adapters
    config = config_from_flags(MergeConfig, flags, config_file=config_file, section="merge")
    if config.into_base is not None:
        baked = bake(config.adapter_weights, config.into_base, config.output, adapter_dirs=config.adapter_dir)
        click.echo(baked.text())
        click.echo(f"Wrote {baked.path}")
        return
    result = merge(
        config.adapter_weights,
        config.output,
        rank=config.rank,
        adapter_dirs=config.adapter_dir,
        config_toml=to_toml(config, section="merge"),
    )
    click.echo(result.text())
    click.echo(f"Wrote {result.path}")
