"""`difflora check FOLDER`: the training data scan as a report (usable images, skipped files, captions,
buckets, duplicates, the training plan), without training. Exit code 1 when training would refuse the data.

It reads the same TrainConfig as `difflora train` (defaults < --config < flags), and the model's config
files and tokenizer only (no weights), so the buckets and plan it prints are the ones training will use.
"""

from __future__ import annotations

from pathlib import Path

import click

from difflora.config import load_config
from difflora.config.train import TrainConfig
from difflora.models.geometry import FALLBACK_RESOLUTION, model_geometry
from difflora.training.check import check_dataset
from difflora.training.plan import DataSettings, Tokens


@click.command("check")
@click.argument("folder", type=click.Path(path_type=Path, file_okay=False))
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="TOML file of train settings ([train] table or top level), as for `difflora train`.",
)
@click.option("--model", default=None, help="Base model (its geometry and tokenizer) [default: embedded].")
@click.option(
    "--resolution", type=int, default=None, help="Bucket area is about this squared [default: model's]."
)
@click.option(
    "--trigger", default=None, help="Word put first in every caption (and used when one is missing)."
)
@click.option("--caption-extension", default=None, help="Caption file looked for first: .txt or .caption.")
@click.option("--no-upscale", is_flag=True, flag_value=True, default=None, help="Never enlarge small images.")
@click.option("--batch-size", type=int, default=None)
@click.option("--gradient-accumulation", type=int, default=None)
@click.option("--max-steps", type=int, default=None, help="Plan this many steps instead of deriving them.")
@click.option("--epochs", type=int, default=None, help="Plan this many epochs instead of deriving them.")
def check_command(folder: Path, config_path: Path | None, **flags) -> None:  # fmt: skip
    """Check an image folder before training: what will be used, what will not, and why."""
    config = load_config(TrainConfig, toml_path=config_path, overrides={"data_dir": str(folder), **flags},
                         section="train")  # fmt: skip
    geometry = model_geometry(config.model)
    resolution = config.resolution or geometry.resolution or FALLBACK_RESOLUTION
    settings = DataSettings.from_config(config, resolution=resolution, bucket_step=geometry.step)
    report = check_dataset(settings, Tokens.of(geometry))
    if geometry.note:
        click.echo(f"Note: {geometry.note}\n")
    click.echo(report.render())
    if not report.ok:
        click.get_current_context().exit(1)
