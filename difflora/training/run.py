"""The state of one training run: its paths, its settings as plain values, its live objects, and how it
resumes from a checkpoint (what it writes is `outputs.py`).

Run layout, beside the adapter `<output-dir>/<name>.safetensors`:

    <output-dir>/<name>.run/
        config.toml      the effective configuration (`difflora train --config` on it reproduces the run)
        plan.txt         the plan printed before training
        loss.csv         step, epoch, loss, smoothed loss, learning rate, skipped, seconds
        loss.png         the loss curve
        timing.json      seconds spent loading, caching, stepping, rendering samples, checkpointing
        samples/step-NNNNNN.png   sample grid (prompts x seeds) at each sampling step
        checkpoints/step-NNNNNN/  see training/checkpoint.py (the newest --keep-checkpoints are kept)
        tensorboard/     event files, when tensorboard is installed
    <output-dir>/.cache/ latents and text embeddings (shared by every run writing to <output-dir>)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from difflora.adapter.adaptive import RankAllocation
from difflora.config.train_files import RESUMABLE_CHANGES
from difflora.errors import ConfigError
from difflora.training.checkpoint import (
    Checkpoint,
    clear_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
)
from difflora.training.data import TrainingData
from difflora.training.ema import WeightAverage
from difflora.training.gradients import GradientMonitor
from difflora.training.log import TrainLog
from difflora.training.record import RunRecord
from difflora.training.setup import Models
from difflora.training.timing import PhaseTimes
from difflora.training.validation_set import Validation

if TYPE_CHECKING:
    from accelerate import Accelerator

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
    shift_factor: float = 0.0  # the autoencoder's latent shift (Flux's), subtracted before scaling
    flow: Any = None  # a flow-matching family's FlowSchedule (difflora.models.families.flow); None: DDPM
    guidance: float = 1.0  # the guidance input of guidance-distilled transformers while training
    unmasked_weight: float = 0.0  # what a loss mask's black pixels still count (--unmasked-weight)

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Autoencoder latents as the denoiser sees them: (x - shift) · scale, as the pipelines decode."""
        return (latents - self.shift_factor) * self.scaling_factor

    @classmethod
    def for_pipe(
        cls,
        pipe: Any,
        noise_offset: float,
        min_snr_gamma: float,
        *,
        zero_terminal_snr: bool = False,
        flow: Any = None,
        guidance: float = 1.0,
        latent_config: Any = None,
    ) -> Objective:
        from diffusers import DDPMScheduler

        # Training always uses the DDPM forward process with the model's own betas, whatever sampler the
        # pipeline ships with (Euler's add_noise works in sigma space); diffusers rescales them for
        # zero terminal SNR exactly as its samplers do with rescale_betas_zero_snr.
        ddpm = DDPMScheduler.from_config(pipe.scheduler.config, rescale_betas_zero_snr=zero_terminal_snr)
        latents = latent_config if latent_config is not None else pipe.vae.config  # the family's latent view
        return cls(
            alphas_cumprod=ddpm.alphas_cumprod.clone().float(),
            prediction_type=str(ddpm.config.prediction_type),
            scaling_factor=float(latents.scaling_factor),
            noise_offset=noise_offset,
            min_snr_gamma=min_snr_gamma,
            shift_factor=float(latents.get("shift_factor") or 0.0),
            flow=flow,
            guidance=guidance,
        )


@dataclass(frozen=True)
class LoopSettings:
    """What the loop needs to know, as plain values (the loop never reads the configuration)."""

    total_steps: int
    accumulation: int
    seed: int
    max_grad_norm: float  # 0: no clipping
    max_bad_steps: int  # consecutive non-finite steps before the run stops
    fp16: bool  # the gradient scaler skips steps with non-finite gradients itself
    save_every: int  # 0: checkpoints only at the end
    sample_every: int  # 0: no samples
    keep_checkpoints: int
    grad_log_every: int = 0  # 0: no gradient monitoring


@dataclass(frozen=True)
class SampleSettings:
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int
    guidance: float
    scheduler: str
    resolution: int
    zero_terminal_snr: bool = False
    embeddings: Any = None  # the prompts' text inputs, once the text encoders are freed (samples.py)


