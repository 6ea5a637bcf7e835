"""`difflora generate --compare A,B,C`: which adapter file each column of a comparison grid composes.

An entry is, in the adapter-spec grammar NAME[:WEIGHT[:TE_WEIGHT]], one of
- an adapter (a name in the adapter folders, or a path): the final adapter, e.g. one of several trained at
  ranks 4/8/16 with `[[adapter]]` tables;
- `NAME@step-N` (or `NAME@N`): the checkpoint of NAME's training run at step N, which training keeps in
  `<NAME>.run/checkpoints/step-NNNNNN/adapter.safetensors` beside the adapter;
- a folder: every checkpoint in it (a run directory, its `checkpoints/` folder) by step, or else every
  `.safetensors` adapter directly in it, by name.
Each becomes a Column: its label (what the user typed, or the checkpoint's name) and the file composed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from difflora.composition.find import find_adapter
from difflora.config.spec import AdapterWeight
from difflora.errors import AdapterSpecError

_AT_STEP = re.compile(r"^(?P<name>.+)@(?:step-)?(?P<step>\d+)$")
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class Column:
    label: str
    spec: AdapterWeight  # the adapter file's path, at the entry's weights


def compare_columns(entries: Sequence[AdapterWeight], directories: Sequence[Path]) -> list[Column]:
    """The grid's columns, in the order given (a folder's checkpoints by step)."""
    columns: list[Column] = []
    for entry in entries:
        suffix = "" if entry.weight == 1 and entry.te_weight is None else f" ×{entry.weight:g}"
        for label, path in _files(entry.name, directories):
            spec = AdapterWeight(str(path), entry.weight, entry.te_weight)
            columns.append(Column(label + suffix, spec))
    if len(columns) < 2:
        raise AdapterSpecError(
            f"--compare needs at least two adapters or checkpoints to compare; it found {len(columns)}."
        )
    return columns


def _files(name: str, directories: Sequence[Path]) -> list[tuple[str, Path]]:
    folder = Path(name).expanduser()
    if folder.is_dir():
        return _folder_files(folder)
    match = _AT_STEP.match(name)
    if match is None:
        return [(name, find_adapter(name, directories))]
    adapter = find_adapter(match["name"], directories)
    step = int(match["step"])
    checkpoint = (
        adapter.parent / f"{adapter.stem}.run" / "checkpoints" / f"step-{step:06d}" / "adapter.safetensors"
    )
    if not checkpoint.is_file():
        kept = [label for label, _ in _checkpoints(checkpoint.parent.parent)]
        raise AdapterSpecError(
            f"{name}: no checkpoint at step {step} in {checkpoint.parent.parent}; kept: {', '.join(kept) or 'none'}."
        )
    return [(f"{match['name']}@step-{step}", checkpoint)]


def _folder_files(folder: Path) -> list[tuple[str, Path]]:
    for candidate in (folder / "checkpoints", folder):
        found = _checkpoints(candidate)
        if found:  # labelled with the run's name: `style.run/checkpoints/step-000150` -> style@step-150
            run = candidate.parent if candidate.name == "checkpoints" else candidate
            name = run.name.removesuffix(".run")
            return [(f"{name}@{label}", path) for label, path in found]
    adapters = sorted(folder.glob("*.safetensors"))
    if not adapters:
        raise AdapterSpecError(
            f"{folder}: no checkpoints (step-N folders) and no .safetensors adapters in it."
        )
    return [(path.stem, path) for path in adapters]


def _checkpoints(folder: Path) -> list[tuple[str, Path]]:
    """(step-N, its adapter file) for each complete checkpoint in `folder`, by step."""
    if not folder.is_dir():
        return []
    steps = []
    for child in folder.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / "adapter.safetensors").is_file():
            steps.append((int(match.group(1)), child / "adapter.safetensors"))
    return [(f"step-{step}", path) for step, path in sorted(steps)]
