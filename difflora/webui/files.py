"""Files the UI may name: only under the adapter folders and --data-root, never outside them.

A UI file reference is (root id, relative path): `adapters0`, `adapters1`, ... for the engine's adapter
folders in order, `data` for --data-root. A relative path with `..`, an absolute path, a backslash, or one
that resolves (through a symlink) outside its root is refused, as is anything but a regular file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from urllib.parse import quote

from difflora.errors import ConfigError

DATA_ROOT_ID = "data"
ADAPTER_ROOT_PREFIX = "adapters"


class OutsideRootsError(ConfigError):
    """A UI file reference that names something outside the folders the UI may read (HTTP 403)."""

    status = 403


class MissingFileError(OutsideRootsError):
    """A well-formed reference to no regular file (HTTP 404)."""

    status = 404


def ui_roots(adapter_dirs: Sequence[Path], data_root: Path | None) -> dict[str, Path]:
    """Root id -> folder (resolved): the adapter folders, then --data-root when given."""
    roots = {f"{ADAPTER_ROOT_PREFIX}{i}": Path(d).expanduser().resolve() for i, d in enumerate(adapter_dirs)}
    if data_root is not None:
        roots[DATA_ROOT_ID] = Path(data_root).resolve()
    return roots


def confined_file(roots: dict[str, Path], root_id: str, relative: str) -> Path:
    """The regular file `relative` names under root `root_id`; OutsideRootsError for anything else."""
    root = roots.get(root_id)
    if root is None:
        raise OutsideRootsError(
            f"Unknown folder {root_id!r}: the UI reads only {', '.join(roots) or 'none'}."
        )
    parts = PurePosixPath(relative).parts
    if not relative or "\\" in relative or relative.startswith("/") or ".." in parts or ":" in relative:
        raise OutsideRootsError(
            f"{relative!r} is not a plain relative path: the UI names files under its folders only."
        )
    path = (root / relative).resolve()
    if not path.is_relative_to(root):  # a symlink pointing out
        raise OutsideRootsError(f"{relative!r} leads outside its folder: the UI reads nothing outside it.")
    if not path.is_file():
        raise MissingFileError(f"{relative!r} is not a file under {root_id}.")
    return path


def file_url(roots: dict[str, Path], path: Path) -> str | None:
    """The UI URL of `path` (under the first root holding it), or None when no root holds it."""
    resolved = path.resolve()
    for root_id, root in roots.items():
        if resolved.is_relative_to(root):
            return f"/ui/api/files/{root_id}/{quote(resolved.relative_to(root).as_posix())}"
    return None
