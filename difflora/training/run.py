"""The state of one training run, and what it writes: the plan, checkpoints (with samples), the adapter.

Run layout, beside the adapter `<output-dir>/<name>.safetensors`:

    <output-dir>/<name>.run/
        config.toml      the effective configuration (`difflora train --config` on it reproduces the run)
        plan.txt         the plan printed before training
        loss.csv         step, epoch, loss, smoothed loss, learning rate, skipped, seconds
        loss.png         the loss curve
        samples/step-NNNNNN.png   sample grid (prompts x seeds) at each sampling step
        checkpoints/step-NNNNNN/  see difflora.checkpoint (the newest --keep-checkpoints are kept)
        tensorboard/     event files, when tensorboard is installed
    <output-dir>/.cache/ latents and text embeddings (shared by every run writing to <output-dir>)
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from difflora.adapter.inject import extract_weights, format_parameter_report, parameter_report
from difflora.adapter.types import Adapter, AdapterMeta
from difflora.config import config_to_dict, to_toml
from difflora.config.train import RESUMABLE_CHANGES, TrainConfig
from difflora.errors import ConfigError
from difflora.formats.native import adapter_state_dict, header_metadata, save_adapter
from difflora.training.checkpoint import (
    Checkpoint,
    clear_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    rng_state,
    save_checkpoint,
)
from difflora.training.log import TrainLog

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPaths:
    adapter: Path
    run_dir: Path
    cache: Path

    @classmethod
    def for_adapter(cls, output_dir: Path, name: str, cache_dir: str | None) -> RunPaths:
        return cls(
            adapter=output_dir / f"{name}.safetensors",
            run_dir=output_dir / f"{name}.run",
            cache=Path(cache_dir) if cache_dir else output_dir / ".cache",
        )

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def samples(self) -> Path:
        return self.run_dir / "samples"


@dataclass(frozen=True)
class Objective:
    """The plain numbers the loss needs, read once from the model's scheduler."""

    alphas_cumprod: torch.Tensor
    prediction_type: str
    scaling_factor: float
    noise_offset: float
    min_snr_gamma: float

    @classmethod
    def for_pipe(cls, pipe: Any, noise_offset: float, min_snr_gamma: float) -> Objective:
        from diffusers import DDPMScheduler

        # Training always uses the DDPM forward process with the model's own betas, whatever sampler the
        # pipeline ships with (Euler's add_noise works in sigma space).
        ddpm = DDPMScheduler.from_config(pipe.scheduler.config)
        return cls(
            alphas_cumprod=ddpm.alphas_cumprod.clone().float(),
            prediction_type=str(ddpm.config.prediction_type),
            scaling_factor=float(pipe.vae.config.scaling_factor),
            noise_offset=noise_offset,
            min_snr_gamma=min_snr_gamma,
        )


@dataclass
class Run:
    config: Any  # TrainConfig: only setup/finish read it; the loop reads the plain fields below
    accelerator: Any
    models: Any
    data: Any
    paths: RunPaths
    optimizer: Any
    scheduler: Any
    unet: Any  # possibly DDP-wrapped
    text_encoder: Any
    objective: Objective
    resolution: int
    total_steps: int
    warmup: int
    save_every: int
    sample_every: int
    sample_prompts: list[str]
    optimizer_name: str
    learning_rate: float
    text_encoder_lr: float
    start_step: int = 0
    final_epoch: int = 0
    started_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    log: TrainLog | None = None

    @property
    def trained_modules(self) -> list[Any]:
        return [self.unet] + ([self.text_encoder] if self.models.train_text_encoder else [])

    def last_checkpoint(self) -> Checkpoint | None:
        return latest_checkpoint(self.paths.checkpoints)

    def restore_or_start(self) -> int:
        """Load the newest checkpoint with --resume (returns its step), else clear stale checkpoints."""
        start = 0
        checkpoint = self.last_checkpoint()
        if self.config.resume and checkpoint is None:
            logger.warning("--resume: no checkpoint in %s; starting from step 0", self.paths.checkpoints)
        elif self.config.resume and checkpoint is not None:
            loaded = load_checkpoint(checkpoint)
            check_resumable(
                loaded.info["config"],
                self.config,
                saved_hash=loaded.info["dataset_hash"],
                current_hash=self.data.scan.dataset_hash,
            )
            params = self.models.trainable
            with torch.no_grad():
                for key, value in loaded.parameters.items():
                    params[key].copy_(value)
            self.optimizer.load_state_dict(loaded.optimizer)
            self.scheduler.load_state_dict(loaded.scheduler)
            threads = loaded.info.get("torch_threads")
            if self.config.num_threads is None and threads and self.accelerator.device.type == "cpu":
                torch.set_num_threads(int(threads))  # same reduction order as before the interruption
            own = loaded.rng.get(str(self.accelerator.process_index))
            if own is not None:
                restore_rng(own)
            self.started_at = loaded.info.get("started_at", self.started_at)
            start = loaded.step
            logger.info("resuming from %s (step %d of %d)", checkpoint.path, start, self.total_steps)
        elif checkpoint is not None and self.accelerator.is_main_process:
            removed = clear_checkpoints(self.paths.checkpoints)
            logger.warning(
                "starting afresh: removed %d checkpoint(s) of an earlier run (use --resume to continue one)",
                removed,
            )
        self.accelerator.wait_for_everyone()
        return start


