"""The `difflora` command as users run it: in a subprocess (`python -m difflora`, offline, one thread, this
checkout first on the path), and its --help read back flag by flag."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner

from difflora.cli import cli
from difflora.faults import FAULT_ENV
from tests.support.paths import REPO_ROOT


def cli_env(fault: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if fault is not None:
        env[FAULT_ENV] = fault
    return env


def _interruptible() -> None:
    """In the child, before exec: Ctrl-C's default action. A test run started in the background of a
    non-interactive shell ignores SIGINT, and children inherit that, so the interruption tests' SIGINT
    would do nothing; a user's terminal never starts difflora that way."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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
        preexec_fn=_interruptible,
    )


def start_cli(args: list[str], *, fault: str | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "difflora", *args],
        env=cli_env(fault),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        preexec_fn=_interruptible,
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


HELP_LINE = re.compile(r"^  (-\S.*?)(?:\s{2,}(.*))?$")  # help on the next line after long flags


def expected_default(field: dataclasses.Field) -> str | None:
    """What --help should show for the field, worked out from the dataclass alone (None: nothing shown)."""
    value = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    if value is None or value is False or value == () or value == "":
        return None
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def help_lines(command: str) -> dict[str, str]:
    """Each flag of `difflora COMMAND --help` -> the help text on its line (one line per option)."""
    result = CliRunner().invoke(cli, [command, "--help"], terminal_width=10_000, max_content_width=10_000)
    assert result.exit_code == 0, result.output
    lines: dict[str, str] = {}
    rows = result.output.split("Options:", 1)[1].splitlines()
    for row, following in zip(rows, [*rows[1:], ""], strict=True):
        match = HELP_LINE.match(row)
        if match:
            for flag in re.findall(r"(?<![\w-])--?[\w-]+", match.group(1)):
                lines[flag] = match.group(2) or following.strip()
    return lines
