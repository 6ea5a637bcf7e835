"""--preserve-base: prior preservation without regularisation images, and the drift it keeps small.

Each micro-batch also takes the same noisy latents at the same timesteps with its captions' trigger word
removed (or prompts from --preserve-prompts): the base model's prediction, with every LoRA layer switched
off and no gradients, is the target of the adapted model's prediction, weighted by --prior-weight. So the
adapter learns the concept where the trigger is and learns to change nothing where it is not. Cost: one
forward without gradients and one with them, per micro-batch.

Drift, measured at each checkpoint when a run has trigger-free prompts (--preserve-base, or --trigger): the
mean squared distance between the adapted and the base model's predictions for those prompts, from fixed
pure noise at the validation grid's noise levels: how much the adapter changes what the base does without
its trigger. 0 at step 0 exactly (B starts at zero).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer

from difflora.data.batches import Draw, collate
from difflora.training.forward import latents_of, micro_seed, predict
from difflora.training.run import Run
from difflora.training.validation import grid

DRIFT_PROMPTS = 4  # trigger-free captions the drift is measured on, when no --preserve-prompts are given


def strip_trigger(caption: str, trigger: str | None) -> str:
    """The caption without its trigger word (as a tag or a word, any letter case), tidied."""
    if not trigger:
        return caption
    pattern = re.compile(rf"(?<!\w){re.escape(trigger)}(?!\w)", re.IGNORECASE)
    tags = (" ".join(pattern.sub(" ", tag).split()) for tag in caption.split(","))
    return ", ".join(tag for tag in tags if tag)


@dataclass
class Prior:
    """What --preserve-base and the drift need, as plain values."""

    weight: float  # --prior-weight; 0 when only the drift is measured (--trigger without --preserve-base)
    trigger: str | None
    prompts: tuple[str, ...]  # --preserve-prompts, else ()
    drift_prompts: tuple[str, ...]
    texts: Any = None  # (cache, {trigger-free caption: key}) when text embeddings are cached, else None

    def captions(self, batch: dict[str, Any]) -> list[str]:
        """The micro-batch's trigger-free captions (a preserve prompt per example, chosen by its index)."""
        if self.prompts:
            return [self.prompts[int(index) % len(self.prompts)] for index in batch["index"]]
        return [strip_trigger(caption, self.trigger) for caption in batch["caption"]]

    def every_caption(self, captions: Sequence[str]) -> set[str]:
        """Every trigger-free caption a run can ask for, to be cached before the text encoders go."""
        found = set(self.prompts) | set(self.drift_prompts)
        return found if self.prompts else found | {strip_trigger(c, self.trigger) for c in captions}


@contextmanager
def adapters_off(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Every LoRA layer of `modules` switched off (the base model's own output), then on again."""
    layers = [m for module in modules for m in module.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def _with_text(run: Run, batch: dict[str, Any], captions: list[str]) -> dict[str, Any]:
    """`batch` conditioned on `captions` instead: their cached embeddings, or the captions themselves."""
    prior = run.prior
    assert prior is not None
    changed = {key: value for key, value in batch.items() if key != "text"}
    if prior.texts is None:
        return {**changed, "caption": captions}
    cache, keys = prior.texts
    embeddings = [cache.load(keys[caption]) for caption in captions]
    return {**changed, "text": {name: torch.stack([e[name] for e in embeddings]) for name in embeddings[0]}}


def prior_loss(run: Run, batch: dict[str, Any], noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The adapted prediction's distance to the base's on the batch's trigger-free captions."""
    prior = run.prior
    assert prior is not None
    plain = _with_text(run, batch, prior.captions(batch))
    base = run.accelerator.unwrap_model(run.unet)  # no gradients: DDP's hooks stay out of it
    with torch.no_grad(), adapters_off(run.trained_modules):
        target = predict(run, plain, noisy, timesteps, model=base)
    # the unwrapped model again: a second forward through DDP before the backward would upset its reducer;
    # the gradients reach the same parameters, and DDP reduces their sum once
    return F.mse_loss(predict(run, plain, noisy, timesteps, model=base).float(), target.float())


def drift(run: Run) -> float:
    """Mean squared distance between the adapted and the base predictions on the drift prompts."""
    prior = run.prior
    assert prior is not None
    levels = grid(run.objective)
    item = run.data.dataset[Draw(0, False, 0)]
    rows = collate([item] * len(levels))
    model = run.accelerator.unwrap_model(run.unet)
    total = 0.0
    with torch.no_grad():
        shape = latents_of(rows, run, torch.Generator()).shape  # once: uncached latents are VAE-encoded
        timesteps = levels.to(run.accelerator.device)
        for index, prompt in enumerate(prior.drift_prompts):
            generator = torch.Generator().manual_seed(micro_seed(run.loop.seed, index, 0, "drift"))
            noise = torch.randn(shape, generator=generator).to(run.accelerator.device)
            plain = _with_text(run, rows, [prompt] * len(levels))
            adapted = predict(run, plain, noise, timesteps, model=model)
            with adapters_off(run.trained_modules):
                base = predict(run, plain, noise, timesteps, model=model)
            total += float(F.mse_loss(adapted.float(), base.float()))
    return total / len(prior.drift_prompts)
