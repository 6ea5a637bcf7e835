"""From scanned examples to training batches: every batch from one bucket, order a pure function of
(seed, epoch), so a resumed run continues at exactly the same data position.

    plans = plan_examples(examples, buckets, resolution=..., no_upscale=..., crop=..., seed=...)
    sampler = BucketBatchSampler([p.bucket for p in plans], [e.repeats for e in examples],
                                 batch_size, seed=seed, flip=flip_aug)
    dataset = TrainingDataset(examples, plans, augmentation=..., latents=..., texts=...)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    sampler.set_epoch(epoch, skip_batches=k)   # before iterating; k>0 when resuming mid-epoch

An epoch is every example ``repeats`` times. Within a bucket the draws are shuffled and cut into batches
of ``batch_size`` (the last one of a bucket may be smaller unless ``drop_last``); the batches of all
buckets are then shuffled together. Each ``Draw`` carries its own seed, from which the caption
augmentation and (uncached) random crop of that draw are derived: items do not depend on worker count
or on what was drawn before them.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from difflora.data.buckets import Bucket, Crop, CropPlan, assign_bucket, plan_crop, render_pixels
from difflora.data.cache import LatentCache, LatentRequest, TextEmbeddingCache
from difflora.data.captions import CaptionAugmentation
from difflora.data.examples import Example
from difflora.data.images import load_image
from difflora.data.masks import MaskSource, mask_image, render_mask

NO_AUGMENTATION = CaptionAugmentation()


def derived_rng(*parts: Any) -> random.Random:
    """A Random seeded from any JSON-able parts; stable across Python versions and processes."""
    digest = hashlib.sha256(json.dumps(parts, default=str).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


@dataclass(frozen=True)
class Draw:
    """One example drawn in one epoch: which, mirrored or not, and the seed of its augmentations."""

    index: int
    flip: bool
    seed: int


def plan_examples(
    examples: Sequence[Example],
    buckets: list[Bucket],
    *,
    no_upscale: bool = False,
    step: int = 64,
    crop: Crop = "center",
    seed: int = 0,
) -> list[CropPlan]:
    """Bucket and crop window of each example. Random windows are drawn from (seed, content hash): this is
    the window a latent cache stores; uncached training redraws a window per draw instead."""
    plans = []
    for example in examples:
        bucket = assign_bucket(example.size, buckets, no_upscale=no_upscale, step=step)
        rng = derived_rng("crop", seed, example.content_hash)
        plans.append(plan_crop(example.size, bucket, crop, rng))
    return plans


def latent_requests(
    examples: Sequence[Example],
    plans: Sequence[CropPlan],
    *,
    flip: bool,
    masks: Sequence[MaskSource | None] | None = None,
) -> tuple[list[LatentRequest], list[tuple[int, bool]]]:
    """What a LatentCache must hold: each example (with its loss mask, if any), and its mirror image too
    when flip augmentation is on. Returns the requests and, for each, its (example index, flip) for
    ``TrainingDataset(latent_keys=...)``."""
    requests, slots = [], []
    for index, (example, plan) in enumerate(zip(examples, plans, strict=True)):
        mask = masks[index] if masks is not None else None
        for mirrored in (False, True) if flip else (False,):
            requests.append(LatentRequest(example.content_hash, example.path, plan, mirrored, mask))
            slots.append((index, mirrored))
    return requests, slots


class BucketBatchSampler(Sampler[list[Draw]]):
    """Batches of Draws, all from one bucket; ``batches(epoch)`` is a pure function of (seed, epoch)."""

    def __init__(
        self,
        buckets: Sequence[Bucket],
        repeats: Sequence[int],
        batch_size: int,
        *,
        seed: int,
        flip: bool = False,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.buckets, self.repeats = list(buckets), list(repeats)
        self.batch_size, self.seed, self.flip, self.drop_last = batch_size, seed, flip, drop_last
        self.epoch, self.skip_batches = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        sizes: dict[Bucket, int] = {}
        for bucket, repeats in zip(self.buckets, self.repeats, strict=True):
            sizes[bucket] = sizes.get(bucket, 0) + repeats
        rounding = math.floor if self.drop_last else math.ceil
        return sum(rounding(size / self.batch_size) for size in sizes.values())

    def batches(self, epoch: int) -> list[list[Draw]]:
        rng = derived_rng("batches", self.seed, epoch)
        groups: dict[Bucket, list[int]] = {}
        for index, (bucket, repeats) in enumerate(zip(self.buckets, self.repeats, strict=True)):
            groups.setdefault(bucket, []).extend([index] * repeats)
        batches: list[list[Draw]] = []
        for bucket in sorted(groups):
            indices = groups[bucket]
            rng.shuffle(indices)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                if self.drop_last and len(chunk) < self.batch_size:
                    continue
                batches.append(
                    [Draw(i, self.flip and rng.random() < 0.5, rng.getrandbits(63)) for i in chunk]
                )
        rng.shuffle(batches)
        return batches

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Choose the epoch the next iteration yields, skipping its first ``skip_batches`` batches."""
        self.epoch, self.skip_batches = epoch, skip_batches

    def __iter__(self):
        yield from self.batches(self.epoch)[self.skip_batches :]

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.skip_batches)


