"""What a run says about itself: the effective configuration, its trigger words, the training facts every
checkpoint's adapter records (`difflora.train.*` header keys) and what to try if the loss diverges. Computed
once at setup; the loop, checkpoints and the final adapter only read it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from difflora.config import config_to_dict, to_toml
from difflora.config.train import TrainConfig


@dataclass(frozen=True)
class RunRecord:
    """What a run says about itself in every checkpoint and in its adapter, computed once at setup."""

    config: dict[str, Any]  # the effective configuration, as config_to_dict gives it
    config_toml: str
    trigger_words: tuple[str, ...]
    facts: dict[str, Any]  # training facts that do not change during the run (lr, batch, seed, ...)
    divergence_hints: tuple[str, ...]  # what to try when the loss stops being finite


def run_record(
    config: TrainConfig,
    *,
    processes: int,
    resolution: int,
    optimizer_name: str,
    warmup: int,
    groups: list[dict[str, Any]],
) -> RunRecord:
    """`groups`: the optimizer's parameter groups, the UNet's first ("initial_lr": the rate before warm-up)."""
    return RunRecord(
        config=config_to_dict(config),
        config_toml=to_toml(config),
        trigger_words=(config.trigger,) if config.trigger else (),
        facts=_static_facts(config, processes, resolution, optimizer_name, warmup, groups),
        divergence_hints=divergence_hints(config, groups[0]["initial_lr"]),
    )


def _static_facts(
    config: TrainConfig,
    processes: int,
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
        "dora": config.dora,
        "quantize_base": config.quantize_base or "no",  # the base the adapter applies to is unquantized
        "zero_terminal_snr": config.zero_terminal_snr,
        "seed": config.seed,
        "batch_size": config.batch_size * processes * config.gradient_accumulation,
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
