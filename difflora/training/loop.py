"""The training loop: micro-batches -> loss -> backward -> clipped optimizer step, with the NaN guard.

Micro-batches come from a stream whose position is a pure function of the step; each micro-batch's noise
and timesteps come from a generator seeded with (seed, micro-batch, process), and torch's global RNG
(LoRA dropout) is reseeded the same way, so a resumed run continues bit for bit.

NaN guard: a step whose loss (or, outside fp16, gradient norm) is not finite on any process is skipped on
all of them (no update; the schedule still advances); after `max_bad_steps` consecutive bad steps the run
stops with TrainingDivergedError, and checkpoints already saved are never touched.

With --adaptive-rank the backward pass also takes AdaLoRA's orthogonality penalty (the loss logged stays the
diffusion loss, comparable with plain LoRA runs) and every good optimizer step is followed by the rank
allocation (`run.ranks`, difflora.adapter.adaptive).

The loop reads `run.loop` (plain values), never the configuration.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch

from difflora.errors import TrainingDivergedError
from difflora.faults import fault_point
from difflora.training.forward import latents_of, loss_mask, micro_seed, predict
from difflora.training.loss import diffusion_loss, noised_batch
from difflora.training.optimizers import evaluation_weights, step_size_estimate
from difflora.training.outputs import render_samples, save_state
from difflora.training.prior import drift, prior_loss
from difflora.training.run import Run
from difflora.training.validation import measure
from difflora.training.validation_set import measurement_due

Stream = Iterator[tuple[int, dict[str, Any]]]


def step_loss(batch: dict[str, Any], run: Run, generator: torch.Generator) -> torch.Tensor:
    """The diffusion loss of one micro-batch (the test suite patches this to inject a NaN)."""
    objective = run.objective
    latents = objective.normalize(latents_of(batch, run, generator))
    if objective.flow is not None:  # rectified flow: σ, x_σ and the velocity target
        noised = objective.flow.noised(latents, generator)
    else:
        noised = noised_batch(
            latents,
            generator,
            alphas_cumprod=objective.alphas_cumprod,
            prediction_type=objective.prediction_type,
            noise_offset=objective.noise_offset,
            min_snr_gamma=objective.min_snr_gamma,
        )
    prediction = predict(run, batch, noised.noisy, noised.timesteps)
    mask = loss_mask(batch, latents, objective.unmasked_weight)
    weights = noised.weights
    if "loss_weight" in batch:  # --reg-dir: a class image's loss weighs --prior-weight, kohya's way
        weights = weights * batch["loss_weight"].to(weights)
    loss = diffusion_loss(prediction, noised.target, weights, mask)
    if run.prior is not None and run.prior.weight:
        loss = loss + run.prior.weight * prior_loss(run, batch, noised.noisy, noised.timesteps)
    return loss


def run_loop(run: Run) -> None:
    settings = run.loop
    stream = run.data.stream(run.start_step * settings.accumulation)
    step, bad_streak, epoch = run.start_step, 0, 0
    while step < settings.total_steps:
        began = time.perf_counter()
        with run.times.phase("steps"):
            epoch, losses, bad = _accumulate(run, stream, step)
            bad = _update(run, bad, step + 1)
            run.scheduler.step()
        step += 1
        bad_streak = bad_streak + 1 if bad else 0
        validation = _validate(run, step)
        if run.log is not None:
            shown = sum(losses) / len(losses) if not bad else float("nan")
            lr = run.scheduler.get_last_lr()[0]
            seconds = time.perf_counter() - began
            run.log.step(step, epoch, shown, lr, skipped=bad, seconds=seconds, validation=validation)
        if bad_streak >= settings.max_bad_steps:
            _diverged(run, step, bad_streak)
        _save_or_sample(run, step, epoch, healthy=not bad_streak)
    run.final_epoch = epoch


def _validate(run: Run, step: int) -> dict[str, float]:
    """What is measured when due at `step` (timed as its own phase): the validation loss, the --ema
    average's, and the drift of trigger-free prompts."""
    settings, validation = run.loop, run.validation
    every = validation.every if validation is not None else 0
    due = measurement_due(step, total=settings.total_steps, every=every, save_every=settings.save_every)
    if not due or (validation is None and run.prior is None):
        return {}
    values: dict[str, float] = {}
    with run.times.phase("validation"), evaluation_weights(run.optimizer):
        if validation is not None:
            values["validation_loss"] = validation.measured[step] = measure(run)
            if run.ema is not None:
                with run.ema.applied(run.models.trainable):
                    values["ema_validation_loss"] = measure(run)
        if run.prior is not None:
            values["drift"] = drift(run)
    return values


