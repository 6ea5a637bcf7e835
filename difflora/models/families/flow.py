"""Rectified flow (flow matching), the objective of Flux, SD3 and their successors: shared machinery that a
flow-matching family returns from `ModelFamily.flow_schedule`.

One step draws σ ∈ (0, 1) per sample and Gaussian noise ε, forms x_σ = (1 - σ)·x0 + σ·ε and regresses the
denoiser's output on the velocity ε - x0 (diffusers' `train_dreambooth_lora_flux.py`). What differs between
trainers is where σ is drawn (`--timestep-sampling`):

- `uniform`: σ ~ U(0, 1) (diffusers' default weighting scheme, "none").
- `logit-normal`: σ = sigmoid(mean + scale·n), n ~ N(0, 1) (SD3's; diffusers' `logit_normal`).
- `sigmoid`: the same around mean 0 (kohya's `--timestep_sampling sigmoid` with `--sigmoid_scale`).
- `shift`: sigmoid(scale·n) shifted towards noise by a constant, σ' = shift·σ / (1 + (shift - 1)·σ).
- `flux-shift`: sigmoid(scale·n) shifted by Flux's resolution-dependent μ, σ' = e^μ / (e^μ + 1/σ - 1), with μ
  interpolated linearly in the image's token count between the scheduler's (base_image_seq_len, base_shift)
  and (max_image_seq_len, max_shift), exactly as `FluxPipeline` computes μ (`calculate_shift`).

All randomness comes from an explicit generator, so a step's noise is a pure function of (seed, step).
torch and diffusers are imported inside the functions: the family package stays importable without them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SAMPLINGS: tuple[str, ...] = ("uniform", "sigmoid", "logit-normal", "shift", "flux-shift")


@dataclass(frozen=True)
class TimestepSampling:
    """Where σ is drawn (`--timestep-sampling` and its `--timestep-mean/-scale/-shift`)."""

    kind: str = "uniform"
    mean: float = 0.0
    scale: float = 1.0
    shift: float = 3.0


@dataclass(frozen=True)
class FlowNoised:
    """What a training step needs besides the model (the fields the loss reads, as `NoisedBatch` has)."""

    noisy: torch.Tensor  # x_σ
    noise: torch.Tensor  # ε
    timesteps: torch.Tensor  # σ per sample, float [B] (the transformer takes σ; it scales by 1000 itself)
    target: torch.Tensor  # ε - x0
    weights: torch.Tensor  # per-sample loss weights [B]: ones


@dataclass(frozen=True)
class FlowSchedule:
    """A flow-matching family's noising: the sampling and the scheduler's resolution-dependent shift line.
    `patch`: latent pixels per token side (Flux packs 2x2 latent pixels into one token)."""

    sampling: TimestepSampling
    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15
    patch: int = 2

    @classmethod
    def from_scheduler(
        cls, config: Mapping[str, Any], sampling: TimestepSampling, *, patch: int = 2
    ) -> FlowSchedule:
        """Read the shift line from a FlowMatchEulerDiscreteScheduler config (diffusers' defaults where a
        config, as schnell's, leaves it out)."""
        return cls(
            sampling,
            base_seq_len=int(config.get("base_image_seq_len", 256)),
            max_seq_len=int(config.get("max_image_seq_len", 4096)),
            base_shift=float(config.get("base_shift", 0.5)),
            max_shift=float(config.get("max_shift", 1.15)),
            patch=patch,
        )

    def mu(self, seq_len: int) -> float:
        """Flux's μ for an image of `seq_len` tokens (diffusers' `calculate_shift`)."""
        slope = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)
        return seq_len * slope + self.base_shift - slope * self.base_seq_len

    def sigmas(self, batch: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
        """σ per sample, float32 on the CPU, drawn as `sampling` says (see the module docstring)."""
        return draw_sigmas(self.sampling, batch, generator, mu=self.mu(seq_len))

    def noised(self, latents: torch.Tensor, generator: torch.Generator) -> FlowNoised:
        """Draw σ, then ε (that order, fixed), and form x_σ and the target."""
        import torch

        seq_len = (latents.shape[-2] // self.patch) * (latents.shape[-1] // self.patch)
        sigmas = self.sigmas(latents.shape[0], seq_len, generator)
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents)
        s = sigmas.to(latents.device).reshape(-1, *([1] * (latents.ndim - 1)))
        return FlowNoised(
            noisy=flow_noisy(latents, noise, s),
            noise=noise,
            timesteps=sigmas.to(latents.device),
            target=flow_target(latents, noise),
            weights=torch.ones(latents.shape[0], device=latents.device),
        )


def flow_noisy(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_σ = (1 - σ)·x0 + σ·ε (σ broadcastable to the latents)."""
    return ((1.0 - sigmas) * latents.float() + sigmas * noise.float()).to(latents.dtype)


def flow_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity the denoiser regresses on: ε - x0."""
    return (noise.float() - latents.float()).to(latents.dtype)


def draw_sigmas(
    sampling: TimestepSampling, batch: int, generator: torch.Generator, *, mu: float
) -> torch.Tensor:
    """σ per sample for `sampling` (the kinds of `SAMPLINGS`), with μ used by `flux-shift`."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    if sampling.kind == "uniform":
        return compute_density_for_timestep_sampling("none", batch, generator=generator)
    mean = sampling.mean if sampling.kind == "logit-normal" else 0.0
    sigmas = compute_density_for_timestep_sampling(
        "logit_normal", batch, logit_mean=mean, logit_std=sampling.scale, generator=generator
    )
    if sampling.kind == "shift":
        return time_shift(sigmas, math.log(sampling.shift))
    if sampling.kind == "flux-shift":
        return time_shift(sigmas, mu)
    if sampling.kind in ("sigmoid", "logit-normal"):
        return sigmas
    raise ValueError(f"unknown timestep sampling {sampling.kind!r}: choose one of {', '.join(SAMPLINGS)}")


def time_shift(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """σ' = e^μ / (e^μ + 1/σ - 1): with e^μ = s it is s·σ / (1 + (s - 1)·σ), SD3's constant shift."""
    import torch

    scale = math.exp(mu)
    return (scale / (scale + (1.0 / sigmas.double() - 1.0))).to(torch.float32)
