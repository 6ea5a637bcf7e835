"""The loss curve PNG every run writes (loss.png), drawn with matplotlib: its size, its writer, and each
series in its own colour (the validation loss only where it was measured)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from difflora.training.log import LossPoint, loss_curve_png

LIGHT, DARK, ORANGE = (0xAA, 0xBE, 0xE6), (0x14, 0x32, 0x8C), (0xE6, 0x78, 0x14)


def _count(pixels: np.ndarray, colour: tuple[int, int, int]) -> int:
    return int(np.all(pixels == np.array(colour, dtype=np.uint8), axis=-1).sum())


def _points() -> list[LossPoint]:
    losses = [1.0 / step + (0.2 if step % 7 == 0 else 0.0) for step in range(1, 61)]
    smoothed, points = losses[0], []
    for step, loss in enumerate(losses, start=1):
        smoothed = 0.9 * smoothed + 0.1 * loss
        points.append(LossPoint(step, loss, smoothed))
    return points


def test_the_curve_is_a_matplotlib_png_with_each_series_in_its_colour():
    image = Image.open(io.BytesIO(loss_curve_png(_points(), [(20, 0.3), (40, 0.2)])))
    assert image.size == (640, 360) and image.info["Software"].startswith("Matplotlib")
    pixels = np.asarray(image.convert("RGB"))
    assert _count(pixels, LIGHT) > 100 and _count(pixels, DARK) > 100 and _count(pixels, ORANGE) > 20
    plain = np.asarray(Image.open(io.BytesIO(loss_curve_png(_points()))).convert("RGB"))
    assert _count(plain, ORANGE) == 0 and _count(plain, DARK) > 100


def test_a_one_point_curve_is_drawn_at_the_requested_size():
    image = Image.open(io.BytesIO(loss_curve_png([LossPoint(1, 0.5, 0.5)], size=(320, 200))))
    assert image.size == (320, 200)


def test_checkpoints_redraw_the_curve_at_most_every_interval_and_the_end_draws_every_step(
    tmp_path, monkeypatch
):
    from difflora.training import log as log_module
    from difflora.training.log import TrainLog

    clock = [1000.0]
    monkeypatch.setattr(log_module.time, "monotonic", lambda: clock[0])
    run = TrainLog(tmp_path, total_steps=4, start_step=0, progress=False)
    png = tmp_path / "loss.png"
    for step in (1, 2):
        run.step(step, 0, 1.0 / step, 1e-3, skipped=False, seconds=0.1)
    assert run.checkpoint_curve() is None and not png.exists()  # a checkpoint right after the start
    clock[0] += log_module.CURVE_EVERY_S
    assert run.checkpoint_curve() == png and png.read_bytes() == loss_curve_png(run.points[:2])
    run.step(3, 0, 0.3, 1e-3, skipped=False, seconds=0.1)
    assert run.checkpoint_curve() is None  # drawn less than the interval ago
    assert run.finish_curve() == png and png.read_bytes() == loss_curve_png(run.points)
    assert run.finish_curve() is None  # nothing new since
    run.close()
