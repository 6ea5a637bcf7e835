"""`train(config) -> Path`: LoRA training with Accelerate: setup -> loop -> save.

Setup loads the model with LoRA layers (train_setup), scans and caches the data (train_data), plans the run
and prints the plan. The loop takes micro-batches from a stream whose position is a pure function of the
step, draws each micro-batch's noise and timesteps from a generator seeded with (seed, micro-batch,
process), and reseeds torch's global RNG the same way (LoRA dropout): a resumed run therefore continues
bit-for-bit, and the checkpoint's RNG states are restored on top as a belt-and-braces measure.

NaN guard: a step whose loss (or, outside fp16, gradient norm) is not finite on any process is skipped on
all of them (no update; the schedule still advances); after `max_bad_steps` consecutive bad steps the run
stops with TrainingDivergedError, and checkpoints already saved are never touched.

Under `accelerate launch` (or torchrun) every process runs this same code; logging, checkpoints, samples
and the adapter are written by the main process only.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from difflora.config import to_toml
from difflora.config.train import TrainConfig
from difflora.data.batches import derived_rng
from difflora.data.captions import CaptionAugmentation
from difflora.errors import ConfigError, TrainingDivergedError
from difflora.safe_io import write_atomic
from difflora.training.data import prepare_data, text_caching_decision, text_encode_fn
from difflora.training.log import TrainLog
from difflora.training.loss import diffusion_loss, noised_batch
from difflora.training.run import (
    Objective,
    Run,
    RunPaths,
    describe_plan,
    finish_run,
    render_samples,
    save_state,
)
from difflora.training.setup import (
    choose_threads,
    load_models,
    make_lr_scheduler,
    make_optimizer,
    native_resolution,
    release_vae_encoder,
)

logger = logging.getLogger(__name__)


def train(config: TrainConfig, *, progress: bool = True) -> Path:
    """Train a LoRA adapter as `config` says; returns the path of the finished adapter file."""
    run = setup(config, progress=progress)
    try:
        run_loop(run)
        return finish_run(run)
    finally:
        if run.log is not None:
            run.log.close()


# ------------------------------------------------------------------------------------------ setup


def setup(config: TrainConfig, *, progress: bool = True) -> Run:
    from accelerate import Accelerator

    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no on this machine.")
    _forget_previous_accelerator()
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation,
        cpu=not torch.cuda.is_available(),  # makes torchrun/accelerate launch on CPU use gloo (MULTI_CPU)
    )
    if not accelerator.is_main_process:  # one voice: the other processes only report problems
        logging.getLogger("difflora").setLevel(logging.WARNING)
    data_dir = Path(config.data_dir)
    name = config.name or data_dir.resolve().name
    paths = RunPaths.for_adapter(Path(config.output_dir), name, config.cache_dir)
    models = load_models(
        config.model,
        device=accelerator.device,
        mixed_precision=config.mixed_precision,
        rank=config.rank,
        alpha=config.effective_alpha,
        dropout=config.lora_dropout,
        unet_targets=config.effective_unet_targets,
        text_encoder_targets=config.text_encoder_targets,
        train_text_encoder=config.train_text_encoder,
        gradient_checkpointing=config.gradient_checkpointing,
        seed=config.seed,
    )
    resolution = config.resolution or native_resolution(models.pipe)
    _set_threads(config.num_threads, accelerator, models.pipe, config.batch_size, resolution)
    augmentation = CaptionAugmentation(
        dropout_rate=config.caption_dropout,
        shuffle_tags=config.shuffle_tags,
        keep_tokens=config.keep_tokens,
        tag_dropout_rate=config.tag_dropout,
    )
    cache_text, text_note = text_caching_decision(
        train_text_encoder=config.train_text_encoder, augmentation=augmentation
    )
    data = prepare_data(
        data_dir,
        pipe=models.pipe,
        resolution=resolution,
        trigger=config.trigger,
        caption_extension=config.caption_extension,
        augmentation=augmentation,
        flip=config.flip,
        random_crop=config.random_crop,
        no_upscale=config.no_upscale,
        cache_latents=config.cache_latents,
        cache_text=cache_text,
        cache_dir=paths.cache,
        batch_size=config.batch_size,
        accumulation=config.gradient_accumulation,
        max_steps=config.max_steps,
        epochs=config.epochs,
        seed=config.seed,
        world_size=accelerator.num_processes,
        rank=accelerator.process_index,
        main_first=accelerator.main_process_first(),
    )
    data.notes.append(text_note)
    if config.cache_latents:
        release_vae_encoder(models.pipe)
    return _assemble(config, accelerator, models, data, paths, resolution, progress)


def _forget_previous_accelerator() -> None:
    """Accelerate keeps its state in a process-wide singleton that refuses a second, different set-up
    (e.g. train() called again with another --mixed-precision from the same Python session). In a single
    process nothing else depends on it, so start afresh; under `accelerate launch` the state belongs to the
    launcher and stays."""
    from accelerate.state import AcceleratorState

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        AcceleratorState._reset_state(reset_partial_state=True)


def _set_threads(threads: int | None, accelerator, pipe, batch: int, resolution: int) -> None:
    if accelerator.device.type != "cpu":
        return
    if threads is not None:
        torch.set_num_threads(threads)
        return
    share = max(1, (os.cpu_count() or 1) // accelerator.num_processes)
    if share == 1:
        torch.set_num_threads(1)
        return
    best, timings = choose_threads(pipe, candidates=(share, 1), batch=batch, resolution=resolution)
    measured = ", ".join(f"{n}: {t * 1000:.0f} ms" for n, t in timings.items())
    logger.info("torch threads: %d (UNet forward with %s; set --num-threads to choose)", best, measured)


def _assemble(config, accelerator, models, data, paths, resolution, progress) -> Run:
    total = data.plan.max_steps
    groups = [
        {
            "params": [p for k, p in models.trainable.items() if k.startswith("unet.")],
            "lr": config.effective_learning_rate(models.identity.family),
        }
    ]
    if config.train_text_encoder:
        te_params = [p for k, p in models.trainable.items() if k.startswith("text_encoder.")]
        groups.append({"params": te_params, "lr": config.effective_text_encoder_lr(models.identity.family)})
    optimizer, optimizer_name = make_optimizer(
        groups,
        kind=config.optimizer,
        weight_decay=config.weight_decay,
        cuda=accelerator.device.type == "cuda",
    )
    warmup = config.lr_warmup_steps if config.lr_warmup_steps is not None else round(0.05 * total)
    scheduler = make_lr_scheduler(optimizer, kind=config.lr_scheduler, warmup=warmup, total=total)
    modules = [models.pipe.unet] + ([models.pipe.text_encoder] if config.train_text_encoder else [])
    prepared = accelerator.prepare(*modules, optimizer)
    save_every = config.save_every if config.save_every is not None else max(1, math.ceil(total / 4))
    run = Run(
        config=config,
        accelerator=accelerator,
        models=models,
        data=data,
        paths=paths,
        optimizer=prepared[-1],
        scheduler=scheduler,
        unet=prepared[0],
        text_encoder=prepared[1] if config.train_text_encoder else models.pipe.text_encoder,
        objective=Objective.for_pipe(models.pipe, config.noise_offset, config.min_snr_gamma),
        resolution=resolution,
        total_steps=total,
        warmup=warmup,
        save_every=save_every,
        sample_every=config.sample_every if config.sample_every is not None else save_every,
        sample_prompts=list(config.sample_prompts) or _default_prompts(data),
        optimizer_name=optimizer_name,
        learning_rate=groups[0]["initial_lr"],  # "lr" already holds the warm-up's first value
        text_encoder_lr=groups[1]["initial_lr"] if config.train_text_encoder else 0.0,
    )
    run.start_step = run.restore_or_start()
    if accelerator.is_main_process:
        plan_text = describe_plan(run)
        logger.info("%s", plan_text)
        write_atomic(paths.run_dir / "plan.txt", (plan_text + "\n").encode())
        write_atomic(paths.run_dir / "config.toml", to_toml(config, section="train").encode())
        run.log = TrainLog(paths.run_dir, total_steps=total, start_step=run.start_step, progress=progress)
    return run


def _default_prompts(data) -> list[str]:
    from difflora.training.samples import default_prompts

    return default_prompts([e.caption for e in data.scan.examples])


# ------------------------------------------------------------------------------------------ the loop


def step_loss(batch: dict[str, Any], run: Run, generator: torch.Generator) -> torch.Tensor:
    """The diffusion loss of one micro-batch (the test suite patches this to inject a NaN)."""
    pipe, objective, device = run.models.pipe, run.objective, run.accelerator.device
    if "latent_mean" in batch:  # cached posterior: sample it like latent_dist.sample() would
        mean, std = batch["latent_mean"], batch["latent_std"]
        latents = mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        latents = latents.to(device)
    else:
        with torch.no_grad():
            pixels = batch["pixels"].to(device, pipe.vae.dtype)
            latents = pipe.vae.encode(pixels).latent_dist.sample(generator=generator).float()
    latents = latents * objective.scaling_factor
    if "text" in batch:
        hidden = batch["text"]["hidden"].to(device)
    elif run.models.train_text_encoder:
        hidden = text_encode_fn(pipe.tokenizer, run.text_encoder)(batch["caption"])["hidden"]
    else:
        with torch.no_grad():
            hidden = text_encode_fn(pipe.tokenizer, pipe.text_encoder)(batch["caption"])["hidden"]
    noised = noised_batch(
        latents,
        generator,
        alphas_cumprod=objective.alphas_cumprod,
        prediction_type=objective.prediction_type,
        noise_offset=objective.noise_offset,
        min_snr_gamma=objective.min_snr_gamma,
    )
    dtype = run.models.weight_dtype
    prediction = run.unet(noised.noisy.to(dtype), noised.timesteps, hidden.to(dtype)).sample
    return diffusion_loss(prediction, noised.target, noised.weights)


def micro_seed(seed: int, micro_batch: int, process: int, stream: str) -> int:
    return derived_rng(stream, seed, micro_batch, process).getrandbits(63)


def run_loop(run: Run) -> None:
    accelerator, config = run.accelerator, run.config
    accumulation = config.gradient_accumulation
    stream = run.data.stream(run.start_step * accumulation)
    step, bad_streak, epoch = run.start_step, 0, 0
    while step < run.total_steps:
        began = time.perf_counter()
        losses, bad = [], False
        for micro in range(accumulation):
            epoch, batch = next(stream)
            index = step * accumulation + micro
            rank = accelerator.process_index
            torch.manual_seed(micro_seed(config.seed, index, rank, "global"))  # LoRA dropout
            generator = torch.Generator().manual_seed(micro_seed(config.seed, index, rank, "noise"))
            with accelerator.accumulate(*run.trained_modules), accelerator.autocast():
                loss = step_loss(batch, run, generator)
                mean_loss, any_bad = _reduce(accelerator, loss)
                bad = bad or any_bad
                if not bad:
                    accelerator.backward(loss)
            losses.append(mean_loss)
        bad = _update(run, bad)
        run.scheduler.step()
        step += 1
        bad_streak = bad_streak + 1 if bad else 0
        shown = sum(losses) / len(losses) if not bad else float("nan")
        if run.log is not None:
            lr = run.scheduler.get_last_lr()[0]
            run.log.step(step, epoch, shown, lr, skipped=bad, seconds=time.perf_counter() - began)
        if bad_streak >= config.max_bad_steps:
            _diverged(run, step, bad_streak)
        # No checkpoint while steps are being skipped: the newest checkpoint is always a healthy one.
        if step < run.total_steps and run.save_every and step % run.save_every == 0 and not bad_streak:
            save_state(run, step, epoch)
        elif step < run.total_steps and accelerator.is_main_process:
            render_samples(run, step)  # samples due between checkpoints (None when not due)
    run.final_epoch = epoch


def _reduce(accelerator, loss: torch.Tensor) -> tuple[float, bool]:
    """Mean loss over processes and whether any process saw a non-finite one (one all-reduce)."""
    value = loss.detach().float().reshape(1)
    flags = torch.cat(
        [torch.nan_to_num(value, nan=0.0, posinf=0.0, neginf=0.0), (~torch.isfinite(value)).float()]
    )
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags.to(accelerator.device), reduction="sum").cpu()
    bad = bool(flags[1] > 0)
    return (float("nan") if bad else float(flags[0]) / accelerator.num_processes), bad


def _update(run: Run, bad: bool) -> bool:
    """Clip and step, unless the step is bad; returns whether it was (a non-finite gradient norm also is,
    except under fp16 where the gradient scaler skips such steps itself)."""
    accelerator, config = run.accelerator, run.config
    if not bad and config.max_grad_norm > 0:
        norm = accelerator.clip_grad_norm_(run.models.trainable.values(), config.max_grad_norm)
        if config.mixed_precision != "fp16" and not torch.isfinite(torch.as_tensor(norm)).item():
            bad = True
    if not bad:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return bad


def _diverged(run: Run, step: int, streak: int) -> None:
    config = run.config
    if run.log is not None:
        run.log.write_curve()
    last = run.last_checkpoint()
    kept = (
        f"The last good checkpoint, {last.path} (step {last.step}), is intact: continue from it with --resume "
        "after changing the settings below."
        if last
        else "No checkpoint had been saved yet; nothing was written."
    )
    hints = [f"lower the learning rate (--learning-rate {run.learning_rate:g} -> {run.learning_rate / 10:g})"]
    if config.mixed_precision == "fp16":
        hints.insert(0, "fp16 overflowed: use --mixed-precision bf16 (or no)")
    if config.noise_offset > 0.2:
        hints.append(f"reduce --noise-offset ({config.noise_offset:g})")
    if config.max_grad_norm == 0:
        hints.append("turn gradient clipping back on (--max-grad-norm 1)")
    hints.append(
        f"check the images with `difflora check {config.data_dir}` (a broken image gives NaN latents)"
    )
    raise TrainingDivergedError(
        f"Training stopped at step {step}: the loss was not finite for {streak} consecutive steps "
        f"(--max-bad-steps {config.max_bad_steps}); those steps were skipped, the weights never took them.\n"
        f"{kept}\nLikely causes, and what to try:\n  - " + "\n  - ".join(hints)
    )
