"""Image files -> RGB images as the trainer sees them, or a reason why a file cannot be used.

``decode_image`` reads every byte (so truncated files are found at scan time, not mid-training), applies the
EXIF orientation, composites RGBA / LA / palette transparency on white, converts CMYK (through its ICC
profile when it has one), 16-bit and grayscale to 8-bit RGB, and refuses decompression bombs. Each
conversion is returned as a note so ``difflora check`` can say what it did.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from difflora.errors import DatasetError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold (about 0.25 GB of RGB)


class ImageRejected(Exception):
    """An image file that cannot be used; the message is the reason shown to the user."""


def decode_image(data: bytes, *, max_pixels: int = MAX_PIXELS) -> tuple[Image.Image, list[str]]:
    """Bytes -> RGB image (EXIF-rotated, composited on white) and the conversions applied.

    Raises ImageRejected with a reason for anything that cannot be used.
    """
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageRejected(
                    f"decompression bomb: {width}x{height} is over {max_pixels:,} pixels; resize it first"
                )
            image.load()  # decodes every byte: this is what finds truncated and corrupt files
    except ImageRejected:
        raise
    except UnidentifiedImageError:
        raise ImageRejected("not an image, or a format Pillow cannot read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(f"decompression bomb: {exc}") from None
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, EOFError... on bad data
        reason = "truncated" if "truncated" in str(exc).lower() else "corrupt"
        raise ImageRejected(f"{reason}: {type(exc).__name__}: {exc}") from None
    if image.size[0] < 1 or image.size[1] < 1:
        raise ImageRejected("image has no pixels")
    return _normalise(image)


def _normalise(image: Image.Image) -> tuple[Image.Image, list[str]]:
    notes: list[str] = []
    orientation = image.getexif().get(0x0112, 1)
    if orientation not in (None, 1):
        image = ImageOps.exif_transpose(image)
        notes.append(f"EXIF orientation {orientation} applied")
    mode = image.mode
    if mode.startswith("I"):  # 16-bit (I;16*) or 32-bit integer grey: scale, don't clip at 255
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(values / 257.0 + 0.5, 0, 255).astype(np.uint8), "L")
        notes.append("16-bit converted to 8-bit")
        mode = "L"
    elif mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if values.max(initial=0) <= 1.0 else 1.0
        image = Image.fromarray(np.clip(values * scale, 0, 255).astype(np.uint8), "L")
        mode = "L"
    if mode == "CMYK":
        notes.append("CMYK converted to RGB")
        return _cmyk_to_rgb(image), notes
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] < 255:
            notes.append("transparency composited on white")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), notes
    if mode in ("L", "1"):
        notes.append("grayscale converted to RGB")
    return (image if mode == "RGB" else image.convert("RGB")), notes


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    """Use the embedded ICC profile when there is one (print CMYK looks wrong converted naively)."""
    profile = image.info.get("icc_profile")
    if profile:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            converted = ImageCms.profileToProfile(
                image, source, ImageCms.createProfile("sRGB"), outputMode="RGB"
            )
            if converted is not None:
                return converted
        except Exception as exc:  # a broken profile is not worth losing the image over
            logger.debug("ICC conversion failed (%s); converting CMYK naively", exc)
    return image.convert("RGB")


def load_image(path: Path, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Load one image as the trainer sees it: RGB, EXIF-rotated, transparency composited on white.

    Raises DatasetError naming the file when it cannot be used.
    """
    try:
        return decode_image(Path(path).read_bytes(), max_pixels=max_pixels)[0]
    except (ImageRejected, OSError) as exc:
        raise DatasetError(f"{path}: {exc}") from None
