"""--reg-dir: class images (DreamBooth's regularisation images) interleaved with the training set.

The class images join the training images as examples of their own, in their own aspect-ratio buckets, and
are drawn, batched and cached exactly like them (so a resumed run draws the same class images at the same
steps). Balance: an epoch draws as many class images as training images (images x repeats): with T training
draws and R class images, each class image is repeated T div R times and the first T mod R (in scan order)
once more (R > T: only the first T are drawn, as kohya's sd-scripts does). A class image's folder prefix
(`N_name`) is therefore ignored.

Loss: each sample's loss is weighted by 1 (a training image) or --prior-weight W (a class image) and the
batch takes the mean, as kohya's sd-scripts does (its per-sample `loss_weights`); over a batch this is the
instance loss plus W times the class images' loss. diffusers' DreamBooth script instead pairs every
instance image with a class image in the same batch and chunks the prediction in two; that needs both at
one resolution, which buckets do not give.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from difflora.data.examples import Example, ScanResult


def balanced_repeats(training_draws: int, count: int) -> list[int]:
    """Repeats of `count` class images so that an epoch draws exactly `training_draws` of them."""
    whole, extra = divmod(training_draws, count)
    return [whole + (1 if index < extra else 0) for index in range(count)]


@dataclass(frozen=True)
class Regularisation:
    """The class images of a run, with their balanced repeats, and the weight of their loss."""

    scan: ScanResult  # the --reg-dir folder as scanned (its examples keep their folders' repeats)
    examples: list[Example]  # the usable class images, repeats balanced against the training set
    training_draws: int  # training images x repeats per epoch
    weight: float  # --prior-weight

    @classmethod
    def balanced(cls, scan: ScanResult, training_draws: int, weight: float) -> Regularisation:
        repeats = balanced_repeats(training_draws, len(scan.examples)) if scan.examples else []
        examples = [replace(e, repeats=r) for e, r in zip(scan.examples, repeats, strict=True)]
        return cls(scan, examples, training_draws, weight)

    @property
    def draws(self) -> int:
        return sum(example.repeats for example in self.examples)

    def loss_weights(self, training_images: int) -> list[float]:
        """Each example's loss weight, the training images' (1) first, then the class images' (W)."""
        return [1.0] * training_images + [self.weight] * len(self.examples)

    def describe(self) -> str:
        """'12 class images, repeated 2x to match 24 training images, prior weight 1.0'."""
        repeats = sorted({example.repeats for example in self.examples})
        times = f"{repeats[0]}x" if len(repeats) == 1 else f"{repeats[0]}-{repeats[-1]}x"
        unused = sum(1 for example in self.examples if not example.repeats)
        tail = f" ({unused} not drawn: more class images than training images)" if unused else ""
        return (
            f"{len(self.examples)} class images, repeated {times} to match {self.training_draws} "
            f"training images, prior weight {float(self.weight)!r}{tail}"
        )


def problems(reg_dir: Path, scan: ScanResult | None) -> list[str]:
    """Why the class-image folder cannot be used, one line each (none: it can)."""
    if scan is None:
        return [f"--reg-dir {reg_dir}: no such folder; give the folder of class images and their captions"]
    found = [f"--reg-dir: {error}" for error in scan.errors if scan.examples]
    if not scan.examples:
        found.append(
            f"--reg-dir {reg_dir}: no usable class image in it; add class images with captions, "
            "or leave --reg-dir out"
        )
    return found


def combined(training: Sequence[Example], regularisation: Regularisation | None) -> list[Example]:
    """The examples a run draws from: the training images, then the class images."""
    return [*training, *(regularisation.examples if regularisation is not None else [])]
