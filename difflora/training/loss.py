"""The diffusion training objective, as pure tensor functions (no Accelerate, no models, no globals).

One step draws timesteps t and Gaussian noise ε (plus optional per-channel offset noise), forms
x_t = √ᾱ_t·x_0 + √(1-ᾱ_t)·ε, and regresses the UNet's output on the target its scheduler predicts:
ε for `epsilon`, v = √ᾱ_t·ε - √(1-ᾱ_t)·x_0 for `v_prediction`, x_0 for `sample`.

Min-SNR-γ weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy")
weights each sample's loss by min(SNR(t), γ)/SNR(t) for ε-prediction and min(SNR(t), γ)/(SNR(t)+1) for
v-prediction, with SNR(t) = ᾱ_t/(1-ᾱ_t): the formula of diffusers' reference training scripts.

All randomness comes from an explicit `torch.Generator`, so the trainer can make a step's noise a pure
function of (seed, step, process): resuming a run needs no noise state at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class NoisedBatch:
    noisy: torch.Tensor  # x_t
    noise: torch.Tensor  # ε (offset included)
    timesteps: torch.Tensor  # long [B]
    target: torch.Tensor  # what the UNet must predict
    weights: torch.Tensor  # per-sample loss weights [B] (ones without min-SNR)


def sample_noise(
    latents: torch.Tensor, generator: torch.Generator, *, noise_offset: float = 0.0
) -> torch.Tensor:
    """ε ~ N(0, I) shaped like `latents`, plus `noise_offset`·N(0, 1) per (sample, channel) when > 0
    (offset noise lets the model shift an image's mean brightness)."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents)
    if noise_offset > 0:
        offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator)
        noise = noise + noise_offset * offset.to(latents)
    return noise


def sample_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform integer timesteps in [0, num_train_timesteps)."""
    return torch.randint(0, num_train_timesteps, (batch,), generator=generator, dtype=torch.long)


def _gather(values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    out = values.to(device=like.device, dtype=torch.float32)[timesteps.to(like.device)]
    return out.reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(
    latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """x_t = √ᾱ_t·x_0 + √(1-ᾱ_t)·ε (DDPM forward process; the same as DDPMScheduler.add_noise)."""
    abar = _gather(alphas_cumprod, timesteps, latents)
    return (abar.sqrt() * latents.float() + (1 - abar).sqrt() * noise.float()).to(latents.dtype)


def target_for(
    prediction_type: str,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """The regression target for the model's prediction type."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        abar = _gather(alphas_cumprod, timesteps, latents)
        return (abar.sqrt() * noise.float() - (1 - abar).sqrt() * latents.float()).to(latents.dtype)
    if prediction_type == "sample":
        return latents
    raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ_t/(1-ᾱ_t) per timestep, in float32."""
    abar = alphas_cumprod.to(torch.float32)[timesteps.cpu()]
    return abar / (1 - abar)


def min_snr_weights(
    timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, *, gamma: float, prediction_type: str
) -> torch.Tensor:
    """Per-sample weights: min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR+1) for v, min(SNR, γ) for x_0 (the
    paper's weight in x_0 space). γ <= 0 gives ones."""
    if gamma <= 0:
        return torch.ones(timesteps.shape[0], dtype=torch.float32)
    ratio = snr(timesteps, alphas_cumprod)
    clamped = torch.clamp(ratio, max=gamma)
    if prediction_type == "v_prediction":
        return clamped / (ratio + 1)
    if prediction_type == "sample":
        return clamped
    return clamped / ratio


def noised_batch(
    latents: torch.Tensor,
    generator: torch.Generator,
    *,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    noise_offset: float = 0.0,
    min_snr_gamma: float = 0.0,
) -> NoisedBatch:
    """Everything one training step needs besides the model: x_t, t, the target and the loss weights.
    Draw order from `generator`: timesteps first, then noise (fixed, so a seed means the same step)."""
    timesteps = sample_timesteps(latents.shape[0], alphas_cumprod.shape[0], generator)
    noise = sample_noise(latents, generator, noise_offset=noise_offset)
    return NoisedBatch(
        noisy=add_noise(latents, noise, timesteps, alphas_cumprod),
        noise=noise,
        timesteps=timesteps.to(latents.device),
        target=target_for(prediction_type, latents, noise, timesteps, alphas_cumprod),
        weights=min_snr_weights(
            timesteps, alphas_cumprod, gamma=min_snr_gamma, prediction_type=prediction_type
        ).to(latents.device),
    )


def diffusion_loss(
    prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Weighted MSE: per-sample mean squared error times its weight, averaged over the batch (float32).
    With `mask` (per latent pixel, broadcast over channels), each sample's error is the mask-weighted mean,
    so a latent pixel of mask 0 gives no gradient at all; a sample whose mask is 0 everywhere counts 0."""
    squared = F.mse_loss(prediction.float(), target.float(), reduction="none")
    dims = tuple(range(1, squared.ndim))
    if mask is None:
        per_sample = squared.mean(dim=dims)
    else:
        mask = torch.broadcast_to(mask.float(), squared.shape)
        per_sample = (squared * mask).sum(dim=dims) / mask.sum(dim=dims).clamp_min(1e-12)
    return (per_sample * weights.float()).mean()
