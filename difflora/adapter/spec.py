"""What LoRA layers a run adds and where: the default targets (the attention projections, as kohya, diffusers
and ComfyUI users expect) and the run's settings as one frozen value (peft's `LoraConfig` idea), built once
from the job's configuration (`TrainConfig.lora_spec(family)`) and handed to `add_lora` / `add_adalora`.

A leaf (no torch, no difflora import): the configuration and the injection code read the same values.
"""

from __future__ import annotations

from dataclasses import dataclass

UNET_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
# LoCon (--conv-rank): the UNet ResNets' 3x3 convolutions, kohya's lora_unet_..._conv1 / _conv2.
CONV_TARGETS: tuple[str, ...] = ("conv1", "conv2")


def default_targets(component: str) -> tuple[str, ...]:
    return TEXT_ENCODER_TARGETS if component.startswith("text_encoder") else UNET_TARGETS


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
    algo: str = "lora"
    """"lora", or "lokr" / "loha" (LyCORIS through peft: `difflora.adapter.lycoris_peft`)."""
    factor: int = -1
    """LoKr's Kronecker factor (peft's decompose_factor; -1: the most balanced split)."""
    blocks: tuple[tuple[str, tuple[int, ...]], ...] = ()
    """(module list, block indices) pairs limiting the denoiser's LoRA (`--blocks`): a module under a listed
    module list is adapted only in the blocks named; () = every block."""

    def targets(self, component: str) -> tuple[str, ...]:
        """The module-name suffixes adapted in `component`, LoCon's convolutions included for the UNet."""
        if component.startswith("text_encoder"):
            return self.text_encoder_targets or default_targets(component)
        chosen = self.unet_targets or default_targets(component)
        conv = CONV_TARGETS if self.conv_rank else ()
        return (*chosen, *(target for target in conv if target not in chosen))

    def keeps(self, component: str, name: str) -> bool:
        """Whether module `name` of `component` is inside the blocks the run adapts."""
        if component.startswith("text_encoder"):
            return True
        for blocks, indices in self.blocks:
            if name.startswith(blocks + "."):
                return int(name.split(".")[len(blocks.split("."))]) in indices
        return True

    def conv_patterns(self, component: str) -> tuple[dict[str, int], dict[str, float]]:
        """peft's (rank_pattern, alpha_pattern) giving LoCon's convolutions their own rank and alpha."""
        if component.startswith("text_encoder") or not self.conv_rank:
            return {}, {}
        alpha = float(self.conv_alpha if self.conv_alpha is not None else self.conv_rank)
        return dict.fromkeys(CONV_TARGETS, self.conv_rank), dict.fromkeys(CONV_TARGETS, alpha)