def describe_plan(run: Run) -> str:
    config, data, models = run.config, run.data, run.models
    plan, identity = data.plan, models.identity
    buckets = ", ".join(f"{bucket}: {count}" for bucket, count in data.buckets.items())
    alpha_note = " (= rank)" if config.alpha is None else ""
    resolution_note = " (the model's native size)" if config.resolution is None else ""
    warmup_note = " (5% of the steps)" if config.lr_warmup_steps is None else ""
    te = f", text encoder lr {run.text_encoder_lr:g}" if config.train_text_encoder else ""
    lr_note = f" (default for a {identity.family} model)" if config.learning_rate is None else ""
    world = run.accelerator.num_processes
    lines = [
        "Training plan",
        f"  data        {config.data_dir}: {plan.images} images, {plan.examples_per_epoch} per epoch with repeats",
        f"  buckets     {buckets}",
        f"  model       {identity.name} ({identity.architecture}, {identity.prediction_type}), "
        f"{run.resolution} px{resolution_note}",
        f"  LoRA        rank {config.rank}, alpha {config.effective_alpha:g}{alpha_note}; UNet "
        f"{len(models.unet_modules)} modules"
        + f" ({', '.join(config.effective_unet_targets(identity.family))}"
        + (f"; default for a {identity.family} model)" if config.unet_targets is None else ")")
        + (f", text encoder {len(models.text_encoder_modules)} modules" if config.train_text_encoder else ""),
        f"  batch       {config.batch_size} per process x {world} process(es) x accumulation "
        f"{config.gradient_accumulation} = {config.batch_size * world * config.gradient_accumulation} images per step",
        f"  length      {plan.max_steps} steps, {plan.epochs} epoch(s) of {plan.steps_per_epoch} steps ({plan.rule})",
        f"  optimizer   {run.optimizer_name}, lr {run.learning_rate:g}{lr_note}{te}, {config.lr_scheduler} schedule, "
        f"warm-up {run.warmup} steps{warmup_note}, grad clip {config.max_grad_norm:g}, "
        f"min-SNR-γ {config.min_snr_gamma:g}, noise offset {config.noise_offset:g}, precision {config.mixed_precision}",
        f"  saves       every {run.save_every} steps + at the end -> {run.paths.checkpoints} (keep {config.keep_checkpoints})",
        f"  samples     every {run.sample_every} steps, {len(run.sample_prompts)} prompt(s) x seeds {list(config.sample_seeds)}"
        if run.sample_every
        else "  samples     off",
        f"  output      {run.paths.adapter}",
    ]
    if run.start_step:
        lines.append(f"  resuming    at step {run.start_step}")
    for note in data.notes:
        lines.append(f"  note        {note}")
    report = format_parameter_report(parameter_report(_components(models)))
    return "\n".join(lines) + "\n" + report


def _components(models) -> dict[str, Any]:
    found = {"unet": models.pipe.unet}
    if models.train_text_encoder:
        found["text_encoder"] = models.pipe.text_encoder
    return found


# ------------------------------------------------------------------------------------------ outputs


def build_adapter(run: Run, *, step: int, finished: bool) -> Adapter:
    config, models, data = run.config, run.models, run.data
    modules = {f"unet.{k}": v for k, v in extract_weights(models.pipe.unet, component="unet").items()}
    if models.train_text_encoder:
        te = extract_weights(models.pipe.text_encoder, component="text_encoder")
        modules.update({f"text_encoder.{k}": v for k, v in te.items()})
    identity, scan = models.identity, data.scan
    facts = {
        "steps": step,
        "epochs": run.final_epoch + 1 if finished else step // max(1, data.plan.steps_per_epoch),
        "learning_rate": run.learning_rate,
        "text_encoder_lr": run.text_encoder_lr,
        "seed": config.seed,
        "batch_size": config.batch_size * run.accelerator.num_processes * config.gradient_accumulation,
        "resolution": run.resolution,
        "num_train_images": len(scan.examples),
        "dataset_hash": scan.dataset_hash,
        "tag_frequency": json.dumps(scan.tag_frequency, ensure_ascii=False),
        "dataset_dirs": json.dumps(scan.dataset_dirs, ensure_ascii=False),
        "training_started_at": run.started_at,
        "training_finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds") if finished else "",
        "mixed_precision": config.mixed_precision,
        "min_snr_gamma": config.min_snr_gamma,
        "noise_offset": config.noise_offset,
        "optimizer": run.optimizer_name,
        "lr_scheduler": config.lr_scheduler,
    }
    meta = AdapterMeta(
        name=run.paths.adapter.stem,
        base_model=identity.name,
        base_family=identity.family,
        base_architecture=identity.architecture,
        base_hash=identity.base_hash,
        prediction_type=identity.prediction_type,
        trigger_words=[config.trigger] if config.trigger else [],
        config_toml=to_toml(config),
        extra={f"difflora.train.{k}": str(v) for k, v in facts.items()},
    )
    return Adapter(modules=modules, meta=meta)


