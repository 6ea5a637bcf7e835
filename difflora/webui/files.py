"""Files the UI may name: only under the adapter folders and --data-root, never outside them.

A UI file reference is (root id, relative path): `adapters0`, `adapters1`, ... for the engine's adapter
folders in order, `data` for --data-root. A relative path with `..`, an absolute path, a backslash, or one
that resolves (through a symlink) outside its root is refused, as is anything but a regular file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from difflora.webui.paths import NotFoundError, OutsideError, confined

DATA_ROOT_ID = "data"
ADAPTER_ROOT_PREFIX = "adapters"


def ui_roots(adapter_dirs: Sequence[Path], data_root: Path | None) -> dict[str, Path]:
    """Root id -> folder (resolved): the adapter folders, then --data-root when given."""
    roots = {f"{ADAPTER_ROOT_PREFIX}{i}": Path(d).expanduser().resolve() for i, d in enumerate(adapter_dirs)}
    if data_root is not None:
        roots[DATA_ROOT_ID] = Path(data_root).resolve()
    return roots


def confined_file(roots: dict[str, Path], root_id: str, relative: str) -> Path:
    """The regular file `relative` names under root `root_id` (the training side's `confined` rule, plus:
    a URL names files with '/' only, so a backslash or a drive's colon is refused, not translated)."""
    root = roots.get(root_id)
    if root is None:
        raise OutsideError(f"Unknown folder {root_id!r}: the UI reads only {', '.join(roots) or 'none'}.")
    if "\\" in relative or ":" in relative:
        raise OutsideError(
            f"{relative!r} is not a plain relative path: the UI names files under its folders only."
        )
    path = confined(root, relative, what="file")
    if not path.is_file():
        raise NotFoundError(f"{relative!r} is not a file under {root_id}.")
    return path


def file_url(roots: dict[str, Path], path: Path) -> str | None:
    """The UI URL of `path` (under the first root holding it), or None when no root holds it."""
    resolved = path.resolve()
    for root_id, root in roots.items():
        if resolved.is_relative_to(root):
            return f"/ui/api/files/{root_id}/{quote(resolved.relative_to(root).as_posix())}"
    return None
