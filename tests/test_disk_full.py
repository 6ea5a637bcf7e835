"""A full disk: the write that fails with ENOSPC keeps the previous adapter / checkpoint / cache entry
intact, leaves no temporary file, and the user reads that the disk is full, which file, and how much space
it needed. In-process with os.write patched to fail part-way (as a real full disk does), and end to end
with the real CLI (the fault point raising ENOSPC where the final rename would follow)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from difflora.data.cache import LatentCache
from difflora.errors import DiskFullError
from difflora.safe_io import format_bytes, write_atomic
from difflora.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from difflora.training.log import TrainLog
from tests.support.cli import run_cli
from tests.support.faults import assert_intact, temporaries
from tests.support.training import make_workspace, train_args


@pytest.fixture
def disk_fills_after(monkeypatch):
    """`disk_fills_after(n)`: from now on os.write takes bytes until `n` have gone out, then raises ENOSPC."""
    real = os.write

    def arm(capacity: int) -> None:
        left = {"bytes": capacity}

        def write(handle: int, data) -> int:
            if left["bytes"] <= 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            taken = real(handle, bytes(data[: left["bytes"]]))
            left["bytes"] -= taken
            return taken

        monkeypatch.setattr(os, "write", write)

    return arm


def test_write_atomic_keeps_the_old_file_and_says_what_and_how_much(tmp_path, disk_fills_after):
    target = tmp_path / "style.safetensors"
    write_atomic(target, b"old adapter")
    disk_fills_after(1000)
    with pytest.raises(DiskFullError) as caught:
        write_atomic(target, b"x" * 5000)
    message = str(caught.value)
    assert "disk is full" in message and str(target) in message
    assert format_bytes(5000) in message and "previous style.safetensors is intact" in message
    assert target.read_bytes() == b"old adapter"
    assert not temporaries(tmp_path)


def test_a_new_file_leaves_nothing_when_the_disk_is_full(tmp_path, disk_fills_after):
    disk_fills_after(0)
    with pytest.raises(DiskFullError, match="no partial new.png was left"):
        write_atomic(tmp_path / "new.png", b"png" * 100)
    assert list(tmp_path.iterdir()) == []


def test_cache_entry_write_on_a_full_disk(tmp_path, disk_fills_after):
    store = LatentCache(tmp_path).store
    disk_fills_after(64)
    with pytest.raises(DiskFullError) as caught:
        store.write("ab" * 32, {"mean": torch.zeros(4, 8, 8)}, {})
    assert str(store.path_for("ab" * 32)) in str(caught.value)
    assert not store.has("ab" * 32) and not temporaries(tmp_path)


def _checkpoint(directory: Path, step: int) -> None:
    save_checkpoint(
        directory,
        step,
        parameters={"unet.a.lora_A.weight": torch.full((4, 4), float(step))},
        optimizer={"state": {}, "param_groups": []},
        scheduler={"last_epoch": step},
        rng={},
        info={"step": step},
        adapter_bytes=b"adapter bytes",
    )


def test_checkpoint_on_a_full_disk_keeps_the_previous_one(tmp_path, disk_fills_after):
    _checkpoint(tmp_path, 2)
    disk_fills_after(100)
    with pytest.raises(DiskFullError) as caught:
        _checkpoint(tmp_path, 4)
    message = str(caught.value)
    assert "checkpoint" in message and "step-000004" in message and "step-000002, is intact" in message
    assert " needed" in message
    newest = latest_checkpoint(tmp_path)
    assert newest is not None and newest.step == 2
    assert float(load_checkpoint(newest).parameters["unet.a.lora_A.weight"][0, 0]) == 2.0
    assert not temporaries(tmp_path)


def test_loss_log_full_disk_and_a_torn_row_left_by_it(tmp_path, monkeypatch):
    log = TrainLog(tmp_path, total_steps=4, start_step=0, progress=False)
    log.step(1, 0, 0.5, 1e-3, skipped=False, seconds=0.1)
    log.step(2, 0, 0.4, 1e-3, skipped=False, seconds=0.1)

    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(log._handle, "flush", full)
    with pytest.raises(DiskFullError, match="loss.csv .* needed.*steps logged before are intact"):
        log.step(3, 0, 0.3, 1e-3, skipped=False, seconds=0.1)
    monkeypatch.undo()
    log.close()
    with open(tmp_path / "loss.csv", "a") as handle:  # what a partial append leaves: half a row
        handle.write("3,0,0.3")
    resumed = TrainLog(tmp_path, total_steps=4, start_step=2, progress=False)  # no error on the torn row
    assert [p.step for p in resumed.points] == [1, 2]
    resumed.close()
    rows = (tmp_path / "loss.csv").read_text().splitlines()[1:]
    assert [row.split(",")[0] for row in rows] == ["1", "2"]  # rewritten without the torn row


@pytest.mark.slow
def test_cli_full_disk_at_a_checkpoint_then_at_the_adapter(tmp_path):
    root = make_workspace(tmp_path / "ws")
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = train_args(root, out, cache)
    failed = run_cli(args, fault="checkpoint-write@2:ENOSPC")
    assert failed.returncode == 1
    last_line = failed.stderr.strip().splitlines()[-1]
    assert last_line.startswith("Error: The disk is full") and "step-000004" in last_line
    assert "step-000002, is intact" in last_line and "Traceback" not in failed.stderr
    assert_intact(out, cache)
    assert not temporaries(out, cache)
    assert run_cli([*args, "--resume"]).returncode == 0  # once there is space again, nothing is lost
    adapter = out / "stripes.safetensors"
    before = adapter.read_bytes()

    again = run_cli(args, fault="adapter-write:ENOSPC")  # a fresh run whose final write finds no space
    assert again.returncode == 1
    assert "disk is full" in again.stderr and str(adapter) in again.stderr
    assert "previous stripes.safetensors is intact" in again.stderr
    assert adapter.read_bytes() == before
    assert_intact(out, cache)
