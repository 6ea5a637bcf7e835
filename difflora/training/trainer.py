"""`train(config) -> Path`: LoRA training with Accelerate: setup -> loop -> outputs.

Setup (this module) turns the configuration into plain values once: it loads the model with LoRA layers
(`setup.py`), plans and caches the data set (`data.py`, `plan.py`), builds the optimizer and schedule,
restores a checkpoint when resuming, and prints the plan. The loop (`loop.py`) and what it writes
(`outputs.py`) then read only those values, never the configuration.

Under `accelerate launch` (or torchrun) every process runs this same code; logging, checkpoints, samples
and the adapter are written by the main process only.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from difflora.adapter.adaptive import RankAllocation, RankSchedule
from difflora.config import to_toml
from difflora.config.train import TrainConfig
from difflora.data.cache import text_cache_allowed
from difflora.data.captions import CaptionAugmentation
from difflora.errors import ConfigError
from difflora.models.dit_files import ComponentFiles
from difflora.models.geometry import pipeline_geometry
from difflora.models.process_memory import return_freed_memory
from difflora.safe_io import write_atomic
from difflora.training.data import TrainingData, prepare_data
from difflora.training.gradients import GradientMonitor
from difflora.training.lock import run_paths, training_locks
from difflora.training.log import TrainLog
from difflora.training.loop import run_loop
from difflora.training.objective import objective_for
from difflora.training.optimizers import owns_schedule
from difflora.training.outputs import finish_run
from difflora.training.plan import DataSettings, Tokens
from difflora.training.plan_text import describe_plan
from difflora.training.record import run_record
from difflora.training.run import (
    LoopSettings,
    Run,
    RunPaths,
    SampleSettings,
    restore_or_start,
)
from difflora.training.run_options import prior_for, validation_for, weight_average_for
from difflora.training.samples import default_prompts, release_text_encoders
from difflora.training.setup import (
    Models,
    denoiser_probe,
    load_models,
    make_lr_scheduler,
    make_optimizer,
    release_vae_encoder,
    unload_lora,
)
from difflora.training.text import pipeline_text_encoders
from difflora.training.threads import MEMORY_FILE, set_threads
from difflora.training.timing import PhaseTimes

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger(__name__)


def train(config: TrainConfig, *, progress: bool = True) -> Path:
    """Train a LoRA adapter as `config` says; returns the path of the finished adapter file."""
    return train_many([config], progress=progress)[0]


def train_many(configs: Sequence[TrainConfig], *, progress: bool = True) -> list[Path]:
    """One adapter per config, in order, in this process. Runs on the same base (model, precision,
    prediction type) share it: loaded once, its LoRA layers removed between runs, its VAE encoder kept
    until the last of them has cached its latents; runs writing to one output folder share its latent
    cache. Each adapter is the one a separate `train` run of its config makes. The bases' memory goes back
    to the OS before it returns, for whatever the process does next (generate, another base)."""
    try:
        return _train_each(configs, progress=progress)
    finally:
        return_freed_memory()


def _train_each(configs: Sequence[TrainConfig], *, progress: bool) -> list[Path]:
    bases: dict[tuple[Any, ...], Any] = {}
    written = []
    for index, config in enumerate(configs):
        key = _base_key(config)
        # an fp8 base is not shared: LoRA layers go in before its weights are stored as float8
        reuse = config.quantize_base != "fp8" and any(
            _base_key(later) == key for later in configs[index + 1 :]
        )
        with training_locks(run_paths(config)):  # one run per output name and cache folder at a time
            run = setup(config, progress=progress, pipe=bases.pop(key, None), keep_base=reuse)
            try:
                run_loop(run)
                written.append(finish_run(run))
            finally:
                if run.log is not None:
                    run.log.close()
        if reuse:
            unload_lora(run.models)
            bases[key] = run.models.pipe
    return written


def _base_key(config: TrainConfig) -> tuple[Any, ...]:
    return (
        config.model,
        config.mixed_precision,
        config.prediction_type,
        config.quantize_base,
        config.clip_l,
        config.t5,
        config.vae,
        config.clip_g,
        config.text_encoder,
    )


# ------------------------------------------------------------------------------------------ setup


def setup(config: TrainConfig, *, progress: bool = True, pipe: Any = None, keep_base: bool = False) -> Run:
    """Everything a run needs, as plain values. `pipe`: the base, already loaded by an earlier run of
    `train_many`; `keep_base`: a later run will reuse it (so its VAE encoder is not freed)."""
    times = PhaseTimes()
    accelerator = _accelerator(config)
    times.memory.device = accelerator.device  # on CUDA, the allocator's peak is read too
    paths = run_paths(config)
    with times.phase("load"):
        models = _load(config, accelerator, pipe)
    geometry = pipeline_geometry(models.pipe)
    resolution = config.resolution or geometry.resolution
    with times.phase("threads"):
        threads_note, threads_chosen = set_threads(
            config.num_threads,
            accelerator,
            partial(denoiser_probe, models.pipe, batch=config.batch_size, resolution=resolution),
            memory=paths.cache / MEMORY_FILE,
            workload=f"{models.identity.architecture}, batch {config.batch_size}, {resolution} px",
        )
    settings = DataSettings.from_config(
        config, resolution=resolution, bucket_step=geometry.step, world_size=accelerator.num_processes
    )
    with times.phase("caching"):
        data = _prepare_data(config, accelerator, models, settings, Tokens.of(geometry), paths.cache)
    if config.cache_latents and not keep_base:
        release_vae_encoder(models.pipe)
    run = _assemble(config, accelerator, models, data, paths, resolution)
    run.prior = prior_for(config, data, models.pipe, paths.cache)
    if data.dataset.texts is not None and not keep_base and not models.train_text_encoder:
        prompts = run.samples.prompts if run.loop.sample_every else ()
        embeddings = release_text_encoders(models.pipe, prompts)
        run.text_encoders, run.samples = {}, dataclasses.replace(run.samples, embeddings=embeddings)
    run.times = times
    run.quiet_advice = config.quiet_advice
    if threads_note:
        data.notes.append(threads_note)
    run.start_step = restore_or_start(run, resume=config.resume, keep_thread_count=not threads_chosen)
    if accelerator.is_main_process:
        plan_text = describe_plan(config, run)
        logger.info("%s", plan_text)
        write_atomic(paths.run_dir / "plan.txt", (plan_text + "\n").encode())
        write_atomic(paths.run_dir / "config.toml", to_toml(config, section="train").encode())
        total = run.loop.total_steps
        run.log = TrainLog(paths.run_dir, total_steps=total, start_step=run.start_step, progress=progress)
        if config.grad_log_every:
            run.gradients = GradientMonitor(
                models.trainable, paths.run_dir, every=config.grad_log_every, start_step=run.start_step
            )
    return run


def _load(config: TrainConfig, accelerator: Accelerator, pipe: Any) -> Models:
    """The base with LoRA layers injected as `config` says (`pipe`: a base already loaded, or None)."""
    return load_models(
        config.model,
        device=accelerator.device,
        mixed_precision=config.mixed_precision,
        lora=config.lora_spec,
        train_text_encoder=config.train_text_encoder,
        gradient_checkpointing=config.gradient_checkpointing,
        seed=config.seed,
        prediction_type=config.prediction_type,
        quantization=config.quantize_base,
        pipe=pipe,
        files=ComponentFiles(config.clip_l, config.t5, config.vae, config.clip_g, config.text_encoder),
        blocks_to_swap=config.blocks_to_swap,
    )


def _accelerator(config: TrainConfig) -> Accelerator:
    from accelerate import Accelerator

    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no on this machine.")
    if config.blocks_to_swap and not torch.cuda.is_available():
        raise ConfigError(
            "--blocks-to-swap needs a CUDA GPU (it moves blocks into GPU memory); leave it out here."
        )
    _forget_previous_accelerator()
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation,
        dynamo_backend="inductor" if config.compile else None,  # prepare() compiles the trained models
        cpu=not torch.cuda.is_available(),  # makes torchrun/accelerate launch on CPU use gloo (MULTI_CPU)
    )
    if not accelerator.is_main_process:  # one voice: the other processes only report problems
        logging.getLogger("difflora").setLevel(logging.WARNING)
    return accelerator


def _forget_previous_accelerator() -> None:
    """Accelerate keeps its state in a process-wide singleton that refuses a second, different set-up
    (e.g. train() called again with another --mixed-precision from the same Python session). In a single
    process nothing else depends on it, so start afresh; under `accelerate launch` the state belongs to the
    launcher and stays. Accelerate has no public API for this: `_reset_state` is what its own test suite
    calls between set-ups (accelerate/test_utils), so it is the supported way in practice."""
    from accelerate.state import AcceleratorState

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        AcceleratorState._reset_state(reset_partial_state=True)


def _prepare_data(
    config: TrainConfig,
    accelerator: Accelerator,
    models: Models,
    settings: DataSettings,
    tokens: Tokens,
    cache_dir: Path,
) -> TrainingData:
    augmentation = CaptionAugmentation(
        dropout_rate=config.caption_dropout,
        shuffle_tags=config.shuffle_tags,
        keep_tokens=config.keep_tokens,
        tag_dropout_rate=config.tag_dropout,
    )
    cache_text, text_note = text_cache_allowed(
        train_text_encoder=config.train_text_encoder, augmentation=augmentation
    )
    data = prepare_data(
        settings,
        tokens,
        pipe=models.pipe,
        augmentation=augmentation,
        cache_latents=config.cache_latents,
        cache_text=cache_text,
        cache_dir=cache_dir,
        rank=accelerator.process_index,
        main_first=accelerator.main_process_first(),
    )
    data.notes.append(text_note)
    return data


def _assemble(
    config: TrainConfig,
    accelerator: Accelerator,
    models: Models,
    data: TrainingData,
    paths: RunPaths,
    resolution: int,
) -> Run:
    """The optimizer, schedule and settings of the run, prepared for Accelerate."""
    total = data.plan.max_steps
    groups = _parameter_groups(config, models)
    warmup = config.lr_warmup_steps if config.lr_warmup_steps is not None else round(0.05 * total)
    optimizer, optimizer_name = make_optimizer(
        groups,
        kind=config.optimizer,
        weight_decay=config.weight_decay,
        cuda=accelerator.device.type == "cuda",
        warmup=warmup,
    )
    # a schedule-free optimizer warms up and schedules itself: the run's schedule is then constant
    kind, schedule_warmup = (
        ("constant", 0) if owns_schedule(config.optimizer) else (config.lr_scheduler, warmup)
    )
    scheduler = make_lr_scheduler(optimizer, kind=kind, warmup=schedule_warmup, total=total)
    components = models.trained_components
    # a swapped denoiser is placed already: Accelerate's placement would move its CPU-held blocks to the GPU
    placement = [not (name == models.denoiser and models.block_swap) for name in components]
    *modules, optimizer_prepared = accelerator.prepare(
        *components.values(), optimizer, device_placement=[*placement, True]
    )
    prepared = dict(zip(components, modules, strict=True))
    tokenizers, encoders = pipeline_text_encoders(models.pipe)
    return Run(
        accelerator=accelerator,
        models=models,
        data=data,
        paths=paths,
        optimizer=optimizer_prepared,
        scheduler=scheduler,
        unet=prepared[models.denoiser],
        text_encoders={name: prepared.get(name, encoder) for name, encoder in encoders.items()},
        tokenizers=tokenizers,
        objective=objective_for(config, models),
        loop=_loop_settings(config, total),
        samples=_sample_settings(config, data, resolution),
        record=run_record(
            config,
            processes=accelerator.num_processes,
            resolution=resolution,
            optimizer_name=optimizer_name,
            warmup=warmup,
            groups=groups,
        ),
        ranks=_rank_allocation(config, models, total),
        validation=validation_for(config, data),
        ema=weight_average_for(config, models.trainable, accelerator.device),
    )


def _rank_allocation(config: TrainConfig, models: Models, total: int) -> RankAllocation | None:
    """--adaptive-rank's allocation, on a schedule fitted to the run's length."""
    if not models.tuners:
        return None
    schedule = RankSchedule.for_run(
        total,
        init_rank=config.effective_adaptive_init_rank,
        target_rank=config.rank,
        fractions=config.adaptive_fractions,
        orth_reg=config.effective_adaptive_orth_reg,
    )
    return RankAllocation(models.tuners, schedule)


def _parameter_groups(config: TrainConfig, models: Models) -> list[dict[str, Any]]:
    """One optimizer group per trained component at its own learning rate (UNet first); with LoRA+ each
    component's B matrices get a group of their own at ratio x the rate. Our own split rather than peft's
    create_loraplus_optimizer, which builds the optimizer itself: difflora chooses the optimizer
    (fused AdamW, 8-bit) and gives every component its rate."""
    family = models.identity.model_family
    trainable = models.trainable
    rates = {models.denoiser: config.effective_learning_rate(family)}
    rates.update(
        {name: config.effective_text_encoder_lr(family, name) for name in models.text_encoder_modules}
    )
    groups = []
    for component, lr in rates.items():
        params = {k: p for k, p in trainable.items() if k.startswith(component + ".")}
        plain = [p for k, p in params.items() if config.loraplus_ratio == 1 or ".lora_B." not in k]
        groups.append({"params": plain, "lr": lr, "name": component})
        if config.loraplus_ratio != 1:
            b = [p for k, p in params.items() if ".lora_B." in k]
            groups.append({"params": b, "lr": lr * config.loraplus_ratio, "name": f"{component}_lora_B"})
    return groups


def _loop_settings(config: TrainConfig, total: int) -> LoopSettings:
    save_every = config.save_every if config.save_every is not None else max(1, math.ceil(total / 4))
    return LoopSettings(
        total_steps=total,
        accumulation=config.gradient_accumulation,
        seed=config.seed,
        max_grad_norm=config.max_grad_norm,
        max_bad_steps=config.max_bad_steps,
        fp16=config.mixed_precision == "fp16",
        save_every=save_every,
        sample_every=config.sample_every if config.sample_every is not None else max(1, math.ceil(total / 2)),
        keep_checkpoints=config.keep_checkpoints,
        grad_log_every=config.grad_log_every,
    )


def _sample_settings(config: TrainConfig, data: TrainingData, resolution: int) -> SampleSettings:
    prompts = config.sample_prompts or default_prompts([e.caption for e in data.scan.examples])
    return SampleSettings(
        prompts=tuple(prompts),
        seeds=config.sample_seeds,
        steps=config.sample_steps,
        guidance=config.sample_guidance,
        scheduler=config.sample_scheduler,
        resolution=resolution,
        zero_terminal_snr=config.zero_terminal_snr,
    )
