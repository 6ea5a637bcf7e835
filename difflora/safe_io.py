"""Safe file primitives every writer and reader of tensors uses: atomic writes, and safetensors reading
with a precise message for each way a file can be bad (missing, not safetensors, truncated, damaged).
Pickled files are read only when the caller explicitly allowed it, and then tensors only."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes

from difflora.errors import AdapterFormatError, DiffloraError, DiskFullError
from difflora.faults import fault_point

_MAX_HEADER_BYTES = 100 * 1024 * 1024
# ENOSPC: the disk is full; EDQUOT: the user's quota is (the same advice applies)
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def write_atomic(path: Path, payload: bytes, *, fault: str = "atomic-write", durable: bool = True) -> Path:
    """Write bytes to a temporary file beside `path`, flush it to disk, then rename it over `path`: a reader
    (or a process killed at any instant) sees the old file or the new one, never a mix. The temporary file
    (`.<name>.<random>.tmp`) is removed when the write fails, and no reader ever takes it for `path`.

    A full disk raises DiskFullError naming the file and the space it needed. `durable=False` skips the
    fsync, for files that verify themselves when read (cache entries carry a checksum). `fault` names the
    test fault point of this write (difflora.faults)."""
    temporary: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            _write_all(handle, payload)
            fault_point(fault)  # the most fragile instant: new bytes complete, old file not yet replaced
            if durable:
                os.fsync(handle)
        finally:
            os.close(handle)
        os.replace(temporary, path)
    except BaseException as error:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        if is_disk_full(error):
            raise disk_full_error(path, len(payload)) from None
        raise
    return path


def write_file(path: Path, payload: bytes) -> None:
    """Write and fsync a new file in place (not atomic: for files inside a folder that is itself renamed
    into place, such as a checkpoint's). Through os.write, so a full disk is an OSError here too."""
    handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o666)
    try:
        _write_all(handle, payload)
        os.fsync(handle)
    finally:
        os.close(handle)


def _write_all(handle: int, payload: bytes) -> None:
    """os.write until every byte is out (a write may take fewer bytes than given)."""
    view = memoryview(payload)
    while view:
        written = os.write(handle, view)
        view = view[written:]


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in _DISK_FULL


def disk_full_error(
    path: Path, needed: int, *, what: str | None = None, kept: str | None = None
) -> DiskFullError:
    """The message for a write that ran out of space: which file, how much it needed, what is still intact."""
    free = _free_space(path.parent)
    free_text = f", {format_bytes(free)} free there" if free is not None else ""
    kept = kept or (
        f"the previous {path.name} is intact" if path.exists() else f"no partial {path.name} was left"
    )
    return DiskFullError(
        f"The disk is full: could not write {what or path} ({format_bytes(needed)} needed{free_text}); "
        f"{kept}. Free some space (or write to another disk) and run the command again."
    )


def interrupted_write_message(output: Path, *, existed: bool) -> str:
    """What a Ctrl-C during a one-file command (export, merge) leaves: never a partial file."""
    kept = f"the existing {output.name} is unchanged" if existed else "no partial file was left"
    return f"Interrupted before {output} was written: {kept}."


def _free_space(directory: Path) -> int | None:
    for candidate in (directory, *directory.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def format_bytes(size: int) -> str:
    """1536 -> "1.5 KiB": sizes in messages, readable at a glance."""
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{size} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


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
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise error(f"{path} is not a safetensors file (its header is not JSON).") from None
    problem = _header_problem(header)
    if problem:
        raise error(f"{path} is a damaged safetensors file: {problem}. Re-export or re-download it.")
    ends = [info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"]
    if ends and file_size < 8 + length + max(ends):
        raise error(
            f"{path} is truncated: its tensors need {max(ends)} bytes of data but only "
            f"{file_size - 8 - length} are present. Fetch or export the file again."
        )
    return header


def _header_problem(header: Any) -> str | None:
    """What is wrong with a parsed header's structure, or None. safetensors checks the rest (dtypes,
    overlapping or out-of-range offsets) when it loads; this catches the shapes of JSON it would choke on
    before we index into them."""
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        return "its __metadata__ is not a table of text values"
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            return f"the entry of tensor {name!r} is not a JSON object"
        offsets, shape = info.get("data_offsets"), info.get("shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(v) for v in offsets)):
            return f"tensor {name!r} has no valid data_offsets"
        if offsets[0] > offsets[1]:
            return f"tensor {name!r} ends before it begins (data_offsets {offsets})"
        if not (isinstance(shape, list) and all(_count(v) for v in shape)):
            return f"tensor {name!r} has no valid shape"
        if not isinstance(info.get("dtype"), str):
            return f"tensor {name!r} has no dtype"
    return None


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_pickle(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a pickled state dict; only reached when the user explicitly allowed pickle. Still restricted to
    tensors (weights_only) so a malicious file cannot run code through torch's unpickler."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise AdapterFormatError(f"{path} does not hold a state dict of tensors.")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, {}
