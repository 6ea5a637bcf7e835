"""What a training run writes while and after it trains: sample grids, checkpoints, the adapter file.

Every file is written atomically by the main process; `save_state` is collective (every process calls it,
so RNG states can be gathered). The adapter file is written last, once the final checkpoint exists.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save as safetensors_bytes

from difflora.adapter.inject import extract_weights
from difflora.adapter.lycoris_peft import extract_lycoris
from difflora.adapter.types import Adapter, AdapterMeta
from difflora.formats.export import model_tree
from difflora.formats.kohya import to_kohya
from difflora.formats.native import adapter_state_dict, header_metadata
from difflora.safe_io import write_atomic
from difflora.training.advice import gradient_advice
from difflora.training.checkpoint import Checkpoint, rng_state, save_checkpoint
from difflora.training.optimizers import evaluation_weights, step_size_estimate
from difflora.training.run import Run
from difflora.training.samples import render_sample_grid, save_grid
from difflora.training.validation import keep_if_best, report_best

logger = logging.getLogger(__name__)


def build_adapter(run: Run, *, step: int, finished: bool, ema: bool = False) -> Adapter:
    """The adapter as trained so far, with everything its header says about how it was made (`ema`: the
    model holds the --ema average, which the header says)."""
    models, data = run.models, run.data
    modules = {
        f"{component}.{name}": weights
        for component, module in models.trained_components.items()
        for name, weights in (
            extract_weights(module, component=component) | extract_lycoris(module, component=component)
        ).items()
    }
    identity, scan = models.identity, data.scan
    facts = {
        "steps": step,
        "epochs": run.final_epoch + 1 if finished else step // max(1, data.plan.steps_per_epoch),
        **run.record.facts,
        "num_train_images": len(scan.examples),
        "dataset_hash": scan.dataset_hash,
        "tag_frequency": json.dumps(scan.tag_frequency, ensure_ascii=False),
        "dataset_dirs": json.dumps(scan.dataset_dirs, ensure_ascii=False),
        "training_started_at": run.started_at,
        "training_finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds") if finished else "",
    }
    if ema and run.ema is not None:
        facts["weights"] = f"moving average (--ema {run.ema.decay:g}, {run.ema.updates} updates)"
    if run.ranks is not None:
        facts["adaptive_ranks"] = json.dumps(run.ranks.summary(), sort_keys=True)
    meta = AdapterMeta(
        name=run.paths.adapter.stem + (".ema" if ema else ""),
        base_model=identity.name,
        base_family=identity.family,
        base_architecture=identity.architecture,
        base_hash=identity.base_hash,
        prediction_type=identity.prediction_type,
        trigger_words=list(run.record.trigger_words),
        config_toml=run.record.config_toml,
        extra={f"difflora.train.{k}": str(v) for k, v in facts.items()},
    )
    return Adapter(modules=modules, meta=meta)


def samples_due(run: Run, step: int) -> bool:
    every = run.loop.sample_every
    return bool(every and run.samples.prompts and (step % every == 0 or step == run.loop.total_steps))


def render_samples(run: Run, step: int) -> bytes | None:
    """The sample grid PNG for this step (main process), or None when samples are off or not due."""
    if not samples_due(run, step):
        return None
    with run.times.phase("previews"), evaluation_weights(run.optimizer):
        return _render_and_save(run, step)


def _render_and_save(run: Run, step: int) -> bytes:
    grid = _render_grid(run)
    path = save_grid(grid, run.paths.samples / f"step-{step:06d}.png")
    if run.log is not None:
        run.log.image("samples", grid, step)
        run.log.write(f"samples: {path}")
    return path.read_bytes()


def _render_grid(run: Run) -> Image.Image:
    samples = run.samples
    return render_sample_grid(
        run.models.pipe,
        samples.prompts,
        samples.seeds,
        steps=samples.steps,
        guidance=samples.guidance,
        scheduler=samples.scheduler,
        width=samples.resolution,
        height=samples.resolution,
        autocast=run.accelerator.autocast(),
        zero_terminal_snr=samples.zero_terminal_snr,
        embeddings=samples.embeddings,
    )


def save_state(run: Run, step: int, epoch: int, *, finished: bool = False) -> Checkpoint | None:
    """A checkpoint at `step` (+ its sample grid and the loss curve); collective: every process calls it."""
    from accelerate.utils import gather_object

    accelerator = run.accelerator
    rngs = gather_object([rng_state()]) if accelerator.num_processes > 1 else [rng_state()]
    checkpoint = None
    if accelerator.is_main_process:
        grid = render_samples(run, step)  # timed as previews; the rest of this block as checkpoints
        with run.times.phase("checkpoints"):
            checkpoint = _write_checkpoint(run, step, epoch, rngs, grid, finished=finished)
    accelerator.wait_for_everyone()
    return checkpoint


def _write_checkpoint(
    run: Run, step: int, epoch: int, rngs: list, grid: bytes | None, *, finished: bool
) -> Checkpoint:
    """The checkpoint files, the gradient log and the loss curve (main process)."""
    with evaluation_weights(run.optimizer):  # the checkpoint's state below keeps the training weights
        adapter_bytes = adapter_file_bytes(build_adapter(run, step=step, finished=finished))
    keep_if_best(run, step, adapter_bytes)  # before the checkpoint: a resumed run rewrites the same file
    best = run.validation.best if run.validation is not None else None
    checkpoint = save_checkpoint(
        run.paths.checkpoints,
        step,
        parameters={k: p.detach() for k, p in run.models.trainable.items()},
        optimizer=run.optimizer.state_dict(),
        scheduler=run.scheduler.state_dict(),
        rng={str(i): state for i, state in enumerate(rngs)},
        info={
            "config": run.record.config,
            "dataset_hash": run.data.scan.dataset_hash,
            "epoch": epoch,
            "started_at": run.started_at,
            "torch_threads": torch.get_num_threads(),
            "validation_best": list(best) if best is not None else None,
        },
        adapter_bytes=adapter_bytes,
        extra_files={"samples.png": grid} if grid else None,
        extra_state=_extra_state(run),
        keep=run.loop.keep_checkpoints,
    )
    if run.gradients is not None:
        run.gradients.write()
    if run.log is not None:
        run.log.checkpoint_curve()
        run.log.write(f"checkpoint: {checkpoint.path}")
    return checkpoint


def _extra_state(run: Run) -> dict[str, object] | None:
    """Training state beyond the parameters and the optimizer: the rank allocation, the --ema average."""
    extra: dict[str, object] = {}
    if run.ranks is not None:
        extra["adaptive_rank"] = run.ranks.state()
    if run.ema is not None:
        extra["ema"] = run.ema.state()
    return extra or None


def finish_run(run: Run) -> Path:
    """Final checkpoint, samples, loss curve and the adapter file (written last, atomically)."""
    step = run.loop.total_steps
    last = run.last_checkpoint()
    if last is None or last.step != step:
        save_state(run, step, run.final_epoch, finished=True)
    if run.accelerator.is_main_process:
        if run.log is not None:
            run.log.end_progress()
            run.log.finish_curve()
        _report_gradients(run)
        _write_average(run, step)
        with run.times.phase("final_save"), evaluation_weights(run.optimizer):
            payload = adapter_file_bytes(build_adapter(run, step=step, finished=True))
            write_atomic(run.paths.adapter, payload, fault="adapter-write")
        if run.ranks is not None:
            logger.info("%s", run.ranks.describe())
        report_best(run)
        estimate = step_size_estimate(run.optimizer)
        if estimate is not None:
            logger.info("Prodigy's step-size estimate at the end: d = %.3g", estimate)
        logger.info("adapter written: %s (run directory %s)", run.paths.adapter, run.paths.run_dir)
        run.times.write(run.paths.run_dir / "timing.json")
        logger.info("time: %s", run.times.summary())
    run.accelerator.wait_for_everyone()
    return run.paths.adapter


def _write_average(run: Run, step: int) -> None:
    """--ema: the average's adapter, `<name>.ema.safetensors`, and its sample grid (main process)."""
    if run.ema is None:
        return
    path = ema_adapter_path(run.paths.adapter)
    with run.ema.applied(run.models.trainable):
        if samples_due(run, step):
            with run.times.phase("previews"):
                grid = _render_grid(run)
            save_grid(grid, run.paths.samples / f"step-{step:06d}-ema.png")
        with run.times.phase("final_save"):
            write_atomic(path, adapter_file_bytes(build_adapter(run, step=step, finished=True, ema=True)))
    logger.info("moving average (--ema %g) written: %s", run.ema.decay, path)


def ema_adapter_path(adapter: Path) -> Path:
    return adapter.with_name(f"{adapter.stem}.ema{adapter.suffix}")


def _report_gradients(run: Run) -> None:
    if run.gradients is None:
        return
    run.gradients.write()
    for kind, warning in run.gradients.findings(run.loop.total_steps):
        logger.warning("%s; see %s", warning, run.gradients.png_path)
        if not run.quiet_advice:
            logger.warning("advice: %s", gradient_advice(kind, float(run.record.facts["learning_rate"])))


def adapter_file_bytes(adapter: Adapter) -> bytes:
    """The adapter file's bytes in difflora's native layout: exactly what `save_adapter` writes, built here
    so the final write can carry its own fault point (`adapter-write`, difflora.faults)."""
    if adapter.lycoris_kinds:  # LyCORIS keys (kohya names), float32: the layout every consumer reads
        return safetensors_bytes(*to_kohya(adapter, dtype=torch.float32, modules=model_tree(adapter, None)))
    return safetensors_bytes(adapter_state_dict(adapter), metadata=header_metadata(adapter))
