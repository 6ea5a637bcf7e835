"""On-disk caches of VAE latents and text embeddings, so each is computed once and reused across runs.

Each entry is one safetensors file named by a sha256 key over everything that changes its content, so
entries invalidate themselves: the image's content hash (not its path: renaming keeps the cache, editing
the pixels does not), the bucket, the resize and crop window, the flip, the model identity string (pass
one that covers the VAE / text-encoder weights, e.g. ``ModelIdentity.base_hash``), the VAE scaling factor,
the loss mask's file content when the image has one, and this module's format version. Files are written atomically (``safe_io.write_atomic``) and carry a
checksum of their tensors: an unreadable, truncated or bit-flipped entry is reported and recomputed, so
an interrupted run or a bad disk never leaves a cache that breaks the next one or is trained on.

Latents: the cache stores the VAE posterior's ``mean`` and ``std`` (float32, before the scaling factor),
not one sample. Training then draws ``mean + std * noise`` each step (``LatentMoments.sample``), exactly
like uncached training with ``latent_dist.sample()``, at twice the disk space of one sample.

Random crops and caching: each cached entry holds one crop window, chosen once from (seed, image content)
by the caller; the image is not re-cropped each epoch. ``random_crop_with_cache_message`` says so, for a
warning rather than kohya's assertion. Flip augmentation caches both orientations.

Text embeddings: only valid when the text encoder is frozen and captions do not change between epochs.
Whole-caption dropout is fine (the "" embedding is cached too); tag shuffling or tag dropout is not:
``text_cache_allowed`` returns the reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from difflora.data.buckets import CropPlan, render_pixels
from difflora.data.captions import CaptionAugmentation
from difflora.data.images import load_image
from difflora.data.masks import MaskSource, mask_image, render_mask
from difflora.errors import DatasetError
from difflora.hashing import sha256_json
from difflora.safe_io import write_atomic

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: every entry carries a checksum of its tensors
CHECKSUM_KEY = "difflora.checksum"

VaeEncode = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # pixels [B,3,H,W] -> (mean, std)
TextEncode = Callable[[list[str]], dict[str, torch.Tensor]]  # captions -> batch-first tensors by name
Progress = Callable[[int, int], None]  # (done, total)


@dataclass(frozen=True)
class LatentRequest:
    """One latent to have: an image (by content hash; path to read it from), its crop window, its flip."""

    content_hash: str
    path: Path
    plan: CropPlan
    flip: bool = False
    mask: MaskSource | None = None  # its loss mask, cached beside the latents on the latent grid


@dataclass(frozen=True)
class LatentMoments:
    """The VAE posterior of one image: latents are ``mean + std * noise``, times the scaling factor."""

    mean: torch.Tensor
    std: torch.Tensor
    mask: torch.Tensor | None = None  # [1, h, w] in [0, 1] on the latent grid, when the image has one

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype)
        return self.mean + self.std * noise


@dataclass(frozen=True)
class CacheBuild:
    keys: list[str]  # one per request, in request order
    hits: int  # distinct entries found on disk
    computed: int  # distinct entries computed and written now


def vae_encoder(vae: torch.nn.Module) -> VaeEncode:
    """A VaeEncode for a diffusers AutoencoderKL, on the VAE's own device and dtype, without gradients."""
    parameter = next(vae.parameters())

    @torch.no_grad()
    def encode(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = vae.encode(pixels.to(parameter.device, parameter.dtype)).latent_dist
        return posterior.mean.float().cpu(), posterior.std.float().cpu()

    return encode


def latent_key(request: LatentRequest, *, model_identity: str, scaling_factor: float) -> str:
    """The cache key of one latent (see the module docstring for what it covers)."""
    plan = request.plan
    mask = {"mask": [request.mask.content_hash, request.mask.alpha]} if request.mask is not None else {}
    return sha256_json(
        {
            **mask,
            "kind": "latent",
            "format": CACHE_FORMAT,
            "content": request.content_hash,
            "bucket": [plan.bucket.width, plan.bucket.height],
            "resized": list(plan.resized),
            "crop": [plan.left, plan.top],
            "flip": request.flip,
            "model": model_identity,
            "scaling_factor": scaling_factor,
        }
    )


class _SafetensorsStore:
    """Key -> one safetensors file under ``directory/<kind>/<key[:2]>/``; atomic writes, and a checksum of
    the tensors in each entry's header, so a truncated or bit-flipped entry is found and recomputed instead
    of being trained on (safetensors itself checks only the header and the file size)."""

    def __init__(self, directory: Path, kind: str) -> None:
        self.directory = Path(directory) / kind

    def path_for(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        """Whether a sound entry exists; a damaged one is reported and will be recomputed."""
        path = self.path_for(key)
        if not path.is_file():
            return False
        try:
            self._load_checked(path)
        except Exception as exc:  # safetensors raises its own error type for a bad header or size
            logger.warning("cache entry %s is damaged (%s); recomputing it", path, exc)
            return False
        return True

    def write(self, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        metadata = {**metadata, CHECKSUM_KEY: tensors_checksum(tensors)}
        # No fsync (durable=False): an entry torn by a power cut fails its checksum and is recomputed,
        # and one fsync per entry would slow caching thousands of images. A full disk is a DiskFullError.
        payload = safetensors_bytes(tensors, metadata=metadata)
        write_atomic(self.path_for(key), payload, fault="cache-write", durable=False)

    def read(self, key: str) -> dict[str, torch.Tensor]:
        """The entry's tensors; raises DatasetError when it was damaged after the run checked it."""
        path = self.path_for(key)
        try:
            return self._load_checked(path)
        except Exception as exc:
            raise DatasetError(
                f"cache entry {path} was damaged during the run ({exc}); nothing was trained on it. Run "
                "the same command again (with --resume to continue): difflora recomputes damaged entries."
            ) from None

    @staticmethod
    def _load_checked(path: Path) -> dict[str, torch.Tensor]:
        with safe_open(str(path), framework="pt") as handle:
            expected = (handle.metadata() or {}).get(CHECKSUM_KEY)
        tensors = load_file(str(path))
        if expected is None:
            raise CorruptCacheEntry("no checksum in its header")
        if tensors_checksum(tensors) != expected:
            raise CorruptCacheEntry("its tensors do not match the checksum written with them")
        return tensors


class CorruptCacheEntry(Exception):
    """A cache entry whose tensors are not the ones written (internal: recomputed, or a DatasetError)."""


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# Pixels per VAE-encode call: 4 images up to 256x256, one at 512x512 and above. Measured on a 2-core CPU with
# the SD 1.5 VAE at 512 px: 4.9-5.5 s per image one at a time, 5.8-6.2 s in batches of 4 (activations of
# 4 x 128 x 512 x 512 floats no longer fit the caches); small images gain from batching.
ENCODE_PIXELS = 4 * 256 * 256


def encode_batch(area: int, most: int) -> int:
    """Images of `area` pixels per VAE-encode call, at most `most`."""
    return max(1, min(most, ENCODE_PIXELS // max(1, area)))


def _batched(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class LatentCache:
    """VAE latents (posterior mean and std) on disk, keyed by image content, crop, flip and model."""

    def __init__(self, directory: Path) -> None:
        self.store = _SafetensorsStore(directory, "latents")

    def build(
        self,
        requests: Sequence[LatentRequest],
        encode: VaeEncode,
        *,
        model_identity: str,
        scaling_factor: float,
        batch_size: int = 4,
        progress: Progress | None = None,
    ) -> CacheBuild:
        """Make sure every request has an entry; encode only the missing ones (batched per bucket)."""
        keys = [latent_key(r, model_identity=model_identity, scaling_factor=scaling_factor) for r in requests]
        distinct = dict(zip(keys, requests, strict=True))
        missing = [(key, request) for key, request in distinct.items() if not self.store.has(key)]
        # Same-bucket entries batch together; both flips of one image sit side by side (one decode).
        missing.sort(key=lambda item: (item[1].plan.bucket, str(item[1].path), item[1].flip))
        by_bucket: dict = {}
        for key, request in missing:
            by_bucket.setdefault(request.plan.bucket, []).append((key, request))
        done = 0
        for bucket, group in by_bucket.items():
            for chunk in _batched(group, encode_batch(bucket.area, batch_size)):
                self._encode_chunk(
                    chunk, encode, model_identity=model_identity, scaling_factor=scaling_factor
                )
                done += len(chunk)
                if progress is not None:
                    progress(done, len(missing))
        if missing:
            logger.info(
                "cached %d latent(s); %d were already cached", len(missing), len(distinct) - len(missing)
            )
        return CacheBuild(keys=keys, hits=len(distinct) - len(missing), computed=len(missing))

    def _encode_chunk(self, chunk, encode: VaeEncode, *, model_identity: str, scaling_factor: float) -> None:
        images: dict[Path, object] = {}
        pixels = []
        for _, request in chunk:
            if request.path not in images:
                images[request.path] = load_image(request.path)
            pixels.append(render_pixels(images[request.path], request.plan, flip=request.flip))
        means, stds = encode(torch.stack(pixels))
        for index, (key, request) in enumerate(chunk):
            metadata = {
                "difflora.cache": json.dumps(
                    {"format": CACHE_FORMAT, "content": request.content_hash, "flip": request.flip,
                     "bucket": str(request.plan.bucket), "model": model_identity,
                     "scaling_factor": scaling_factor, "source": request.path.name}
                )
            }  # fmt: skip
            tensors = {"mean": means[index].float(), "std": stds[index].float()}
            if request.mask is not None:  # in the entry, so its checksum covers the mask too
                mask = mask_image(request.mask, images[request.path].size)
                grid = tuple(means[index].shape[-2:])
                tensors["mask"] = render_mask(mask, request.plan, flip=request.flip, grid=grid)
            self.store.write(key, tensors, metadata)

    def load(self, key: str) -> LatentMoments:
        tensors = self.store.read(key)
        return LatentMoments(mean=tensors["mean"], std=tensors["std"], mask=tensors.get("mask"))


def text_key(caption: str, *, encoder_identity: str) -> str:
    return sha256_json(
        {"kind": "text", "format": CACHE_FORMAT, "caption": caption, "model": encoder_identity}
    )


class TextEmbeddingCache:
    """Text-encoder outputs per caption (whatever tensors ``encode`` returns, e.g. hidden states and the
    pooled output for SDXL), keyed by the exact caption and the text encoders' identity."""

    def __init__(self, directory: Path) -> None:
        self.store = _SafetensorsStore(directory, "text")

    def build(
        self, captions: Iterable[str], encode: TextEncode, *, encoder_identity: str, batch_size: int = 16
    ) -> tuple[dict[str, str], CacheBuild]:
        """Returns ({caption: key}, stats); encodes only captions not cached yet."""
        keys = {caption: text_key(caption, encoder_identity=encoder_identity) for caption in captions}
        missing = sorted(caption for caption, key in keys.items() if not self.store.has(key))
        for chunk in _batched(missing, batch_size):
            outputs = encode(list(chunk))
            for index, caption in enumerate(chunk):
                tensors = {name: value[index].float() for name, value in outputs.items()}
                meta = {"difflora.cache": json.dumps({"format": CACHE_FORMAT, "model": encoder_identity})}
                self.store.write(keys[caption], tensors, meta)
        stats = CacheBuild(keys=list(keys.values()), hits=len(keys) - len(missing), computed=len(missing))
        return keys, stats

    def load(self, key: str) -> dict[str, torch.Tensor]:
        return self.store.read(key)


def text_cache_allowed(*, train_text_encoder: bool, augmentation: CaptionAugmentation) -> tuple[bool, str]:
    """Whether text embeddings can be cached, and why not when they cannot (for a message, not an assert)."""
    if train_text_encoder:
        return False, "text embeddings are not cached: the text encoder is being trained"
    if augmentation.changes_tags:
        return (
            False,
            "text embeddings are not cached: tag shuffling / tag dropout change captions every epoch",
        )
    return True, "text embeddings cached (captions are fixed; dropped captions use the cached '' embedding)"


def random_crop_with_cache_message() -> str:
    return (
        "random crop with latent caching: each image keeps one random crop window (chosen from the seed) "
        "for the whole run; disable the latent cache to draw a new window every epoch"
    )
