"""The training plan: how many optimizer steps, and why, derived from the data (no hidden fixed default).

Counting: an epoch shows every image ``repeats`` times (its folder's ``N_`` prefix). Draws are batched
within their aspect-ratio bucket, so ``batches_per_epoch`` = Σ over buckets of ceil(draws / batch size)
(floor with ``drop_last``), and an optimizer step takes ``gradient_accumulation`` batches:
``steps_per_epoch`` = ceil(batches_per_epoch / gradient_accumulation).

Length, in order of precedence:
- ``max_steps`` given: that many steps; epochs = ceil(max_steps / steps_per_epoch), the last maybe partial.
- ``epochs`` given: epochs × steps_per_epoch steps.
- neither (the derived rule): **10 epochs, but at least 300 and at most 2000 steps**, in whole epochs:
  epochs = max(10, ceil(300 / steps_per_epoch)); if that exceeds 2000 steps, as many whole epochs as fit
  in 2000 (at least one); an epoch longer than 2000 steps alone is cut at 2000. Ten passes is where
  small LoRA datasets (5-50 images) usually converge at the usual learning rates (1e-4 for AdamW, rank
  4-32); the 300-step floor keeps a small set from stopping before it has learned (the embedded model's
  24-image sample subject needs ~300 steps), and the 2000-step ceiling
  keeps a 1000-image set from running for a day when a few epochs suffice. The plan says which rule it
  used (``rule``), and ``difflora check`` prints it before anyone trains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from difflora.data.batches import BucketBatchSampler, plan_examples
from difflora.data.buckets import Bucket, Crop, CropPlan, bucket_histogram, make_buckets
from difflora.data.captions import TokenCounter, rough_token_count
from difflora.data.examples import Example, ScanResult
from difflora.data.masks import MaskScan, scan_masks
from difflora.data.regularisation import Regularisation, combined, problems
from difflora.data.scan import scan_folder
from difflora.data.validation import hold_out
from difflora.errors import ConfigError, DatasetError

if TYPE_CHECKING:
    from difflora.config.train import TrainConfig
    from difflora.models.geometry import ModelGeometry

DEFAULT_EPOCHS = 10
MIN_DERIVED_STEPS = 300
MAX_DERIVED_STEPS = 2000


@dataclass(frozen=True)
class TrainingPlan:
    images: int  # usable images
    examples_per_epoch: int  # images × repeats
    batch_size: int
    gradient_accumulation: int
    batches_per_epoch: int
    steps_per_epoch: int  # optimizer steps
    epochs: int  # epochs started (the last may be partial when max_steps decides)
    max_steps: int  # optimizer steps in the whole run
    rule: str  # how max_steps was chosen, in words

    def describe(self) -> str:
        return (
            f"{self.images} images, {self.examples_per_epoch} examples per epoch (with repeats), "
            f"batch size {self.batch_size} × accumulation {self.gradient_accumulation}: "
            f"{self.steps_per_epoch} steps per epoch; {self.epochs} epoch(s), {self.max_steps} steps ({self.rule})"
        )


def make_plan(
    *,
    images: int,
    examples_per_epoch: int,
    batches_per_epoch: int,
    batch_size: int,
    gradient_accumulation: int = 1,
    max_steps: int | None = None,
    epochs: int | None = None,
) -> TrainingPlan:
    """Plan a run from the dataset's counts (see the module docstring for the rule).

    ``batches_per_epoch`` comes from ``BucketBatchSampler.batches_per_epoch`` (bucketing makes it more than
    examples / batch size when buckets hold partial batches).
    """
    if max_steps is not None and epochs is not None:
        raise ConfigError(
            "--max-steps and --epochs both given: choose one (the other is derived from the data)"
        )
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"--max-steps must be at least 1, not {max_steps}")
    if epochs is not None and epochs < 1:
        raise ConfigError(f"--epochs must be at least 1, not {epochs}")
    if batches_per_epoch < 1:
        raise ConfigError("the dataset gives no batch per epoch: lower --batch-size or turn off drop_last")
    steps_per_epoch = math.ceil(batches_per_epoch / gradient_accumulation)
    if max_steps is not None:
        total, count, rule = max_steps, math.ceil(max_steps / steps_per_epoch), "--max-steps given"
    elif epochs is not None:
        total, count, rule = epochs * steps_per_epoch, epochs, "--epochs given"
    else:
        count = max(DEFAULT_EPOCHS, math.ceil(MIN_DERIVED_STEPS / steps_per_epoch))
        if count * steps_per_epoch > MAX_DERIVED_STEPS:
            count = max(1, MAX_DERIVED_STEPS // steps_per_epoch)
        total = min(count * steps_per_epoch, MAX_DERIVED_STEPS)
        rule = (
            f"derived: {DEFAULT_EPOCHS} epochs, at least {MIN_DERIVED_STEPS} and at most "
            f"{MAX_DERIVED_STEPS} steps, whole epochs"
        )
    return TrainingPlan(
        images=images,
        examples_per_epoch=examples_per_epoch,
        batch_size=batch_size,
        gradient_accumulation=gradient_accumulation,
        batches_per_epoch=batches_per_epoch,
        steps_per_epoch=steps_per_epoch,
        epochs=count,
        max_steps=total,
        rule=rule,
    )


# ------------------------------------------------------------------------------------ the data set's plan


def masks_origin(settings: DataSettings) -> str:
    """The option the loss masks come from, as the plan and check name it."""
    return "--alpha-mask" if settings.alpha_mask else f"--masks {settings.masks}"


@dataclass(frozen=True)
class DataSettings:
    """What decides which images train, in which buckets, in which order and for how long: the data knobs
    of a TrainConfig plus the model's bucket step. `difflora check` and `difflora train` both plan from
    this (built by `from_config`), so the plan check prints is the plan training uses."""

    root: Path
    caption_extension: str
    trigger: str | None
    resolution: int
    bucket_step: int
    no_upscale: bool
    random_crop: bool
    flip: bool
    batch_size: int
    gradient_accumulation: int
    max_steps: int | None
    epochs: int | None
    seed: int
    world_size: int = 1
    validation_split: float = 0.0  # the share of the folder held out for the validation loss
    validation_dir: Path | None = None  # or a folder of held-out images
    masks: Path | None = None  # the folder of loss masks
    alpha_mask: bool = False  # or each image's alpha channel
    reg_dir: Path | None = None  # the folder of class images (--reg-dir)
    prior_weight: float = 1.0  # their loss's weight

    @classmethod
    def from_config(
        cls, config: TrainConfig, *, resolution: int, bucket_step: int, world_size: int = 1
    ) -> DataSettings:
        return cls(
            root=Path(config.data_dir),
            caption_extension=config.caption_extension,
            trigger=config.trigger,
            resolution=resolution,
            bucket_step=bucket_step,
            no_upscale=config.no_upscale,
            random_crop=config.random_crop,
            flip=config.flip,
            batch_size=config.batch_size,
            gradient_accumulation=config.gradient_accumulation,
            max_steps=config.max_steps,
            epochs=config.epochs,
            seed=config.seed,
            world_size=world_size,
            validation_split=config.validation_split,
            validation_dir=Path(config.validation_dir) if config.validation_dir else None,
            masks=Path(config.masks) if config.masks else None,
            alpha_mask=config.alpha_mask,
            reg_dir=Path(config.reg_dir) if config.reg_dir else None,
            prior_weight=config.prior_weight,
        )


@dataclass(frozen=True)
class Tokens:
    """How captions are measured: the model's token limit and counter (None: a rough estimate)."""

    max_tokens: int | None
    count: TokenCounter | None

    @classmethod
    def of(cls, geometry: ModelGeometry) -> Tokens:
        return cls(geometry.max_tokens, geometry.count_tokens)


