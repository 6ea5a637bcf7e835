"""Regenerate difflora/formats/golden/*.txt: the kohya module names difflora exports for an attention-only
adapter (difflora's default targets on the UNet and every text encoder) of SD1.5, SD2.1 and SDXL.

The names come from the real architectures built on the meta device (no weights, no hub). Run after a
deliberate naming change and review the diff:  python scripts/make_golden_keys.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from difflora.formats.kohya import to_kohya
from difflora.models.families import checkpoint_families
from tests.support.formats import synthetic_adapter

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "difflora" / "formats" / "golden"


def main() -> None:
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    for family in (f.name for f in checkpoint_families()):
        tensors, _ = to_kohya(synthetic_adapter(family, rank=1))
        names = sorted({key.split(".")[0] for key in tensors})
        path = GOLDEN_DIR / f"{family}_attention.txt"
        path.write_text("\n".join(names) + "\n")
        print(f"{path}: {len(names)} modules")


if __name__ == "__main__":
    main()
