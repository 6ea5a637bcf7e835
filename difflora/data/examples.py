"""What scanning an image folder yields: the examples, and a report of everything that was not used.

`difflora.data.scan.scan_folder` builds a ScanResult; the trainer, `check`, the batcher and kohya's
metadata read it (its fields are listed in scan.py's docstring).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from difflora.data.captions import split_tags
from difflora.data.images import IMAGE_EXTENSIONS


@dataclass(frozen=True)
class Example:
    path: Path
    caption: str  # final caption: trigger applied, fallbacks resolved
    repeats: int
    class_name: str | None
    content_hash: str  # sha256 of the file's bytes
    size: tuple[int, int]  # (width, height) after EXIF rotation
    folder: str  # the folder that sets repeats, relative to the root ("." for the root)
    caption_source: str | None = None  # ".txt", ".caption", "metadata.jsonl", "trigger", "class name", None
    notes: tuple[str, ...] = ()  # conversions applied when loading (EXIF, CMYK, 16-bit, alpha, ...)


@dataclass(frozen=True)
class SkippedFile:
    path: Path
    reason: str


@dataclass(frozen=True)
class CaptionIssue:
    path: Path
    kind: Literal["missing", "empty", "too_long", "decoding", "conflict", "orphan", "metadata"]
    message: str
    level: Literal["warning", "error"] = "warning"


@dataclass(frozen=True)
class FolderInfo:
    name: str  # relative to the root, "." for the root
    path: Path
    repeats: int
    class_name: str | None
    image_count: int
    has_prefix: bool


@dataclass
class ScanResult:
    root: Path
    examples: list[Example] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    caption_issues: list[CaptionIssue] = field(default_factory=list)
    folders: list[FolderInfo] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)

    @property
    def duplicates(self) -> dict[str, list[Path]]:
        groups: dict[str, list[Path]] = defaultdict(list)
        for example in self.examples:
            groups[example.content_hash].append(example.path)
        return {digest: paths for digest, paths in groups.items() if len(paths) > 1}

    @property
    def tag_frequency(self) -> dict[str, dict[str, int]]:
        counts: dict[str, Counter] = defaultdict(Counter)
        for example in self.examples:
            counts[example.folder].update(split_tags(example.caption))
        return {folder: dict(counter) for folder, counter in counts.items()}

    @property
    def dataset_dirs(self) -> dict[str, dict[str, int]]:
        return {f.name: {"n_repeats": f.repeats, "img_count": f.image_count} for f in self.folders}

    @property
    def dataset_hash(self) -> str:
        rows = sorted((e.content_hash, e.caption, e.repeats) for e in self.examples)
        return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()

    @property
    def errors(self) -> list[str]:
        found = [f"{i.path}: {i.message}" for i in self.caption_issues if i.level == "error"]
        if not self.examples:
            found.append(_nothing_usable_message(self))
        return found


def _nothing_usable_message(result: ScanResult) -> str:
    if result.skipped:
        return (
            f"no usable image in {result.root}: all {len(result.skipped)} image file(s) were skipped "
            "(see the list above, or run `difflora check` on the folder)"
        )
    return (
        f"no image found in {result.root} (looked for {', '.join(IMAGE_EXTENSIONS)} in any letter case, "
        "in subfolders too): point to the folder that holds the images"
    )
