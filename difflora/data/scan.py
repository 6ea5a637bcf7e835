"""Image folder -> examples + a report of everything that was not used, and why (the types: examples.py).

Public API (plain values; the trainer, ``check`` and the exporter read these):

    scan_folder(root, *, caption_extension=".txt", trigger=None, max_tokens=None, count_tokens=None,
                strict=True) -> ScanResult
        .examples        list[Example]   usable images (path, caption, repeats, class_name, content_hash,
                                         size=(w, h) after EXIF rotation, folder, caption_source, notes)
        .skipped         list[SkippedFile(path, reason)]   unreadable files, never silently dropped
        .caption_issues  list[CaptionIssue(path, kind, message, level)]  missing/empty/too_long/decoding/
                                         conflict/orphan/metadata; level "error" for conflicting sources
        .folders         list[FolderInfo(name, path, repeats, class_name, image_count, has_prefix)]
        .warnings        list[str]       folder-level remarks (e.g. a folder without an N_ prefix)
        .ignored         list[Path]      non-image, non-caption files
        .duplicates      dict[content_hash, list[Path]]
        .tag_frequency   {folder name: {tag: count}}             (kohya ``ss_tag_frequency``)
        .dataset_dirs    {folder name: {"n_repeats", "img_count"}} (kohya ``ss_dataset_dirs``)
        .dataset_hash    sha256 of sorted (content hash, caption, repeats): provenance, path-independent
        .errors          error-level messages; strict=True raises DatasetError when there are any
    load_image(path) -> PIL.Image.Image   RGB, EXIF-rotated, transparency composited on white

Folder rules: images (.png .jpg .jpeg .webp .bmp .gif, any case; GIF/WebP: first frame) are found
recursively; hidden files and folders (leading ".") and ``__MACOSX`` are not looked at. A folder below the
root named ``N_name`` (kohya) gives its images, and those of its subfolders, N repeats and the class name
``name``; other folders give 1 repeat (named in ``warnings`` when the layout otherwise uses prefixes);
``0_name`` excludes the folder (each image listed as skipped). Captions: same-stem ``caption_extension``
file, else the other of .txt/.caption, else a ``metadata.jsonl``/``metadata.csv`` row (``file_name``,
``text``) in the image's folder or any folder above it. Sources that disagree are an error. A missing or
empty caption falls back to the trigger word, else the class name, else "" (each listed).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from difflora.data.captions import (
    CAPTION_EXTENSIONS,
    METADATA_FILES,
    TokenCounter,
    apply_trigger,
    read_caption_file,
    read_metadata,
)
from difflora.data.examples import CaptionIssue, Example, FolderInfo, ScanResult, SkippedFile
from difflora.data.images import IMAGE_EXTENSIONS, MAX_PIXELS, ImageRejected, decode_image, load_image
from difflora.errors import DatasetError, first_n

logger = logging.getLogger(__name__)

__all__ = ["load_image", "scan_folder"]

_REPEATS_FOLDER = re.compile(r"^(\d+)_(.+)$")
_SKIPPED_DIRS = {"__MACOSX"}


# --------------------------------------------------------------------------------------------- folders


@dataclass
class _Listing:
    images: list[Path] = field(default_factory=list)
    captions: dict[tuple[Path, str], dict[str, Path]] = field(default_factory=dict)  # (dir, stem) -> ext
    metadata: list[Path] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)


def _list_files(root: Path) -> _Listing:
    listing = _Listing()
    for directory, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in _SKIPPED_DIRS)
        here = Path(directory)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = here / name
            suffix = path.suffix.lower()
            if suffix in IMAGE_EXTENSIONS:
                listing.images.append(path)
            elif suffix in CAPTION_EXTENSIONS:
                listing.captions.setdefault((here, path.stem), {})[suffix] = path
            elif name.lower() in METADATA_FILES:
                listing.metadata.append(path)
            else:
                listing.ignored.append(path)
    return listing


def _subset_of(root: Path, image: Path) -> tuple[str, int, str | None, bool]:
    """(folder name, repeats, class name, has N_ prefix) for an image, from the first N_name folder."""
    parts = image.parent.relative_to(root).parts
    for index, part in enumerate(parts):
        match = _REPEATS_FOLDER.match(part)
        if match:
            return "/".join(parts[: index + 1]), int(match.group(1)), match.group(2), True
    return ("/".join(parts) or "."), 1, None, False


def _collect_metadata(listing: _Listing, result: ScanResult) -> dict[Path, tuple[str, Path]]:
    captions: dict[Path, tuple[str, Path]] = {}
    images = set(listing.images)
    for meta in listing.metadata:
        try:
            rows, problems = read_metadata(meta)
        except OSError as exc:
            rows, problems = {}, [f"cannot read: {exc}"]
        for problem in problems:
            result.caption_issues.append(CaptionIssue(meta, "metadata", problem))
        for name, text in rows.items():
            target = meta.parent / name
            if target not in images:
                result.caption_issues.append(
                    CaptionIssue(meta, "metadata", f"row names {name!r}, which is not an image in the folder")
                )
            captions.setdefault(target, (text, meta))
    return captions


class _Scanner:
    """One scan's settings and its growing result; keeps the per-image functions short."""

    def __init__(self, root: Path, listing: _Listing, settings: dict, result: ScanResult) -> None:
        self.root, self.listing, self.result = root, listing, result
        self.extension: str = settings["caption_extension"]
        self.trigger: str | None = settings["trigger"]
        self.max_tokens: int | None = settings["max_tokens"]
        self.count_tokens: TokenCounter | None = settings["count_tokens"]
        self.max_pixels: int = settings["max_pixels"]
        self.metadata: dict[Path, tuple[str, Path]] = {}
        self.folders: dict[str, list] = {}  # name -> [repeats, class, has_prefix, usable count]

    def issue(self, path: Path, kind: str, message: str, level: str = "warning") -> None:
        self.result.caption_issues.append(CaptionIssue(path, kind, message, level))  # type: ignore[arg-type]

    def image(self, path: Path) -> None:
        folder, repeats, class_name, has_prefix = _subset_of(self.root, path)
        entry = self.folders.setdefault(folder, [repeats, class_name, has_prefix, 0])
        if repeats == 0:
            self.result.skipped.append(SkippedFile(path, f"folder {folder!r} has 0 repeats (excluded)"))
            return
        try:
            data = path.read_bytes()
            image, notes = decode_image(data, max_pixels=self.max_pixels)
        except ImageRejected as exc:
            self.result.skipped.append(SkippedFile(path, str(exc)))
            return
        except OSError as exc:
            self.result.skipped.append(SkippedFile(path, f"cannot read: {exc.strerror or exc}"))
            return
        caption, source = self.caption(path, class_name)
        if self.max_tokens is not None and self.count_tokens is not None:
            tokens = self.count_tokens(caption)
            if tokens > self.max_tokens:
                self.issue(
                    path,
                    "too_long",
                    f"caption is {tokens} tokens; the text encoder reads only the first {self.max_tokens}",
                )
        entry[3] += 1
        self.result.examples.append(
            Example(
                path=path,
                caption=caption,
                repeats=repeats,
                class_name=class_name,
                content_hash=hashlib.sha256(data).hexdigest(),
                size=image.size,
                folder=folder,
                caption_source=source,
                notes=tuple(notes),
            )
        )

    def caption(self, path: Path, class_name: str | None) -> tuple[str, str | None]:
        found: list[tuple[str, str]] = []  # (source, normalised text), preferred source first
        sidecars = self.listing.captions.get((path.parent, path.stem), {})
        order = [self.extension] + [e for e in CAPTION_EXTENSIONS if e != self.extension]
        for extension in order:
            if extension not in sidecars:
                continue
            try:
                text, warning = read_caption_file(sidecars[extension])
            except OSError as exc:
                self.issue(sidecars[extension], "decoding", f"cannot read: {exc}")
                continue
            if warning:
                self.issue(sidecars[extension], "decoding", warning)
            found.append((extension, text))
        if path in self.metadata:
            text, meta = self.metadata[path]
            found.append((meta.name, text))
        texts = [(source, text) for source, text in found if text]
        if len({text for _, text in texts}) > 1:
            said = "; ".join(f"{source} says {text[:60]!r}" for source, text in texts)
            self.issue(
                path, "conflict", f"caption sources disagree ({said}): delete one or make them agree", "error"
            )
        if texts:
            source, text = texts[0]
            return apply_trigger(text, self.trigger), source
        fallback = self.trigger or class_name or ""
        source = "trigger" if self.trigger else ("class name" if class_name else None)
        used = f"using {fallback!r}" if fallback else "training it with an empty caption"
        kind = "empty" if found else "missing"
        what = "caption is empty" if found else f"no caption ({' / '.join(order)} / metadata)"
        self.issue(path, kind, f"{what}: {used}")
        return fallback, source

    def finish(self) -> None:
        listed = {(p.parent, p.stem) for p in self.listing.images}
        for key, files in self.listing.captions.items():
            if key not in listed:
                for file in files.values():
                    self.issue(file, "orphan", "caption file with no image of the same name")
        prefixed = any(values[2] for values in self.folders.values())
        for name, (repeats, class_name, has_prefix, count) in sorted(self.folders.items()):
            self.result.folders.append(
                FolderInfo(name, self.root / name, repeats, class_name, count, has_prefix)
            )
            if prefixed and not has_prefix:
                self.result.warnings.append(
                    f"folder {name!r} has no N_ repeat prefix: its {count} image(s) are used with 1 repeat "
                    f"(kohya would ignore them); rename it like '1_{Path(name).name}' to choose"
                )
            if repeats > 100:
                self.result.warnings.append(
                    f"folder {name!r} means {repeats} repeats; rename it if the number is not a repeat count"
                )


