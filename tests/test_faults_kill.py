"""`kill -9` of a real `difflora train` at the worst instants and at seeded random ones: whatever the
moment, every file left is absent or complete and loadable, no temporary file is taken for a real one,
a stale lock or temporary file does not block the next run, and `--resume` finishes the run with the
adapter an uninterrupted run writes, bit for bit (once a first checkpoint existed).

The named points (difflora.faults) hit the write windows deterministically: a cache entry, the middle of a
step, the second checkpoint (so one checkpoint is complete), the final adapter. Random points are drawn
from a seeded RNG over the measured duration of an uninterrupted run. `pytest --kill-points 20` tries 20.
"""

from __future__ import annotations

import random
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difflora.training.checkpoint import latest_checkpoint
from tests.support.cli import run_cli, start_cli
from tests.support.faults import assert_intact, temporaries
from tests.support.training import make_workspace, train_args

pytestmark = pytest.mark.slow

NAMED_POINTS = ("cache-write@3", "step@3", "checkpoint-write@2", "adapter-write@1")
SEED = 20240613


def pytest_generate_tests(metafunc) -> None:
    if "kill_point" in metafunc.fixturenames:
        count = metafunc.config.getoption("--kill-points")
        points = [*NAMED_POINTS[:count], *(f"random-{i}" for i in range(max(0, count - len(NAMED_POINTS))))]
        metafunc.parametrize("kill_point", points)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor], list[str], float]:
    """The workspace, the uninterrupted run's adapter tensors and loss column, and its duration (s)."""
    root = make_workspace(tmp_path_factory.mktemp("kill"))
    began = time.monotonic()
    result = run_cli(train_args(root, root / "straight", root / "straight-cache"))
    duration = time.monotonic() - began
    assert result.returncode == 0, result.stderr
    return root, load_file(root / "straight" / "stripes.safetensors"), _losses(root / "straight"), duration


def _losses(out: Path) -> list[str]:
    lines = (out / "stripes.run" / "loss.csv").read_text().splitlines()[1:]
    return [line.split(",")[2] for line in lines]


def _kill(args: list[str], point: str, duration: float) -> tuple[str, int]:
    """Run and kill at `point`; returns a description of the kill and the exit status."""
    if not point.startswith("random-"):
        result = run_cli(args, fault=point)
        assert result.returncode == -9, f"never reached {point}:\n{result.stderr[-3000:]}"
        return point, result.returncode
    delay = random.Random(f"{SEED}-{point}").uniform(0.0, duration)
    process = start_cli(args)
    try:
        process.wait(timeout=delay)
    except subprocess.TimeoutExpired:  # still running at the chosen instant: the usual case
        process.kill()
    process.communicate(timeout=120)
    return f"kill -9 after {delay:.2f}s of a {duration:.2f}s run", process.returncode


def test_killed_run_leaves_only_complete_files_and_resumes_exactly(kill_point, baseline, tmp_path):
    root, straight, straight_losses, duration = baseline
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = train_args(root, out, cache)
    what, code = _kill(args, kill_point, duration)

    assert_intact(out, cache)
    run_dir = out / "stripes.run"
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    if kill_point == "checkpoint-write@2":  # the staged step-4 folder is never taken for a checkpoint
        assert checkpoint is not None and checkpoint.step == 2
        assert any(p.name.startswith(".step-000004.") for p in (run_dir / "checkpoints").iterdir())
    if kill_point == "adapter-write@1":  # a complete temporary adapter, but no adapter
        assert not (out / "stripes.safetensors").exists() and temporaries(out)
    stale_lock = (out / "stripes.lock").exists()

    resumed = run_cli([*args, "--resume"])
    assert resumed.returncode == 0, f"{what} (exit {code}); resume failed:\n{resumed.stderr[-3000:]}"
    assert_intact(out, cache)
    assert not temporaries(out, cache), f"{what}: temporary files survived the next run"
    assert not (out / "stripes.lock").exists() and not (cache / "difflora.lock").exists()
    if stale_lock:
        assert "stale lock" in resumed.stderr
    adapter = load_file(out / "stripes.safetensors")
    assert adapter.keys() == straight.keys()
    if checkpoint is not None or code == 0:
        # continued from a checkpoint (or the run had finished): the same run, bit for bit
        assert all(torch.equal(adapter[k], straight[k]) for k in straight), what
        assert _losses(out) == straight_losses, what
    else:
        # started over (cached latents from the killed run may have been encoded in other batches)
        assert all(bool(torch.isfinite(t).all()) for t in adapter.values())
