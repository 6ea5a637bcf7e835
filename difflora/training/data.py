"""The trainer's side of the data stage: folder -> buckets -> caches -> a stream of micro-batches.

difflora.data does the work (scan, buckets, batches, cache) and `plan_dataset` (training/plan.py, the
planning `difflora check` prints) decides buckets and length; this module caches for one run and adds what
only training needs: sharding across processes and a resumable position.

Position: micro-batches are numbered 0, 1, 2, ... across epochs. Micro-batch m of process r is batch
`(m mod P)·W + r` of epoch `m div P` in the epoch's batch list (a pure function of (seed, epoch)), padded
cyclically to P·W batches, where W is the number of processes and P = ceil(batches/W). Every process
therefore takes the same number of steps (DDP needs that), and resuming at optimizer step s means starting
at micro-batch s·accumulation: nothing about the data has to be saved.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from difflora.data.batches import (
    NO_AUGMENTATION,
    BucketBatchSampler,
    Draw,
    TrainingDataset,
    collate,
    latent_requests,
)
from difflora.data.buckets import Bucket
from difflora.data.cache import LatentCache, TextEmbeddingCache, random_crop_with_cache_message, vae_encoder
from difflora.data.captions import CaptionAugmentation
from difflora.data.examples import ScanResult
from difflora.data.masks import MaskSource
from difflora.data.regularisation import Regularisation, combined
from difflora.errors import DatasetError
from difflora.hashing import weights_fingerprint
from difflora.models.identity import model_identity
from difflora.training.plan import (
    DatasetPlan,
    DataSettings,
    Tokens,
    TrainingPlan,
    masks_origin,
    plan_dataset,
)
from difflora.training.text import caption_encoder, pipeline_conditioning, pipeline_text_encoders

logger = logging.getLogger(__name__)


@dataclass
class TrainingData:
    scan: ScanResult
    dataset: TrainingDataset
    sampler: BucketBatchSampler
    plan: TrainingPlan
    buckets: dict[Bucket, int]
    per_process_batches: int  # P in the module docstring
    world_size: int
    rank: int
    notes: list[str] = field(default_factory=list)
    validation: TrainingDataset | None = None  # the held-out images, cached as the training ones
    masks: str = ""  # the loss masks, described for the plan ('' without masks)
    regularisation: Regularisation | None = None  # --reg-dir's class images, examples after the training ones

    def stream(self, start: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """(epoch, collated batch) for micro-batches start, start+1, ... of this process, forever."""
        cached_epoch, batches = -1, []
        position = start
        while True:
            epoch, index = divmod(position, self.per_process_batches)
            if epoch != cached_epoch:
                batches, cached_epoch = self.sampler.batches(epoch), epoch
            draws: list[Draw] = batches[(index * self.world_size + self.rank) % len(batches)]
            yield epoch, collate([self.dataset[draw] for draw in draws])
            position += 1


def prepare_data(
    settings: DataSettings,
    tokens: Tokens,
    *,
    pipe: Any,
    augmentation: CaptionAugmentation,
    cache_latents: bool,
    cache_text: bool,
    cache_dir: Path,
    rank: int = 0,
    main_first: AbstractContextManager | None = None,
) -> TrainingData:
    """Plan the data set (`plan_dataset`, as `difflora check` does) and cache what can be cached.
    `main_first` makes the main process build the caches before the others read them (Accelerate's
    `main_process_first()`)."""
    planned = plan_dataset(settings, tokens, strict=True)
    regularisation = planned.regularisation
    examples = combined(planned.scan.examples, regularisation)  # the class images after the training ones
    crops = planned.crops + planned.regularisation_crops
    with main_first or nullcontext():
        masks = _masks(planned)
        latents = (
            _latent_cache(examples, crops, pipe, settings.flip, cache_dir, masks) if cache_latents else None
        )
        texts = _text_cache(examples, augmentation, pipe, cache_dir) if cache_text else None
        validation = _held_out_dataset(planned, pipe, cache_latents, cache_text, cache_dir)
    notes = [random_crop_with_cache_message()] if cache_latents and settings.random_crop else []
    dataset = TrainingDataset(
        examples,
        crops,
        augmentation=augmentation,
        random_crop=settings.random_crop and not cache_latents,
        latents=latents,
        texts=texts,
        masks=masks,
        weights=regularisation.loss_weights(len(planned.crops)) if regularisation is not None else None,
    )
    described = planned.masks.describe(masks_origin(settings)) if planned.masks is not None else ""
    if planned.plan is None:  # strict planning already refuses such a folder; never train on nothing
        raise DatasetError(f"{settings.root}: no usable images")
    return TrainingData(
        scan=planned.scan,
        dataset=dataset,
        sampler=planned.sampler,
        plan=planned.plan,
        buckets=planned.histogram,
        per_process_batches=planned.per_process_batches,
        world_size=settings.world_size,
        rank=rank,
        notes=notes,
        validation=validation,
        masks=described,
        regularisation=regularisation,
    )


def _masks(planned: DatasetPlan) -> list[MaskSource | None] | None:
    """The loss mask of each example drawn: the training images' (the class images learn everywhere)."""
    if planned.masks is None:
        return None
    return [*planned.masks.sources, *[None] * len(planned.regularisation_crops)]


