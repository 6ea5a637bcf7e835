"""`difflora merge a:0.7,b:0.3 -o out.safetensors`: several adapters as one. A thin layer over difflora.merge."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from difflora.config import load_config, to_toml


@click.command("merge")
@click.argument("adapters", nargs=-1)
@click.option("--output", "-o", default=None, help="The merged adapter file (.safetensors).")
@click.option(
    "--rank",
    type=int,
    default=None,
    help="Truncate each layer to this rank (SVD) and report its error. Default: exact.",
)
@click.option(
    "--adapter-dir",
    multiple=True,
    help="Folder searched for adapters by name (repeatable; ./adapters always is).",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path),
    default=None,
    help="TOML settings ([merge] table or flat).",
)
def merge_command(adapters: tuple[str, ...], config_file: Path | None, **flags: Any) -> None:
    """Merge ADAPTERS (NAME[:WEIGHT[:TE_WEIGHT]],...) into one adapter file.

    Exact by default: the file's update equals the weighted sum of the adapters' updates (ranks are
    concatenated). --rank K makes it smaller and reports each layer's relative error.
    """
    from difflora.composition.merge import merge
    from difflora.composition.spec import parse_adapter_weights
    from difflora.config.merge import MergeConfig

    overrides = {key: (value if value != () else None) for key, value in flags.items()}
    overrides["adapters"] = adapters or None
    config = load_config(MergeConfig, toml_path=config_file, overrides=overrides, section="merge")
    result = merge(
        parse_adapter_weights(config.adapters),
        config.output,
        rank=config.rank,
        adapter_dirs=config.adapter_dir,
        config_toml=to_toml(config, section="merge"),
    )
    click.echo(result.text())
    click.echo(f"Wrote {result.path}")
