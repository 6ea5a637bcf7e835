"""The LoRA settings of a run as one frozen value (peft's `LoraConfig` idea): built once from the job's
configuration (`TrainConfig.lora_spec(family)`), handed to `add_lora` / `add_adalora` unchanged.

A leaf (no torch), like `targets.py`, whose defaults it applies.
"""

from __future__ import annotations

from dataclasses import dataclass

from difflora.adapter.targets import CONV_TARGETS, default_targets


@dataclass(frozen=True)
class LoraSpec:
    """Where LoRA layers go and how they scale. `alpha / rank` scales an update (`alpha / sqrt(rank)` with
    `rslora`); `dora` adds a trained magnitude per output row; `conv_rank` also adapts the UNet ResNets' 3x3
    convolutions (LoCon) at their own rank and alpha (default: the conv rank); `adaptive_init_rank` makes the
    layers AdaLoRA ones starting at that rank, pruned to an average of `rank`. Empty targets: the component's
    defaults (the attention projections)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    unet_targets: tuple[str, ...] = ()
    text_encoder_targets: tuple[str, ...] = ()
    rslora: bool = False
    dora: bool = False
    conv_rank: int | None = None
    conv_alpha: float | None = None
    adaptive_init_rank: int | None = None

    def targets(self, component: str) -> tuple[str, ...]:
        """The module-name suffixes adapted in `component`, LoCon's convolutions included for the UNet."""
        if component != "unet":
            return self.text_encoder_targets or default_targets(component)
        chosen = self.unet_targets or default_targets(component)
        conv = CONV_TARGETS if self.conv_rank else ()
        return (*chosen, *(target for target in conv if target not in chosen))

    def conv_patterns(self, component: str) -> tuple[dict[str, int], dict[str, float]]:
        """peft's (rank_pattern, alpha_pattern) giving LoCon's convolutions their own rank and alpha."""
        if component != "unet" or not self.conv_rank:
            return {}, {}
        alpha = float(self.conv_alpha if self.conv_alpha is not None else self.conv_rank)
        return dict.fromkeys(CONV_TARGETS, self.conv_rank), dict.fromkeys(CONV_TARGETS, alpha)
