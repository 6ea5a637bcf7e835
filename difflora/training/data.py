"""The trainer's side of the data stage: folder -> buckets -> caches -> a stream of micro-batches.

The data helper's modules do the work (difflora.data scans, difflora.buckets sizes, difflora.batches
orders, difflora.cache caches, difflora.plan counts); this module wires them for one run and adds what only
training needs: sharding across processes and a resumable position.

Position: micro-batches are numbered 0, 1, 2, ... across epochs. Micro-batch m of process r is batch
`(m mod P)·W + r` of epoch `m div P` in the epoch's batch list (a pure function of (seed, epoch)), padded
cyclically to P·W batches, where W is the number of processes and P = ceil(batches/W). Every process
therefore takes the same number of steps (DDP needs that), and resuming at optimizer step s means starting
at micro-batch s·accumulation: nothing about the data has to be saved.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from difflora.data.batches import (
    BucketBatchSampler,
    Draw,
    TrainingDataset,
    collate,
    latent_requests,
    plan_examples,
)
from difflora.data.buckets import Bucket, bucket_histogram, bucket_step, make_buckets
from difflora.data.cache import (
    LatentCache,
    TextEmbeddingCache,
    random_crop_with_cache_message,
    text_cache_allowed,
    vae_encoder,
)
from difflora.data.captions import CaptionAugmentation, clip_token_counter
from difflora.data.scan import ScanResult, scan_folder
from difflora.training.plan import TrainingPlan, make_plan

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


def text_encode_fn(tokenizer: Any, text_encoder: torch.nn.Module):
    """captions -> {"hidden": [B, tokens, dim]}, exactly as StableDiffusionPipeline.encode_prompt encodes
    prompts (padded to the tokenizer's max length, attention mask only when the encoder asks for one)."""

    def encode(captions: list[str]) -> dict[str, torch.Tensor]:
        device = next(text_encoder.parameters()).device
        tokens = tokenizer(
            captions,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = None
        if getattr(text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(device)
        hidden = text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
        return {"hidden": hidden}

    return encode


def module_fingerprint(module: torch.nn.Module, sample: int = 256) -> str:
    """A cheap hash of a module's weights (names, shapes, first/last values): keys the caches to the exact
    VAE / text encoder, so a different base model never reuses stale latents."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        if ".lora_" in key:
            continue
        flat = tensor.detach().reshape(-1).to(torch.float32).cpu()
        digest.update(f"{key}:{tuple(tensor.shape)}".encode())
        digest.update(flat[:sample].numpy().tobytes() + flat[-sample:].numpy().tobytes())
    return digest.hexdigest()[:16]


def prepare_data(
    data_dir: Path,
    *,
    pipe: Any,
    resolution: int,
    trigger: str | None,
    caption_extension: str,
    augmentation: CaptionAugmentation,
    flip: bool,
    random_crop: bool,
    no_upscale: bool,
    cache_latents: bool,
    cache_text: bool,
    cache_dir: Path,
    batch_size: int,
    accumulation: int,
    max_steps: int | None,
    epochs: int | None,
    seed: int,
    world_size: int = 1,
    rank: int = 0,
    main_first: AbstractContextManager | None = None,
) -> TrainingData:
    """Scan, bucket and (optionally) cache the data set; plan the run. `main_first` makes the main process
    build the caches before the others read them (Accelerate's `main_process_first()`)."""
    counter = clip_token_counter(pipe.tokenizer)
    max_tokens = int(pipe.tokenizer.model_max_length) - 2
    scan = scan_folder(
        data_dir,
        caption_extension=caption_extension,
        trigger=trigger,
        max_tokens=max_tokens,
        count_tokens=counter,
    )
    examples = scan.examples
    step = bucket_step(pipe.vae_scale_factor, len(pipe.unet.config.block_out_channels) - 1)
    try:
        buckets = make_buckets(resolution, step)
    except ValueError as error:
        from difflora.errors import ConfigError

        raise ConfigError(f"--resolution: {error}") from None
    crop = "random" if random_crop else "center"
    plans = plan_examples(examples, buckets, no_upscale=no_upscale, step=step, crop=crop, seed=seed)
    notes: list[str] = []
    with main_first or nullcontext():
        latents = _latent_cache(examples, plans, pipe, flip, cache_dir) if cache_latents else None
        texts = None
        if cache_text:
            texts = _text_cache(examples, augmentation, pipe, cache_dir)
    if cache_latents and random_crop:
        notes.append(random_crop_with_cache_message())
    dataset = TrainingDataset(
        examples,
        plans,
        augmentation=augmentation,
        random_crop=random_crop and not cache_latents,
        latents=latents,
        texts=texts,
    )
    sampler = BucketBatchSampler(
        [p.bucket for p in plans], [e.repeats for e in examples], batch_size, seed=seed, flip=flip
    )
    per_process = math.ceil(sampler.batches_per_epoch / world_size)
    plan = make_plan(
        images=len(examples),
        examples_per_epoch=sum(e.repeats for e in examples),
        batches_per_epoch=per_process,
        batch_size=batch_size * world_size,
        gradient_accumulation=accumulation,
        max_steps=max_steps,
        epochs=epochs,
    )
    return TrainingData(
        scan=scan,
        dataset=dataset,
        sampler=sampler,
        plan=plan,
        buckets=bucket_histogram([p.bucket for p in plans]),
        per_process_batches=per_process,
        world_size=world_size,
        rank=rank,
        notes=notes,
    )


def _latent_cache(examples, plans, pipe: Any, flip: bool, cache_dir: Path):
    requests, slots = latent_requests(examples, plans, flip=flip)
    cache = LatentCache(cache_dir)
    vae = pipe.vae
    identity = module_fingerprint(vae)
    built = cache.build(
        requests,
        vae_encoder(vae),
        model_identity=identity,
        scaling_factor=float(vae.config.scaling_factor),
        batch_size=4,  # small batches keep the one-time encoding from setting the run's peak memory
    )
    logger.debug("latents: %d cached before, %d computed", built.hits, built.computed)
    return _Memo(cache), dict(zip(slots, built.keys, strict=True))


def _text_cache(examples, augmentation: CaptionAugmentation, pipe: Any, cache_dir: Path):
    captions: set[str] = set()
    for example in examples:
        captions |= augmentation.possible_captions(example.caption)
    cache = TextEmbeddingCache(cache_dir)
    encoder = pipe.text_encoder
    identity = module_fingerprint(encoder) + str(pipe.tokenizer.model_max_length)
    with torch.no_grad():
        keys, built = cache.build(
            sorted(captions), text_encode_fn(pipe.tokenizer, encoder), encoder_identity=identity
        )
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


def text_caching_decision(*, train_text_encoder: bool, augmentation: CaptionAugmentation) -> tuple[bool, str]:
    return text_cache_allowed(train_text_encoder=train_text_encoder, augmentation=augmentation)
