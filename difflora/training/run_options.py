"""The optional parts of a run, from its config and data: the held-out set (--validation-split/-dir), the
weight average (--ema) and prior preservation (--preserve-base, its trigger-free captions cached before the
text encoders are freed)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from difflora.config.train import TrainConfig
from difflora.training.data import TrainingData, caption_cache
from difflora.training.ema import WeightAverage
from difflora.training.prior import DRIFT_PROMPTS, Prior, strip_trigger
from difflora.training.validation_set import Validation


def validation_for(config: TrainConfig, data: TrainingData) -> Validation | None:
    held = data.validation
    if held is None:
        return None
    names = tuple(example.path.name for example in held.examples)
    every, best = config.validate_every, config.keep_best
    return Validation(held, names, every=every, keep_best=best, chunk=2 * config.batch_size)


def weight_average_for(
    config: TrainConfig, trainable: Mapping[str, torch.Tensor], device: torch.device
) -> WeightAverage | None:
    if not config.ema:
        return None
    return WeightAverage(trainable, config.ema, torch.device("cpu") if config.ema_on_cpu else device)


def prior_for(config: TrainConfig, data: TrainingData, pipe: Any, cache_dir: Path) -> Prior | None:
    if data.regularisation is not None:
        return _class_drift(data, pipe, cache_dir)
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


def _class_drift(data: TrainingData, pipe: Any, cache_dir: Path) -> Prior:
    """--reg-dir: no loss of its own here (the class images weigh in the batch), but the drift, measured on
    class captions: how far the adapter moves what the base draws for the class."""
    regularisation = data.regularisation
    assert regularisation is not None
    captions = sorted({example.caption for example in regularisation.examples})
    prior = Prior(weight=0.0, trigger=None, prompts=(), drift_prompts=tuple(captions[:DRIFT_PROMPTS]))
    if data.dataset.texts is not None:
        prior.texts = caption_cache(set(prior.drift_prompts), pipe, cache_dir)
    return prior
