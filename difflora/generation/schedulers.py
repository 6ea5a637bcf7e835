"""Samplers built by name: difflora.config.schedulers' table turned into diffusers scheduler objects.

Imports diffusers only when a scheduler is built (`SCHEDULERS` or `make_scheduler`).
"""

from __future__ import annotations

from typing import Any

from difflora.config.schedulers import DEFAULT_SCHEDULER, SCHEDULER_TABLE, check_scheduler
from difflora.errors import ConfigError


def __getattr__(name: str) -> Any:
    """`SCHEDULERS` (name -> diffusers scheduler class) is built on first use: importing diffusers costs
    seconds, which `difflora --help` should not pay."""
    if name == "SCHEDULERS":
        import diffusers

        return {key: getattr(diffusers, cls) for key, (cls, _, _) in SCHEDULER_TABLE.items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# What an adapter trained with --zero-terminal-snr needs from the sampler (Lin et al. 2023, section 3.3):
# the same rescaled betas, and timesteps that start at the last one, where the signal is zero.
ZERO_TERMINAL_SNR = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


def make_scheduler(name: str, base_config: Any, *, zero_terminal_snr: bool = False) -> Any:
    """A scheduler of kind `name` built from the model's own scheduler config (betas, prediction type)."""
    check_scheduler(name)
    flow = str(base_config.get("_class_name", "")).startswith("FlowMatch")
    if flow:  # a flow-matching model (Flux.1): its own Euler sampler, shift settings included
        if name != DEFAULT_SCHEDULER:
            raise ConfigError(
                f"--scheduler {name}: flow-matching models (Flux.1) sample with {DEFAULT_SCHEDULER} only "
                "(their flow-matching Euler sampler); leave --scheduler out."
            )
        return type_of(base_config).from_config(base_config)
    class_name, extra, _ = SCHEDULER_TABLE[name]
    overrides = {**extra, **(ZERO_TERMINAL_SNR if zero_terminal_snr else {})}
    import diffusers

    # As keyword arguments, not merged into the config: from_config drops config keys the saved config
    # lists under _use_default_values, which would silently undo an override.
    return getattr(diffusers, class_name).from_config(base_config, **overrides)


def type_of(config: Any) -> Any:
    """The diffusers scheduler class a scheduler config names."""
    import diffusers

    return getattr(diffusers, str(config["_class_name"]))
