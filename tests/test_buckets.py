"""Bucket geometry, crops and pixels, checked against brute force / plain numpy."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from difflora.data.buckets import (
    Bucket,
    assign_bucket,
    make_buckets,
    plan_crop,
    render_pixels,
)
from tests.support.images import noise_rgb


@pytest.mark.parametrize(("resolution", "step"), [(512, 64), (1024, 64), (64, 16), (256, 32)])
def test_buckets_are_step_multiples_near_the_target_area(resolution, step):
    buckets = make_buckets(resolution, step)
    assert Bucket(resolution, resolution) in buckets
    for bucket in buckets:
        assert bucket.width % step == 0 and bucket.height % step == 0
        assert bucket.area <= resolution * resolution
        assert Bucket(bucket.height, bucket.width) in buckets  # both orientations
        # the short side is the largest that fits with this long side: no bigger bucket of that shape
        long, short = max(bucket.width, bucket.height), min(bucket.width, bucket.height)
        assert (short + step) * long > resolution * resolution
        assert long <= 2 * resolution and short >= resolution // 2
    ratios = [b.width / b.height for b in buckets]
    assert max(ratios) >= 3.9 and min(ratios) <= 1 / 3.9  # 4:1 panoramas have a bucket


def test_assign_bucket_is_nearest_aspect_ratio_brute_force():
    buckets = make_buckets(512, 64)
    rng = random.Random(0)
    for _ in range(300):
        size = (rng.randint(50, 4000), rng.randint(50, 4000))
        chosen = assign_bucket(size, buckets)
        gap = abs(math.log(chosen.width / chosen.height) - math.log(size[0] / size[1]))
        best = min(abs(math.log(b.width / b.height) - math.log(size[0] / size[1])) for b in buckets)
        assert gap == pytest.approx(best)


def test_no_upscale_never_enlarges_and_keeps_step_multiples():
    buckets = make_buckets(512, 64)
    rng = random.Random(1)
    for _ in range(300):
        size = (rng.randint(64, 1500), rng.randint(64, 1500))
        bucket = assign_bucket(size, buckets, no_upscale=True)
        plan = plan_crop(size, bucket)
        assert plan.scale <= 1.0 + 1e-9, (size, bucket)
        assert bucket.width % 64 == 0 and bucket.height % 64 == 0
        assert bucket.area <= 512 * 512
    small = assign_bucket((300, 200), buckets, no_upscale=True)
    assert small == Bucket(256, 192)  # its own bucket, rounded down
    assert plan_crop((300, 200), assign_bucket((300, 200), buckets)).scale > 1  # default does enlarge


def test_crop_windows_stay_inside_and_random_crops_vary():
    bucket = Bucket(64, 64)
    center = plan_crop((200, 100), bucket)
    assert center.resized == (128, 64) and (center.left, center.top) == (32, 0)
    lefts = {plan_crop((200, 100), bucket, "random", random.Random(s)).left for s in range(30)}
    assert len(lefts) > 5 and min(lefts) >= 0 and max(lefts) <= 64
    with pytest.raises(ValueError, match="rng"):
        plan_crop((200, 100), bucket, "random")


def test_pixels_match_numpy_crop_and_flip():
    image = noise_rgb((96, 64), seed=3)  # already bucket height: no resize, only a horizontal crop
    bucket = Bucket(64, 64)
    plan = plan_crop(image.size, bucket)
    array = np.asarray(image, dtype=np.float32)[:, plan.left : plan.left + 64] / 127.5 - 1
    pixels = render_pixels(image, plan)
    assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.float32
    assert torch.allclose(pixels, torch.from_numpy(array).permute(2, 0, 1), atol=1e-6)
    flipped = render_pixels(image, plan, flip=True)
    assert torch.equal(flipped, pixels.flip(-1))
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert render_pixels(image, plan_crop(image.size, bucket)).shape == (3, 64, 64)
