"""The ranges of every number and text a generation request carries, declared once.

`difflora generate` (flags, TOML) and `difflora serve` (JSON bodies) validate through the same configs, so
both refuse the same values with the same one-line message. The bounds are far beyond any useful value:
they exist so that no input can overflow a computation (a weight of 1e308 times an update is infinite in
float32) or make the process spend seconds or gigabytes on one request. `difflora serve` narrows steps,
size and images further with its own flags (--max-steps, --max-size, --max-images).
"""

from __future__ import annotations

import math

MAX_WEIGHT = 100.0
"""|WEIGHT|, |TE_WEIGHT| and |block factor| of an adapter spec: a LoRA is useful at a few units at most."""
MAX_GUIDANCE = 100.0
"""Guidance and true-CFG scales: images are saturated past ~30."""
MAX_STEPS = 1000
"""Denoising steps: a diffusion scheduler has 1000 training timesteps."""
MAX_SIZE = 8192
"""Width and height in pixels."""
MAX_IMAGES = 1000
"""Images per request or command."""
MAX_PROMPT_CHARS = 4000
"""Characters of a prompt or negative prompt. Text encoders read 77 (CLIP) or 512 (T5) tokens, about 300
and 2000 characters of English: 4000 loses nothing, and 2 prompts of 4000 characters fit serve's default
body limit even JSON-escaped (6 bytes a character)."""
MAX_SEED = 2**63 - 1
"""Largest seed: a torch.Generator takes a signed 64-bit seed (image i adds i to it)."""


def out_of_range(value: float, low: float, high: float) -> str | None:
    """Why `value` is outside [low, high] (not finite included), or None when it is inside."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if not low <= value <= high:
        return f"must be between {shown(low)} and {shown(high)}, got {shown(value)}"
    return None


def shown(value: float) -> str:
    """`value` for a message: short however large (a 5000-digit integer cannot even be str()-ed)."""
    if isinstance(value, int) and abs(value) >= 10**20:
        return f"an integer of {value.bit_length()} bits"
    return str(value) if isinstance(value, int) else f"{value:g}"


def weight_problem(value: float) -> str | None:
    """Why `value` is no adapter weight or block factor (see MAX_WEIGHT), or None."""
    return out_of_range(value, -MAX_WEIGHT, MAX_WEIGHT)
