"""A tiny saved model with a small image folder, and few-step training runs on it (CLI arguments or a
TrainConfig) that finish in seconds."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from difflora.config.train import TrainConfig
from tests.support.models import tiny_pipeline


def make_workspace(root: Path) -> Path:
    """A saved tiny model and an 8-image folder of the embedded world's style concept (test_trainer's and
    the fault tests' workspace)."""
    from difflora.embedded.shapes import style_batch

    tiny_pipeline(root / "tok").save_pretrained(root / "model")
    images, captions = style_batch(0, 8)
    data = root / "stripes"
    data.mkdir()
    for index, (pixels, caption) in enumerate(zip(images, captions, strict=True)):
        Image.fromarray(pixels).resize((16, 16)).save(data / f"{index}.png")
        (data / f"{index}.txt").write_text(caption)
    return root


def train_args(workspace: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    """A few-step run with a checkpoint every 2 steps; one thread, so two runs agree bit for bit."""
    return [
        "train",
        str(workspace / "stripes"),
        "--model",
        str(workspace / "model"),
        "--output-dir",
        str(out),
        "--cache-dir",
        str(cache),
        "--resolution",
        "16",
        "--batch-size",
        "4",
        "--max-steps",
        "6",
        "--save-every",
        "2",
        "--sample-every",
        "3",
        "--sample-steps",
        "2",
        "--sample-seeds",
        "1",
        "--learning-rate",
        "0.01",
        "--num-threads",
        "1",
        *extra,
    ]


def tiny_train_config(workspace: Path, out: Path, *, data: str, **changes: object) -> TrainConfig:
    """A 2-step run at 16 px, batch 1, on the tiny model saved in `workspace`/model and the image folder
    `workspace`/`data`: no checkpoints or sample grids, one thread (bit-exact comparisons between runs need
    the same reduction order); `changes` override any field."""
    values: dict[str, object] = dict(
        data_dir=str(workspace / data),
        model=str(workspace / "model"),
        output_dir=str(out),
        cache_dir=str(out / "cache"),
        resolution=16,
        batch_size=1,
        max_steps=2,
        save_every=0,
        sample_every=0,
        learning_rate=1e-2,
        num_threads=1,
    )
    return TrainConfig(**(values | changes))
