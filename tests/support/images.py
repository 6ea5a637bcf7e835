"""Messy image folders built at test time with PIL (no binary fixtures in the repository).

``make_messy_folder(root)`` writes a kohya-style folder with every kind of file users have, and returns
what a correct scan must conclude about each file, so tests compare the scan against this independent list.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

RED, BLUE = (255, 0, 0), (0, 0, 255)


@dataclass
class Expected:
    usable: dict[str, tuple[int, int]] = field(default_factory=dict)  # relative path -> (w, h) after EXIF
    skipped: dict[str, str] = field(default_factory=dict)  # relative path -> word the reason must contain
    captions: dict[str, str] = field(default_factory=dict)  # relative path -> final caption (no trigger)
    missing: set[str] = field(default_factory=set)  # images whose caption is missing or empty


def noise_rgb(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A PNG whose header claims a huge canvas (a decompression bomb) with almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def half_and_half(size: tuple[int, int], left, right, mode: str = "RGB") -> Image.Image:
    image = Image.new(mode, size, left)
    image.paste(Image.new(mode, (size[0] - size[0] // 2, size[1]), right), (size[0] // 2, 0))
    return image


def exif_rotated_jpeg() -> bytes:
    """80x40 stored (red left, blue right), EXIF orientation 6: shown 40x80, red on top."""
    image = half_and_half((80, 40), RED, BLUE)
    exif = image.getexif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def save(image: Image.Image, path: Path, fmt: str | None = None, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt, **kwargs)


def make_messy_folder(root: Path) -> Expected:
    expected = Expected()
    dog, plain, meta = root / "10_dog", root / "plain", root / "2_meta"

    save(noise_rgb((64, 48)), dog / "rgb.png")
    (dog / "rgb.txt").write_text("a dog, red collar, grass", encoding="utf-8")
    expected.usable["10_dog/rgb.png"] = (64, 48)
    expected.captions["10_dog/rgb.png"] = "a dog, red collar, grass"

    (dog / "rotated.jpg").write_bytes(exif_rotated_jpeg())
    (dog / "rotated.txt").write_text("rotated dog", encoding="utf-8")
    expected.usable["10_dog/rotated.jpg"] = (40, 80)
    expected.captions["10_dog/rotated.jpg"] = "rotated dog"

    save(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), dog / "cmyk.jpg", quality=95)
    (dog / "cmyk.txt").write_bytes("\ufeffcafé dog,  bom\ncaption".encode())  # UTF-8 with BOM, two lines
    expected.usable["10_dog/cmyk.jpg"] = (32, 32)
    expected.captions["10_dog/cmyk.jpg"] = "café dog, bom caption"

    gradient = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)
    save(Image.fromarray(gradient), dog / "gray16.png")
    (dog / "gray16.txt").write_bytes("naïve dog, résumé".encode("latin-1"))
    expected.usable["10_dog/gray16.png"] = (32, 32)
    expected.captions["10_dog/gray16.png"] = "naïve dog, résumé"

    save(half_and_half((32, 16), (0, 0, 255, 255), (0, 0, 0, 0), "RGBA"), dog / "rgba.png")  # no caption
    expected.usable["10_dog/rgba.png"] = (32, 16)
    expected.missing.add("10_dog/rgba.png")

    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(0, (0, 0, 8, 16))
    save(palette, dog / "palette.gif", transparency=0)
    (dog / "palette.txt").write_text("   \n", encoding="utf-8")  # empty caption
    expected.usable["10_dog/palette.gif"] = (16, 16)
    expected.missing.add("10_dog/palette.gif")

    frames = [Image.new("RGB", (24, 24), RED), Image.new("RGB", (24, 24), BLUE)]
    save(frames[0], dog / "nested" / "ANIM.GIF", save_all=True, append_images=frames[1:])
    (dog / "nested" / "ANIM.caption").write_text("animated", encoding="utf-8")
    expected.usable["10_dog/nested/ANIM.GIF"] = (24, 24)
    expected.captions["10_dog/nested/ANIM.GIF"] = "animated"

    save(Image.new("LA", (20, 10), (128, 255)), dog / "gray_alpha.PNG")
    save(noise_rgb((30, 20), 1), dog / "photo.BMP")
    save(noise_rgb((30, 30), 2), dog / "photo2.WebP")
    for name, size in (("gray_alpha.PNG", (20, 10)), ("photo.BMP", (30, 20)), ("photo2.WebP", (30, 30))):
        (dog / name).with_suffix(".txt").write_text(f"file {name}", encoding="utf-8")
        expected.usable[f"10_dog/{name}"] = size
        expected.captions[f"10_dog/{name}"] = f"file {name}"

    # A folder without an N_ prefix: used with 1 repeat (and a warning), its bad files reported.
    save(noise_rgb((40, 40), 3), plain / "ok.jpg", quality=90)
    (plain / "ok.txt").write_text("plain ok", encoding="utf-8")
    expected.usable["plain/ok.jpg"] = (40, 40)
    expected.captions["plain/ok.jpg"] = "plain ok"
    (plain / "dup.png").write_bytes((dog / "rgb.png").read_bytes())
    (plain / "dup.txt").write_text("duplicate", encoding="utf-8")
    expected.usable["plain/dup.png"] = (64, 48)
    expected.captions["plain/dup.png"] = "duplicate"

    (plain / "corrupt.png").write_bytes(b"this is not a png at all" * 10)
    expected.skipped["plain/corrupt.png"] = "not an image"
    buffer = io.BytesIO()
    noise_rgb((64, 64), 4).save(buffer, "JPEG", quality=90)
    (plain / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    expected.skipped["plain/truncated.jpg"] = "truncated"
    (plain / "empty.png").write_bytes(b"")
    expected.skipped["plain/empty.png"] = "empty"
    (plain / "bomb.png").write_bytes(png_bomb())
    expected.skipped["plain/bomb.png"] = "decompression bomb"

    # Ignored: hidden files and folders, non-image files; reported: a caption with no image.
    save(noise_rgb((8, 8)), plain / ".hidden.png")
    save(noise_rgb((8, 8)), plain / ".thumbs" / "x.png")
    (plain / "notes.md").write_text("not an image", encoding="utf-8")
    (plain / "orphan.txt").write_text("no image for me", encoding="utf-8")

    # Hugging Face imagefolder captions.
    save(noise_rgb((48, 32), 5), meta / "m1.png")
    save(noise_rgb((32, 48), 6), meta / "sub" / "m2.png")
    rows = [
        '{"file_name": "m1.png", "text": "from jsonl"}',
        '{"file_name": "sub/m2.png", "text": "nested row"}',
    ]
    (meta / "metadata.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    expected.usable |= {"2_meta/m1.png": (48, 32), "2_meta/sub/m2.png": (32, 48)}
    expected.captions |= {"2_meta/m1.png": "from jsonl", "2_meta/sub/m2.png": "nested row"}
    return expected


def make_simple_folder(root: Path, count: int = 4, size: tuple[int, int] = (32, 32)) -> list[Path]:
    """``count`` distinct noise images with .txt captions ``image i, tag a, tag b``."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = root / f"img{index}.png"
        noise_rgb(size, 100 + index).save(path)
        path.with_suffix(".txt").write_text(f"image {index}, tag a, tag b", encoding="utf-8")
        paths.append(path)
    return paths


def read_png_parameters(path: str | os.PathLike) -> str:
    """The `parameters` text chunk of a PNG ("" when absent): what A1111 and ComfyUI read back."""
    with Image.open(path) as img:
        return str(img.info.get("parameters", ""))
