"""Does an adapter fit a model? Refuse clearly before anything touches the weights.

Another architecture (recorded in the adapter's metadata), a module the model lacks, or a module whose shape
differs is an AdapterCompatibilityError naming both models (LANDSCAPE pain 17: today users get a shape
error deep inside a layer, or "lora key not loaded"). The same architecture with different base weights
is only a warning: a LoRA trained on one fine-tune usually works on a sibling. An adapter the composition
mode cannot apply is refused here too, and a composed weight its parameter's type cannot hold is caught
(`check_representable`) before it is written.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from difflora.adapter.lycoris import bias_delta, is_lycoris
from difflora.adapter.names import live_name
from difflora.adapter.types import Adapter, ModuleWeights
from difflora.errors import AdapterCompatibilityError, ConfigError, first_n
from difflora.models.identity import KNOWN_FAMILIES, model_identity

logger = logging.getLogger(__name__)


def check_compatible(adapter: Adapter, pipe: Any, *, name: str) -> list[str]:
    """Refuse an adapter made for another architecture, or one whose modules are missing from or do not
    fit the model (AdapterCompatibilityError naming both models). Returns warnings (same architecture,
    different base weights)."""
    identity = model_identity(pipe)
    meta = adapter.meta
    made_for = f"{meta.base_model or 'an unknown base'} ({meta.base_architecture or meta.base_family or '?'})"
    this = f"{identity.name} ({identity.architecture})"
    other_family = meta.base_family in KNOWN_FAMILIES and identity.family in KNOWN_FAMILIES
    if (meta.base_architecture and meta.base_architecture != identity.architecture) or (
        other_family and meta.base_family != identity.family
    ):
        raise AdapterCompatibilityError(
            f"Adapter {name!r} was made for {made_for}, but the model is {this}: another architecture. "
            "Use an adapter trained on this model's architecture, or pass the matching --model."
        )
    problems = _shape_problems(adapter, pipe)
    if problems:
        listing = first_n(problems, 5, separator="\n  ")
        raise AdapterCompatibilityError(
            f"Adapter {name!r} (made for {made_for}) does not fit the model {this}: {len(problems)} of its "
            f"{len(adapter.modules)} modules are missing or have other shapes:\n  {listing}\n"
            "It was most likely trained for another base model; pass the matching --model."
        )
    if meta.base_hash and meta.base_hash != identity.base_hash:
        message = (
            f"Adapter {name!r} was trained on {made_for} with base hash {meta.base_hash}; this model "
            f"{this} has hash {identity.base_hash}. Same architecture, so it applies, but results may differ."
        )
        logger.warning(message)
        return [message]
    return []


def _shape_problems(adapter: Adapter, pipe: Any) -> list[str]:
    problems = []
    for component in adapter.components:
        model = getattr(pipe, component, None)
        if model is None:
            problems.append(f"{component}: the model has no {component}")
            continue
        modules = dict(model.named_modules())
        for classic, weights in adapter.component_modules(component).items():
            module = modules.get(live_name(component, classic, model))
            weight = getattr(base_layer(module), "weight", None) if module is not None else None
            if weight is None:
                problems.append(f"{component}.{classic}: no such module in the model")
            elif not _fits(weights, weight):
                adapter_shape = f"{_in_numel(weights)}->{_out_features(weights)}"
                model_shape = f"{weight[0].numel()}->{weight.shape[0]}"
                problems.append(f"{component}.{classic}: adapter {adapter_shape}, model {model_shape}")
            elif bias_delta(weights) is not None and getattr(base_layer(module), "bias", None) is None:
                problems.append(
                    f"{component}.{classic}: the adapter changes its bias (diff_b), the model has none"
                )
    return problems


# Not formats.family.shape_fits, on purpose: that one tells architectures apart by a file's exact layout
# (in_features and kernel of a reference module), this one asks whether a loaded module can take the update
# at all, by element count, so every layout fit_to_modules reshapes ([r, in] on a 1x1 conv, [r, in, 1, 1] on
# a Linear, a flattened kxk down) passes, and so does any module with a weight, Linear/Conv2d or not.
def _fits(weights: ModuleWeights, weight: torch.Tensor) -> bool:
    return _out_features(weights) == weight.shape[0] and _in_numel(weights) == weight[0].numel()


def _out_features(weights: ModuleWeights) -> int:
    return weights.out_features if is_lycoris(weights) else int(weights.up.shape[0])  # type: ignore[union-attr]


def _in_numel(weights: ModuleWeights) -> int:
    """Elements of one row of the weight the module updates (a LyCORIS update is reshaped to it when fused)."""
    return weights.in_numel if is_lycoris(weights) else int(weights.down[0].numel())  # type: ignore[union-attr]


def base_layer(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, LoraLayer) else module


def fit_to_modules(adapter: Adapter, pipe: Any) -> Adapter:
    """Reshape A/B to the module kind they adapt (a 1x1-conv LoRA on a Linear, or the reverse, as foreign
    files sometimes hold) so fused and dynamic modes see the same tensors."""
    modules: dict[str, ModuleWeights] = {}
    for key, weights in adapter.modules.items():
        if is_lycoris(weights):  # its update is reshaped to the weight where it is fused
            modules[key] = weights
            continue
        component, _, classic = key.partition(".")
        model = getattr(pipe, component)
        module = base_layer(model.get_submodule(live_name(component, classic, model)))
        down, up = weights.down, weights.up
        if isinstance(module, nn.Linear) and down.ndim == 4:
            down, up = down.flatten(1), up.flatten(1)
        elif isinstance(module, nn.Conv2d) and down.ndim == 2:
            down = down.reshape(down.shape[0], *module.weight.shape[1:])
            up = up.reshape(*up.shape, 1, 1)
        modules[key] = weights if down is weights.down else replace(weights, down=down, up=up)
    return Adapter(modules=modules, meta=adapter.meta)


def check_mode(name: str, adapter: Adapter, mode: str) -> None:
    """Refuse what dynamic composition (peft's LoRA layers) cannot apply: LyCORIS and DoRA modules."""
    if mode == "dynamic" and adapter.lycoris_kinds:
        raise ConfigError(
            f"Adapter {name!r} holds {'/'.join(adapter.lycoris_kinds)} modules, which dynamic composition "
            "(peft's LoRA layers) cannot apply; compose it fused (generate without --no-fuse; serve with mode fused)."
        )
    if mode == "dynamic" and adapter.dora_axes:
        raise ConfigError(
            f"Adapter {name!r} is a DoRA adapter: it re-normalises the weights, which dynamic "
            "composition (peft's unfused layers) cannot scale by a weight. Compose it fused (generate "
            "without --no-fuse; serve with mode fused)."
        )


class WeightOverflow(Exception):
    """A composed weight is not finite in its parameter's type (the composer turns it into a user error)."""


def check_representable(total: torch.Tensor, dtype: torch.dtype, target: tuple[str, str]) -> None:
    """Raise WeightOverflow unless every value of `total` (float32) is finite as `dtype`: W0 + 100·ΔW of a
    large update overflows float16 (65504), and one infinite weight turns every later image into NaN."""
    largest = float(total.abs().amax()) if total.numel() else 0.0
    if not largest <= torch.finfo(dtype).max:  # NaN compares false too
        raise WeightOverflow(
            f"overflows {str(dtype).removeprefix('torch.')} in {target[0]} module {target[1]} "
            f"(largest |weight| {largest:g}, the type holds {torch.finfo(dtype).max:g})"
        )
