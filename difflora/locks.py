"""Lock files: one difflora process at a time on a run's outputs or on a cache folder.

`hold_lock(path, what=..., advice=...)` is a context manager. It creates `path` atomically (os.open with
O_CREAT | O_EXCL: of two processes racing, exactly one succeeds) holding the owner's PID, host, process
start time and command line as JSON, and deletes it on exit, exceptions and Ctrl-C included. A second
process is refused with a DiffloraError naming the owner's PID and the lock file.

A lock whose owner is gone (killed with -9, a crashed machine) is stale: its PID no longer runs on this
host, or runs but started at another time (the PID was reused). It is replaced, with a warning. A lock
held from another host is always taken as live: its process cannot be checked from here.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from difflora.errors import DiffloraError

logger = logging.getLogger(__name__)

# A lock file that is still empty this long after it was created was left by a process killed between
# creating and writing it; younger, its owner is probably writing it right now.
_EMPTY_LOCK_GRACE_S = 5.0
_ATTEMPTS = 5


class LockedError(DiffloraError):
    """Another live difflora process holds the lock."""


@dataclass(frozen=True)
class LockOwner:
    pid: int
    host: str
    started: str | None  # the process's start time as the OS counts it (Linux); tells a reused PID apart
    since: str  # when the lock was taken (UTC)
    command: str

    @classmethod
    def current(cls) -> LockOwner:
        return cls(
            pid=os.getpid(),
            host=socket.gethostname(),
            started=process_start_time(os.getpid()),
            since=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            command=" ".join(sys.argv)[:300],
        )


def process_start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat (clock ticks since boot), or None where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # the command name, in parentheses, may contain spaces
    return fields[19] if len(fields) > 19 else None


def owner_alive(owner: LockOwner) -> bool:
    """Whether the process that wrote the lock still runs (another host's, or on Windows: assumed so)."""
    if owner.host != socket.gethostname() or os.name == "nt":
        return True  # Windows: os.kill(pid, 0) would send the process a Ctrl-C, not probe it
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        pass
    now = process_start_time(owner.pid)
    return not (owner.started and now and now != owner.started)


@contextmanager
def hold_lock(path: Path, *, what: str, advice: str) -> Iterator[LockOwner]:
    """Hold the lock file `path` for the block. `what` names what it protects and `advice` says what to do
    instead, both for the message a second process gets."""
    owner = acquire(path, what=what, advice=advice)
    try:
        yield owner
    finally:
        release(path, owner)


def acquire(path: Path, *, what: str, advice: str) -> LockOwner:
    """Take the lock (LockedError when a live process holds it; a stale one is replaced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    me = LockOwner.current()
    for _ in range(_ATTEMPTS):
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_owner(path)
            if holder is None:
                _wait_or_break_empty(path)
                continue
            if owner_alive(holder):
                raise LockedError(_held_message(path, holder, what, advice)) from None
            _break_stale(path, holder)
            continue
        with os.fdopen(handle, "w") as out:
            json.dump(asdict(me), out)
        return me
    raise LockedError(
        f"Could not take the lock {path} for {what}: it is being created by another process right now, "
        f"or cannot be read. {advice} If no other difflora process is running, delete the lock file."
    )


def release(path: Path, owner: LockOwner) -> None:
    """Delete the lock if it is still ours (a lock taken over as stale belongs to its new owner)."""
    if read_owner(path) == owner:
        path.unlink(missing_ok=True)


def read_owner(path: Path) -> LockOwner | None:
    """The lock's owner; None when the file is gone, empty or not a lock difflora wrote."""
    try:
        data = json.loads(path.read_text())
        return LockOwner(**data)
    except (OSError, ValueError, TypeError):
        return None


def _held_message(path: Path, holder: LockOwner, what: str, advice: str) -> str:
    host = "" if holder.host == socket.gethostname() else f" on {holder.host}"
    return (
        f"{what} is in use by another difflora process: PID {holder.pid}{host}, since {holder.since} "
        f"({holder.command}). Lock file: {path}. {advice} If that process is not running any more, delete "
        "the lock file."
    )


def _wait_or_break_empty(path: Path) -> None:
    """An unreadable lock: being written right now (wait a moment), or left half-made by a killed process."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return
    if age < _EMPTY_LOCK_GRACE_S:
        time.sleep(min(0.2, _EMPTY_LOCK_GRACE_S - age))
        return
    logger.warning("removed the unreadable lock file %s (left by a process that was killed)", path)
    path.unlink(missing_ok=True)


def _break_stale(path: Path, holder: LockOwner) -> None:
    """Remove a stale lock without ever removing a live one: move it aside, check that what was moved is
    the stale lock we judged (another process may have replaced it meanwhile), and put it back if not."""
    aside = path.with_name(f".{path.name}.{os.getpid()}.stale.tmp")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return  # another process removed it first
    moved = read_owner(aside)
    if moved != holder:
        with suppress(OSError):  # put it back, unless yet another process took the lock meanwhile
            os.link(aside, path)
        aside.unlink(missing_ok=True)
        return
    aside.unlink(missing_ok=True)
    logger.warning(
        "note: replaced the stale lock %s of PID %d (since %s), which is no longer running",
        path,
        holder.pid,
        holder.since,
    )
