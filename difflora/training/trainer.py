"""`train(config) -> Path`: LoRA training with Accelerate: setup -> loop -> outputs.

Setup (this module) turns the configuration into plain values once: it loads the model with LoRA layers
(`setup.py`), plans and caches the data set (`data.py`, `plan.py`), builds the optimizer and schedule,
restores a checkpoint when resuming, and prints the plan. The loop (`loop.py`) and what it writes
(`outputs.py`) then read only those values, never the configuration.

Under `accelerate launch` (or torchrun) every process runs this same code; logging, checkpoints, samples
and the adapter are written by the main process only.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from difflora.adapter.inject import format_parameter_report, parameter_report
from difflora.config import config_to_dict, to_toml
from difflora.config.train import TrainConfig
from difflora.data.cache import text_cache_allowed
from difflora.data.captions import CaptionAugmentation
from difflora.errors import ConfigError
from difflora.models.architecture import pipeline_architecture
from difflora.models.geometry import pipeline_geometry
from difflora.safe_io import write_atomic
from difflora.training.data import TrainingData, prepare_data
from difflora.training.gradients import GradientMonitor
from difflora.training.log import TrainLog
from difflora.training.loop import run_loop
from difflora.training.outputs import finish_run
from difflora.training.plan import DataSettings, Tokens
from difflora.training.run import (
    LoopSettings,
    Objective,
    Run,
    RunPaths,
    RunRecord,
    SampleSettings,
    restore_or_start,
)
from difflora.training.samples import default_prompts
from difflora.training.setup import (
    Models,
    load_models,
    make_lr_scheduler,
    make_optimizer,
    release_vae_encoder,
    set_threads,
)
from difflora.training.text import pipeline_text_encoders

if TYPE_CHECKING:
    from accelerate import Accelerator

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
    accelerator = _accelerator(config)
    paths = RunPaths.for_adapter(
        Path(config.output_dir), config.name or Path(config.data_dir).resolve().name, config.cache_dir
    )
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
        prediction_type=config.prediction_type,
        rslora=config.rslora,
        conv_rank=config.conv_rank,
        conv_alpha=config.conv_alpha,
    )
    geometry = pipeline_geometry(models.pipe)
    resolution = config.resolution or geometry.resolution
    threads_note, threads_chosen = set_threads(
        config.num_threads, accelerator, models.pipe, config.batch_size, resolution
    )
    settings = DataSettings.from_config(
        config, resolution=resolution, bucket_step=geometry.step, world_size=accelerator.num_processes
    )
    data = _prepare_data(config, accelerator, models, settings, Tokens.of(geometry), paths.cache)
    run = _assemble(config, accelerator, models, data, paths, resolution)
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


def _accelerator(config: TrainConfig) -> Accelerator:
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
    if config.cache_latents:
        release_vae_encoder(models.pipe)
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
    optimizer, optimizer_name = make_optimizer(
        groups,
        kind=config.optimizer,
        weight_decay=config.weight_decay,
        cuda=accelerator.device.type == "cuda",
    )
    warmup = config.lr_warmup_steps if config.lr_warmup_steps is not None else round(0.05 * total)
    scheduler = make_lr_scheduler(optimizer, kind=config.lr_scheduler, warmup=warmup, total=total)
    components = models.trained_components
    *modules, optimizer_prepared = accelerator.prepare(*components.values(), optimizer)
    prepared = dict(zip(components, modules, strict=True))
    tokenizers, encoders = pipeline_text_encoders(models.pipe)
    learning_rate = groups[0]["initial_lr"]  # "lr" already holds the warm-up's first value
    facts = _static_facts(config, accelerator, resolution, optimizer_name, warmup, groups)
    return Run(
        accelerator=accelerator,
        models=models,
        data=data,
        paths=paths,
        optimizer=optimizer_prepared,
        scheduler=scheduler,
        unet=prepared["unet"],
        text_encoders={name: prepared.get(name, encoder) for name, encoder in encoders.items()},
        tokenizers=tokenizers,
        objective=_objective(config, models),
        loop=_loop_settings(config, total),
        samples=_sample_settings(config, data, resolution),
        record=RunRecord(
            config=config_to_dict(config),
            config_toml=to_toml(config),
            trigger_words=(config.trigger,) if config.trigger else (),
            facts=facts,
            divergence_hints=divergence_hints(config, learning_rate),
        ),
    )


def _parameter_groups(config: TrainConfig, models: Models) -> list[dict[str, Any]]:
    """One optimizer group per trained component at its own learning rate (UNet first); with LoRA+ each
    component's B matrices get a group of their own at ratio x the rate. Our own split rather than peft's
    create_loraplus_optimizer, which builds the optimizer itself: difflora chooses the optimizer
    (fused AdamW, 8-bit) and gives every component its rate."""
    family = models.identity.family
    trainable = models.trainable
    rates = {"unet": config.effective_learning_rate(family)}
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


def _objective(config: TrainConfig, models: Models) -> Objective:
    objective = Objective.for_pipe(
        models.pipe, config.noise_offset, config.min_snr_gamma, zero_terminal_snr=config.zero_terminal_snr
    )
    if config.zero_terminal_snr and objective.prediction_type == "epsilon":
        raise ConfigError(
            "--zero-terminal-snr needs a v-prediction model: at zero signal an epsilon-prediction model has "
            f"nothing to predict, and {models.identity.name} predicts epsilon. Use an SD 2.x 768-v base, "
            "or train without --zero-terminal-snr."
        )
    return objective


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


def _static_facts(
    config: TrainConfig,
    accelerator: Accelerator,
    resolution: int,
    optimizer_name: str,
    warmup: int,
    groups: list[dict[str, Any]],
) -> dict[str, Any]:
    """The training facts every checkpoint's adapter records (`difflora.train.*` header keys)."""
    return {
        "learning_rate": groups[0]["initial_lr"],
        "text_encoder_lr": 0.0,  # when it is not trained; then one rate per trained text encoder
        **{f"{g['name']}_lr": g["initial_lr"] for g in groups[1:] if not g["name"].endswith("lora_B")},
        "loraplus_ratio": config.loraplus_ratio,
        "rslora": config.rslora,
        "zero_terminal_snr": config.zero_terminal_snr,
        "seed": config.seed,
        "batch_size": config.batch_size * accelerator.num_processes * config.gradient_accumulation,
        "resolution": resolution,
        "mixed_precision": config.mixed_precision,
        "min_snr_gamma": config.min_snr_gamma,
        "noise_offset": config.noise_offset,
        "optimizer": optimizer_name,
        "lr_scheduler": config.lr_scheduler,
        "lr_warmup_steps": warmup,
    }


