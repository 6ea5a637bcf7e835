"""Sample grids during training, rendered by `difflora.generation.pipeline.render`: the code `difflora generate` uses,
so a sample is exactly what generation with that checkpoint's adapter, seed and scheduler gives.

Rows are prompts, columns are seeds. Rendering never touches the training RNG streams (it runs inside
`torch.random.fork_rng`), so a run with samples trains exactly like a run without.

While a grid renders, each LoRA layer runs fused (`difflora.adapter.inject.merged_lora`): its weight is
W0 + ΔW, summed in float32 as `difflora generate` composes an adapter, and peft's LoRA branch is off. On
small models that branch's extra matmuls roughly double a render (embedded model, 6-image grid: 2.9 s with
the branch, 1.4 s fused), and the grids were a fifth of the default run's wall time.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from difflora.adapter.inject import merged_lora
from difflora.adapter.types import COMPONENTS
from difflora.models.identity import model_identity
from difflora.safe_io import write_atomic

logger = logging.getLogger(__name__)

DEFAULT_SAMPLE_PROMPTS = 3
# Preview images rendered per pipeline call, by pixels: a whole grid of 64-px images at once (where the
# per-call overhead dominates), two 512-px images, one 1024-px image (memory grows with the batch).
PREVIEW_BATCH_PIXELS = 2 * 512 * 512


def default_prompts(captions: Sequence[str], count: int = DEFAULT_SAMPLE_PROMPTS) -> list[str]:
    """The first `count` distinct non-empty captions of the data set, in scan order."""
    chosen: list[str] = []
    for caption in captions:
        if caption and caption not in chosen:
            chosen.append(caption)
        if len(chosen) == count:
            break
    return chosen


def render_sample_grid(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int,
    guidance: float,
    scheduler: str,
    width: int,
    height: int,
    autocast: Any,
    zero_terminal_snr: bool = False,
    embeddings: Mapping[str, Any] | None = None,
) -> Image.Image:
    """One image per (prompt, seed), laid out prompts × seeds, labelled with the seed. `embeddings`: the
    prompts' text inputs, encoded before the run freed the text encoders (`release_text_encoders`)."""
    from difflora.generation.pipeline import image_grid, render

    all_prompts = [p for p in prompts for _ in seeds]
    all_seeds = [s for _ in prompts for s in seeds]
    present = (getattr(pipe, name, None) for name in COMPONENTS)
    modules = [module for module in present if module is not None]
    modes = [m.training for m in modules]
    for module in modules:
        module.eval()
    try:
        with torch.random.fork_rng(devices=[]), autocast, _quiet("diffusers"), merged_lora(modules):
            images = render(
                pipe,
                all_prompts,
                seeds=all_seeds,
                steps=steps,
                guidance=guidance,
                scheduler=scheduler,
                width=width,
                height=height,
                zero_terminal_snr=zero_terminal_snr,
                batch_pixels=PREVIEW_BATCH_PIXELS,
                embeddings=embeddings,
            )
    finally:
        for module, mode in zip(modules, modes, strict=True):
            module.train(mode)
    labels = [f"seed {s}: {p}" for p, s in zip(all_prompts, all_seeds, strict=True)]
    return image_grid(images, rows=len(prompts), cols=len(seeds), labels=labels)


def release_text_encoders(pipe: Any, prompts: Sequence[str]) -> dict[str, Any] | None:
    """Free the pipeline's text encoders (their output is cached and they do not train: the steps never
    run them, and a T5-XXL is ~9 GB idle through the run), after encoding the sample prompts with them:
    the sample grids render from those embeddings (None when there are no samples)."""
    from difflora.generation.pipeline import prompt_embeddings

    embeddings = prompt_embeddings(pipe, prompts) if prompts else None
    for name in model_identity(pipe).model_family.text_encoders:
        setattr(pipe, name, None)
    return embeddings


@contextmanager
def _quiet(name: str):
    """Silence a library's warnings while sampling: the pipeline repeats the same prompt-truncation warning
    for every sample, while the data scan has already reported captions longer than the text encoder reads."""
    library = logging.getLogger(name)
    level = library.level
    library.setLevel(logging.ERROR)
    try:
        yield
    finally:
        library.setLevel(level)


def save_grid(image: Image.Image, path: Path) -> Path:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return write_atomic(path, buffer.getvalue())
