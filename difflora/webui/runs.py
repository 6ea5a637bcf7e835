"""Past runs as the trainer lays them out: `<adapter folder>/<name>.run/` beside `<name>.safetensors`, in
the adapter folders the server serves (the first folder holding a name wins, as for adapters). A run's
files are served by name from a fixed list of what the trainer writes, never by a path the client sends."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from difflora.webui.paths import NotFoundError, checked_name
from difflora.webui.progress import sample_grids, snapshot, timing

RUN_SUFFIX = ".run"
# the files of a run folder a client may fetch: the curves, the heat map and the sample grids
SERVED = re.compile(r"^(loss\.png|gradients\.png|samples/step-\d{6}(-ema)?\.png)$")


def run_folders(directories: Sequence[Path]) -> dict[str, Path]:
    """Run name -> its folder, over the adapter folders in order."""
    found: dict[str, Path] = {}
    for directory in directories:
        if directory.is_dir():
            for path in sorted(directory.glob("*" + RUN_SUFFIX)):
                if path.is_dir():
                    found.setdefault(path.name.removesuffix(RUN_SUFFIX), path.resolve())
    return found


def run_folder(directories: Sequence[Path], name: str) -> Path:
    checked_name(name, what="run name")
    folder = run_folders(directories).get(name)
    if folder is None:
        raise NotFoundError(f"No run {name!r} in the adapter folders: GET /runs lists them.")
    return folder


def run_list(directories: Sequence[Path]) -> list[dict[str, Any]]:
    """Every run: name, whether its adapter exists, steps logged, the newest sample grid, last modified."""
    listed = []
    for name, folder in run_folders(directories).items():
        grids = sample_grids(folder)
        listed.append(
            {
                "name": name,
                "adapter": (folder.parent / f"{name}.safetensors").is_file(),
                "steps": _last_step(folder),
                "last_sample": grids[-1] if grids else None,
                "modified": folder.stat().st_mtime,
            }
        )
    return sorted(listed, key=lambda run: -run["modified"])


def run_detail(folder: Path) -> dict[str, Any]:
    """What the Runs page shows of one run: plan, configuration, time breakdown, loss rows (with the
    validation loss), sample grids by step and which plots exist."""
    current = snapshot(folder)
    return {
        "name": folder.name.removesuffix(RUN_SUFFIX),
        "adapter": (folder.parent / folder.name.replace(RUN_SUFFIX, ".safetensors")).is_file(),
        "plan": _text(folder / "plan.txt"),
        "config": _text(folder / "config.toml"),
        "timing": timing(folder),
        "rows": current.rows,
        "status": current.status(),
        "samples": current.samples,
        "gradients": (folder / "gradients.png").is_file(),
        "loss_png": (folder / "loss.png").is_file(),
    }


def run_file(folder: Path, name: str) -> Path:
    """One of the run's served files (SERVED), which must exist."""
    if not SERVED.match(name) or not (folder / name).is_file():
        raise NotFoundError(
            f"No file {name!r} in run {folder.name} (served: loss.png, gradients.png, samples/)."
        )
    return folder / name


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def _last_step(folder: Path) -> int:
    rows = snapshot(folder).rows
    return rows[-1]["step"] if rows else 0