def _accumulate(run: Run, stream: Stream, step: int) -> tuple[int, list[float], bool]:
    """Forward and backward over one step's micro-batches: (epoch, mean losses, whether any was bad)."""
    accelerator, settings = run.accelerator, run.loop
    losses, bad, epoch = [], False, 0
    for micro in range(settings.accumulation):
        epoch, batch = next(stream)
        index = step * settings.accumulation + micro
        rank = accelerator.process_index
        torch.manual_seed(micro_seed(settings.seed, index, rank, "global"))  # LoRA dropout
        generator = torch.Generator().manual_seed(micro_seed(settings.seed, index, rank, "noise"))
        with accelerator.accumulate(*run.trained_modules), accelerator.autocast():
            loss = step_loss(batch, run, generator)
            mean_loss, any_bad = _reduce(accelerator, loss)
            bad = bad or any_bad
            if not bad:
                accelerator.backward(loss if run.ranks is None else loss + run.ranks.penalty())
            if run.models.block_swap is not None:  # drop the blocks the backward left resident
                run.models.block_swap.finish()
        fault_point("step")  # mid-step: gradients computed, the optimizer not yet stepped
        losses.append(mean_loss)
    return epoch, losses, bad


def _save_or_sample(run: Run, step: int, epoch: int, *, healthy: bool) -> None:
    """A checkpoint when one is due (the final one is finish_run's), else samples when they are due.
    No checkpoint while steps are being skipped: the newest checkpoint is always a healthy one."""
    settings = run.loop
    if step >= settings.total_steps:
        return
    if settings.save_every and step % settings.save_every == 0 and healthy:
        save_state(run, step, epoch)
    elif run.accelerator.is_main_process:
        render_samples(run, step)  # nothing when no samples are due at this step


def _reduce(accelerator: Any, loss: torch.Tensor) -> tuple[float, bool]:
    """Mean loss over processes and whether any process saw a non-finite one (one all-reduce)."""
    value = loss.detach().float().reshape(1)
    flags = torch.cat(
        [torch.nan_to_num(value, nan=0.0, posinf=0.0, neginf=0.0), (~torch.isfinite(value)).float()]
    )
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags.to(accelerator.device), reduction="sum").cpu()
    bad = bool(flags[1] > 0)
    return (float("nan") if bad else float(flags[0]) / accelerator.num_processes), bad


def _update(run: Run, bad: bool, step: int) -> bool:
    """Clip and step, unless the step is bad; returns whether it was (a non-finite gradient norm also is,
    except under fp16 where the gradient scaler skips such steps itself). The gradient monitor sees the
    accumulated gradients before clipping."""
    settings = run.loop
    if not bad and run.gradients is not None:
        totals = run.gradients.record(step)
        if totals is not None and run.log is not None:
            run.log.scalars({"grad_norm/lora_A": totals[0], "grad_norm/lora_B": totals[1]}, step)
    if not bad and settings.max_grad_norm > 0:
        norm = run.accelerator.clip_grad_norm_(run.models.trainable.values(), settings.max_grad_norm)
        if not settings.fp16 and not torch.isfinite(torch.as_tensor(norm)).item():
            bad = True
    if not bad:
        run.optimizer.step()
        if run.ema is not None:
            run.ema.update(run.models.trainable)
        estimate = step_size_estimate(run.optimizer)
        if estimate is not None and run.log is not None:
            run.log.scalars({"optimizer/d": estimate}, step)
        if run.ranks is not None:  # AdaLoRA scores the gradients and prunes ranks before they are cleared
            run.ranks.update(step)
    run.optimizer.zero_grad(set_to_none=True)
    return bad


def _diverged(run: Run, step: int, streak: int) -> None:
    if run.log is not None:
        run.log.finish_curve()
    last = run.last_checkpoint()
    kept = (
        f"The last good checkpoint, {last.path} (step {last.step}), is intact: continue from it with --resume "
        "after changing the settings below."
        if last
        else "No checkpoint had been saved yet; nothing was written."
    )
    raise TrainingDivergedError(
        f"Training stopped at step {step}: the loss was not finite for {streak} consecutive steps "
        f"(--max-bad-steps {run.loop.max_bad_steps}); those steps were skipped, the weights never took them.\n"
        f"{kept}\nLikely causes, and what to try:\n  - " + "\n  - ".join(run.record.divergence_hints)
    )
