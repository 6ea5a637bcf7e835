"""Ctrl-C (SIGINT) during `difflora generate`, `export`, `merge` and `train`: no partial PNG, JSON sidecar or
safetensors file is left, the one-line message says what was completed, and the exit code is 130.

The interruption lands at a chosen write through a fault point (difflora.faults: the process sends itself
SIGINT with the new file complete under its temporary name), and once from outside, at whatever moment
the first image has appeared."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.support.cli import run_cli, start_cli
from tests.support.faults import assert_intact, temporaries
from tests.support.training import make_workspace, train_args

pytestmark = pytest.mark.slow


def _generate(model: Path, adapters: Path, out: Path, images: int, steps: int = 2) -> list[str]:
    return [
        "generate", "a red circle", "--model", str(model), "--adapter-dir", str(adapters),
        "--adapters", "style:0.7", "--seed", "5", "-n", str(images), "--steps", str(steps), "--out", str(out),
    ]  # fmt: skip


def _complete_images(out: Path) -> list[str]:
    """Image names whose PNG and sidecar both exist; asserts no PNG lacks its sidecar or the reverse."""
    pngs = {p.stem for p in out.glob("*.png")}
    sidecars = {p.stem for p in out.glob("*.json")}
    assert pngs == sidecars, f"unpaired files: {pngs ^ sidecars}"
    return sorted(pngs)


def _last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


# Atomic writes of `generate -n 4`, in order: PNG 1, JSON 1, PNG 2, JSON 2, PNG 3 (the 5th), JSON 3 (6th)
@pytest.mark.parametrize("write", [5, 6], ids=["during-png-3", "during-sidecar-3"])
def test_generate_interrupted_keeps_the_finished_images_and_says_so(model_and_adapters, tmp_path, write):
    model, adapters = model_and_adapters
    out = tmp_path / "out"
    result = run_cli(_generate(model, adapters, out, 4), fault=f"atomic-write@{write}:SIGINT")
    assert result.returncode == 130, result.stderr[-3000:]
    message = _last_line(result.stderr)
    assert message.startswith("Error: Interrupted: wrote 2 of 4 images before the interruption: ")
    assert str(out / "00000-5.png") in message and str(out / "00001-6.png") in message
    assert _complete_images(out) == ["00000-5", "00001-6"] and not temporaries(out)
    assert_intact(out)


def test_generate_interrupted_from_outside(model_and_adapters, tmp_path):
    model, adapters = model_and_adapters
    out = tmp_path / "out"
    process = start_cli(_generate(model, adapters, out, 30, steps=4))
    deadline = time.monotonic() + 240
    while not list(out.glob("*.json")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    done = _complete_images(out)
    assert 1 <= len(done) < 30 and not temporaries(out)
    assert f"wrote {len(done)} of 30 images" in _last_line(stderr)
    assert_intact(out)


def test_export_and_merge_interrupted_leave_no_file(model_and_adapters, tmp_path):
    _, adapters = model_and_adapters
    exported = tmp_path / "style.comfy.safetensors"
    export = [
        "export",
        str(adapters / "style.safetensors"),
        "--output",
        str(exported),
        "--format",
        "diffusers",
    ]
    result = run_cli(export, fault="export-write:SIGINT")
    assert result.returncode == 130 and not exported.exists() and not temporaries(tmp_path)
    assert (
        _last_line(result.stderr)
        == f"Error: Interrupted before {exported} was written: no partial file was left."
    )
    assert run_cli(export).returncode == 0
    before = exported.read_bytes()
    result = run_cli([*export, "--overwrite", "--dtype", "fp32"], fault="export-write:SIGINT")
    assert result.returncode == 130 and "the existing style.comfy.safetensors is unchanged" in result.stderr
    assert exported.read_bytes() == before

    merged = tmp_path / "merged.safetensors"
    merge = ["merge", "style:0.7,subject:0.3", "-o", str(merged), "--adapter-dir", str(adapters)]
    result = run_cli(merge, fault="atomic-write:SIGINT")
    assert result.returncode == 130 and not merged.exists() and not temporaries(tmp_path)
    assert f"Interrupted before {merged} was written" in _last_line(result.stderr)


def test_train_interrupted_names_the_checkpoint_to_resume_from(tmp_path):
    root = make_workspace(tmp_path / "ws")
    out, cache = tmp_path / "out", tmp_path / "cache"
    result = run_cli(train_args(root, out, cache), fault="step@3:SIGINT")
    assert result.returncode == 130, result.stderr[-3000:]
    message = _last_line(result.stderr)
    assert "Training interrupted" in message and "step-000002 (step 2)" in message and "--resume" in message
    assert not (out / "stripes.safetensors").exists()
    assert_intact(out, cache)
    assert not (out / "stripes.lock").exists()  # released on the way out, not left for a stale check
