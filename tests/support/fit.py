"""How well a pipeline's weights fit a folder of captioned images, computed with diffusers' own scheduler and
independently of difflora's trainer: the ε-prediction loss at fixed noise and timesteps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def fixed_noise_loss(pipe, folder: Path, *, timesteps: Sequence[int], count: int | None = None) -> float:
    """Mean ε-prediction MSE over the folder's first `count` images (all when None), each with its own
    caption, noised as DDPM does at each of `timesteps` with noise drawn from seed 0."""
    from diffusers import DDPMScheduler

    from difflora.data.images import load_image

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    images = sorted(folder.rglob("*.png"))[:count]
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    pixels = torch.stack(
        [
            torch.from_numpy(np.asarray(load_image(p).resize((size, size)), dtype=np.float32)).permute(
                2, 0, 1
            )
            for p in images
        ]
    )
    captions = [p.with_suffix(".txt").read_text().strip() for p in images]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        latents = pipe.vae.encode(pixels / 127.5 - 1).latent_dist.mean * pipe.vae.config.scaling_factor
        tokens = pipe.tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt")
        hidden = pipe.text_encoder(tokens.input_ids)[0]
        losses = []
        for t in timesteps:
            noise = torch.randn(latents.shape, generator=generator)
            steps = torch.full((len(images),), t)
            noisy = scheduler.add_noise(latents, noise, steps)
            prediction = pipe.unet(noisy, steps, hidden).sample
            losses.append(float(torch.nn.functional.mse_loss(prediction, noise)))
    return float(np.mean(losses))
