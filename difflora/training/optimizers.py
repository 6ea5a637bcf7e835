"""The optimizers LoRA trainers use now, beside AdamW (difflora.training.setup.make_optimizer):

- `prodigy` (Mishchenko & Defazio 2023, the `prodigyopt` package): estimates its own step size d; run at
  learning rate 1 (its default here), d is logged every step (TensorBoard `optimizer/d`) and at the end.
- `adamw-schedulefree` (Defazio et al. 2024, the `schedulefree` package): no schedule (the run's learning
  rate schedule is constant; warm-up is the optimizer's own). It trains on one sequence of weights and
  evaluates another: sample grids, validation and every saved adapter use its evaluation weights
  (`evaluation_weights`), while a checkpoint keeps the training weights and the optimizer state, so a resumed
  run continues exactly. Saving the training weights as the adapter is the common bug elsewhere.
- `adafactor` (transformers' Adafactor at an explicit learning rate, without relative steps or parameter
  scaling: the settings LoRA trainers document).

prodigyopt and schedulefree are optional (`pip install 'difflora[optimizers]'`); a missing one is one line.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from difflora.errors import ConfigError

logger = logging.getLogger(__name__)

EXTRA_OPTIMIZERS = ("prodigy", "adamw-schedulefree", "adafactor")
_PACKAGES = {"prodigy": "prodigyopt", "adamw-schedulefree": "schedulefree"}


def extra_optimizer(
    kind: str, groups: list[dict[str, Any]], *, weight_decay: float, warmup: int
) -> torch.optim.Optimizer:
    """One of EXTRA_OPTIMIZERS over `groups` (each with its own "lr")."""
    if kind == "prodigy":
        return _module(kind).Prodigy(groups, lr=1.0, weight_decay=weight_decay)
    if kind == "adamw-schedulefree":
        optimizer = _module(kind).AdamWScheduleFree(groups, weight_decay=weight_decay, warmup_steps=warmup)
        optimizer.train()  # the training weights: the mode every step runs in
        return optimizer
    from transformers.optimization import Adafactor

    return Adafactor(
        groups, scale_parameter=False, relative_step=False, warmup_init=False, weight_decay=weight_decay
    )


def _module(kind: str) -> Any:
    import importlib

    package = _PACKAGES[kind]
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ConfigError(
            f"--optimizer {kind} needs the {package} package: pip install 'difflora[optimizers]' "
            f"(or pip install {package})."
        ) from None


def owns_schedule(kind: str) -> bool:
    """Whether the optimizer schedules its learning rate itself (the run's schedule is then constant)."""
    return kind == "adamw-schedulefree"


def _inner(optimizer: Any) -> Any:
    return getattr(optimizer, "optimizer", optimizer)  # under Accelerate's AcceleratedOptimizer


@contextmanager
def evaluation_weights(optimizer: Any) -> Iterator[None]:
    """The weights a schedule-free optimizer evaluates (its averaged sequence) in the model for the block,
    the training weights back after; nothing for other optimizers."""
    inner = _inner(optimizer)
    training = bool(getattr(inner, "param_groups", [{}])[0].get("train_mode", False))
    if not (training and hasattr(inner, "eval")):
        yield
        return
    inner.eval()
    try:
        yield
    finally:
        inner.train()


def step_size_estimate(optimizer: Any) -> float | None:
    """Prodigy's current d (its step-size estimate), or None for other optimizers."""
    group = _inner(optimizer).param_groups[0]
    return float(group["d"]) if "d" in group and "d0" in group else None
