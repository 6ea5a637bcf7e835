"""The value checks of `difflora train`'s configuration: counts, rates and closed choices. Each problem is
collected with the flag it concerns, so one ConfigError lists them all. Kept apart from the field list in
`train.py`, as the variant checks are in `variants.py`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from difflora.config import Problems
from difflora.config.schedulers import SCHEDULER_NAMES
from difflora.config.variants import check_variants

# The config is a difflora.config.train.TrainConfig being built; it is typed Any because train.py imports
# this module (the import-cycle test counts type-only imports too).
TrainConfig = Any
PRECISIONS: tuple[str, ...] = ("no", "fp16", "bf16")
SCHEDULES: tuple[str, ...] = ("constant", "cosine", "linear")
OPTIMIZERS: tuple[str, ...] = ("auto", "adamw", "adamw8bit", "prodigy", "adamw-schedulefree", "adafactor")
QUANTIZATIONS: tuple[str, ...] = ("int8", "nf4", "fp8")
# difflora.models.families.flow's SAMPLINGS and ModelFamily.target_presets' names (config/ imports no model code)
TIMESTEP_SAMPLINGS: tuple[str, ...] = ("uniform", "sigmoid", "logit-normal", "shift", "flux-shift")
TARGET_PRESETS: tuple[str, ...] = ("attention", "attention-mlp", "all-linear")


def check_counts(config: TrainConfig, p: Problems) -> None:
    positive = ("rank", "batch_size", "gradient_accumulation", "keep_checkpoints", "sample_steps")
    for name in positive:
        p.check(getattr(config, name) >= 1, name, f"must be at least 1, got {getattr(config, name)}")
    p.check(config.max_bad_steps >= 1, "max_bad_steps", f"must be at least 1, got {config.max_bad_steps}")
    for name in ("max_steps", "epochs", "resolution", "num_threads"):
        value = getattr(config, name)
        p.check(value is None or value >= 1, name, f"must be at least 1, got {value}")
    for name in ("save_every", "sample_every", "lr_warmup_steps", "grad_log_every"):
        value = getattr(config, name)
        p.check(value is None or value >= 0, name, f"must be 0 or more, got {value}")
    p.check(config.keep_tokens >= 0, "keep_tokens", f"must be 0 or more, got {config.keep_tokens}")
    p.check(config.blocks_to_swap >= 0, "blocks_to_swap", f"must be 0 or more, got {config.blocks_to_swap}")
    p.check(
        not config.blocks_to_swap or config.quantize_base in (None, "fp8"),
        "blocks_to_swap",
        f"cannot move bitsandbytes' {config.quantize_base} layers; use --quantize-base fp8 or no quantization",
    )
    if config.conv_rank is not None:
        p.check(config.conv_rank >= 1, "conv_rank", f"must be at least 1, got {config.conv_rank}")
    elif config.conv_alpha is not None:
        p.add("conv_alpha", "given without --conv-rank: add --conv-rank to adapt the convolutions")
    check_variants(config, p)
    if config.max_steps is not None and config.epochs is not None:
        p.add("max_steps", "--max-steps and --epochs both given: choose one (the other is derived)")
    if config.resolution is not None and config.resolution % 8:
        p.add("resolution", f"must be a multiple of 8 (the VAE's factor), got {config.resolution}")
    p.check(
        config.unet_targets is None or bool(config.unet_targets), "unet_targets", "name at least one module"
    )
    p.check(bool(config.sample_seeds), "sample_seeds", "give at least one seed")


def check_rates(config: TrainConfig, p: Problems) -> None:
    if config.learning_rate is not None:
        p.check(config.learning_rate > 0, "learning_rate", f"must be positive, got {config.learning_rate}")
    for name in ("text_encoder_lr", "text_encoder_2_lr"):
        value = getattr(config, name)
        p.check(value is None or value >= 0, name, "must be 0 or more")
    for name in ("alpha", "conv_alpha"):
        value = getattr(config, name)
        p.check(value is None or value > 0, name, f"must be positive, got {value}")
    p.check(config.loraplus_ratio > 0, "loraplus_ratio", f"must be positive, got {config.loraplus_ratio}")
    for name in ("lora_dropout", "caption_dropout", "tag_dropout"):
        value = getattr(config, name)
        p.check(0.0 <= value < 1.0, name, f"must be in [0, 1), got {value}")
    for name in ("weight_decay", "max_grad_norm", "noise_offset", "min_snr_gamma"):
        value = getattr(config, name)
        p.check(value >= 0, name, f"must be 0 or more, got {value}")
    p.check(config.sample_guidance >= 0, "sample_guidance", "must be 0 or more")


def check_choices(config: TrainConfig, p: Problems) -> None:
    for name, choices in (
        ("mixed_precision", PRECISIONS),
        ("lr_scheduler", SCHEDULES),
        ("optimizer", OPTIMIZERS),
        ("sample_scheduler", SCHEDULER_NAMES),
    ):
        value = getattr(config, name)
        p.check(value in choices, name, f"must be one of {', '.join(choices)}, got {value!r}")
    p.check(
        config.quantize_base in (None, *QUANTIZATIONS),
        "quantize_base",
        f"must be one of {', '.join(QUANTIZATIONS)} (or left out), got {config.quantize_base!r}",
    )
    for name, choices in (("timestep_sampling", TIMESTEP_SAMPLINGS), ("targets", TARGET_PRESETS)):
        value = getattr(config, name)
        p.check(value in (None, *choices), name, f"must be one of {', '.join(choices)}, got {value!r}")
    p.check(config.timestep_scale > 0, "timestep_scale", f"must be positive, got {config.timestep_scale}")
    p.check(config.timestep_shift > 0, "timestep_shift", f"must be positive, got {config.timestep_shift}")
    for spec in config.blocks:
        kind, _, ranges = spec.partition("=")
        valid = bool(kind) and bool(ranges) and all(_is_range(part) for part in ranges.split(","))
        p.check(valid, "blocks", f"{spec!r} is not KIND=RANGES (e.g. double=0-18 or single=0,5-9)")
    extension = config.caption_extension.lower()
    p.check(
        extension.lstrip(".") in ("txt", "caption"),
        "caption_extension",
        f"must be .txt or .caption, got {config.caption_extension!r}",
    )


def _is_range(text: str) -> bool:
    """`7` or `0-18`: a block index or an inclusive range of them."""
    low, _, high = text.strip().partition("-")
    return low.isdigit() and (not high or (high.isdigit() and int(high) >= int(low)))


def check_validation(config: TrainConfig, p: Problems) -> None:
    """The validation options: one source of held-out images, and the options that need one."""
    split, folder = config.validation_split, config.validation_dir
    p.check(0.0 <= split < 1.0, "validation_split", f"must be in [0, 1), got {split}")
    p.check(config.validate_every >= 0, "validate_every", f"must be 0 or more, got {config.validate_every}")
    if split and folder:
        p.add("validation_dir", "--validation-split and --validation-dir both given: choose one")
    if not (split or folder):
        for name in ("validate_every", "keep_best"):
            if getattr(config, name):
                p.add(name, "needs held-out images: add --validation-split 0.1 or --validation-dir DIR")
    if folder and config.data_dir:
        data, held = Path(config.data_dir).resolve(), Path(folder).resolve()
        if held == data or data in held.parents:
            p.add(
                "validation_dir",
                f"{folder} is inside the training folder, so its images would train too: "
                "move it out of the training folder",
            )


def check_ema(config: TrainConfig, p: Problems) -> None:
    p.check(0.0 <= config.ema < 1.0, "ema", f"must be in [0, 1) (e.g. 0.999; 0: off), got {config.ema}")
    if config.ema_on_cpu and not config.ema:
        p.add("ema_on_cpu", "given without --ema: add --ema 0.999 to keep an average")


def check_masks(config: TrainConfig, p: Problems) -> None:
    weight = config.unmasked_weight
    p.check(0.0 <= weight <= 1.0, "unmasked_weight", f"must be in [0, 1], got {weight}")
    if config.masks and config.alpha_mask:
        p.add("alpha_mask", "--masks and --alpha-mask both given: choose one source of masks")
    if weight and not (config.masks or config.alpha_mask):
        p.add("unmasked_weight", "needs masks: add --masks DIR or --alpha-mask")
    if config.masks and config.data_dir:
        data, masks = Path(config.data_dir).resolve(), Path(config.masks).resolve()
        if masks == data or data in masks.parents:
            p.add(
                "masks",
                f"{config.masks} is inside the training folder, so its masks would train as images: "
                "move it out of the training folder",
            )


def check_prior(config: TrainConfig, p: Problems) -> None:
    weight = config.prior_weight
    p.check(weight >= 0, "prior_weight", f"must be 0 (measure the drift only) or more, got {weight}")
    if config.preserve_prompts and not config.preserve_base:
        p.add("preserve_prompts", "given without --preserve-base: add --preserve-base to use them")
    if config.preserve_base and not (config.trigger or config.preserve_prompts):
        p.add(
            "preserve_base",
            "needs prompts without the concept: give --trigger (removed from the captions) or --preserve-prompts FILE",
        )
    if config.preserve_prompts and not Path(config.preserve_prompts).is_file():
        p.add(
            "preserve_prompts",
            f"{config.preserve_prompts}: no such file; give a text file, one prompt per line",
        )


def check_regularisation(config: TrainConfig, p: Problems) -> None:
    """--reg-dir: a folder of its own, outside the training folder, and not with --preserve-base (both are
    the prior loss that --prior-weight weighs: one would silently take the other's weight)."""
    folder = config.reg_dir
    if not folder:
        return
    if config.preserve_base:
        p.add("reg_dir", "--reg-dir and --preserve-base both given: choose one way to preserve the base")
    if not Path(folder).is_dir():
        p.add("reg_dir", f"{folder}: no such folder; give the folder of class images and their captions")
    elif config.data_dir:
        data, reg = Path(config.data_dir).resolve(), Path(folder).resolve()
        if reg == data or data in reg.parents or reg in data.parents:
            p.add(
                "reg_dir",
                f"{folder} and the training folder {config.data_dir} overlap, so class images would train "
                "as the subject: give --reg-dir a folder outside the training folder",
            )
