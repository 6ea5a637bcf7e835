"""`difflora check FOLDER`: the training data scan as a report (usable images, skipped files, captions,
buckets, duplicates, the training plan), without training. Exit code 1 when training would refuse the data."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from difflora.captions import TokenCounter, clip_token_counter
from difflora.check import run_check

logger = logging.getLogger(__name__)


def _tokenizer_counter(model: str | None) -> tuple[TokenCounter | None, int | None]:
    """Exact token counting from the model's own tokenizer when it is a local folder (or the embedded
    model); otherwise None, and the report says its counts are estimates."""
    try:
        from transformers import AutoTokenizer

        from difflora.models import resolve_model

        source = resolve_model(model)
        if source.kind not in ("embedded", "folder"):
            return None, None
        tokenizer = AutoTokenizer.from_pretrained(Path(source.location) / "tokenizer")
    except Exception as exc:  # no model at hand is fine for a data check: fall back to an estimate
        logger.debug("no tokenizer for exact caption lengths (%s); estimating", exc)
        return None, None
    return clip_token_counter(tokenizer), tokenizer.model_max_length - 2


@click.command("check")
@click.argument("folder", type=click.Path(path_type=Path, file_okay=False))
@click.option(
    "--caption-extension", default=".txt", show_default=True, help="Preferred sidecar caption file."
)
@click.option(
    "--trigger", default=None, help="Word put first in every caption (and used when one is missing)."
)
@click.option(
    "--resolution", default=512, show_default=True, type=int, help="Bucket area is about this squared."
)
@click.option(
    "--bucket-step", default=64, show_default=True, type=int, help="Bucket sides are multiples of this."
)
@click.option("--no-upscale", is_flag=True, help="Never enlarge an image to fit its bucket.")
@click.option("--batch-size", default=1, show_default=True, type=int)
@click.option("--gradient-accumulation", default=1, show_default=True, type=int)
@click.option("--max-steps", default=None, type=int, help="Plan this many steps instead of deriving them.")
@click.option("--epochs", default=None, type=int, help="Plan this many epochs instead of deriving them.")
@click.option(
    "--max-tokens", default=None, type=int, help="Caption token limit [default: the tokenizer's, or 75]."
)
@click.option(
    "--model", default=None, help="Model whose tokenizer counts caption tokens [default: embedded]."
)
def check_command(folder: Path, model: str | None, max_tokens: int | None, **options) -> None:
    """Check an image folder before training: what will be used, what will not, and why."""
    counter, limit = _tokenizer_counter(model)
    report = run_check(
        folder,
        caption_extension=options["caption_extension"],
        trigger=options["trigger"],
        resolution=options["resolution"],
        step=options["bucket_step"],
        no_upscale=options["no_upscale"],
        batch_size=options["batch_size"],
        gradient_accumulation=options["gradient_accumulation"],
        max_steps=options["max_steps"],
        epochs=options["epochs"],
        max_tokens=max_tokens or limit or 75,
        count_tokens=counter,
    )
    click.echo(report.render())
    if not report.ok:
        click.get_current_context().exit(1)
