"""The real `difflora` command in a subprocess, made to fail as users see it fail (kill -9, Ctrl-C, a full
disk; difflora.faults aims at the fragile instants), and a check of everything it left on disk.

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
import os
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from difflora.data.cache import CHECKSUM_KEY, tensors_checksum
from difflora.faults import FAULT_ENV
from difflora.formats.read import load_adapter
from difflora.safe_io import read_safetensors
from difflora.training.checkpoint import Checkpoint, load_checkpoint
from tests.conftest import REPO_ROOT, tiny_pipeline

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def cli_env(fault: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if fault is not None:
        env[FAULT_ENV] = fault
    return env


def run_cli(
    args: list[str], *, fault: str | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """`python -m difflora ARGS` to completion (or to the fault), output captured."""
    return subprocess.run(
        [sys.executable, "-m", "difflora", *args],
        env=cli_env(fault),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
    )


def start_cli(args: list[str], *, fault: str | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "difflora", *args],
        env=cli_env(fault),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    )


def wait_until_stopped(process: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until `process` has stopped itself (SIGSTOP from a fault point): state T in /proc/<pid>/stat."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the process ended ({process.returncode}) instead of stopping")
        state = Path(f"/proc/{process.pid}/stat").read_text().rpartition(")")[2].split()[0]
        if state in ("T", "t"):
            return
        time.sleep(0.05)
    raise AssertionError("the process did not reach its fault point in time")


def make_workspace(root: Path) -> Path:
    """A saved tiny model and an 8-image folder of the embedded world's style concept (test_trainer's and
    the fault tests' workspace)."""
    from difflora.embedded.shapes import style_batch

    tiny_pipeline(root / "tok").save_pretrained(root / "model")
    images, captions = style_batch(0, 8)
    data = root / "stripes"
    data.mkdir()
    for index, (pixels, caption) in enumerate(zip(images, captions, strict=True)):
        Image.fromarray(pixels).resize((16, 16)).save(data / f"{index}.png")
        (data / f"{index}.txt").write_text(caption)
    return root


def train_args(workspace: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    """A few-step run with a checkpoint every 2 steps; one thread, so two runs agree bit for bit."""
    return [
        "train",
        str(workspace / "stripes"),
        "--model",
        str(workspace / "model"),
        "--output-dir",
        str(out),
        "--cache-dir",
        str(cache),
        "--resolution",
        "16",
        "--batch-size",
        "4",
        "--max-steps",
        "6",
        "--save-every",
        "2",
        "--sample-every",
        "3",
        "--sample-steps",
        "2",
        "--sample-seeds",
        "1",
        "--learning-rate",
        "0.01",
        "--num-threads",
        "1",
        *extra,
    ]


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
