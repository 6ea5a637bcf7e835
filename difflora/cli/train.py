"""`difflora train DIR`: one flag per TrainConfig field, generated from the dataclass (difflora.cli.options)
so a new knob can never be a key without a flag (or the reverse): defaults < `--config FILE.toml` < flags.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from difflora.cli.options import config_file_option, config_options
from difflora.config.schedulers import SCHEDULER_NAMES
from difflora.config.train import TrainConfig
from difflora.errors import Interrupted


@click.command("train")
@click.argument("data_dir", nargs=-1, type=click.Path(path_type=Path))
@config_file_option("train")
@config_options(TrainConfig, skip=("data_dir",), choices={"sample_scheduler": SCHEDULER_NAMES})
def train_command(data_dir: tuple[Path, ...], config_file: Path | None, **flags: Any) -> None:
    """Train a LoRA adapter on the images (and captions) in each DATA_DIR.

    Writes <output-dir>/<name>.safetensors (default ./adapters/<folder name>.safetensors) and a run
    directory beside it with the plan, loss log and curve, samples and checkpoints. Several folders (or
    [[adapter]] tables in --config) train one adapter each, in one process over one loaded base model.
    """
    from difflora.config.train_files import load_train_configs
    from difflora.training.lock import interrupted_message, run_paths
    from difflora.training.trainer import train, train_many

    given = {key: (None if value == () else value) for key, value in flags.items()}
    configs = load_train_configs(config_file, given, [str(d) for d in data_dir])
    try:
        adapters = [train(configs[0])] if len(configs) == 1 else train_many(configs)
    except KeyboardInterrupt:
        running = next((c for c in configs if not run_paths(c).adapter.exists()), configs[-1])
        raise Interrupted(interrupted_message(run_paths(running))) from None
    if (
        os.environ.get("RANK", "0") == "0"
    ):  # under accelerate launch / torchrun: one line, not one per process
        for adapter in adapters:
            click.echo(f"Adapter: {adapter}")
