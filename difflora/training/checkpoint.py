"""Training checkpoints: complete, atomic, pickle-free, and enough to continue a run bit-for-bit.

A checkpoint is a folder `<run>/checkpoints/step-NNNNNN/` holding
- `adapter.safetensors`: the adapter at that step (usable on its own with `difflora generate`);
- `state.safetensors`: every tensor of the training state: the LoRA parameters by name, the optimizer's
  moments, the RNG states (torch CPU/CUDA, numpy's Mersenne state);
- `state.json`: everything else: step, the optimizer's and scheduler's non-tensor state (with placeholders
  where tensors were), Python's RNG state, the effective config and the dataset hash.

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
from safetensors.torch import load_file, save_file

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
    keep: int | None = None,
) -> Checkpoint:
    """Write a checkpoint folder atomically, then delete all but the newest `keep` checkpoints.
    `rng` maps a process name ("0", "1", ...) to that process's RNG state."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {
        f"param.{k}": v.detach().cpu().contiguous() for k, v in parameters.items()
    }
    skeleton = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "optimizer": split_state(optimizer, tensors, "optimizer"),
        "scheduler": split_state(scheduler, tensors, "scheduler"),
        "rng": split_state(rng, tensors, "rng"),
        "info": info,
    }
    final = directory / f"step-{step:06d}"
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=directory))
    try:
        save_file(tensors, str(staging / "state.safetensors"))
        files = {"adapter.safetensors": adapter_bytes, **(extra_files or {})}
        for name, payload in files.items():
            (staging / name).write_bytes(payload)
        # state.json last: its presence marks the checkpoint complete (see list_checkpoints).
        (staging / "state.json").write_text(json.dumps(skeleton, indent=1))
        for child in staging.iterdir():
            with open(child, "rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():  # re-saving the same step (a resumed run reaching it again): replace it
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if keep is not None:
        for old in list_checkpoints(directory)[:-keep]:
            shutil.rmtree(old.path, ignore_errors=True)
    return Checkpoint(final, step)


@dataclass
class LoadedCheckpoint:
    step: int
    parameters: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, dict[str, Any]]
    info: dict[str, Any]


def load_checkpoint(checkpoint: Checkpoint) -> LoadedCheckpoint:
    skeleton = json.loads((checkpoint.path / "state.json").read_text())
    if skeleton.get("format") != CHECKPOINT_FORMAT:
        from difflora.errors import DiffloraError

        raise DiffloraError(
            f"{checkpoint.path} was written by an incompatible difflora (checkpoint format "
            f"{skeleton.get('format')}, expected {CHECKPOINT_FORMAT}); start a fresh run without --resume."
        )
    tensors = load_file(str(checkpoint.path / "state.safetensors"))
    parameters = {k[len("param.") :]: v for k, v in tensors.items() if k.startswith("param.")}
    return LoadedCheckpoint(
        step=int(skeleton["step"]),
        parameters=parameters,
        optimizer=join_state(skeleton["optimizer"], tensors),
        scheduler=join_state(skeleton["scheduler"], tensors),
        rng=join_state(skeleton["rng"], tensors),
        info=skeleton["info"],
    )


def clear_checkpoints(directory: Path) -> int:
    """Remove every checkpoint (and stale temporary folders) of a run that starts afresh."""
    removed = 0
    if directory.is_dir():
        for child in directory.iterdir():
            if child.is_dir() and (_STEP_DIR.match(child.name) or child.name.endswith(".tmp")):
                shutil.rmtree(child, ignore_errors=True)
                removed += 1
    return removed
