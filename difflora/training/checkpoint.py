"""Training checkpoints: complete, atomic, pickle-free, and enough to continue a run bit-for-bit.

A checkpoint is a folder `<run>/checkpoints/step-NNNNNN/` holding
- `adapter.safetensors`: the adapter at that step (usable on its own with `difflora generate`);
- `state.safetensors`: every tensor of the training state: the LoRA parameters by name, the optimizer's
  moments, the RNG states (torch CPU/CUDA, numpy's Mersenne state);
- `state.json`: everything else: step, the optimizer's and scheduler's non-tensor state (with placeholders
  where tensors were), Python's RNG state, the effective config and the dataset hash;
- under `extra`, state of variants beyond the parameters (--adaptive-rank's rank allocator), split the
  same way.

Nothing is pickled: optimizer and scheduler state dicts are split into tensors (safetensors) and a JSON
skeleton, so loading a checkpoint can never run code. The folder is written under a temporary name and
renamed into place (atomic on POSIX), so an interrupted save leaves the previous checkpoints untouched and
never a half checkpoint that `--resume` would pick up.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from difflora.errors import DiffloraError
from difflora.faults import fault_point
from difflora.safe_io import disk_full_error, is_disk_full, write_file

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")


# ------------------------------------------------------------------ state dicts <-> (tensors, JSON)


def split_state(value: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """Replace every tensor/ndarray in a nested structure by a placeholder; collect them in `tensors`."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(value, np.ndarray):
        tensors[path] = torch.from_numpy(np.ascontiguousarray(value))
        return {"__ndarray__": path}
    if isinstance(value, dict):
        return {"__dict__": [[k, split_state(v, tensors, f"{path}.{k}")] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [split_state(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [split_state(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot store {type(value).__name__} at {path} in a checkpoint")


def join_state(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of split_state."""
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__ndarray__" in value:
            return tensors[value["__ndarray__"]].numpy()
        if "__dict__" in value:
            return {k: join_state(v, tensors) for k, v in value["__dict__"]}
        if "__tuple__" in value:
            return tuple(join_state(v, tensors) for v in value["__tuple__"])
    if isinstance(value, list):
        return [join_state(v, tensors) for v in value]
    return value


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------ checkpoint folders


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int

    @property
    def adapter(self) -> Path:
        return self.path / "adapter.safetensors"


def list_checkpoints(directory: Path) -> list[Checkpoint]:
    """Complete checkpoints (a state.json present), oldest first."""
    found = []
    if directory.is_dir():
        for child in directory.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and (child / "state.json").is_file():
                found.append(Checkpoint(child, int(match.group(1))))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(directory: Path) -> Checkpoint | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def save_checkpoint(
    directory: Path,
    step: int,
    *,
    parameters: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    scheduler: dict[str, Any],
    rng: dict[str, dict[str, Any]],
    info: dict[str, Any],
    adapter_bytes: bytes,
    extra_files: dict[str, bytes] | None = None,
    extra_state: dict[str, Any] | None = None,
    keep: int | None = None,
) -> Checkpoint:
    """Write a checkpoint folder atomically, then delete all but the newest `keep` checkpoints.
    `rng` maps a process name ("0", "1", ...) to that process's RNG state. A full disk raises
    DiskFullError naming the checkpoint and its size; the checkpoints already written are untouched."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {
        f"param.{k}": v.detach().cpu().contiguous() for k, v in parameters.items()
    }
    skeleton = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "optimizer": split_state(optimizer, tensors, "optimizer"),
        "scheduler": split_state(scheduler, tensors, "scheduler"),
        # the torch / numpy RNG states are tensors too: they land in state.safetensors, not the JSON
        "rng": split_state(rng, tensors, "rng"),
        "info": info,
        "extra": split_state(extra_state or {}, tensors, "extra"),
    }
    # state.json last: its presence marks the checkpoint complete (see list_checkpoints).
    files = {"adapter.safetensors": adapter_bytes, **(extra_files or {})}
    files["state.json"] = json.dumps(skeleton, indent=1).encode()
    final = directory / f"step-{step:06d}"
    try:
        staging = _write_staging(directory, final.name, tensors, files)
    except BaseException as error:
        if not is_disk_full(error):
            raise
        needed = sum(t.numel() * t.element_size() for t in tensors.values()) + sum(map(len, files.values()))
        last = latest_checkpoint(directory)
        kept = (
            f"the newest checkpoint, {last.path.name}, is intact"
            if last
            else "no partial checkpoint was left"
        )
        raise disk_full_error(final, needed, what=f"checkpoint {final}", kept=kept) from None
    _move_into_place(staging, final)
    if keep is not None:
        for old in list_checkpoints(directory)[:-keep]:
            remove_checkpoint(old.path)
    return Checkpoint(final, step)


def _write_staging(
    directory: Path, name: str, tensors: dict[str, torch.Tensor], files: dict[str, bytes]
) -> Path:
    """The checkpoint's files, complete and on disk, in a temporary folder `.<name>.<random>.tmp` that no
    reader takes for a checkpoint (list_checkpoints matches `step-NNNNNN` only); removed on failure."""
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=directory))
    try:
        # Serialised in memory (LoRA state is small) and written through os.write: a full disk is then an
        # OSError with errno ENOSPC, where safetensors' save_file would raise its own error type.
        write_file(staging / "state.safetensors", safetensors_bytes(tensors))
        for file, payload in files.items():
            write_file(staging / file, payload)
        fault_point("checkpoint-write")  # complete under its temporary name, not yet renamed into place
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def _move_into_place(staging: Path, final: Path) -> None:
    """Rename the staged folder to `final`. Re-saving an existing step (a resumed run reaching it again)
    first moves the old folder aside under a temporary name, so `final` is never a half-deleted folder."""
    if final.exists():
        aside = final.with_name(f".{final.name}.{os.getpid()}.replaced.tmp")
        os.replace(final, aside)
        os.replace(staging, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(staging, final)


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint folder: renamed to a temporary name first (one atomic step), so a kill during
    the deletion leaves a `.tmp` folder that nothing loads, never a `step-N` folder missing files."""
    aside = path.with_name(f".{path.name}.{os.getpid()}.deleted.tmp")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


@dataclass
class LoadedCheckpoint:
    step: int
    parameters: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, dict[str, Any]]
    info: dict[str, Any]
    extra: dict[str, Any]  # save_checkpoint's extra_state ({} when none)


def load_checkpoint(checkpoint: Checkpoint) -> LoadedCheckpoint:
    try:
        skeleton = json.loads((checkpoint.path / "state.json").read_text())
        tensors = load_file(str(checkpoint.path / "state.safetensors"))
    except Exception as error:  # json, OSError, or safetensors' own error type for a damaged file
        raise DiffloraError(
            f"checkpoint {checkpoint.path} is damaged ({error}); delete that folder to resume from the "
            "checkpoint before it, or start a fresh run without --resume."
        ) from None
    if not isinstance(skeleton, dict) or skeleton.get("format") != CHECKPOINT_FORMAT:
        found = skeleton.get("format") if isinstance(skeleton, dict) else None
        raise DiffloraError(
            f"{checkpoint.path} was written by an incompatible difflora (checkpoint format "
            f"{found}, expected {CHECKPOINT_FORMAT}); start a fresh run without --resume."
        )
    parameters = {k[len("param.") :]: v for k, v in tensors.items() if k.startswith("param.")}
    return LoadedCheckpoint(
        step=int(skeleton["step"]),
        parameters=parameters,
        optimizer=join_state(skeleton["optimizer"], tensors),
        scheduler=join_state(skeleton["scheduler"], tensors),
        rng=join_state(skeleton["rng"], tensors),
        info=skeleton["info"],
        extra=join_state(skeleton.get("extra", {"__dict__": []}), tensors),
    )


def clear_checkpoints(directory: Path) -> int:
    """Remove every checkpoint (and stale temporary folders) of a run that starts afresh."""
    removed = 0
    if directory.is_dir():
        for child in directory.iterdir():
            if child.is_dir() and _STEP_DIR.match(child.name):
                remove_checkpoint(child)
                removed += 1
            elif child.is_dir() and child.name.endswith(".tmp"):
                shutil.rmtree(child, ignore_errors=True)
    return removed