def _held_out_dataset(
    planned: DatasetPlan, pipe: Any, cache_latents: bool, cache_text: bool, cache_dir: Path
) -> TrainingDataset | None:
    """The held-out images as a data set: centre crops, never mirrored, captions as written, cached with
    the training images' caches (so the VAE and text encoders can be freed before the first step)."""
    held, crops = planned.validation, planned.validation_crops
    if not held:
        return None
    masks = planned.validation_masks.sources if planned.validation_masks is not None else None
    latents = _latent_cache(held, crops, pipe, False, cache_dir, masks) if cache_latents else None
    texts = _text_cache(held, NO_AUGMENTATION, pipe, cache_dir) if cache_text else None
    return TrainingDataset(held, crops, latents=latents, texts=texts, masks=masks)


def _latent_cache(examples, plans, pipe: Any, flip: bool, cache_dir: Path, masks=None):
    requests, slots = latent_requests(examples, plans, flip=flip, masks=masks)
    cache = LatentCache(cache_dir)
    vae = pipe.vae
    identity = weights_fingerprint({"vae": vae})
    encoder = model_identity(pipe).model_family.latent_encoder(vae)  # Qwen-Image's: one video frame
    built = cache.build(
        requests,
        vae_encoder(encoder),
        model_identity=identity,
        scaling_factor=float(encoder.config.scaling_factor),
        batch_size=4,  # small batches keep the one-time encoding from setting the run's peak memory
    )
    logger.debug("latents: %d cached before, %d computed", built.hits, built.computed)
    return _Memo(cache), dict(zip(slots, built.keys, strict=True))


def _text_cache(examples, augmentation: CaptionAugmentation, pipe: Any, cache_dir: Path):
    captions: set[str] = set()
    for example in examples:
        captions |= augmentation.possible_captions(example.caption)
    return caption_cache(captions, pipe, cache_dir)


def caption_cache(captions: set[str], pipe: Any, cache_dir: Path) -> tuple[Any, dict[str, str]]:
    """`captions` encoded once into the text-embedding cache: (its reader, {caption: key})."""
    cache = TextEmbeddingCache(cache_dir)
    tokenizers, encoders = pipeline_text_encoders(pipe)
    lengths = ",".join(str(tokenizer.model_max_length) for tokenizer in tokenizers)
    conditioning = pipeline_conditioning(pipe)
    identity = weights_fingerprint(encoders) + lengths + conditioning.cache_tag
    with torch.no_grad():
        encode = caption_encoder(conditioning, tokenizers, list(encoders.values()))
        keys, built = cache.build(sorted(captions), encode, encoder_identity=identity)
    logger.debug("text embeddings: %d cached before, %d computed", built.hits, built.computed)
    return _Memo(cache), keys


class _Memo:
    """A cache's `load` remembered in memory: every entry is read from disk once per run instead of once
    per draw. Bounded, so a huge data set falls back to reading from disk."""

    def __init__(self, cache: Any, limit: int = 8192) -> None:
        self.cache, self.limit, self.entries = cache, limit, {}

    def load(self, key: str) -> Any:
        found = self.entries.get(key)
        if found is None:
            found = self.cache.load(key)
            if len(self.entries) < self.limit:
                self.entries[key] = found
        return found
