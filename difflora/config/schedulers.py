"""Samplers by name: the table from difflora's scheduler names to diffusers class names and A1111 labels.

A leaf without diffusers, so the configuration can validate `--scheduler` (and `difflora --help` can list
the names) without paying for it; difflora.generation.schedulers builds the scheduler objects.
"""

from __future__ import annotations

import difflib
from typing import Any

from difflora.errors import ConfigError

DEFAULT_SCHEDULER = "euler"

# name -> (diffusers class name, extra config, A1111 sampler name written into PNG parameters)
SCHEDULER_TABLE: dict[str, tuple[str, dict[str, Any], str]] = {
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "dpm++-2m": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
        "DPM++ 2M",
    ),
    "dpm++-2m-karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        "DPM++ 2M Karras",
    ),
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "pndm": ("PNDMScheduler", {}, "PLMS"),
    "heun": ("HeunDiscreteScheduler", {}, "Heun"),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
}


SCHEDULER_NAMES: tuple[str, ...] = tuple(SCHEDULER_TABLE)


def scheduler_label(name: str) -> str:
    """A1111's sampler name for a difflora scheduler name (what the PNG `parameters` chunk says)."""
    return SCHEDULER_TABLE[name][2] if name in SCHEDULER_TABLE else name


def check_scheduler(name: str) -> str:
    if name not in SCHEDULER_TABLE:
        close = difflib.get_close_matches(name, list(SCHEDULER_TABLE), n=1, cutoff=0.4)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"--scheduler: unknown scheduler {name!r}.{hint} Choose one of: {', '.join(SCHEDULER_TABLE)}"
        )
    return name
