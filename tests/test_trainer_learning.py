"""End to end on the embedded model: `difflora train sample_data/<concept>` with its defaults learns.

Two things a user would notice, each measured independently of the trainer's own code:
- the loss goes down: the denoising loss on the folder's images at fixed noise and timesteps (computed
  here with diffusers' scheduler) is lower with the trained adapter than without it;
- generations move towards the folder's signature: with the adapter loaded by diffusers itself
  (`load_lora_weights`), the same prompts and seeds give images with more of the concept's measured
  signature (stripe energy for the style folder, plus-shaped blobs for the subject folder) than the base.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from difflora.models.loading import load_pipeline
from tests.support.fit import fixed_noise_loss
from tests.support.paths import SAMPLE_DATA

pytestmark = pytest.mark.slow

SEEDS = list(range(8))


@pytest.fixture(autouse=True)
def _one_thread():
    """Rendering and scoring run in this process: pin one thread (on a shared 2-core machine two threads
    can run many times slower); training picks its own thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fixed_noise_loss(pipe, folder: Path) -> float:
    """Mean ε-prediction MSE over the folder's first 16 images at 4 fixed timesteps and fixed noise."""
    return fixed_noise_loss(pipe, folder, timesteps=(100, 300, 500, 700), count=16)


def _measure(pipe, prompt: str, measure) -> float:
    from difflora.generation.pipeline import render

    images = render(pipe, [prompt] * len(SEEDS), seeds=SEEDS, steps=20, guidance=5.0)
    return float(np.mean([measure(image) for image in images]))


def _loss_trend(run_dir: Path) -> tuple[float, float]:
    with open(run_dir / "loss.csv", newline="") as handle:
        losses = [float(row["loss"]) for row in csv.DictReader(handle)]
    third = max(1, len(losses) // 3)
    return float(np.mean(losses[:third])), float(np.mean(losses[-third:]))


@pytest.mark.parametrize(
    ("concept", "prompt", "measure_name"),
    [
        ("style", "a red circle on a white background, zebrastripes style", "stripe_energy"),
        ("subject", "a red crossglyph on a white background", "cross_score"),
    ],
)
def test_default_training_learns_the_folders_concept(sample_adapters, concept, prompt, measure_name):
    from difflora.embedded import signatures

    measure = getattr(signatures, measure_name)
    adapter = sample_adapters / f"{concept}.safetensors"  # trained by the README's command (conftest)
    first, last = _loss_trend(sample_adapters / f"{concept}.run")
    assert last < first, f"training loss went from {first:.4f} to {last:.4f}"
    base = load_pipeline(None)
    base_loss = _fixed_noise_loss(base, SAMPLE_DATA / concept)
    base_signature = _measure(base, prompt, measure)
    base.load_lora_weights(str(adapter))  # diffusers' own loader: independent of difflora's code
    trained_loss = _fixed_noise_loss(base, SAMPLE_DATA / concept)
    trained_signature = _measure(base, prompt, measure)
    assert trained_loss < base_loss * 0.95, (base_loss, trained_loss)
    assert trained_signature > base_signature + 0.1, (measure_name, base_signature, trained_signature)