def divergence_hints(config: TrainConfig, learning_rate: float) -> tuple[str, ...]:
    """What to try when the loss stops being finite, most likely cause first."""
    hints = [f"lower the learning rate (--learning-rate {learning_rate:g} -> {learning_rate / 10:g})"]
    if config.mixed_precision == "fp16":
        hints.insert(0, "fp16 overflowed: use --mixed-precision bf16 (or no)")
    if config.noise_offset > 0.2:
        hints.append(f"reduce --noise-offset ({config.noise_offset:g})")
    if config.max_grad_norm == 0:
        hints.append("turn gradient clipping back on (--max-grad-norm 1)")
    hints.append(
        f"check the images with `difflora check {config.data_dir}` (a broken image gives NaN latents)"
    )
    return tuple(hints)


# ------------------------------------------------------------------------------------------ the plan


def describe_plan(config: TrainConfig, run: Run) -> str:
    """The plan printed (and written to plan.txt) before training: every derived value and its rule."""
    data, models, facts = run.data, run.models, run.record.facts
    plan, identity = data.plan, models.identity
    buckets = ", ".join(f"{bucket}: {count}" for bucket, count in data.buckets.items())
    alpha_note = " (= rank)" if config.alpha is None else ""
    resolution_note = " (the model's native size)" if config.resolution is None else ""
    warmup_note = " (5% of the steps)" if config.lr_warmup_steps is None else ""
    te = "".join(
        f", {name.replace('_', ' ')} lr {facts[name + '_lr']:g}" for name in models.text_encoder_modules
    )
    lr_note = f" (default for a {identity.family} model)" if config.learning_rate is None else ""
    world = run.accelerator.num_processes
    lines = [
        "Training plan",
        f"  data        {config.data_dir}: {plan.images} images, {plan.examples_per_epoch} per epoch with repeats",
        f"  buckets     {buckets}",
        f"  model       {identity.name} ({_label(models)}, {identity.architecture}, {identity.prediction_type}), "
        f"{run.samples.resolution} px{resolution_note}",
        f"  LoRA        rank {config.rank}, alpha {config.effective_alpha:g}{alpha_note}; UNet "
        f"{len(models.unet_modules)} modules"
        + f" ({', '.join(config.effective_unet_targets(identity.family))}"
        + (f"; default for a {identity.family} model)" if config.unet_targets is None else ")")
        + "".join(
            f", {name.replace('_', ' ')} {len(found)} modules"
            for name, found in models.text_encoder_modules.items()
        ),
        f"  batch       {config.batch_size} per process x {world} process(es) x accumulation "
        f"{config.gradient_accumulation} = {config.batch_size * world * config.gradient_accumulation} images per step",
        f"  length      {plan.max_steps} steps, {plan.epochs} epoch(s) of {plan.steps_per_epoch} steps ({plan.rule})",
        f"  optimizer   {facts['optimizer']}, lr {facts['learning_rate']:g}{lr_note}{te}, {config.lr_scheduler} schedule, "
        f"warm-up {facts['lr_warmup_steps']} steps{warmup_note}, grad clip {config.max_grad_norm:g}, "
        f"min-SNR-γ {config.min_snr_gamma:g}, noise offset {config.noise_offset:g}, precision {config.mixed_precision}",
        f"  saves       every {run.loop.save_every} steps + at the end -> {run.paths.checkpoints} (keep {config.keep_checkpoints})",
        f"  samples     every {run.loop.sample_every} steps, {len(run.samples.prompts)} prompt(s) x seeds {list(config.sample_seeds)}"
        if run.loop.sample_every
        else "  samples     off",
        f"  output      {run.paths.adapter}",
    ]
    variants = _variants(config)
    if variants:
        lines.insert(5, f"  variants    {variants}")
    if run.start_step:
        lines.append(f"  resuming    at step {run.start_step}")
    for note in data.notes:
        lines.append(f"  note        {note}")
    report = format_parameter_report(parameter_report(models.trained_components))
    return "\n".join(lines) + "\n" + report


def _label(models: Models) -> str:
    """The base as users name it ("SDXL base", "SD 2.x (v-prediction, 768 px)"), or "custom"."""
    architecture = pipeline_architecture(models.pipe)
    if architecture is not None:
        return architecture.label
    return "embedded tiny model" if models.identity.family == "tiny" else "custom architecture"


def _variants(config: TrainConfig) -> str:
    """The LoRA variants chosen, as the plan names them (empty for plain LoRA)."""
    chosen = []
    if config.rslora:
        chosen.append(f"rsLoRA (scale alpha/sqrt(rank) = {config.effective_alpha / config.rank**0.5:g})")
    if config.conv_rank:
        alpha = config.conv_alpha if config.conv_alpha is not None else config.conv_rank
        chosen.append(f"LoCon (ResNet 3x3 convs at rank {config.conv_rank}, alpha {alpha:g})")
    if config.loraplus_ratio != 1:
        chosen.append(f"LoRA+ (B at {config.loraplus_ratio:g}x the learning rate)")
    return "; ".join(chosen)
