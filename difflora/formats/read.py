"""Reading any LoRA file: which reader handles it, decided in one place above every format.

`load_adapter(path)` reads the file safely (safetensors; pickle only when explicitly allowed) and hands the
tensors to `parse_state_dict`, which picks difflora's native layout (`native.py`), kohya / A1111 / ComfyUI
(`kohya.py`) or diffusers / PEFT (`diffusers_peft.py`). Every key is consumed or the file is refused with
the keys named: a silent partial load is the bug this package exists to prevent.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch

from difflora.adapter.types import Adapter
from difflora.errors import AdapterFormatError
from difflora.formats.diffusers_peft import read_diffusers
from difflora.formats.kohya import from_kohya, is_kohya_key
from difflora.formats.native import is_native_layout, parse_native
from difflora.safe_io import read_pickle, read_safetensors

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
Layout = Literal["difflora", "kohya", "diffusers", "mixed"]


def detect_format(
    tensors: dict[str, torch.Tensor] | list[str], metadata: dict[str, str] | None = None
) -> Layout:
    """Which layout a file's keys are in: difflora's native one, kohya's, diffusers/PEFT, or a mix."""
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


def load_adapter(path: str | os.PathLike, *, allow_pickle: bool = False) -> Adapter:
    """Load any LoRA file difflora understands (its own, diffusers/PEFT, kohya/A1111/ComfyUI) as an Adapter."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise AdapterFormatError(
                f"{path.name} is a pickled file, and unpickling can run arbitrary code. Convert it to "
                ".safetensors, or pass --allow-pickle (allow_pickle=True) if you trust its source."
            )
        tensors, metadata = read_pickle(path)
    else:
        tensors, metadata = read_safetensors(path)
    adapter = parse_state_dict(tensors, metadata, source=str(path))
    if not adapter.meta.name:
        adapter.meta.name = path.stem
    return adapter


def parse_state_dict(tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, source: str) -> Adapter:
    """The Adapter in `tensors`, whichever layout they are in."""
    if not any(".lora_" in key or "lora_" in key.split(".")[0] for key in tensors):
        raise AdapterFormatError(
            f"{source} holds no LoRA tensors ({len(tensors)} tensors, none named lora_*)."
        )
    if is_native_layout(tensors):
        return parse_native(tensors, metadata, source=source)
    return read_foreign(tensors, metadata, source=source)
