"""Captions: reading them as users write them, the trigger word, and caption augmentation.

Reading: sidecar files are decoded as UTF-8 (a UTF-8 BOM is stripped; a UTF-16 BOM is honoured); anything
else falls back to cp1252, then Latin-1, and the caller gets a warning saying so. Whitespace runs, newlines
included, collapse to one space: a caption is one line of text to the text encoder.

Tags are the comma-separated parts of a caption. ``augment_caption`` follows kohya's conventions so that
existing datasets keep their meaning: ``keep_tokens`` counts tags (not text-encoder tokens) kept in place at
the front, and a ``|||`` separator, when present, marks everything before it as kept instead.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CAPTION_EXTENSIONS = (".txt", ".caption")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
KEEP_SEPARATOR = "|||"
TRIGGER_PLACEHOLDER = "[trigger]"

_BOMS = ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))
_FALLBACK_ENCODINGS = ("cp1252", "latin-1")  # latin-1 decodes any byte string: the last resort


def decode_text(data: bytes) -> tuple[str, str | None]:
    """Decode caption bytes. Returns (text, warning); warning is None for clean UTF-8 (with or without BOM)."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                return data[len(bom) :].decode(encoding), None
            except UnicodeDecodeError:
                break  # a BOM followed by garbage: fall through to the fallbacks below
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        for encoding in _FALLBACK_ENCODINGS:
            try:
                text = data.decode(encoding)
            except UnicodeDecodeError:
                continue
            return text, f"not valid UTF-8 (byte {exc.start}); decoded as {encoding}: save it as UTF-8"
    raise AssertionError("latin-1 decodes every byte string")  # pragma: no cover


def normalise_caption(text: str) -> str:
    """One line, single spaces, no surrounding whitespace."""
    return " ".join(text.split())


def read_caption_file(path: Path) -> tuple[str, str | None]:
    """Read and normalise one sidecar caption file. Returns (caption, decoding warning or None)."""
    text, warning = decode_text(path.read_bytes())
    return normalise_caption(text), warning


def read_metadata(path: Path) -> tuple[dict[str, str], list[str]]:
    """Read a Hugging Face imagefolder ``metadata.jsonl`` / ``metadata.csv``.

    Returns ({file_name: caption}, problems). ``file_name`` is relative to the metadata file's folder;
    the caption column is ``text`` (``caption`` is accepted when ``text`` is absent).
    """
    text, warning = decode_text(path.read_bytes())
    problems = [f"{path.name}: {warning}"] if warning else []
    if path.suffix.lower() == ".jsonl":
        rows: list[dict] = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{path.name} line {number}: not JSON ({exc.msg})")
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                problems.append(f"{path.name} line {number}: not a JSON object")
    else:
        rows = _csv_rows(text, path.name, problems)
    captions: dict[str, str] = {}
    for number, row in enumerate(rows, start=1):
        name = row.get("file_name")
        caption = row.get("text", row.get("caption"))
        if not isinstance(name, str) or not name:
            problems.append(f"{path.name} row {number}: no file_name")
            continue
        captions[name.replace("\\", "/")] = normalise_caption(str(caption)) if caption is not None else ""
    return captions, problems


def _csv_rows(text: str, name: str, problems: list[str]) -> list[dict]:
    """The rows of a metadata.csv up to the first malformed line (reported in `problems`, never raised:
    one bad line must not stop a scan). newline="" is what the csv module needs to see quoted newlines."""
    rows: list[dict] = []
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            rows.append(row)
    except csv.Error as exc:
        problems.append(f"{name} line {reader.line_num}: not readable as CSV ({exc}); later rows ignored")
    return rows


def split_tags(caption: str) -> list[str]:
    """Comma-separated tags, stripped, empties dropped."""
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def apply_trigger(caption: str, trigger: str | None) -> str:
    """Put the trigger word first.

    ``[trigger]`` in a caption is replaced in place (ai-toolkit's convention); a caption whose first tag is
    already the trigger is left alone; otherwise ``"<trigger>, "`` is prepended.
    """
    if not trigger:
        return caption
    if TRIGGER_PLACEHOLDER in caption:
        return caption.replace(TRIGGER_PLACEHOLDER, trigger)
    if not caption:
        return trigger
    tags = split_tags(caption)
    if tags and tags[0] == trigger:
        return caption
    return f"{trigger}, {caption}"


def augment_caption(
    caption: str,
    *,
    dropout_rate: float = 0.0,
    shuffle_tags: bool = False,
    keep_tokens: int = 0,
    tag_dropout_rate: float = 0.0,
    rng: random.Random,
) -> str:
    """Caption as the model sees it for one draw.

    With probability ``dropout_rate`` the whole caption becomes "" (unconditional training). Otherwise the
    tags after the kept ones (the first ``keep_tokens`` tags, or everything before ``|||``) are dropped
    each with probability ``tag_dropout_rate`` and shuffled when ``shuffle_tags``. Pure given ``rng``.
    """
    if dropout_rate > 0 and rng.random() < dropout_rate:
        return ""
    if KEEP_SEPARATOR in caption:
        head, _, tail = caption.partition(KEEP_SEPARATOR)
        kept, rest = split_tags(head), split_tags(tail)
    else:
        tags = split_tags(caption)
        kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    if not shuffle_tags and tag_dropout_rate <= 0 and KEEP_SEPARATOR not in caption:
        return caption  # nothing to do: keep the user's exact text (spacing, no trailing-comma rewrite)
    if tag_dropout_rate > 0:
        rest = [tag for tag in rest if rng.random() >= tag_dropout_rate]
    if shuffle_tags:
        rng.shuffle(rest)
    return ", ".join(kept + rest)


@dataclass(frozen=True)
class CaptionAugmentation:
    """The caption augmentation knobs, as one value the dataset and the text cache can both read."""

    dropout_rate: float = 0.0
    shuffle_tags: bool = False
    keep_tokens: int = 0
    tag_dropout_rate: float = 0.0

    @property
    def changes_tags(self) -> bool:
        """True when captions vary beyond all-or-nothing dropout (so text embeddings cannot be cached)."""
        return self.shuffle_tags or self.tag_dropout_rate > 0

    def possible_captions(self, caption: str) -> set[str]:
        """Every text ``apply`` can return for ``caption`` when ``changes_tags`` is False (for the text cache)."""
        fixed = augment_caption(caption, rng=random.Random(0))
        return {fixed, ""} if self.dropout_rate > 0 else {fixed}

    def apply(self, caption: str, rng: random.Random) -> str:
        return augment_caption(
            caption,
            dropout_rate=self.dropout_rate,
            shuffle_tags=self.shuffle_tags,
            keep_tokens=self.keep_tokens,
            tag_dropout_rate=self.tag_dropout_rate,
            rng=rng,
        )


_WORDISH = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def rough_token_count(text: str) -> int:
    """A lower bound on CLIP tokens: one per word and per punctuation mark (BPE splits rare words further).

    Used by ``difflora check`` when no tokenizer is at hand; the report says it is an estimate.
    """
    return len(_WORDISH.findall(text))


TokenCounter = Callable[[str], int]


def clip_token_counter(tokenizer) -> TokenCounter:
    """Count tokens with a Hugging Face tokenizer, without the begin/end tokens (75 fit in CLIP's 77)."""

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"])

    return count
