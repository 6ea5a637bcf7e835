"""Every error difflora raises on purpose. Each message says what is wrong and what to do.

The CLI turns any DiffloraError into one clean line and a non-zero exit code; anything else is a bug
and shows its traceback.
"""

from __future__ import annotations

from collections.abc import Sequence


def first_n(items: Sequence[str], limit: int, *, separator: str = ", ") -> str:
    """The first `limit` items joined by `separator`, then "... and K more" when some are left out: a message
    listing many keys stays readable and still says how many it does not show.

    `first_n(names, 20, separator="\\n  ")` gives one indented line per name, the count on the last line."""
    limit = max(limit, 0)
    shown = separator.join(items[:limit])
    hidden = len(items) - limit
    if hidden <= 0:
        return shown
    return f"{shown}{separator}... and {hidden} more" if shown else f"... and {hidden} more"


class DiffloraError(Exception):
    """Base class: an expected failure with a message written for the user."""

    exit_code = 1


class ConfigError(DiffloraError):
    """A configuration value, flag or TOML key is invalid. Lists every problem at once."""

    exit_code = 2


class ModelError(DiffloraError):
    """A --model could not be resolved or loaded (missing folder, no network for a hub id, ...)."""


class DatasetError(DiffloraError):
    """The image folder holds nothing usable, or cannot be read."""


class TargetNotFoundError(DiffloraError):
    """A requested LoRA target module does not exist in the model."""


class AdapterFormatError(DiffloraError):
    """An adapter file is not safetensors, is truncated, holds no LoRA tensors, or has unknown keys."""


class AdapterCompatibilityError(DiffloraError):
    """An adapter was made for another architecture, or its shapes do not fit the model."""


class AdapterSpecError(DiffloraError):
    """A --adapters specification is malformed or names an unknown adapter."""

    exit_code = 2


class TrainingDivergedError(DiffloraError):
    """Training produced non-finite losses for too many consecutive steps."""


class DiskFullError(DiffloraError):
    """A write ran out of disk space (or quota); the file it would have replaced is intact."""


class Interrupted(DiffloraError):
    """The user pressed Ctrl-C (SIGINT); the message says what was completed before it."""

    exit_code = 130  # 128 + SIGINT, what shells report for a command stopped by Ctrl-C
