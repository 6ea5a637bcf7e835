"""Exporting DoRA adapters for ComfyUI and A1111: converting peft's per-row magnitudes to kohya's per-column ones.

difflora trains DoRA through peft, whose magnitude is one value per output row. ComfyUI, A1111 and Forge read
kohya/LyCORIS `dora_scale`, and every version of each applies it per input column (`formats.consumers`'
`patched_weight`). Newer ComfyUI and Forge also read a per-row `dora_scale`, but normalise it by the row
norms of the weight before the patch instead of the patched one, A1111 and older ComfyUI scramble it, and
diffusers drops every `dora_scale`: so the export targets the per-column convention, which the most consumers
apply and apply as DoRA defines it.

A per-column magnitude cannot reproduce a per-row DoRA weight in general (`difflora.adapter.dora`): the
export keeps B, A and alpha and writes the magnitude `dora.column_magnitude`, whose weight is the closest
(least squares, column by column) the convention reaches. What is exact: ComfyUI and A1111 compute from the
file exactly the weight V·d/‖V‖_col that difflora computes for it (and re-imports); it equals the trained
weight only when all rows of a layer share one factor m/‖V‖. What is not: the trained weight itself, off by
the relative error of each layer's update this module measures, which the export logs and records. The
exact ways to use the trained adapter are difflora itself and its diffusers export (peft's own layout).

The conversion needs the base weights W0 (V = W0 + s·B·A): they are read from `--model`, by default the base
the adapter records.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from difflora.adapter.dora import column_magnitude
from difflora.adapter.names import live_name
from difflora.adapter.types import Adapter
from difflora.errors import AdapterCompatibilityError, ConfigError
from difflora.formats.family import family_of

logger = logging.getLogger(__name__)

BaseWeights = Callable[[str], torch.Tensor]  # module key -> its base weight W0
CONVERSION_KEY = "difflora.dora_conversion"


@dataclass
class ColumnConversion:
    """The adapter with per-input-column magnitudes, and each converted layer's relative error
    ‖ΔW_file − ΔW_trained‖ / ‖ΔW_trained‖ (ΔW the layer's effective update against the base)."""

    adapter: Adapter
    errors: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        if not self.errors:
            return "No DoRA module needed converting."
        values = sorted(self.errors.values())
        worst = max(self.errors, key=self.errors.__getitem__)
        return (
            f"DoRA magnitudes of {len(values)} layers converted from per output row (as trained) to per input "
            "column (kohya dora_scale, the convention ComfyUI, A1111 and Forge apply): not exact. ComfyUI and "
            "A1111 apply this file's weights exactly as difflora does, but those differ from the trained ones "
            f"by {_percent(values[len(values) // 2])} of each layer's update (median; worst "
            f"{_percent(self.errors[worst])}, {worst}). For the trained weights exactly, use difflora or "
            "export --format diffusers (peft's layout, loaded by diffusers)."
        )


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def needs_conversion(adapter: Adapter) -> bool:
    return "out" in adapter.dora_axes


def to_column_magnitudes(adapter: Adapter, base: BaseWeights) -> ColumnConversion:
    """Every per-row DoRA module given the per-column magnitude closest to it (see the module docstring)."""
    modules, errors = dict(adapter.modules), {}
    for key, weights in adapter.modules.items():
        if weights.magnitude is None or weights.magnitude_axis != "out":
            continue
        w0 = base(key).float()
        magnitude = column_magnitude(w0, weights.low_rank_delta(), weights.magnitude.to(w0.device))
        converted = replace(weights, magnitude=magnitude.to(weights.magnitude.dtype), magnitude_axis="in")
        trained = weights.delta(w0)
        norm = float(trained.norm())
        errors[key] = float((converted.delta(w0) - trained).norm()) / norm if norm else 0.0
        modules[key] = converted
    result = ColumnConversion(Adapter(modules=modules, meta=replace(adapter.meta)), errors)
    result.adapter.meta.extra = {**adapter.meta.extra, CONVERSION_KEY: result.summary()}
    return result


def base_weights(adapter: Adapter, model: str | None) -> BaseWeights:
    """The base weights of the adapter's modules, from `model` or else the base the adapter records; a base
    of another architecture is refused, other weights of the same architecture only warned about."""
    from difflora.models.identity import model_identity
    from difflora.models.loading import load_pipeline

    meta = adapter.meta
    if model is None and not meta.base_model:
        raise ConfigError(
            "This DoRA adapter records no base model, and converting its magnitudes for ComfyUI/A1111 needs "
            "the base weights: pass --model with the model it was trained on."
        )
    embedded = family_of(meta.base_family).ships_with_difflora  # recorded by display name: omit --model
    reference = model if model is not None else (None if embedded else meta.base_model)
    pipe = load_pipeline(reference)
    identity = model_identity(pipe)
    if meta.base_architecture and meta.base_architecture != identity.architecture:
        raise AdapterCompatibilityError(
            f"The adapter was trained on {meta.base_model} ({meta.base_architecture}) but --model is "
            f"{identity.name} ({identity.architecture}); pass the base it was trained on."
        )
    if meta.base_hash and meta.base_hash != identity.base_hash:
        logger.warning(
            "The adapter was trained on base weights with hash %s, %s has %s: the DoRA magnitudes are "
            "converted against these weights.",
            meta.base_hash,
            identity.name,
            identity.base_hash,
        )
    return lambda key: _module_weight(pipe, key)


def _module_weight(pipe: Any, key: str) -> torch.Tensor:
    component, _, classic = key.partition(".")
    model = getattr(pipe, component)
    return model.get_submodule(live_name(component, classic, model)).weight.detach()
