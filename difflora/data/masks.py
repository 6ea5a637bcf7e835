"""Loss masks: which pixels of a training image the loss learns from (white learns, black does not).

`--masks DIR` pairs each image with the grayscale image of the same name (its path relative to the training
folder, any image extension: `sub/cat.png` takes `DIR/sub/cat.*`, or `DIR/cat.*` when the folder has no
subfolders for it); `--alpha-mask` takes the image's own alpha channel (an opaque image learns everywhere).
A mask is the image's size, or the same shape at another size (it is resized to the image's): a mask of
another shape cannot be placed and is refused. An image without a mask learns everywhere; `difflora check`
and the plan say how many have one and how much of each they cover.

A mask goes through the image's own resize, crop and flip, then to the latent grid by area (each latent
pixel gets the mean of the pixels it encodes), and is cached with the image's latents: its file's content
is in the entry's key and the mask in the entry's checksum.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from difflora.data.buckets import CropPlan, render_pixels
from difflora.data.examples import Example
from difflora.data.images import IMAGE_EXTENSIONS
from difflora.errors import DatasetError

ASPECT_TOLERANCE = 0.01  # a mask saved at another size keeps the image's shape to within 1%


@dataclass(frozen=True)
class MaskSource:
    """Where one image's mask comes from: a mask file, or the image's own alpha channel."""

    path: Path
    alpha: bool
    content_hash: str  # of the mask file (the image's own hash for its alpha)


@dataclass
class MaskScan:
    """Masks matched to the examples, and what could not be matched."""

    sources: list[MaskSource | None]  # one per example, None: no mask (the image learns everywhere)
    orphans: list[Path] = field(default_factory=list)  # mask files that match no image
    misshapen: list[str] = field(default_factory=list)  # "mask.png is 10x20, its image 40x40"
    coverage: list[float] = field(default_factory=list)  # per matched mask: its mean value

    def describe(self, origin: str) -> str:
        """The plan's line: 'masks: 40 of 40 images (--masks DIR), mean coverage 31%'."""
        found = sum(source is not None for source in self.sources)
        mean = f", mean coverage {100 * float(np.mean(self.coverage)):.0f}%" if self.coverage else ""
        return f"masks: {found} of {len(self.sources)} images ({origin}){mean}"


def scan_masks(
    examples: Sequence[Example], root: Path, folder: Path | None, *, alpha: bool, required: bool = True
) -> MaskScan:
    """The mask of each example (by `folder`, or each image's alpha), with the problems `check` lists.
    `required`: a folder matching no image at all is refused (a wrong folder, not a choice)."""
    if alpha:
        sources = [MaskSource(e.path, True, e.content_hash) if _has_alpha(e.path) else None for e in examples]
        scan = MaskScan(sources)
    else:
        assert folder is not None
        if not folder.is_dir():
            raise DatasetError(f"--masks {folder}: no such folder; give the folder of the masks")
        files = _mask_files(folder)
        matched = [_match(example, root, folder, files) for example in examples]
        used = {source.path for source in matched if source is not None}
        scan = MaskScan(matched, orphans=sorted(set(files.values()) - used))
    for example, source in zip(examples, scan.sources, strict=True):
        if source is not None:
            _measure(example, source, scan)
    if required and not alpha and not any(scan.sources):
        raise DatasetError(
            f"--masks {folder}: no mask matches an image of {root} (a mask has its image's file name, any "
            "image extension); check the folder"
        )
    return scan


def _mask_files(folder: Path) -> dict[str, Path]:
    """Mask files by their path relative to `folder`, without extension ('sub/cat')."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            found[path.relative_to(folder).with_suffix("").as_posix()] = path
    return found


def _match(example: Example, root: Path, folder: Path, files: dict[str, Path]) -> MaskSource | None:
    relative = example.path.relative_to(root).with_suffix("").as_posix()
    path = files.get(relative) or files.get(example.path.stem)
    if path is None:
        return None
    return MaskSource(path, False, hashlib.sha256(path.read_bytes()).hexdigest())


def _has_alpha(path: Path) -> bool:
    with Image.open(path) as image:
        return image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info


def _measure(example: Example, source: MaskSource, scan: MaskScan) -> None:
    try:
        scan.coverage.append(
            float(np.asarray(mask_image(source, example.size), dtype=np.float32).mean() / 255)
        )
    except DatasetError as error:
        scan.misshapen.append(str(error))


def mask_image(source: MaskSource, size: tuple[int, int]) -> Image.Image:
    """The mask as an 8-bit grayscale image of the image's `size` (width, height), EXIF-rotated as the
    image is. Raises DatasetError for a mask of another shape."""
    with Image.open(source.path) as opened:
        image = ImageOps.exif_transpose(opened)
        mask = image.convert("RGBA").getchannel("A") if source.alpha else image.convert("L")
    if mask.size == size:
        return mask
    if abs(mask.size[0] / mask.size[1] - size[0] / size[1]) > ASPECT_TOLERANCE * size[0] / size[1]:
        raise DatasetError(
            f"{source.path}: the mask is {mask.size[0]}x{mask.size[1]} but its image is {size[0]}x{size[1]}; "
            "save it at the image's size"
        )
    return mask.resize(size, Image.Resampling.BOX)


def render_mask(
    mask: Image.Image, plan: CropPlan, *, flip: bool, grid: tuple[int, int] | None
) -> torch.Tensor:
    """[1, h, w] in [0, 1]: the mask resized, cropped and flipped as its image is (render_pixels), then
    averaged down to the latent `grid` (h, w) by area; None keeps the pixel grid."""
    pixels = render_pixels(mask, plan, flip=flip)[:1]  # grey: the three channels are equal
    values = ((pixels + 1.0) / 2.0).clamp(0.0, 1.0)
    if grid is None or tuple(values.shape[-2:]) == tuple(grid):
        return values
    return F.interpolate(values[None], size=grid, mode="area")[0]
