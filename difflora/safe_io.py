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

from difflora.errors import AdapterFormatError, DiffloraError

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
    header = _check_header(path, data, len(data), AdapterFormatError)
    try:
        tensors = load_safetensors_bytes(data)
    except Exception as error:  # safetensors raises its own error type for every kind of damage
        raise AdapterFormatError(
            f"{path} is a damaged safetensors file ({error}). Re-export or re-download it."
        ) from None
    return tensors, dict(header.get("__metadata__") or {})


def read_safetensors_header(
    path: str | os.PathLike, *, error: type[DiffloraError] = AdapterFormatError
) -> dict[str, Any]:
    """The header alone ({name: {"dtype", "shape", "data_offsets"}}, metadata under "__metadata__"), read
    without touching the tensors: a 7 GB checkpoint's architecture is decided from its names and shapes.
    The same checks as `read_safetensors` (not safetensors, truncated), raised as `error`."""
    path = Path(path)
    if not path.is_file():
        raise error(f"File not found: {path}")
    with path.open("rb") as handle:
        prefix = handle.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
        head = prefix + handle.read(min(length, _MAX_HEADER_BYTES))
    return _check_header(path, head, path.stat().st_size, error)


def _check_header(path: Path, head: bytes, file_size: int, error: type[DiffloraError]) -> dict[str, Any]:
    """Parse the header from `head` (the file's first bytes, at least the header when it is whole), checking
    it against the file's real size."""
    if file_size < 8:
        raise error(f"{path} is not a safetensors file: it is only {file_size} bytes long.")
    (length,) = struct.unpack("<Q", head[:8])
    if length > _MAX_HEADER_BYTES or not head[8:9] == b"{":
        raise error(
            f"{path} is not a safetensors file (no safetensors header). Convert pickled .ckpt/.pt/.bin files "
            "to .safetensors, or pass --allow-pickle if you trust their source."
        )
    if file_size < 8 + length:
        raise error(
            f"{path} is truncated: its header announces {length} bytes but the file ends after {file_size - 8}. "
            "The download or copy was interrupted; fetch or export the file again."
        )
    try:
        header = json.loads(head[8 : 8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise error(f"{path} is not a safetensors file (its header is not JSON).") from None
    ends = [info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"]
    if ends and file_size < 8 + length + max(ends):
        raise error(
            f"{path} is truncated: its tensors need {max(ends)} bytes of data but only "
            f"{file_size - 8 - length} are present. Fetch or export the file again."
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
