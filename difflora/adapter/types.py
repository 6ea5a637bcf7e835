"""What an adapter is in memory: LoraWeights per adapted module, AdapterMeta, and the Adapter holding both.

Modules are keyed "<component>.<classic module path>" (components: unet or transformer, text_encoder,
text_encoder_2, text_encoder_3), the
names every LoRA consumer writes; how they are laid out on disk is difflora.formats' business.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from difflora import __version__
from difflora.adapter import dora
from difflora.adapter.lycoris import LycorisWeights, is_lycoris

COMPONENTS: tuple[str, ...] = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass
class LoraWeights:
    """One adapted module: ΔW = (alpha / rank) · up @ down (down = peft lora_A, up = lora_B). A DoRA module
    also has a 1-D `magnitude`, one value per output row or per input column (`magnitude_axis`, see
    `difflora.adapter.dora`); its update then depends on the base weight W0: `delta(base)`."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    magnitude: torch.Tensor | None = None
    magnitude_axis: str = "out"

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def is_dora(self) -> bool:
        return self.magnitude is not None

    kind = "LoRA"  # a class attribute, not a field: LyCORIS modules say LoKr, LoHa or full here

    def low_rank_delta(self) -> torch.Tensor:
        """(alpha/rank)·B·A in float32, shaped like the module's weight (Linear [out, in], Conv [out, in, k, k])."""
        product = self.up.float().flatten(1) @ self.down.float().flatten(1)
        if self.down.ndim == 4:
            product = product.reshape(self.up.shape[0], *self.down.shape[1:])
        return product * self.scale

    def delta(self, base: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW in float32: the low-rank update, or for DoRA the effective update W − W0 against the base
        weight `base` (W0, required then), shaped like `base`."""
        if self.magnitude is None:
            return self.low_rank_delta()
        if base is None:
            raise ValueError("A DoRA module's update depends on the base weight: pass base=W0.")
        update, magnitude = self.low_rank_delta().to(base.device), self.magnitude.to(base.device)
        return dora.decomposed_weight(base, update, magnitude, self.magnitude_axis) - base.float()

    @property
    def parameter_count(self) -> int:
        extra = self.magnitude.numel() if self.magnitude is not None else 0
        return self.down.numel() + self.up.numel() + extra


# One adapted module: a LoRA, or a LyCORIS module (difflora.adapter.lycoris) with the same update interface.
ModuleWeights = LoraWeights | LycorisWeights


@dataclass
class AdapterMeta:
    """Everything an adapter says about itself besides its tensors."""

    name: str = ""
    base_model: str = ""
    base_family: str = ""
    base_architecture: str = ""
    base_hash: str = ""
    prediction_type: str = "epsilon"
    trigger_words: list[str] = field(default_factory=list)
    config_toml: str = ""
    source_format: str = "difflora"
    created_at: str = ""
    difflora_version: str = __version__
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class Adapter:
    """A LoRA adapter: modules keyed "<component>.<classic module path>" plus metadata. A module may be a
    LyCORIS one (LoKr, LoHa, full), read from a file; see `lycoris_kinds`."""

    modules: dict[str, ModuleWeights]
    meta: AdapterMeta = field(default_factory=AdapterMeta)

    @property
    def dora_axes(self) -> list[str]:
        """The DoRA magnitude axes its modules use ("out", "in"); empty for a plain LoRA."""
        return sorted({w.magnitude_axis for w in self.modules.values() if w.is_dora})

    @property
    def lycoris_kinds(self) -> list[str]:
        """The LyCORIS kinds among its modules ("LoHa", "LoKr", "full"); empty for a LoRA adapter."""
        return sorted({w.kind for w in self.modules.values() if is_lycoris(w)})

    def component_modules(self, component: str) -> dict[str, ModuleWeights]:
        """This component's modules, keyed by module path without the component prefix."""
        prefix = component + "."
        return {key[len(prefix) :]: w for key, w in self.modules.items() if key.startswith(prefix)}

    @property
    def components(self) -> list[str]:
        return [c for c in COMPONENTS if any(k.startswith(c + ".") for k in self.modules)]

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per component: module count, ranks, alphas, target suffixes, parameter count (and the DoRA axis)."""
        result = {}
        for component in self.components:
            modules = self.component_modules(component)
            ranks = Counter(w.rank for w in modules.values())
            alphas = Counter(_round(w.alpha) for w in modules.values())
            suffixes = sorted({_target_suffix(name) for name in modules})
            result[component] = {
                "modules": len(modules),
                "rank": _single_or_counts(ranks),
                "alpha": _single_or_counts(alphas),
                "targets": suffixes,
                "parameters": sum(w.parameter_count for w in modules.values()),
            }
            axes = Counter(dora.AXIS_NAMES[w.magnitude_axis] for w in modules.values() if w.is_dora)
            if axes:  # only DoRA adapters carry the key, so plain adapters' headers are unchanged
                result[component]["dora"] = _single_or_counts(axes)
            kinds = Counter(w.kind for w in modules.values())
            if set(kinds) != {"LoRA"}:  # likewise only where a LyCORIS module is present
                result[component]["kinds"] = dict(sorted(kinds.items()))
        return result

    @property
    def parameter_count(self) -> int:
        return sum(w.parameter_count for w in self.modules.values())


def _round(value: float) -> float:
    return float(f"{value:.6g}")


def _single_or_counts(counter: Counter) -> Any:
    return next(iter(counter)) if len(counter) == 1 else dict(sorted(counter.items()))


_CONTAINERS = (
    "transformer_blocks",
    "single_transformer_blocks",
    "resnets",
    "attentions",
    "layers",
    "down_blocks",
    "up_blocks",
)
_ATTENTION_LEVELS = ("attn1", "attn2", "attn", "self_attn", "mlp")


def _target_suffix(module_path: str) -> str:
    """The target name a user would pass for this module: the path after its innermost numbered block,
    without the attention/MLP level ("...transformer_blocks.0.attn1.to_out.0" -> "to_out.0",
    "...transformer_blocks.0.ff.net.0.proj" -> "ff.net.0.proj", "...resnets.1.conv2" -> "conv2")."""
    parts = module_path.split(".")
    start = 0
    for index in range(len(parts) - 1):
        if parts[index] in _CONTAINERS and parts[index + 1].isdigit():
            start = index + 2
    tail = parts[start:]
    if len(tail) > 1 and tail[0] in _ATTENTION_LEVELS:
        tail = tail[1:]
    return ".".join(tail)
