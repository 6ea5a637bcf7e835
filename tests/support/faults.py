"""What a `difflora` run made to fail as users see it fail (kill -9, Ctrl-C, a full disk; difflora.faults
aims at the fragile instants, tests.support.cli starts the run) left on disk, checked.

`assert_intact(*folders)` opens every file a run can leave the way its readers do: a safetensors file
parses (an adapter loads with `load_adapter`, a cache entry matches its checksum), a checkpoint folder
loads with `load_checkpoint`, PNG/JSON/TOML/CSV files parse completely. Temporary files
(`.<name>.<random>.tmp`, or anything inside a temporary folder) may exist, since a killed writer cannot
remove its own, but are never opened: no reader looks at them, which `list_checkpoints` and the cache's
fixed entry names make so.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from PIL import Image

from difflora.data.cache import CHECKSUM_KEY, tensors_checksum
from difflora.formats.read import load_adapter
from difflora.safe_io import read_safetensors
from difflora.training.checkpoint import Checkpoint, load_checkpoint

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


# ------------------------------------------------------------------------------------------ what is on disk


def is_temporary(path: Path, root: Path) -> bool:
    parts = path.relative_to(root).parts
    return any(part.startswith(".") and part.endswith(".tmp") for part in parts)


def temporaries(*folders: Path) -> list[Path]:
    return [p for folder in folders if folder.exists() for p in folder.rglob("*") if is_temporary(p, folder)]


def assert_intact(*folders: Path) -> int:
    """Open every non-temporary file under `folders` as its reader would; returns how many were checked."""
    checked = 0
    for folder in folders:
        if not folder.exists():
            continue
        for path in sorted(folder.rglob("*")):
            if is_temporary(path, folder):
                continue
            if path.is_dir():
                if path.parent.name == "checkpoints" and path.name.startswith("step-"):
                    _check_checkpoint(path)
                continue
            _check_file(path)
            checked += 1
    return checked


def _check_checkpoint(path: Path) -> None:
    names = {p.name for p in path.iterdir()}
    assert {"state.json", "state.safetensors", "adapter.safetensors"} <= names, f"half checkpoint {path}"
    loaded = load_checkpoint(Checkpoint(path, int(path.name.split("-")[1])))
    assert loaded.parameters, path


def _check_file(path: Path) -> None:
    suffix = path.suffix
    if suffix == ".safetensors":
        tensors, metadata = read_safetensors(path)
        if CHECKSUM_KEY in metadata:  # a cache entry
            assert tensors_checksum(tensors) == metadata[CHECKSUM_KEY], f"damaged cache entry {path}"
        elif "difflora.format_version" in metadata:  # an adapter (the run's, or a checkpoint's)
            assert load_adapter(path).modules, path
    elif suffix == ".png":
        with Image.open(path) as image:
            image.load()
    elif suffix in (".json", ".lock"):
        json.loads(path.read_text())
    elif suffix == ".toml":
        tomllib.loads(path.read_text())
    elif suffix == ".csv":
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert all(None not in row.values() and None not in row for row in rows), f"torn row in {path}"
    else:
        path.read_text(encoding="utf-8")
