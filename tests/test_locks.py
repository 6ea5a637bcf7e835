"""Two runs at once: the lock file holds its owner's PID, is taken atomically, released on exit and on
exceptions, recognised as stale when its owner is gone (then replaced, with a note), and a second run is
refused with a message naming the owner's PID and the lock file. The last test runs the real CLI."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from difflora.locks import LockedError, LockOwner, acquire, hold_lock, read_owner
from difflora.training.lock import lock_path, sweep_temporaries, training_locks
from difflora.training.run import RunPaths
from tests.support.cli import cli_env, run_cli, start_cli, wait_until_stopped
from tests.support.paths import REPO_ROOT
from tests.support.training import make_workspace, train_args

HOLDER = """
import sys, time
from pathlib import Path
from difflora.locks import hold_lock
with hold_lock(Path(sys.argv[1]), what="test", advice=""):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def other_process_holds(tmp_path):
    """Start another Python process holding the lock at the given path; yields it (killed afterwards)."""
    started: list[subprocess.Popen] = []

    def start(path: Path) -> subprocess.Popen:
        process = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(path)],
            stdout=subprocess.PIPE,
            text=True,
            env=cli_env(),
            cwd=REPO_ROOT,
        )
        assert process.stdout is not None and process.stdout.readline().strip() == "held"
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
        process.wait()


def test_the_lock_holds_the_owner_and_is_released_on_exit_and_on_errors(tmp_path):
    path = tmp_path / "run.lock"
    with hold_lock(path, what="Run x", advice="Wait.") as owner:
        assert json.loads(path.read_text())["pid"] == os.getpid() == owner.pid
        with pytest.raises(LockedError, match=f"PID {os.getpid()}"):  # the same lock twice: refused too
            acquire(path, what="Run x", advice="Wait.")
    assert not path.exists()
    with pytest.raises(RuntimeError), hold_lock(path, what="Run x", advice="Wait."):
        raise RuntimeError("training failed")
    assert not path.exists()


def test_a_live_owner_refuses_a_second_run_then_a_killed_one_is_stale(tmp_path, other_process_holds, caplog):
    path = tmp_path / "run.lock"
    holder = other_process_holds(path)
    with pytest.raises(LockedError) as caught:
        acquire(path, what="Training run out/x.safetensors", advice="Train under another --name.")
    message = str(caught.value)
    assert f"PID {holder.pid}" in message and str(path) in message and "another --name" in message
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with caplog.at_level(logging.WARNING, logger="difflora.locks"), hold_lock(path, what="x", advice=""):
        assert read_owner(path).pid == os.getpid()
    assert f"stale lock {path} of PID {holder.pid}" in caplog.text


def test_a_reused_pid_and_a_half_written_lock_are_stale_another_hosts_is_not(tmp_path):
    path = tmp_path / "run.lock"
    me = LockOwner.current()
    if me.started is not None:  # /proc exists: our own PID, but another process start time -> reused PID
        path.write_text(json.dumps(asdict(replace(me, started="1"))))
        with hold_lock(path, what="x", advice=""):
            assert read_owner(path).started == me.started
    path.write_text("")
    os.utime(path, (0, 0))  # empty since long ago: its writer was killed between creating and writing
    with hold_lock(path, what="x", advice=""):
        pass
    path.write_text(json.dumps(asdict(replace(me, pid=1, host=socket.gethostname() + "-elsewhere"))))
    with pytest.raises(LockedError, match="-elsewhere"):
        acquire(path, what="x", advice="")


def test_training_locks_cover_the_output_name_and_the_cache_and_sweep_leftovers(tmp_path):
    paths = RunPaths.for_adapter(tmp_path / "out", "style", None)
    leftovers = [
        tmp_path / "out" / ".style.safetensors.abc123.tmp",
        paths.run_dir / "checkpoints" / ".step-000004.xyz.tmp" / "state.json",
        paths.cache / "latents" / "ab" / ".abcd1234-q.tmp",
    ]
    keep = [  # another run's temporary file, a real file, and a user's file in a shared cache folder
        tmp_path / "out" / ".other.safetensors.abc.tmp",
        paths.run_dir / "loss.csv",
        paths.cache / "notes" / ".draft.tmp",
    ]
    for path in leftovers + keep:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    with training_locks(paths):
        assert not any(p.exists() for p in leftovers) and all(p.exists() for p in keep)
        assert lock_path(paths).exists()
        with pytest.raises(LockedError, match="another --name"), training_locks(paths):
            pass
        other = RunPaths.for_adapter(tmp_path / "out", "subject", None)  # same default cache folder
        with pytest.raises(LockedError, match="own --cache-dir"), training_locks(other):
            pass
        assert not lock_path(other).exists()  # the refused run let go of what it had taken
    assert not lock_path(paths).exists() and not (paths.cache / "difflora.lock").exists()
    assert sweep_temporaries(paths) == 0


@pytest.mark.slow
def test_cli_second_run_is_refused_and_a_killed_runs_lock_does_not_block(tmp_path):
    root = make_workspace(tmp_path / "ws")
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = train_args(root, out, cache)
    first = start_cli(args, fault="step@2:SIGSTOP")  # frozen mid-run, holding its locks
    try:
        wait_until_stopped(first)
        second = run_cli(args)
        assert second.returncode == 1
        message = second.stderr.strip().splitlines()[-1]
        assert message.startswith("Error: Training run") and f"PID {first.pid}" in message
        assert str(out / "stripes.lock") in message
        other_name = run_cli([*args, "--name", "other"])  # its own output name, the same cache folder
        assert other_name.returncode == 1 and str(cache / "difflora.lock") in other_name.stderr
        first.kill()  # kill -9 while it holds both locks
        first.wait()
    finally:
        first.kill()
        first.communicate()
    third = run_cli(args)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "stale lock" in third.stderr and (out / "stripes.safetensors").exists()
    assert not (out / "stripes.lock").exists() and not (cache / "difflora.lock").exists()