@dataclass(frozen=True)
class DatasetPlan:
    scan: ScanResult
    crops: list[CropPlan]  # bucket and crop window per usable example
    sampler: BucketBatchSampler
    per_process_batches: int  # batches each process takes per epoch
    plan: TrainingPlan | None  # None when nothing is usable
    validation: list[Example] = field(default_factory=list)  # held out: never trained on
    validation_crops: list[CropPlan] = field(default_factory=list)  # their buckets, centre-cropped
    masks: MaskScan | None = None  # the training images' loss masks, when masks are on
    validation_masks: MaskScan | None = None  # the held-out images'
    regularisation: Regularisation | None = None  # --reg-dir's class images, drawn after the training ones
    regularisation_crops: list[CropPlan] = field(default_factory=list)
    regularisation_problems: list[str] = field(default_factory=list)  # why --reg-dir cannot be used

    @property
    def histogram(self) -> dict[Bucket, int]:
        return bucket_histogram([crop.bucket for crop in self.crops])

    @property
    def upscaled(self) -> list[tuple[Path, float]]:
        """(image, enlargement factor) for the images trained larger than they are."""
        pairs = zip(self.scan.examples, self.crops, strict=True)
        return [(example.path, crop.scale) for example, crop in pairs if crop.scale > 1.0001]


