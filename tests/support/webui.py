"""An adapter library for the web UI's tests: adapters for the embedded model, one of them with the run
folder `difflora train` writes beside it (sample grids, loss.csv and loss.png, timing.json, plan.txt), its
values known to the tests that check what the UI shows."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from PIL import Image

from difflora.config import to_toml
from difflora.config.train import TrainConfig
from difflora.formats.native import save_adapter
from difflora.training.log import CSV_FIELDS, LossPoint, draw_loss_curve
from tests.support.adapters import random_adapter

TRAINED = "trained"
TRIGGER = "zxq stripes"
STEPS = 20
IMAGES = 8
TIMING = {"data": 0.5, "forward": 3.25, "backward": 4.0, "other": 0.25, "total": 8.0, "peak_memory_mib": {}}
GRID_STEPS = (10, 20)


def loss_rows(steps: int = STEPS) -> list[dict[str, str]]:
    return [
        {
            "step": str(s),
            "epoch": "0",
            "loss": f"{1 / s:.6f}",
            "smoothed_loss": f"{1.5 / s:.6f}",
            "lr": "0.0001",
            "skipped": "0",
            "seconds": "0.1",
        }
        for s in range(1, steps + 1)
    ]


def grid_image(step: int) -> Image.Image:
    return Image.new("RGB", (32, 16), (step * 10 % 256, 80, 160))


def write_library(pipe, directory: Path) -> Path:
    """`style` and `subject` (no run folder) and `trained` (with one) in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    targets = ("to_q", "to_k", "to_v", "to_out.0")
    save_adapter(
        random_adapter(pipe, seed=1, unet=targets, te=("q_proj",), name="style"),
        directory / "style.safetensors",
    )
    save_adapter(
        random_adapter(pipe, seed=2, unet=("to_k", "to_v"), rank=2, alpha=1.0, name="subject"),
        directory / "subject.safetensors",
    )
    trained = random_adapter(pipe, seed=3, unet=("to_q", "to_v"), rank=8, alpha=8.0, name=TRAINED)
    trained.meta.base_model = "embedded-test"
    trained.meta.trigger_words = [TRIGGER]
    trained.meta.config_toml = to_toml(
        TrainConfig(data_dir="data/stripes", max_steps=STEPS, trigger=TRIGGER), section="train"
    )
    trained.meta.extra = {"difflora.train.steps": str(STEPS), "difflora.train.num_train_images": str(IMAGES)}
    save_adapter(trained, directory / f"{TRAINED}.safetensors")
    write_run_folder(directory / f"{TRAINED}.run")
    return directory


def write_run_folder(run: Path) -> None:
    (run / "samples").mkdir(parents=True, exist_ok=True)
    for step in GRID_STEPS:
        grid_image(step).save(run / "samples" / f"step-{step:06d}.png")
    grid_image(99).save(run / "samples" / f"step-{STEPS:06d}-ema.png")  # not the adapter's own grid
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows(loss_rows())
    (run / "loss.csv").write_text(buffer.getvalue())
    points = [LossPoint(int(r["step"]), float(r["loss"]), float(r["smoothed_loss"])) for r in loss_rows()]
    draw_loss_curve(points).save(run / "loss.png")
    (run / "timing.json").write_text(json.dumps(TIMING))
    (run / "plan.txt").write_text("20 steps of 4 images\n")
