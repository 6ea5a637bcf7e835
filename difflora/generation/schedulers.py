"""Samplers by name: the table from difflora's scheduler names to diffusers classes and A1111 labels.

A leaf that imports diffusers only when a scheduler is built, so the configuration can validate
`--scheduler` (and `difflora --help` can list the names) without paying for it.
"""

from __future__ import annotations

import difflib
from typing import Any

from difflora.errors import ConfigError

DEFAULT_SCHEDULER = "euler"

# name -> (diffusers class name, extra config, A1111 sampler name written into PNG parameters)
_SCHEDULER_TABLE: dict[str, tuple[str, dict[str, Any], str]] = {
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


SCHEDULER_NAMES: tuple[str, ...] = tuple(_SCHEDULER_TABLE)


def __getattr__(name: str) -> Any:
    """`SCHEDULERS` (name -> diffusers scheduler class) is built on first use: importing diffusers costs
    seconds, which `difflora --help` should not pay."""
    if name == "SCHEDULERS":
        import diffusers

        return {key: getattr(diffusers, cls) for key, (cls, _, _) in _SCHEDULER_TABLE.items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def scheduler_label(name: str) -> str:
    """A1111's sampler name for a difflora scheduler name (what the PNG `parameters` chunk says)."""
    return _SCHEDULER_TABLE[name][2] if name in _SCHEDULER_TABLE else name


def check_scheduler(name: str) -> str:
    if name not in _SCHEDULER_TABLE:
        close = difflib.get_close_matches(name, list(_SCHEDULER_TABLE), n=1, cutoff=0.4)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"--scheduler: unknown scheduler {name!r}.{hint} Choose one of: {', '.join(_SCHEDULER_TABLE)}"
        )
    return name


# What an adapter trained with --zero-terminal-snr needs from the sampler (Lin et al. 2023, section 3.3):
# the same rescaled betas, and timesteps that start at the last one, where the signal is zero.
ZERO_TERMINAL_SNR = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


def make_scheduler(name: str, base_config: Any, *, zero_terminal_snr: bool = False) -> Any:
    """A scheduler of kind `name` built from the model's own scheduler config (betas, prediction type)."""
    check_scheduler(name)
    class_name, extra, _ = _SCHEDULER_TABLE[name]
    overrides = {**extra, **(ZERO_TERMINAL_SNR if zero_terminal_snr else {})}
    import diffusers

    # As keyword arguments, not merged into the config: from_config drops config keys the saved config
    # lists under _use_default_values, which would silently undo an override.
    return getattr(diffusers, class_name).from_config(base_config, **overrides)
