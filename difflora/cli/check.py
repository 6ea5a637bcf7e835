"""`difflora check FOLDER`: the training data scan as a report (usable images, skipped files, captions,
buckets, duplicates, the training plan), without training. Exit code 1 when training would refuse the data.

It reads the same TrainConfig as `difflora train` (defaults < --config < flags; the flags are TrainConfig's
data and length knobs), and the model's config files and tokenizer only (no weights), so the buckets and
plan it prints are the ones training will use.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import click

from difflora.cli.options import config_file_option, config_from_flags, config_options
from difflora.config.train import TrainConfig

# The TrainConfig knobs that change what check reports; the others only matter once training runs.
CHECKED_FIELDS = (
    "model",
    "prediction_type",
    "resolution",
    "trigger",
    "caption_extension",
    "no_upscale",
    "batch_size",
    "gradient_accumulation",
    "max_steps",
    "epochs",
    "reg_dir",
    "prior_weight",
)
_UNCHECKED = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in CHECKED_FIELDS)


@click.command("check")
@click.argument("folder", type=click.Path(path_type=Path, file_okay=False))
@config_file_option("train")
@config_options(TrainConfig, skip=_UNCHECKED)
def check_command(folder: Path, config_file: Path | None, **flags: Any) -> None:
    """Check an image folder before training: what will be used, what will not, and why."""
    from difflora.training.check import check_folder  # here: `difflora --help` does not pay for torch

    flags["data_dir"] = str(folder)
    report = check_folder(config_from_flags(TrainConfig, flags, config_file=config_file, section="train"))
    if report.model_note:
        click.echo(f"Note: {report.model_note}\n")
    click.echo(report.render())
    if not report.ok:
        click.get_current_context().exit(1)
