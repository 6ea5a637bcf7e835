"""Where the tests find the repository and its shipped sample data."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE_DATA = REPO_ROOT / "sample_data"


def copy_samples(concept: str, folder: Path, numbers: Iterable[int]) -> Path:
    """Images `numbers` of sample_data/<concept> (`<concept>_NNN.png`) with their captions, copied into
    `folder` (made, parents too): a small training set of a sample concept."""
    folder.mkdir(parents=True, exist_ok=True)
    for number in numbers:
        for suffix in (".png", ".txt"):
            source = SAMPLE_DATA / concept / f"{concept}_{number:03d}{suffix}"
            (folder / source.name).write_bytes(source.read_bytes())
    return folder
