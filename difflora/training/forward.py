"""One forward of the denoiser on a collated batch, as training and validation both need it: the batch's
latents (cached posteriors sampled, or pixels encoded), its text embeddings (cached, or encoded now), and
the family's conditioning call."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from difflora.data.batches import derived_rng
from difflora.models.families.conditioning import TextConditioning
from difflora.training.run import Run
from difflora.training.text import caption_encoder, pipeline_conditioning


def micro_seed(seed: int, micro_batch: int, process: int, stream: str) -> int:
    return derived_rng(stream, seed, micro_batch, process).getrandbits(63)


def predict(
    run: Run,
    batch: dict[str, Any],
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    model: torch.nn.Module | None = None,
) -> torch.Tensor:
    """The denoiser's output for `noisy` at `timesteps`, conditioned on `batch`'s captions (`model`: the
    denoiser to run, by default the run's, as Accelerate prepared it)."""
    conditioning = pipeline_conditioning(run.models.pipe)
    return conditioning.predict(
        model if model is not None else run.unet,
        noisy,
        timesteps,
        _text(batch, run, conditioning),
        batch,
        device=run.accelerator.device,
        dtype=run.models.weight_dtype,
        guidance=run.objective.guidance,
    )


def latents_of(batch: dict[str, Any], run: Run, generator: torch.Generator) -> torch.Tensor:
    device = run.accelerator.device
    if "latent_mean" in batch:  # cached posterior: sample it like latent_dist.sample() would
        mean, std = batch["latent_mean"], batch["latent_std"]
        return (mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)).to(device)
    vae = run.models.identity.model_family.latent_encoder(run.models.pipe.vae)
    with torch.no_grad():
        pixels = batch["pixels"].to(device, vae.dtype)
        return vae.encode(pixels).latent_dist.sample(generator=generator).float()


def _text(batch: dict[str, Any], run: Run, conditioning: TextConditioning) -> dict[str, torch.Tensor]:
    """The batch's cached text embeddings, or its captions encoded now (with gradients into the text
    encoders' LoRA layers when they train)."""
    if "text" in batch:
        return batch["text"]
    encode = caption_encoder(conditioning, run.tokenizers, list(run.text_encoders.values()))
    if run.models.train_text_encoder:
        return encode(batch["caption"])
    with torch.no_grad():
        return encode(batch["caption"])


def loss_mask(batch: dict[str, Any], latents: torch.Tensor, unmasked_weight: float) -> torch.Tensor | None:
    """The batch's loss masks as per-latent-pixel weights [B, 1, h, w]: unmasked_weight + (1 - it)·mask, a
    pixel-grid mask (uncached latents) averaged down to the latent grid by area. None without masks."""
    mask = batch.get("loss_mask")
    if mask is None:
        return None
    mask = mask.to(latents.device, torch.float32)
    if tuple(mask.shape[-2:]) != tuple(latents.shape[-2:]):
        mask = F.interpolate(mask, size=tuple(latents.shape[-2:]), mode="area")
    return unmasked_weight + (1.0 - unmasked_weight) * mask
