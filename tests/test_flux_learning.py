"""Flux LoRAs learn: on the tiny pretrained Flux (difflora/embedded/flux), a LoRA trained on
`sample_data/style` and one trained on `sample_data/subject` move the concepts' measured signatures
(`difflora.embedded.signatures`: stripe energy, plus-shaped blobs), the base model with the same prompts
and seeds as the control. Rendered at the model folder's defaults (64 px, true CFG 5, T5 at 32 tokens).

Settings (chosen for cost; numbers measured on this 2-core CPU, one torch thread, 2026-12-06, on the model
shipped then: 4,300 pretraining steps, shape accuracy 78.7%): rank 8, `--targets attention-mlp`, lr 1e-2
(cosine, 5% warm-up), batch 4, 120 steps, 64 px; 4 seeds, 12 steps. Training both adapters takes ~35 s and
rendering ~25 s on a quiet machine.

- style (prompt "a red circle on a white background, zebrastripes style"): stripe energy 0.023 on the
  base, 0.761 with the LoRA: past `STRIPE_THRESHOLD` (0.2) on every seed.
- subject (prompt "a red crossglyph on a white background"): cross score 0.236 on the base, 0.478 with
  the LoRA (+0.24). It does NOT reach `CROSS_THRESHOLD` (0.7): the LoRA makes plus-like blobs, not crisp
  crosses. The tiny Flux sees a 64-px image as 8x8 tokens of 8x8 px and draws token by token; the subject
  images themselves, averaged over 8-px cells, score 0.618 on the mean: a drawing that resolves only tokens
  stays under 0.7 (details and every LoRA setting tried: "LoRAs trained on it" in difflora/embedded/flux/README.md).
  This test asserts the threshold for the style and a +0.1 move for the subject, the bar
  `tests/test_trainer_learning.py` sets on the embedded SD model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from difflora.composition.composer import compose
from difflora.config.spec import parse_adapter_weights
from difflora.config.train import TrainConfig
from difflora.embedded import EMBEDDED_MODEL_DIR, signatures
from difflora.generation.pipeline import render
from difflora.models.loading import load_pipeline
from difflora.training.trainer import train_many
from tests.support.paths import SAMPLE_DATA

pytestmark = pytest.mark.slow

TINY_FLUX = EMBEDDED_MODEL_DIR.parent / "flux"
SEEDS = [0, 1, 2, 3]
STEPS = 12
CONCEPTS = {
    "style": ("a red circle on a white background, zebrastripes style", "stripe_energy"),
    "subject": ("a red crossglyph on a white background", "cross_score"),
}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> Path:
    """Both LoRAs, trained in one process on one loaded base (as `difflora train style subject` does)."""
    out = tmp_path_factory.mktemp("flux-learning")
    configs = [
        TrainConfig(
            data_dir=str(SAMPLE_DATA / concept),
            model=str(TINY_FLUX),
            output_dir=str(out),
            max_steps=120,
            batch_size=4,
            rank=8,
            learning_rate=1e-2,
            targets="attention-mlp",
            sample_every=0,
            save_every=0,
            grad_log_every=0,
            num_threads=1,
            seed=0,
        )
        for concept in CONCEPTS
    ]
    train_many(configs, progress=False)
    return out


@pytest.fixture(scope="module")
def pipe():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # rendering on a shared 2-core machine: one thread is fastest
    yield load_pipeline(TINY_FLUX)
    torch.set_num_threads(threads)


def _signature(pipe, adapters: Path, spec: str, concept: str) -> list[float]:
    prompt, measure = CONCEPTS[concept]
    compose(pipe, parse_adapter_weights(spec), adapter_dirs=[adapters])
    images = render(pipe, [prompt] * len(SEEDS), seeds=SEEDS, steps=STEPS)
    return [getattr(signatures, measure)(image) for image in images]


def test_a_style_lora_draws_the_stripes_the_base_does_not(pipe, adapters):
    base = _signature(pipe, adapters, "", "style")
    trained = _signature(pipe, adapters, "style", "style")
    assert max(base) < signatures.STRIPE_THRESHOLD < min(trained), (base, trained)


def test_a_subject_lora_moves_the_cross_signature(pipe, adapters):
    base = _signature(pipe, adapters, "", "subject")
    trained = _signature(pipe, adapters, "subject", "subject")
    assert np.mean(base) < signatures.CROSS_THRESHOLD and np.mean(trained) > np.mean(base) + 0.1, (
        base,
        trained,
    )