def render_samples(run: Run, step: int) -> bytes | None:
    """The sample grid PNG for this step (main process), or None when samples are off or not due."""
    if (
        not run.sample_every
        or not run.sample_prompts
        or (step % run.sample_every and step != run.total_steps)
    ):
        return None
    from difflora.training.samples import render_sample_grid, save_grid

    config = run.config
    grid = render_sample_grid(
        run.models.pipe,
        run.sample_prompts,
        config.sample_seeds,
        steps=config.sample_steps,
        guidance=config.sample_guidance,
        scheduler=config.sample_scheduler,
        width=run.resolution,
        height=run.resolution,
        autocast=run.accelerator.autocast(),
    )
    path = save_grid(grid, run.paths.samples / f"step-{step:06d}.png")
    if run.log is not None:
        run.log.image("samples", grid, step)
        run.log.write(f"samples: {path}")
    return path.read_bytes()


def save_state(run: Run, step: int, epoch: int, *, finished: bool = False) -> Checkpoint | None:
    """A checkpoint at `step` (+ its sample grid and the loss curve); collective: every process calls it."""
    from accelerate.utils import gather_object

    accelerator = run.accelerator
    rngs = gather_object([rng_state()]) if accelerator.num_processes > 1 else [rng_state()]
    checkpoint = None
    if accelerator.is_main_process:
        adapter = build_adapter(run, step=step, finished=finished)
        from safetensors.torch import save as to_bytes

        grid = render_samples(run, step)
        checkpoint = save_checkpoint(
            run.paths.checkpoints,
            step,
            parameters={k: p.detach() for k, p in run.models.trainable.items()},
            optimizer=run.optimizer.state_dict(),
            scheduler=run.scheduler.state_dict(),
            rng={str(i): state for i, state in enumerate(rngs)},
            info={
                "config": config_to_dict(run.config),
                "dataset_hash": run.data.scan.dataset_hash,
                "epoch": epoch,
                "started_at": run.started_at,
                "torch_threads": torch.get_num_threads(),
            },
            adapter_bytes=to_bytes(adapter_state_dict(adapter), metadata=header_metadata(adapter)),
            extra_files={"samples.png": grid} if grid else None,
            keep=run.config.keep_checkpoints,
        )
        if run.log is not None:
            run.log.write_curve()
            run.log.write(f"checkpoint: {checkpoint.path}")
    accelerator.wait_for_everyone()
    return checkpoint


def finish_run(run: Run) -> Path:
    """Final checkpoint, samples, loss curve and the adapter file (written last, atomically)."""
    step = run.total_steps
    last = run.last_checkpoint()
    if last is None or last.step != step:
        save_state(run, step, run.final_epoch, finished=True)
    if run.accelerator.is_main_process:
        adapter = build_adapter(run, step=step, finished=True)
        save_adapter(adapter, run.paths.adapter)
        logger.info("adapter written: %s (run directory %s)", run.paths.adapter, run.paths.run_dir)
    run.accelerator.wait_for_everyone()
    return run.paths.adapter


def check_resumable(
    saved: dict[str, Any], current: TrainConfig, *, saved_hash: str, current_hash: str
) -> None:
    """Refuse to resume a run with settings that change what is trained (naming every difference)."""
    now = config_to_dict(current)
    keys = sorted((set(saved) | set(now)) - RESUMABLE_CHANGES)
    differences = [
        f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)
    ]
    if saved_hash != current_hash:
        differences.append("the images or captions in the data folder changed since the checkpoint")
    if differences:
        raise ConfigError(
            "Cannot --resume: these settings differ from the run being resumed:\n  "
            + "\n  ".join(differences)
            + "\nResume with the run's own settings (pass --config <run dir>/config.toml --resume), or start "
            "a fresh run without --resume (or with another --name)."
        )
