"""The run's Prior (--preserve-base) from its config and data, its trigger-free captions cached before the
text encoders are freed (difflora.training.prior uses it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from difflora.config.train import TrainConfig
from difflora.training.data import TrainingData, caption_cache
from difflora.training.prior import DRIFT_PROMPTS, Prior, strip_trigger


def prior_for(config: TrainConfig, data: TrainingData, pipe: Any, cache_dir: Path) -> Prior | None:
    if not config.preserve_base:
        return None
    prompts = _prompts(config.preserve_prompts) if config.preserve_prompts else ()
    captions = [example.caption for example in data.scan.examples]
    stripped = sorted({strip_trigger(caption, config.trigger) for caption in captions})
    prior = Prior(
        weight=config.prior_weight,
        trigger=config.trigger,
        prompts=prompts,
        drift_prompts=prompts[:DRIFT_PROMPTS] or tuple(stripped[:DRIFT_PROMPTS]),
    )
    if data.dataset.texts is not None:  # the steps read embeddings, not captions: cache these too
        dropped = {""} if config.caption_dropout else set()
        prior.texts = caption_cache(prior.every_caption(captions) | dropped, pipe, cache_dir)
    return prior


def _prompts(path: str) -> tuple[str, ...]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip())
