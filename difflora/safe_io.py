"""Safe file primitives every writer and reader of tensors uses: atomic writes, and safetensors reading
with a precise message for each way a file can be bad (missing, not safetensors, truncated, damaged).
Pickled files are read only when the caller explicitly allowed it, and then tensors only."""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes

from difflora.errors import AdapterFormatError

_MAX_HEADER_BYTES = 100 * 1024 * 1024


def write_atomic(path: Path, payload: bytes) -> Path:
    """Write bytes to a temporary file beside `path`, flush to disk, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(payload)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a safetensors file, with a precise message for each way it can be bad."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFormatError(f"Adapter file not found: {path}")
    data = path.read_bytes()
    header = _parse_header(path, data)
    try:
        tensors = load_safetensors_bytes(data)
    except Exception as error:  # safetensors raises its own error type for every kind of damage
        raise AdapterFormatError(
            f"{path} is a damaged safetensors file ({error}). Re-export or re-download it."
        ) from None
    return tensors, dict(header.get("__metadata__") or {})


def _parse_header(path: Path, data: bytes) -> dict[str, Any]:
    if len(data) < 8:
        raise AdapterFormatError(f"{path} is not a safetensors file: it is only {len(data)} bytes long.")
    (length,) = struct.unpack("<Q", data[:8])
    if length > _MAX_HEADER_BYTES or not data[8:9] == b"{":
        raise AdapterFormatError(
            f"{path} is not a safetensors file (no safetensors header). LoRA files must be .safetensors; "
            "convert pickled .ckpt/.pt/.bin files, or pass --allow-pickle if you trust their source."
        )
    if len(data) < 8 + length:
        raise AdapterFormatError(
            f"{path} is truncated: its header announces {length} bytes but the file ends after {len(data) - 8}. "
            "The download or copy was interrupted; fetch or export the file again."
        )
    try:
        header = json.loads(data[8 : 8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AdapterFormatError(f"{path} is not a safetensors file (its header is not JSON).") from None
    ends = [info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"]
    if ends and len(data) < 8 + length + max(ends):
        raise AdapterFormatError(
            f"{path} is truncated: its tensors need {max(ends)} bytes of data but only "
            f"{len(data) - 8 - length} are present. Fetch or export the file again."
        )
    return header


def read_pickle(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a pickled state dict; only reached when the user explicitly allowed pickle. Still restricted to
    tensors (weights_only) so a malicious file cannot run code through torch's unpickler."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise AdapterFormatError(f"{path} does not hold a state dict of tensors.")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, {}