@dataclass
class Run:
    accelerator: Accelerator
    models: Models
    data: TrainingData
    paths: RunPaths
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    unet: torch.nn.Module  # the denoiser (a UNet or a transformer), possibly DDP-wrapped
    text_encoders: dict[str, torch.nn.Module]  # by component; the trained ones possibly DDP-wrapped
    tokenizers: list[Any]  # in the text encoders' order
    objective: Objective
    loop: LoopSettings
    samples: SampleSettings
    record: RunRecord
    start_step: int = 0
    final_epoch: int = 0
    started_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    log: TrainLog | None = None
    gradients: GradientMonitor | None = None  # main process only
    times: PhaseTimes = field(default_factory=PhaseTimes)
    ranks: RankAllocation | None = None  # --adaptive-rank: the AdaLoRA rank allocation the loop drives
    quiet_advice: bool = False  # --quiet-advice: no advice lines (difflora.training.advice)
    validation: Validation | None = None  # the held-out set (--validation-split / --validation-dir)
    ema: WeightAverage | None = None  # --ema: the moving average of the LoRA weights
    prior: Any = None  # difflora.training.prior.Prior: --preserve-base and the drift (it imports Run)

    @property
    def trained_modules(self) -> list[torch.nn.Module]:
        trained = [self.text_encoders[name] for name in self.models.text_encoder_modules]
        return [self.unet, *trained]

    def last_checkpoint(self) -> Checkpoint | None:
        return latest_checkpoint(self.paths.checkpoints)


def restore_or_start(run: Run, *, resume: bool, keep_thread_count: bool) -> int:
    """Load the newest checkpoint when resuming (returns its step), else clear stale checkpoints.
    `keep_thread_count`: the user chose no thread count, so take the checkpoint's (bit-exact resume needs
    the same reduction order as before the interruption)."""
    checkpoint = run.last_checkpoint()
    start = 0
    if resume and checkpoint is None:
        logger.warning("--resume: no checkpoint in %s; starting from step 0", run.paths.checkpoints)
    elif resume and checkpoint is not None:
        start = _restore(run, checkpoint, keep_thread_count=keep_thread_count)
    elif checkpoint is not None and run.accelerator.is_main_process:
        removed = clear_checkpoints(run.paths.checkpoints)
        logger.warning(
            "starting afresh: removed %d checkpoint(s) of an earlier run (use --resume to continue one)",
            removed,
        )
    run.accelerator.wait_for_everyone()
    return start


def _restore(run: Run, checkpoint: Checkpoint, *, keep_thread_count: bool) -> int:
    loaded = load_checkpoint(checkpoint)
    check_resumable(
        loaded.info["config"],
        run.record.config,
        saved_hash=loaded.info["dataset_hash"],
        current_hash=run.data.scan.dataset_hash,
    )
    params = run.models.trainable
    with torch.no_grad():
        for key, value in loaded.parameters.items():
            params[key].copy_(value)
    if run.ranks is not None:
        run.ranks.load_state(loaded.extra.get("adaptive_rank"))
    if run.ema is not None:
        run.ema.load_state(loaded.extra.get("ema"))
    run.optimizer.load_state_dict(loaded.optimizer)
    run.scheduler.load_state_dict(loaded.scheduler)
    threads = loaded.info.get("torch_threads")
    if keep_thread_count and threads and run.accelerator.device.type == "cpu":
        torch.set_num_threads(int(threads))
    own = loaded.rng.get(str(run.accelerator.process_index))
    if own is not None:
        restore_rng(own)
    run.started_at = loaded.info.get("started_at", run.started_at)
    best = loaded.info.get("validation_best")
    if run.validation is not None and best is not None:
        run.validation.best = (int(best[0]), float(best[1]))
    logger.info("resuming from %s (step %d of %d)", checkpoint.path, loaded.step, run.loop.total_steps)
    return loaded.step


def check_resumable(
    saved: dict[str, Any], now: dict[str, Any], *, saved_hash: str, current_hash: str
) -> None:
    """Refuse to resume a run with settings that change what is trained (naming every difference)."""
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
