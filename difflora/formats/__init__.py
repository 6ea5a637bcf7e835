"""Foreign LoRA formats: the only place that knows other tools' key names.

- `read_foreign(tensors, metadata, source=...)` turns any non-native LoRA file difflora can apply into an
  Adapter (`difflora.adapter.load_adapter` delegates here): kohya / A1111 / ComfyUI files (`kohya.py`),
  diffusers and PEFT layouts (`diffusers_formats.py`). Every key is consumed or the file is refused with
  the keys named; a silent partial load is the bug this package exists to prevent.
- `naming.py` is the one table between difflora's module names and kohya's, built from live module trees
  (`reference.py`: SD1.5, SD2.1, SDXL and the embedded model on the meta device).
- `kohya.to_kohya` writes the ComfyUI/A1111/Forge/diffusers-compatible export; `compat.py` says, for any
  file, which keys ComfyUI, A1111/Forge and diffusers would load.
"""

from __future__ import annotations

from typing import Literal

import torch

from difflora.adapter import Adapter
from difflora.errors import AdapterFormatError

Layout = Literal["difflora", "kohya", "diffusers", "mixed"]


def detect_format(
    tensors: dict[str, torch.Tensor] | list[str], metadata: dict[str, str] | None = None
) -> Layout:
    """Which layout a file's keys are in: difflora's native one, kohya's, diffusers/PEFT, or a mix."""
    from difflora.adapter import is_native_layout
    from difflora.formats.kohya import is_kohya_key

    keys = list(tensors)
    kohya = sum(is_kohya_key(key) for key in keys)
    if keys and kohya == len(keys):
        return "kohya"
    if kohya:
        return "mixed"
    if metadata and "difflora.format_version" in metadata and is_native_layout(dict.fromkeys(keys)):  # type: ignore[arg-type]
        return "difflora"
    return "diffusers"


def read_foreign(tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, source: str) -> Adapter:
    """An Adapter from a kohya or diffusers/PEFT file (every key applied, or an error naming the rest)."""
    from difflora.formats.diffusers_formats import read_diffusers
    from difflora.formats.kohya import from_kohya, is_kohya_key

    layout = detect_format(tensors, metadata)
    if layout == "kohya":
        return from_kohya(tensors, metadata, source=source)
    if layout == "mixed":
        kohya = sorted(key for key in tensors if is_kohya_key(key))
        other = sorted(key for key in tensors if not is_kohya_key(key))
        raise AdapterFormatError(
            f"{source} mixes kohya keys ({kohya[0]}, ...) with other keys ({other[0]}, ...; {len(other)} in "
            "all). No consumer loads such a file completely (diffusers refuses it, ComfyUI drops keys); "
            "re-export it in one layout."
        )
    return read_diffusers(tensors, metadata, source=source)
