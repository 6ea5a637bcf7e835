"""A new dataset folder under --data-root from uploaded images and captions, all or nothing: every image
is decoded and checked with PIL, names are reduced to safe ones, the folder is built under a temporary
name and renamed into place only once complete. The request's size is bounded by --max-body-kb (the
server's body limit); the image count and each image's pixels have their own bounds here."""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import shutil
import uuid
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict

from difflora.webui.paths import ConflictError, WebUIError, checked_name, confined

MAX_FILES = 500
MAX_PIXELS = 4096 * 4096  # a decompression bomb is refused before it is decoded
FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}


class UploadedImage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str  # the file's name on the client's machine; only a safe stem of it is kept
    data: str  # the file's bytes, base64
    caption: str = ""


class UploadBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    files: list[UploadedImage]


def safe_stem(name: str) -> str:
    """The file name's stem with anything but letters, digits, '-' and '_' replaced by '_' (at most 64)."""
    stem = Path(name.replace("\\", "/")).stem
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem)[:64] or "image"


def image_bytes(item: UploadedImage) -> tuple[bytes, str]:
    """The decoded image and its file extension, or WebUIError naming the file."""
    try:
        data = base64.b64decode(item.data, validate=True)
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            kind = image.format
            if width * height > MAX_PIXELS:
                raise WebUIError(f"{item.name}: {width}x{height} is over {MAX_PIXELS} pixels; resize it.")
            image.verify()
    except (binascii.Error, ValueError):
        raise WebUIError(f"{item.name}: 'data' is not base64.") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise WebUIError(f"{item.name}: not a readable image ({error}).") from None
    if kind not in FORMATS:
        raise WebUIError(f"{item.name}: {kind} images are not accepted; send PNG, JPEG or WebP.")
    return data, FORMATS[kind]


def create_dataset(root: Path, body: UploadBody) -> Path:
    """The folder `root/<name>` holding the images and their .txt captions; refused if it exists."""
    checked_name(body.name, what="dataset name")
    target = confined(root, body.name, what="dataset")
    if target.exists():
        raise ConflictError(f"A dataset {body.name!r} exists already: choose another name.")
    if not body.files or len(body.files) > MAX_FILES:
        raise WebUIError(f"Send between 1 and {MAX_FILES} images, got {len(body.files)}.")
    decoded = [(safe_stem(item.name), item.caption, *image_bytes(item)) for item in body.files]
    stems = [stem for stem, *_ in decoded]
    repeated = sorted({stem for stem in stems if stems.count(stem) > 1})
    if repeated:
        raise WebUIError(f"Several images would be named {', '.join(repeated)}: rename them.")
    staging = root / f".{body.name}.{uuid.uuid4().hex}.tmp"
    staging.mkdir()
    try:
        for stem, caption, data, suffix in decoded:
            (staging / f"{stem}{suffix}").write_bytes(data)
            if caption.strip():
                (staging / f"{stem}.txt").write_text(caption.strip() + "\n", encoding="utf-8")
        os.rename(staging, target)  # one step: the dataset is whole or absent
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
