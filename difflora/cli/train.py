"""`difflora train DIR`: one flag per TrainConfig field, generated from the dataclass (difflora.cli.options)
so a new knob can never be a key without a flag (or the reverse): defaults < `--config FILE.toml` < flags.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from difflora.cli.options import config_file_option, config_from_flags, config_options
from difflora.config.train import TrainConfig
from difflora.errors import Interrupted
from difflora.generation.schedulers import SCHEDULER_NAMES


@click.command("train")
@click.argument("data_dir", required=False, type=click.Path(path_type=Path))
@config_file_option("train")
@config_options(TrainConfig, skip=("data_dir",), choices={"sample_scheduler": SCHEDULER_NAMES})
def train_command(data_dir: Path | None, config_file: Path | None, **flags: Any) -> None:
    """Train a LoRA adapter on the images (and captions) in DATA_DIR.

    Writes <output-dir>/<name>.safetensors (default ./adapters/<folder name>.safetensors) and a run
    directory beside it with the plan, loss log and curve, samples and checkpoints.
    """
    from difflora.training.lock import interrupted_message, run_paths
    from difflora.training.trainer import train

    flags["data_dir"] = str(data_dir) if data_dir is not None else None
    config = config_from_flags(TrainConfig, flags, config_file=config_file, section="train")
    try:
        adapter = train(config)
    except KeyboardInterrupt:
        raise Interrupted(interrupted_message(run_paths(config))) from None
    if (
        os.environ.get("RANK", "0") == "0"
    ):  # under accelerate launch / torchrun: one line, not one per process
        click.echo(f"Adapter: {adapter}")
