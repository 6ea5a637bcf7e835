"""`difflora generate PROMPT`: compose adapters and render images. A thin layer over difflora.generate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from difflora.config import load_config
from difflora.generation.schedulers import SCHEDULER_NAMES


@click.command("generate")
@click.argument("prompt", required=False)
@click.option(
    "--adapters",
    "adapter_specs",
    multiple=True,
    help="NAME[:WEIGHT[:TE_WEIGHT]],... e.g. style:0.7,subject:0.3",
)
@click.option(
    "--adapter", "adapter_single", multiple=True, help="One NAME[:WEIGHT[:TE_WEIGHT]] (repeatable)."
)
@click.option(
    "--adapter-dir",
    multiple=True,
    help="Folder searched for adapters by name (repeatable; ./adapters always is).",
)
@click.option(
    "--model",
    default=None,
    help="Diffusers folder, .safetensors checkpoint or hub id. Default: embedded model.",
)
@click.option("--negative-prompt", default=None, help="What the image should not show.")
@click.option("--steps", type=int, default=None, help="Denoising steps [default: 20].")
@click.option("--guidance", type=float, default=None, help="Classifier-free guidance scale [default: 5.0].")
@click.option(
    "--seed", type=int, default=None, help="Seed of the first image (image i uses seed+i). Default: random."
)
@click.option("--num-images", "-n", type=int, default=None, help="How many images [default: 1].")
@click.option(
    "--width", type=int, default=None, help="Width in pixels (multiple of 8). Default: the model's."
)
@click.option(
    "--height", type=int, default=None, help="Height in pixels (multiple of 8). Default: the model's."
)
@click.option("--scheduler", default=None, help=f"Sampler: {', '.join(SCHEDULER_NAMES)} [default: euler].")
@click.option("--out", "-o", default=None, help="Output folder [default: outputs].")
@click.option(
    "--fuse/--no-fuse",
    default=None,
    help="Fuse adapters into the weights (default) or use peft's dynamic forward.",
)
@click.option("--report", is_flag=True, default=None, help="Print and save the per-layer composition report.")
@click.option("--sweep", multiple=True, help="NAME:W1,W2,... grid over an adapter's weight (repeat for 2-D).")
@click.option("--device", default=None, help="torch device. Default: cuda when available, else cpu.")
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path),
    default=None,
    help="TOML settings ([generate] table or flat); flags override it.",
)
def generate_command(
    prompt: str | None,
    adapter_specs: tuple[str, ...],
    adapter_single: tuple[str, ...],
    config_file: Path | None,
    **flags: Any,
) -> None:
    """Generate images for PROMPT, composing saved adapters with their weights.

    Example: difflora generate "a striped cat" --adapters style:0.7,subject:0.5 -n 4 --seed 1
    """
    from difflora.config.generate import GenerateConfig
    from difflora.generation.generate import generate

    overrides = {key: (value if value != () else None) for key, value in flags.items()}
    overrides["prompt"] = prompt
    overrides["adapters"] = (*adapter_specs, *adapter_single) or None
    config = load_config(GenerateConfig, toml_path=config_file, overrides=overrides, section="generate")
    with click.progressbar(length=1, label="Generating", file=click.get_text_stream("stderr")) as bar:

        def progress(done: int, total: int) -> None:
            bar.length = total
            bar.update(done - bar.pos)

        paths = generate(config, progress=progress)
    for path in paths:
        click.echo(str(path))