class TrainingDataset(Dataset):
    """Draw -> item dict. Items hold either ``pixels`` [3,H,W] in [-1,1] or, with a latent cache,
    ``latent_mean``/``latent_std``; ``caption`` (augmented), optional ``text`` embeddings, and SDXL's
    micro-conditioning as (height, width) pairs: ``original_size``, ``crop_top_left``, ``target_size``."""

    def __init__(
        self,
        examples: Sequence[Example],
        plans: Sequence[CropPlan],
        *,
        augmentation: CaptionAugmentation = NO_AUGMENTATION,
        random_crop: bool = False,
        latents: tuple[LatentCache, Mapping[tuple[int, bool], str]] | None = None,
        texts: tuple[TextEmbeddingCache, Mapping[str, str]] | None = None,
        masks: Sequence[MaskSource | None] | None = None,
        weights: Sequence[float] | None = None,
    ) -> None:
        self.examples, self.plans = list(examples), list(plans)
        self.augmentation, self.random_crop = augmentation, random_crop
        self.latents, self.texts = latents, texts
        self.masks = masks  # None: no loss masks; else one per example (None: learns everywhere)
        self.weights = weights  # None: every example's loss counts 1; else one per example (--reg-dir)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, draw: Draw) -> dict[str, Any]:
        example, plan = self.examples[draw.index], self.plans[draw.index]
        caption = self.augmentation.apply(example.caption, derived_rng("caption", draw.seed))
        item: dict[str, Any] = {"index": draw.index, "caption": caption, "flip": draw.flip}
        if self.weights is not None:
            item["loss_weight"] = torch.tensor(float(self.weights[draw.index]))
        if self.latents is not None:
            cache, keys = self.latents
            moments = cache.load(keys[(draw.index, draw.flip)])
            item["latent_mean"], item["latent_std"] = moments.mean, moments.std
            if self.masks is not None:  # an image without a mask learns everywhere
                item["loss_mask"] = (
                    moments.mask if moments.mask is not None else torch.ones(1, *moments.mean.shape[-2:])
                )
        else:
            if self.random_crop:
                plan = plan_crop(example.size, plan.bucket, "random", derived_rng("crop", draw.seed))
            item["pixels"] = render_pixels(load_image(example.path), plan, flip=draw.flip)
            if self.masks is not None:  # on the pixel grid: the loss averages it down to the latents'
                item["loss_mask"] = self._pixel_mask(draw.index, plan, draw.flip, item["pixels"].shape[-2:])
        if self.texts is not None:
            cache, keys = self.texts
            item["text"] = cache.load(keys[caption])
        left = plan.resized[0] - plan.left - plan.bucket.width if draw.flip else plan.left
        item["original_size"] = (example.size[1], example.size[0])
        item["crop_top_left"] = (plan.top, left)
        item["target_size"] = (plan.bucket.height, plan.bucket.width)
        return item

    def _pixel_mask(self, index: int, plan: CropPlan, flip: bool, size: tuple[int, int]) -> torch.Tensor:
        source = self.masks[index] if self.masks is not None else None
        if source is None:
            return torch.ones(1, *size)
        return render_mask(mask_image(source, self.examples[index].size), plan, flip=flip, grid=None)


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of items (all one bucket) into a batch; captions stay a list of strings."""
    batch: dict[str, Any] = {
        "index": torch.tensor([item["index"] for item in items]),
        "caption": [item["caption"] for item in items],
        "flip": torch.tensor([item["flip"] for item in items]),
    }
    for name in ("original_size", "crop_top_left", "target_size"):
        batch[name] = torch.tensor([item[name] for item in items])
    for name in ("pixels", "latent_mean", "latent_std", "loss_mask", "loss_weight"):
        if name in items[0]:
            batch[name] = torch.stack([item[name] for item in items])
    if "text" in items[0]:
        batch["text"] = {key: torch.stack([item["text"][key] for item in items]) for key in items[0]["text"]}
    return batch
