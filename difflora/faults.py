"""Fault points: named places where the test suite makes a real `difflora` process fail on purpose.

This module exists only for tests (tests/test_faults_kill.py, tests/test_interrupts.py, ...). A writer calls
`fault_point("checkpoint-write")` at its most fragile moment (the new file complete under its temporary
name, not yet renamed over the old one); with the environment variable unset, that costs one dict lookup.

    DIFFLORA_FAULT_AT="<point>[@<n>][:<action>]"

fires on the n-th time (default the first) the process reaches `<point>`. The action is a signal the
process sends itself (`SIGKILL`, the default, as `kill -9` would; `SIGINT` as Ctrl-C would; `SIGSTOP` to
freeze a run that holds its locks), or `ENOSPC` to raise the OSError a full disk raises.

The points: `cache-write` (a latent or text-embedding cache entry), `step` (mid training step, after the
backward pass, before the optimizer step), `checkpoint-write`, `adapter-write` (the final adapter file),
`export-write`, and `atomic-write` (every other `write_atomic`: generated PNGs and their JSON sidecars,
merged adapters, plan, loss curve).
"""

from __future__ import annotations

import errno
import os
import signal

FAULT_ENV = "DIFFLORA_FAULT_AT"

_reached: dict[str, int] = {}  # point -> how many times this process reached it (only while armed)


def fault_point(name: str) -> None:
    """Fire the fault `DIFFLORA_FAULT_AT` names when it names this point (and this is its n-th time)."""
    spec = os.environ.get(FAULT_ENV)
    if spec is None:
        return
    point, count, action = parse_fault(spec)
    if point != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == count:
        _fire(action, name)


def parse_fault(spec: str) -> tuple[str, int, str]:
    """`"checkpoint-write@2:SIGINT"` -> ("checkpoint-write", 2, "SIGINT"). A malformed spec is a bug in a
    test, so it raises ValueError loudly rather than silently never firing."""
    point, _, action = spec.partition(":")
    point, _, count = point.partition("@")
    action = action or "SIGKILL"
    if action != "ENOSPC" and not hasattr(signal, action):
        raise ValueError(f"{FAULT_ENV}={spec!r}: unknown action {action!r} (a signal name or ENOSPC)")
    return point.strip(), int(count) if count else 1, action


def _fire(action: str, name: str) -> None:
    if action == "ENOSPC":
        raise OSError(errno.ENOSPC, f"No space left on device (fault point {name})")
    os.kill(os.getpid(), getattr(signal, action))
