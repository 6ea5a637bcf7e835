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
