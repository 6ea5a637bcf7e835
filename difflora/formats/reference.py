"""Reference architectures: the real SD1.5, SD2.1 and SDXL UNet and text-encoder configurations (public
configs, shipped in `difflora/models/architectures/<base>/<component>/config.json`, the same folders that load
single-file checkpoints offline), instantiated on the meta device. They give every module name and
shape of those models without a single weight being allocated, so name tables, golden key lists and
compatibility verdicts are computed from the actual module trees, never from hand-written name lists.

The embedded tiny model ("tiny") is a reference too when its configs are installed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from difflora.errors import ModelError
from difflora.models.architecture import config_folder
from difflora.models.identity import KNOWN_FAMILIES

_COMPONENTS = {
    "sd1": ("unet", "text_encoder"),
    "sd2": ("unet", "text_encoder"),
    "sdxl": ("unet", "text_encoder", "text_encoder_2"),
}


@dataclass(frozen=True)
class ModuleInfo:
    """What a LoRA on this module must look like: down [rank, in, k, k] (or [rank, in]), up [out, rank, ...]."""

    kind: Literal["linear", "conv"]
    in_features: int
    out_features: int
    kernel: tuple[int, int] = (1, 1)


def module_info(module: nn.Module) -> ModuleInfo:
    base = getattr(module, "base_layer", module)  # a peft-wrapped layer describes its base
    if isinstance(base, nn.Conv2d):
        return ModuleInfo("conv", base.in_channels, base.out_channels, tuple(base.kernel_size))  # type: ignore[arg-type]
    return ModuleInfo("linear", base.in_features, base.out_features)


def reference_families() -> tuple[str, ...]:
    """Families whose module tree we can build offline: the three SD bases, plus the embedded model if present."""
    return (*KNOWN_FAMILIES, "tiny") if _embedded_config("unet") is not None else KNOWN_FAMILIES


def components_of(family: str) -> tuple[str, ...]:
    return _COMPONENTS.get(family, ("unet", "text_encoder"))


def _embedded_config(component: str) -> Path | None:
    from difflora.embedded import EMBEDDED_MODEL_DIR

    path = EMBEDDED_MODEL_DIR / component / "config.json"
    return path if path.is_file() else None


def load_config(family: str, component: str) -> dict[str, Any]:
    """The component's configuration, without bookkeeping keys (those starting with '_')."""
    if family == "tiny":
        path = _embedded_config(component)
    elif family in KNOWN_FAMILIES and component in _COMPONENTS[family]:
        path = config_folder(family) / component / "config.json"
    else:
        path = None
    if path is None or not path.is_file():
        raise ModelError(f"No reference configuration for the {component} of family {family!r}.")
    raw = json.loads(path.read_text())
    return {key: value for key, value in raw.items() if not key.startswith("_")} | {
        "_class_name": raw.get("_class_name", raw.get("architectures", ["CLIPTextModel"])[0])
    }


@cache
def reference_model(family: str, component: str) -> nn.Module:
    """The component built on the meta device (module tree and shapes only; cached, costs < 1 s for SDXL)."""
    config = load_config(family, component)
    class_name = config.pop("_class_name")
    with torch.device("meta"):
        if component == "unet":
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel.from_config(config)
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        config = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "torch_dtype")}
        config = {k: v for k, v in config.items() if k not in ("transformers_version", "dtype")}
        model_class = CLIPTextModelWithProjection if "Projection" in class_name else CLIPTextModel
        return model_class(CLIPTextConfig(**config))


def adaptable(component: str, model: nn.Module) -> dict[str, ModuleInfo]:
    """Every Linear/Conv2d of `model` by its classic name (the names LoRA files use)."""
    from difflora.adapter.names import adaptable_modules, classic_name

    return {
        classic_name(component, name, model): module_info(module)
        for name, module in adaptable_modules(model).items()
    }


@cache
def reference_modules(family: str, component: str) -> dict[str, ModuleInfo]:
    return adaptable(component, reference_model(family, component))
