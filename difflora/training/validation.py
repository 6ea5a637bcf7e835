"""The validation loss: the diffusion loss on held-out images, measured so the curve follows the adapter and
not the dice.

Each held-out image is noised at a fixed grid of GRID_POINTS timesteps (DDPM: the centres of GRID_POINTS
equal slices of the model's timesteps; flow matching: σ at the centres of GRID_POINTS equal slices of (0, 1))
with noise drawn from a generator seeded by (run seed, image index) alone, and the loss is the training
objective's (its min-SNR weights included) averaged over the grid and the images, with the LoRA dropout off.
So two measurements of the same weights are equal bit for bit, whatever the step, the batch or an
interruption: a resumed run's curve is the uninterrupted run's.

When it is measured: every --validate-every steps, at each checkpoint and at the end. The lowest value
seen at a checkpoint is the run's best (kept in each checkpoint, so a resumed run knows it); --keep-best
writes that checkpoint's adapter as `<name>.best.safetensors` when it is found, before the checkpoint
itself, so a run killed in between re-measures and rewrites the same file when resumed.

Every process measures the whole set (the same number of forwards everywhere, so a DDP-wrapped model's
collectives stay matched); the images are few, so the cost is small (BENCHMARKS.md).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from difflora.data.batches import Draw, collate
from difflora.models.families.flow import flow_noisy, flow_target
from difflora.safe_io import write_atomic
from difflora.training.forward import latents_of, loss_mask, micro_seed, predict
from difflora.training.loss import add_noise, diffusion_loss, min_snr_weights, target_for
from difflora.training.run import Objective, Run
from difflora.training.validation_set import Validation, best_adapter_path

logger = logging.getLogger(__name__)

GRID_POINTS = 8  # noise levels per image: they cover the range, cheap enough for every checkpoint


def grid(objective: Objective, points: int = GRID_POINTS) -> torch.Tensor:
    """The fixed noise levels: σ in (0, 1) for flow matching, integer timesteps for DDPM."""
    centres = (torch.arange(points, dtype=torch.float64) + 0.5) / points
    if objective.flow is not None:
        return centres.float()
    return (centres * objective.alphas_cumprod.shape[0]).floor().long()


def measure(run: Run) -> float:
    """The validation loss of the weights as they are now: the mean over every image and noise level, so
    each image weighs the same."""
    validation = run.validation
    assert validation is not None
    with torch.no_grad(), _evaluating(run.trained_modules), run.accelerator.autocast():
        total, rows = 0.0, 0
        for indices in _by_size(validation).values():
            loss, count = _group_loss(run, indices)
            total, rows = total + loss, rows + count
    return total / rows


def _by_size(validation: Validation) -> dict[tuple[int, int], list[int]]:
    """The held-out images by bucket: one bucket's images share a forward."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, plan in enumerate(validation.dataset.plans):
        groups.setdefault((plan.bucket.width, plan.bucket.height), []).append(index)
    return groups


def _group_loss(run: Run, indices: list[int]) -> tuple[float, int]:
    """(the loss summed over rows, the number of rows) for images of one size, each at every level, the
    rows run `chunk` at a time. Each image's latent sample and noise come from its own generator."""
    validation, objective = run.validation, run.objective
    assert validation is not None
    levels = grid(objective)
    points = len(levels)
    items = [validation.dataset[Draw(index, False, 0)] for index in indices]
    batch = collate([item for item in items for _ in range(points)])
    noisy, target, weights = [], [], []
    for position, index in enumerate(indices):
        rows = _rows(batch, slice(position * points, (position + 1) * points))
        generator = torch.Generator().manual_seed(micro_seed(run.loop.seed, index, 0, "validation"))
        latents = objective.normalize(latents_of(rows, run, generator))
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents)
        for values, kept in zip(
            _noised(objective, latents, noise, levels), (noisy, target, weights), strict=True
        ):
            kept.append(values)
    noisy_all, target_all, weights_all = (torch.cat(values) for values in (noisy, target, weights))
    timesteps = levels.repeat(len(indices)).to(noisy_all.device)
    mask = loss_mask(batch, noisy_all, objective.unmasked_weight)
    total = 0.0
    for start in range(0, len(timesteps), validation.chunk):
        part = slice(start, start + validation.chunk)
        prediction = predict(run, _rows(batch, part), noisy_all[part], timesteps[part])
        loss = diffusion_loss(
            prediction, target_all[part], weights_all[part], None if mask is None else mask[part]
        )
        total += float(loss) * len(timesteps[part])
    return total, len(timesteps)


def _noised(
    objective: Objective, latents: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy, target, per-sample weights) at the grid's levels: the training objective's formulas."""
    if objective.flow is not None:
        sigmas = levels.to(latents.device).reshape(-1, *([1] * (latents.ndim - 1)))
        ones = torch.ones(latents.shape[0], device=latents.device)
        return flow_noisy(latents, noise, sigmas), flow_target(latents, noise), ones
    alphas, kind = objective.alphas_cumprod, objective.prediction_type
    weights = min_snr_weights(levels, alphas, gamma=objective.min_snr_gamma, prediction_type=kind)
    return (
        add_noise(latents, noise, levels, alphas),
        target_for(kind, latents, noise, levels, alphas),
        weights.to(latents.device),
    )


def _rows(batch: dict[str, Any], part: slice) -> dict[str, Any]:
    """Rows `part` of a collated batch (tensors, lists and the text embeddings' dict alike)."""
    rows: dict[str, Any] = {}
    for key, value in batch.items():
        rows[key] = {k: v[part] for k, v in value.items()} if isinstance(value, dict) else value[part]
    return rows


@contextmanager
def _evaluating(modules: list[torch.nn.Module]) -> Iterator[None]:
    """LoRA dropout off while measuring, each module's mode restored after."""
    modes = [module.training for module in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, mode in zip(modules, modes, strict=True):
            module.train(mode)


def keep_if_best(run: Run, step: int, adapter_bytes: bytes) -> None:
    """At a checkpoint: note whether it is the best, and with --keep-best write its adapter (main process)."""
    validation = run.validation
    if validation is not None and validation.offer(step) and validation.keep_best:
        write_atomic(best_adapter_path(run.paths.adapter), adapter_bytes)


def report_best(run: Run) -> None:
    """The run's last line about validation: which checkpoint had the lowest loss."""
    validation = run.validation
    if validation is None or validation.best is None:
        return
    step, loss = validation.best
    checkpoint = run.paths.checkpoints / f"step-{step:06d}"
    where = str(checkpoint) if checkpoint.is_dir() else "its checkpoint was removed by --keep-checkpoints"
    kept = f"; its adapter: {best_adapter_path(run.paths.adapter)}" if validation.keep_best else ""
    logger.info("validation: lowest loss %.6g at step %d (%s)%s", loss, step, where, kept)
