"""Held-out images for the validation loss: `--validation-split` takes a reproducible share of the training
folder out of training, `--validation-dir` names a folder of its own.

The choice is a pure function of (the images' paths, the fraction, the seed): the same folder and seed hold
out the same images on every run and every resume, whatever order the folder was scanned in, so validation
curves of two runs are comparable and a resumed run validates on what it did before.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from difflora.data.examples import Example
from difflora.errors import ConfigError


def held_out_count(images: int, fraction: float) -> int:
    """How many of `images` a split of `fraction` holds out: at least one when the fraction is above 0."""
    return max(1, round(fraction * images)) if fraction > 0 else 0


def hold_out(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(training examples in their scanned order, held-out examples by path). Raises when the split would
    leave no image to train on."""
    count = held_out_count(len(examples), fraction)
    if count == 0:
        return list(examples), []
    if count >= len(examples):
        raise ConfigError(
            f"--validation-split {fraction:g} holds out {count} of the folder's {len(examples)} images and "
            "leaves none to train on: lower it, or give held-out images with --validation-dir."
        )
    by_path = sorted(examples, key=lambda example: str(example.path))
    random.Random(f"validation-split-{seed}").shuffle(by_path)
    held = {example.path for example in by_path[:count]}
    training = [example for example in examples if example.path not in held]
    return training, sorted((e for e in examples if e.path in held), key=lambda e: str(e.path))


def describe_held_out(held: Sequence[Example], source: str, limit: int = 8) -> str:
    """'3 held-out images (--validation-split 0.1): a.png, b.png, c.png', as the plan and check list them."""
    names = [example.path.name for example in held]
    shown = ", ".join(names[:limit]) + (f", and {len(names) - limit} more" if len(names) > limit else "")
    return f"{len(names)} held-out image{'s' if len(names) != 1 else ''} ({source}): {shown}"