def plan_dataset(settings: DataSettings, tokens: Tokens, *, strict: bool) -> DatasetPlan:
    """Scan, bucket, batch and count the data set as `settings` say. `strict` (training) raises when the
    folder cannot be used; `difflora check` passes False and reports the problems instead."""
    try:
        buckets = make_buckets(settings.resolution, settings.bucket_step)
    except ValueError as error:
        raise ConfigError(f"--resolution: {error}") from None
    scan = _scan(settings.root, settings, tokens, strict=strict)
    scan, held = _held_out(scan, settings, tokens, strict=strict)
    examples = scan.examples
    crop: Crop = "random" if settings.random_crop else "center"
    crops = _crops(examples, buckets, settings, crop)
    regularisation, reg_problems = _regularisation(settings, tokens, examples, strict=strict)
    drawn = combined(examples, regularisation)
    reg_crops = _crops(drawn[len(examples) :], buckets, settings, crop)
    sampler = BucketBatchSampler(
        [c.bucket for c in crops + reg_crops],
        [e.repeats for e in drawn],
        settings.batch_size,
        seed=settings.seed,
        flip=settings.flip,
    )
    per_process = math.ceil(sampler.batches_per_epoch / settings.world_size)
    plan = None
    if examples:
        plan = make_plan(
            images=len(examples),
            examples_per_epoch=sum(e.repeats for e in drawn),
            batches_per_epoch=per_process,
            batch_size=settings.batch_size * settings.world_size,
            gradient_accumulation=settings.gradient_accumulation,
            max_steps=settings.max_steps,
            epochs=settings.epochs,
        )
    held_crops = _crops(held, buckets, settings, "center")
    masks, validation_masks = _masks(settings, examples, held)
    return DatasetPlan(
        scan,
        crops,
        sampler,
        per_process,
        plan,
        held,
        held_crops,
        masks,
        validation_masks,
        regularisation,
        reg_crops,
        reg_problems,
    )


def _crops(
    examples: list[Example], buckets: list[Bucket], settings: DataSettings, crop: str
) -> list[CropPlan]:
    return plan_examples(
        examples,
        buckets,
        no_upscale=settings.no_upscale,
        step=settings.bucket_step,
        crop=crop,
        seed=settings.seed,
    )


def _masks(
    settings: DataSettings, examples: list[Example], held: list[Example]
) -> tuple[MaskScan | None, MaskScan | None]:
    """The training images' masks and the held-out images' (None, None without --masks or --alpha-mask)."""
    if settings.masks is None and not settings.alpha_mask:
        return None, None
    masks = scan_masks(examples, settings.root, settings.masks, alpha=settings.alpha_mask)
    held_root = settings.validation_dir or settings.root
    return masks, scan_masks(held, held_root, settings.masks, alpha=settings.alpha_mask, required=False)


def _regularisation(
    settings: DataSettings, tokens: Tokens, examples: list[Example], *, strict: bool
) -> tuple[Regularisation | None, list[str]]:
    """--reg-dir's class images (captions as written: never the trigger), balanced against `examples`;
    and why the folder cannot be used, which `strict` planning raises."""
    folder = settings.reg_dir
    if folder is None:
        return None, []
    scan = None
    if folder.is_dir():
        class_settings = replace(settings, trigger=None)
        scan = _scan(folder, class_settings, tokens, strict=False)
    found = problems(folder, scan)
    if strict and found:
        raise DatasetError("\n".join(found))
    if scan is None or not scan.examples:
        return None, found
    draws = sum(example.repeats for example in examples)
    return Regularisation.balanced(scan, draws, settings.prior_weight), found


def _scan(root: Path, settings: DataSettings, tokens: Tokens, *, strict: bool) -> ScanResult:
    return scan_folder(
        root,
        caption_extension=settings.caption_extension,
        trigger=settings.trigger,
        max_tokens=tokens.max_tokens,
        count_tokens=tokens.count or rough_token_count,
        strict=strict,
    )


def _held_out(
    scan: ScanResult, settings: DataSettings, tokens: Tokens, *, strict: bool
) -> tuple[ScanResult, list[Example]]:
    """The scan without its held-out images (--validation-split), and the held-out images: those, or
    --validation-dir's (scanned with the training folder's caption rules)."""
    if settings.validation_dir is not None:
        return scan, _scan(settings.validation_dir, settings, tokens, strict=strict).examples
    if not settings.validation_split or not scan.examples:
        return scan, []
    training, held = hold_out(scan.examples, settings.validation_split, settings.seed)
    return replace(scan, examples=training), held
