"""Aspect-ratio buckets: which size each image trains at, and how it is resized and cropped to it.

Buckets (``make_buckets``): for each long side from ``resolution`` to ``max_side`` (default resolution*2)
in multiples of ``step``, the largest short side (a multiple of ``step``, at least ``min_side``, default
resolution/2) whose area is at most resolution²; both orientations. For 512: 512x512, 576x448, 640x384,
704x320, 768x320, 832x256 ... 1024x256 and their mirrors (kohya's scheme without its smaller duplicates).
``step`` is 64 for SD1/SDXL (VAE factor 8 × three UNet downsamplings); a model with fewer downsamplings
needs less: ``bucket_step(vae_scale_factor, unet_downsamplings)``.

Assignment (``assign_bucket``): the bucket whose aspect ratio is nearest the image's (in log space; ties to
the larger area). The image is then scaled to cover the bucket and cropped (centre or random). With
``no_upscale``, an image smaller than that bucket gets a bucket of its own: its size (shrunk to at most
resolution² pixels) rounded down to multiples of ``step``, so it is cropped but never enlarged (except a
side shorter than one ``step``, which is enlarged to one step: the model cannot take less).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image

Crop = Literal["center", "random"]


@dataclass(frozen=True, order=True)
class Bucket:
    width: int
    height: int

    @property
    def area(self) -> int:
        return self.width * self.height

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass(frozen=True)
class CropPlan:
    """Resize the image to ``resized`` (w, h), then take the bucket-sized window at (left, top).

    (left, top) is also SDXL's ``crops_coords_top_left``; ``resized`` vs. the original size says whether
    the image was upscaled.
    """

    bucket: Bucket
    original: tuple[int, int]
    resized: tuple[int, int]
    left: int
    top: int

    @property
    def scale(self) -> float:
        """Resize factor; above 1 means the image was enlarged."""
        return max(self.resized[0] / self.original[0], self.resized[1] / self.original[1])


def bucket_step(vae_scale_factor: int = 8, unet_downsamplings: int = 3) -> int:
    """Pixel multiple that keeps every UNet feature map an integer size."""
    return vae_scale_factor * 2**unet_downsamplings


def make_buckets(
    resolution: int, step: int = 64, *, min_side: int | None = None, max_side: int | None = None
) -> list[Bucket]:
    """Buckets of about ``resolution``² pixels (never more), sides multiples of ``step``. Sorted."""
    if resolution < step or resolution % step:
        raise ValueError(f"resolution {resolution} must be a positive multiple of the bucket step {step}")
    max_area = resolution * resolution
    low = max(step, (min_side if min_side is not None else resolution // 2) // step * step)
    high = max(resolution, (max_side if max_side is not None else resolution * 2) // step * step)
    found = {Bucket(resolution, resolution)}
    for width in range(resolution, high + 1, step):  # landscape sides; portrait buckets are their mirrors
        height = max_area // width // step * step
        if height >= low:
            found.add(Bucket(width, height))
            found.add(Bucket(height, width))
    return sorted(found)


def _cover_scale(size: tuple[int, int], bucket: Bucket) -> float:
    return max(bucket.width / size[0], bucket.height / size[1])


def assign_bucket(
    size: tuple[int, int], buckets: list[Bucket], *, no_upscale: bool = False, step: int = 64
) -> Bucket:
    """The bucket an image of ``size`` (w, h) trains at (rules in the module docstring)."""
    width, height = size
    ratio = math.log(width / height)
    best = min(buckets, key=lambda b: (abs(math.log(b.width / b.height) - ratio), -b.area))
    if not no_upscale or _cover_scale(size, best) <= 1.0:
        return best
    shrink = min(1.0, math.sqrt(max(b.area for b in buckets) / (width * height)))
    return Bucket(
        max(step, int(width * shrink) // step * step),
        max(step, int(height * shrink) // step * step),
    )


def plan_crop(
    size: tuple[int, int], bucket: Bucket, crop: Crop = "center", rng: random.Random | None = None
) -> CropPlan:
    """Scale ``size`` to cover ``bucket`` and place the crop window. ``rng`` is needed for random crops."""
    scale = _cover_scale(size, bucket)
    resized = (max(bucket.width, round(size[0] * scale)), max(bucket.height, round(size[1] * scale)))
    spare_x, spare_y = resized[0] - bucket.width, resized[1] - bucket.height
    if crop == "random":
        if rng is None:
            raise ValueError("a random crop needs an rng")
        left, top = rng.randint(0, spare_x), rng.randint(0, spare_y)
    elif crop == "center":
        left, top = spare_x // 2, spare_y // 2
    else:
        raise ValueError(f"crop must be 'center' or 'random', not {crop!r}")
    return CropPlan(bucket, tuple(size), resized, left, top)


def render_pixels(image: Image.Image, plan: CropPlan, *, flip: bool = False) -> torch.Tensor:
    """RGB image -> float32 tensor [3, H, W] in [-1, 1], resized, cropped and optionally mirrored."""
    if image.size != plan.resized:
        # Lanczos when shrinking keeps detail without aliasing; bicubic when enlarging avoids ringing.
        shrinking = plan.resized[0] <= image.size[0]
        image = image.resize(
            plan.resized, Image.Resampling.LANCZOS if shrinking else Image.Resampling.BICUBIC
        )
    box = (plan.left, plan.top, plan.left + plan.bucket.width, plan.top + plan.bucket.height)
    image = image.crop(box)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous() / 127.5 - 1.0


def bucket_histogram(assigned: list[Bucket]) -> dict[Bucket, int]:
    """Images per bucket, largest count first."""
    counts: dict[Bucket, int] = {}
    for bucket in assigned:
        counts[bucket] = counts.get(bucket, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))
