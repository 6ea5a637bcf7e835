"""Reading any LoRA file: which reader handles it, decided in one place above every format.

`load_adapter(path)` reads the file safely (safetensors; pickle only when explicitly allowed) and hands the
tensors to `parse_state_dict`, which picks difflora's native layout (`native.py`), kohya / A1111 / ComfyUI
(`kohya.py`) or diffusers / PEFT (`diffusers_peft.py`). Every key is consumed or the file is refused with
the keys named: a silent partial load is the bug this package exists to prevent.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch

from difflora.adapter.types import Adapter
from difflora.errors import AdapterFormatError
from difflora.formats.diffusers_peft import peft_config_problem, read_diffusers
from difflora.formats.kohya import comfyui_to_kohya, from_kohya, is_comfyui_key, is_kohya_key
from difflora.formats.lycoris import LYCORIS_PARTS
from difflora.formats.naming import NameTable
from difflora.formats.native import is_native_layout, parse_native
from difflora.safe_io import read_pickle, read_safetensors

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
Layout = Literal["difflora", "kohya", "comfyui", "diffusers", "mixed"]


def detect_format(
    tensors: dict[str, torch.Tensor] | list[str], metadata: dict[str, str] | None = None
) -> Layout:
    """Which layout a file's keys are in: difflora's native one, kohya's, ComfyUI's `diffusion_model.`,
    diffusers/PEFT, or a mix."""
    keys = list(tensors)
    kohya = sum(is_kohya_key(key) for key in keys)
    if keys and kohya == len(keys):
        return "kohya"
    if keys and all(is_comfyui_key(key) for key in keys):
        return "comfyui"
    if kohya:
        return "mixed"
    if metadata and "difflora.format_version" in metadata and is_native_layout(dict.fromkeys(keys)):  # type: ignore[arg-type]
        return "difflora"
    return "diffusers"


def read_foreign(
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    *,
    source: str,
    tables: Sequence[NameTable] | None = None,
) -> Adapter:
    """An Adapter from a kohya, ComfyUI or diffusers/PEFT file (every key applied, or an error naming the
    rest). `tables`: the architectures to place kohya names in (default: the reference architectures)."""
    layout = detect_format(tensors, metadata)
    if layout == "kohya":
        return from_kohya(tensors, metadata, source=source, tables=tables)
    if layout == "comfyui":
        return from_kohya(comfyui_to_kohya(tensors), metadata, source=source, tables=tables)
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


def parse_state_dict(
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    *,
    source: str,
    tables: Sequence[NameTable] | None = None,
) -> Adapter:
    """The Adapter in `tensors`, whichever layout they are in (`tables`: see `read_foreign`)."""
    if not any(
        ".lora_" in key
        or "lora_" in key.split(".")[0]
        or key.endswith(_MATRIX_SUFFIXES)
        or key.rpartition(".")[2] in LYCORIS_PARTS  # a LyCORIS file in ComfyUI's layout
        for key in tensors
    ):
        raise AdapterFormatError(
            f"{source} holds no LoRA tensors ({len(tensors)} tensors, none named lora_*)."
        )
    check_tensors(tensors, source=source)
    check_metadata(metadata, source=source)
    if is_native_layout(tensors):
        return parse_native(tensors, metadata, source=source)
    return read_foreign(tensors, metadata, source=source, tables=tables)


# The names every reader takes for LoRA matrices (A/down, B/up) in any layout it reads, and for alphas.
_MATRIX_SUFFIXES = (
    "lora_A.weight",
    "lora_B.weight",
    "lora_down.weight",
    "lora_up.weight",
    "lora.down.weight",
    "lora.up.weight",
    "lora_linear_layer.down.weight",
    "lora_linear_layer.up.weight",
)


# DoRA magnitudes: peft's and diffusers' spellings, and kohya's (difflora.formats.dora).
_MAGNITUDE_SUFFIXES = (".lora_magnitude_vector", ".lora_magnitude_vector.weight", ".dora_scale")


def check_tensors(tensors: dict[str, torch.Tensor], *, source: str) -> None:
    """What every reader relies on, checked once above them all: LoRA matrices of floats with 2 (linear)
    or 4 (convolution) dimensions and a rank of at least 1, alphas that are one float, DoRA magnitudes of
    floats, all finite. Other tensors are left to the readers, which name what they are (an embedding, ...)."""
    for key, tensor in tensors.items():
        is_matrix, is_alpha = key.endswith(_MATRIX_SUFFIXES), key.endswith(".alpha")
        if not (is_matrix or is_alpha or key.endswith(_MAGNITUDE_SUFFIXES)):
            continue
        if not tensor.is_floating_point():
            raise AdapterFormatError(f"{source}: tensor {key} is {tensor.dtype}; LoRA weights are floats.")
        if is_alpha and tensor.numel() != 1:
            raise AdapterFormatError(f"{source}: {key} holds {tensor.numel()} numbers; an alpha is one.")
        if is_matrix and (tensor.ndim not in (2, 4) or tensor.numel() == 0):
            raise AdapterFormatError(
                f"{source}: tensor {key} has shape {tuple(tensor.shape)}; a LoRA matrix has 2 dimensions "
                "(4 for a convolution) and a rank of at least 1. The file is damaged; re-export it."
            )
        if not bool(torch.isfinite(tensor).all()):
            raise AdapterFormatError(
                f"{source}: tensor {key} holds NaN or infinite values; the file is damaged (or was trained "
                "into divergence). Use an earlier checkpoint or re-export it."
            )


def check_metadata(metadata: dict[str, str], *, source: str) -> None:
    """The JSON the readers parse from the header, checked for its shape before any reader indexes into it."""
    text = metadata.get("lora_adapter_metadata")
    if text:
        problem = peft_config_problem(_json(text, "lora_adapter_metadata", source))
        if problem:
            raise AdapterFormatError(f"{source}: header entry lora_adapter_metadata {problem}.")
    words = metadata.get("difflora.trigger_words")
    if words:
        value = _json(words, "difflora.trigger_words", source)
        if not isinstance(value, list) or not all(isinstance(w, str) for w in value):
            raise AdapterFormatError(f"{source}: header entry difflora.trigger_words is not a list of words.")


def _json(text: str, key: str, source: str) -> object:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise AdapterFormatError(
            f"{source}: header entry {key} is not valid JSON; the file is damaged."
        ) from None