def scan_folder(
    root: Path,
    *,
    caption_extension: str = ".txt",
    trigger: str | None = None,
    max_tokens: int | None = None,
    count_tokens: TokenCounter | None = None,
    strict: bool = True,
    max_pixels: int = MAX_PIXELS,
) -> ScanResult:
    """Scan an image folder (see the module docstring for the rules). Reads and hashes each file once.

    ``strict`` (what training wants) logs the skipped files and caption problems as warnings and raises
    DatasetError when nothing is usable or a caption conflict is found; ``difflora check`` passes
    ``strict=False``: nothing is logged or raised, the problems are in the result for it to print.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder: pass the folder that holds the training images")
    extension = (
        caption_extension.lower() if caption_extension.startswith(".") else f".{caption_extension.lower()}"
    )
    if extension not in CAPTION_EXTENSIONS:
        raise DatasetError(
            f"caption extension {caption_extension!r} is not one of {', '.join(CAPTION_EXTENSIONS)}"
        )
    listing = _list_files(root)
    result = ScanResult(root=root, ignored=listing.ignored)
    settings = dict(
        caption_extension=extension,
        trigger=trigger or None,
        max_tokens=max_tokens,
        count_tokens=count_tokens,
        max_pixels=max_pixels,
    )
    scanner = _Scanner(root, listing, settings, result)
    scanner.metadata = _collect_metadata(listing, result)
    for path in listing.images:
        scanner.image(path)
    scanner.finish()
    if strict:  # with strict=False the caller reports the problems itself (difflora check prints them)
        _log_summary(result)
    if strict and result.errors:
        raise DatasetError("the image folder cannot be used:\n  " + "\n  ".join(result.errors))
    return result


def _log_summary(result: ScanResult, limit: int = 20) -> None:
    logger.info(
        "%d usable image(s) in %s, %d skipped", len(result.examples), result.root, len(result.skipped)
    )
    if result.skipped:
        lines = [f"{s.path}: {s.reason}" for s in result.skipped]
        logger.warning("skipped %d file(s):\n  %s", len(lines), first_n(lines, limit, separator="\n  "))
    problems = [i for i in result.caption_issues if i.kind in ("missing", "empty")]
    if problems:
        lines = [f"{i.path}: {i.message}" for i in problems]
        listing = first_n(lines, limit, separator="\n  ")
        logger.warning("%d caption(s) missing or empty:\n  %s", len(lines), listing)
    for warning in result.warnings:
        logger.warning("%s", warning)
