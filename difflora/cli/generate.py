"""`difflora generate PROMPT`: compose adapters and render images. A thin layer over difflora.generate, with
one flag per GenerateConfig field (difflora.cli.options)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from difflora.cli.options import config_file_option, config_from_flags, config_options
from difflora.config.generate import GenerateConfig
from difflora.config.schedulers import SCHEDULER_NAMES


@click.command("generate")
@click.argument("prompt", required=False)
@config_options(
    GenerateConfig,
    skip=("prompt",),
    names={
        "adapters": ("--adapters", "--adapter"),
        "num_images": ("-n", "--num-images"),
        "out": ("-o", "--out"),
        "report": ("--report",),
    },
    choices={"scheduler": SCHEDULER_NAMES},
)
@config_file_option("generate")
def generate_command(prompt: str | None, config_file: Path | None, **flags: Any) -> None:
    """Generate images for PROMPT, composing saved adapters with their weights.

    Example: difflora generate "a striped cat" --adapters style:0.7,subject:0.5 -n 4 --seed 1
    """
    from difflora.generation.generate import generate

    flags["prompt"] = prompt
    config = config_from_flags(GenerateConfig, flags, config_file=config_file, section="generate")
    with click.progressbar(length=1, label="Generating", file=click.get_text_stream("stderr")) as bar:

        def progress(done: int, total: int) -> None:
            bar.length = total
            bar.update(done - bar.pos)

        paths = generate(config, progress=progress)
    for path in paths:
        click.echo(str(path))
