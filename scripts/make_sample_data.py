"""Regenerate sample_data/: two small LoRA training sets of concepts the embedded model never saw.

  sample_data/style/    horizontal dark stripes (period 8 px) over the base's shapes, on white or
                        gray; captions end in ", zebrastripes style". Signature: stripe energy.
  sample_data/subject/  a plus-shaped cross in the base's colours and backgrounds; captions
                        "a red crossglyph on a white background". Signature: cross score.

Each folder holds N PNG images and same-stem .txt captions, drawn by difflora.embedded.shapes from a
fixed seed, so this script reproduces the committed files pixel for pixel:

    python scripts/make_sample_data.py
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from difflora.embedded import shapes  # noqa: E402

SETS = {"style": (shapes.style_batch, 101), "subject": (shapes.subject_batch, 202)}


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name)
    os.close(fd)
    write(tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def write_set(folder: Path, make, seed: int, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for old in [*folder.glob("*.png"), *folder.glob("*.txt")]:
        old.unlink()  # a smaller N must not leave stale pairs behind
    images, captions = make(seed, n)
    for i, (img, cap) in enumerate(zip(images, captions, strict=True)):
        stem = folder / f"{folder.name}_{i:03d}"
        _atomic(stem.with_suffix(".png"), lambda p, im=img: Image.fromarray(im).save(p, format="PNG"))
        _atomic(stem.with_suffix(".txt"), lambda p, c=cap: Path(p).write_text(c + "\n"))
    print(f"{folder}: {n} images, e.g. {captions[0]!r}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "sample_data")
    parser.add_argument("-n", type=int, default=24, help="images per folder")
    args = parser.parse_args()
    for name, (make, seed) in SETS.items():
        write_set(args.out / name, make, seed, args.n)


if __name__ == "__main__":
    main()
