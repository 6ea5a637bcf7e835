"""Every path the web UI's training side names is confined to `--data-root` (datasets, model files, masks)
or to the server's adapter folders (runs): a name is relative, has no `..`, and resolves (symlinks
followed) inside its folder; anything else is refused with one line saying what to send instead.

The errors carry their HTTP status (`status`), so the routes raise and one handler answers."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from difflora.errors import DiffloraError

# an adapter or dataset name: what the trainer writes as <name>.safetensors and <name>.run/
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class WebUIError(DiffloraError):
    """A request the training routes refuse; `status` is its HTTP status."""

    status = 400


class NoDataRootError(WebUIError):
    status = 409  # the server's configuration, not the request, rules training out


class OutsideError(WebUIError):
    status = 403


class NotFoundError(WebUIError):
    status = 404


class ConflictError(WebUIError):
    status = 409


def require_root(root: Path | None) -> Path:
    """The server's --data-root, or NoDataRootError when it was started without one."""
    if root is None:
        raise NoDataRootError(
            "Training from the web UI is off: restart `difflora serve` with --data-root DIR (the folder "
            "holding the datasets)."
        )
    return root


def confined(root: Path, name: str, *, what: str) -> Path:
    """`root / name` resolved, refused unless `name` is relative, free of `..` and (after symlinks) inside
    `root` (itself resolved)."""
    text = name.strip().replace("\\", "/")
    parts = PurePosixPath(text).parts
    if not text or text.startswith("/") or re.match(r"^[A-Za-z]:", text):
        raise OutsideError(f"The {what} {name!r} must be a folder name relative to the data root.")
    if ".." in parts:
        raise OutsideError(f"The {what} {name!r} may not contain '..': name a folder under the data root.")
    resolved = (root / text).resolve()
    if not resolved.is_relative_to(root):
        raise OutsideError(f"The {what} {name!r} leads outside the data root (a symlink?): refused.")
    return resolved


def existing(root: Path, name: str, *, what: str, folder: bool) -> Path:
    """A confined path that exists, as a folder (`folder`) or a file."""
    path = confined(root, name, what=what)
    if not (path.is_dir() if folder else path.is_file()):
        kind = "folder" if folder else "file"
        raise NotFoundError(f"No {what} {kind} {name!r} under the data root.")
    return path


def checked_name(name: str, *, what: str) -> str:
    """A name that is safe as a file and folder name (letters, digits, . _ -; at most 64)."""
    if not NAME.match(name):
        raise WebUIError(
            f"The {what} {name!r} is not a valid name: use letters, digits, '.', '_' or '-' (at most 64, "
            "starting with a letter or digit)."
        )
    return name


def datasets(root: Path) -> list[str]:
    """The folders directly under `root` that resolve inside it (hidden ones, e.g. the job folder, left
    out), by name."""
    return sorted(
        path.name
        for path in root.iterdir()
        if path.is_dir() and not path.name.startswith(".") and path.resolve().is_relative_to(root)
    )
