"""The diffusion objective against diffusers' own implementations (DDPMScheduler, training_utils)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from difflora.training.loss import (
    add_noise,
    diffusion_loss,
    min_snr_weights,
    noised_batch,
    sample_noise,
    target_for,
)


@pytest.fixture
def ddpm() -> DDPMScheduler:
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(5, 4, 8, 8, generator=g)
    noise = torch.randn(5, 4, 8, 8, generator=g)
    timesteps = torch.tensor([0, 10, 500, 900, 999])
    return latents, noise, timesteps


def test_forward_process_and_targets_match_diffusers(ddpm):
    latents, noise, timesteps = _inputs()
    abar = ddpm.alphas_cumprod
    torch.testing.assert_close(
        add_noise(latents, noise, timesteps, abar), ddpm.add_noise(latents, noise, timesteps)
    )
    velocity = target_for("v_prediction", latents, noise, timesteps, abar)
    torch.testing.assert_close(velocity, ddpm.get_velocity(latents, noise, timesteps))
    assert target_for("epsilon", latents, noise, timesteps, abar) is noise
    assert target_for("sample", latents, noise, timesteps, abar) is latents
    with pytest.raises(ValueError, match="unknown prediction type"):
        target_for("flow", latents, noise, timesteps, abar)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_the_reference_formula(ddpm, prediction_type):
    _, _, timesteps = _inputs()
    gamma = 5.0
    snr = compute_snr(ddpm, timesteps)  # diffusers' reference helper
    base = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    expected = base / snr if prediction_type == "epsilon" else base / (snr + 1)
    weights = min_snr_weights(timesteps, ddpm.alphas_cumprod, gamma=gamma, prediction_type=prediction_type)
    torch.testing.assert_close(weights, expected.float())
    # Low-noise timesteps (high SNR) are down-weighted, high-noise ones keep weight <= 1.
    assert weights[0] < 0.01 and weights[-1] <= 1.0
    ones = min_snr_weights(timesteps, ddpm.alphas_cumprod, gamma=0, prediction_type=prediction_type)
    assert torch.equal(ones, torch.ones(5))


def test_noise_offset_shifts_each_channel_by_one_shared_value():
    latents = torch.zeros(64, 4, 8, 8)
    plain = sample_noise(latents, torch.Generator().manual_seed(3))
    offset = sample_noise(latents, torch.Generator().manual_seed(3), noise_offset=0.5)
    difference = offset - plain  # same first draw, then the per-(sample, channel) offset
    assert torch.allclose(difference, difference[:, :, :1, :1].expand_as(difference))
    assert 0.4 < float(difference[:, :, 0, 0].std()) < 0.6


def test_noised_batch_is_a_pure_function_of_the_generator(ddpm):
    latents, _, _ = _inputs()
    kwargs = dict(alphas_cumprod=ddpm.alphas_cumprod, prediction_type="epsilon", min_snr_gamma=5.0)
    a = noised_batch(latents, torch.Generator().manual_seed(7), **kwargs)
    b = noised_batch(latents, torch.Generator().manual_seed(7), **kwargs)
    c = noised_batch(latents, torch.Generator().manual_seed(8), **kwargs)
    assert torch.equal(a.noisy, b.noisy) and torch.equal(a.timesteps, b.timesteps)
    assert not torch.equal(a.noise, c.noise)
    torch.testing.assert_close(a.noisy, ddpm.add_noise(latents, a.noise, a.timesteps))


def test_weighted_loss_is_the_weighted_mean_of_per_sample_mse():
    prediction, target = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    weights = torch.tensor([1.0, 0.5, 0.0])
    per_sample = [float(((prediction[i] - target[i]) ** 2).mean()) for i in range(3)]
    expected = (per_sample[0] * 1.0 + per_sample[1] * 0.5) / 3
    assert float(diffusion_loss(prediction, target, weights)) == pytest.approx(expected, rel=1e-6)
    unweighted = diffusion_loss(prediction, target, torch.ones(3))
    torch.testing.assert_close(unweighted, torch.nn.functional.mse_loss(prediction, target))
