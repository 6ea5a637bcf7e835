"""Finding the adapter files an adapter spec names: a path, or a name in the adapter folders.

`./adapters` (where `difflora train` writes `<name>.safetensors`) is always searched, after the folders
given. An unknown name lists the available adapters and the closest matches.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from difflora.errors import AdapterSpecError, first_n

DEFAULT_ADAPTER_DIR = Path("adapters")
ADAPTER_SUFFIX = ".safetensors"


def adapter_dirs(extra: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """The directories searched for adapters by name: those given, then ./adapters (difflora train's
    default output directory). Duplicates removed, order kept."""
    result: list[Path] = []
    for directory in [*(Path(d) for d in extra), DEFAULT_ADAPTER_DIR]:
        if directory.expanduser().resolve() not in [d.expanduser().resolve() for d in result]:
            result.append(directory)
    return result


def available_adapters(directories: Sequence[Path]) -> dict[str, Path]:
    """Adapter name -> file, for every `.safetensors` file directly in the directories (first one wins)."""
    found: dict[str, Path] = {}
    for directory in directories:
        if directory.is_dir():
            for path in sorted(directory.glob("*" + ADAPTER_SUFFIX)):
                found.setdefault(path.stem, path)
    return found


class UnknownAdapterError(AdapterSpecError):
    """An adapter name found in none of the adapter folders."""


def find_adapter(name: str, directories: Sequence[Path], *, allow_paths: bool = True) -> Path:
    """The file an adapter spec NAME refers to: an existing path, else `<dir>/<name>.safetensors` in the
    first directory that has it. An unknown name lists the available adapters and the closest matches.
    With `allow_paths=False` (a server: its clients must not make it read arbitrary files) NAME must be a
    bare name, and an unknown one is told the names available, never the folders they are in."""
    if not allow_paths:
        _refuse_path(name)
    elif Path(name).expanduser().is_file():
        return Path(name).expanduser()
    for directory in directories:
        candidate = directory / (name if name.endswith(ADAPTER_SUFFIX) else name + ADAPTER_SUFFIX)
        if candidate.is_file():
            return candidate
    raise UnknownAdapterError(_unknown_message(name, directories, show_folders=allow_paths))


def _refuse_path(name: str) -> None:
    stem = name.removesuffix(ADAPTER_SUFFIX)
    if not stem or any(c in stem for c in "/\\:") or stem.startswith(".") or Path(stem).is_absolute():
        raise AdapterSpecError(
            f"Adapter {name!r}: a server request names adapters from its adapter folders (GET /adapters "
            "lists them), not paths."
        )


def _unknown_message(name: str, directories: Sequence[Path], *, show_folders: bool) -> str:
    available = available_adapters(directories)
    searched = ", ".join(str(d) for d in directories)
    if not available and show_folders:
        return (
            f"Unknown adapter {name!r}: it is not a file, and no adapters were found in {searched}. "
            "Pass a path to a .safetensors file, or --adapter-dir with the folder holding your adapters."
        )
    close = difflib.get_close_matches(Path(name).stem, list(available), n=3, cutoff=0.4)
    hint = f" Closest: {', '.join(close)}." if close else ""
    where = f" (in {searched})" if show_folders else ""
    return f"Unknown adapter {name!r}.{hint}\nAvailable adapters{where}: {first_n(sorted(available), 30) or 'none'}"
