"""Reference architectures: the real UNet and text-encoder configurations of every family with a reference
(public configs, shipped in each family's config folder, the same folders that load single-file checkpoints
offline; the embedded model's own folder), instantiated on the meta device. They give every module name and
shape of those models without a single weight being allocated, so name tables, golden key lists and
compatibility verdicts are computed from the actual module trees, never from hand-written name lists.
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
from difflora.models.families import ModelFamily, families
from difflora.models.families import family as model_family

# Bookkeeping keys of a transformers config.json that are not settings of the model's config class.
_TRANSFORMERS_BOOKKEEPING = ("architectures", "model_type", "torch_dtype", "transformers_version", "dtype")


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
    """Families whose module tree can be built offline: those with a reference whose configs are installed
    (the embedded model's are absent from a bare source checkout)."""
    return tuple(f.name for f in families() if f.has_reference and _config_path(f.name, f.denoiser))


def components_of(family: str) -> tuple[str, ...]:
    """The family's components whose configurations are installed (a family's text-encoder configs may ship
    apart from its denoiser's)."""
    return tuple(c for c in model_family(family).components if _config_path(family, c) is not None)


def _config_path(family: str, component: str) -> Path | None:
    known = model_family(family)
    folder = _config_folder(known) if known.has_reference and component in known.components else None
    path = folder / component / "config.json" if folder is not None else None
    return path if path is not None and path.is_file() else None


def _config_folder(known: ModelFamily) -> Path | None:
    if known.ships_with_difflora:  # the embedded model: its configs sit beside its weights
        from difflora.embedded import EMBEDDED_MODEL_DIR

        return EMBEDDED_MODEL_DIR
    return known.config_dir()


def load_config(family: str, component: str) -> dict[str, Any]:
    """The component's configuration, without bookkeeping keys (those starting with '_'), and the class it
    builds as `_class_name` (a diffusers model's own key; a transformers model's first `architectures`)."""
    path = _config_path(family, component)
    if path is None:
        raise ModelError(f"No reference configuration for the {component} of family {family!r}.")
    return _read_config(path)


def _read_config(path: Path) -> dict[str, Any]:
    raw = json.loads(path.read_text())
    return {key: value for key, value in raw.items() if not key.startswith("_")} | {
        "_class_name": raw.get("_class_name", raw.get("architectures", ["CLIPTextModel"])[0])
    }


@cache
def reference_model(family: str, component: str) -> nn.Module:
    """The component built on the meta device (module tree and shapes only; cached, costs < 1 s for SDXL)."""
    return _meta_model(load_config(family, component))


def folder_modules(folder: str | Path, family: str) -> dict[str, dict[str, ModuleInfo]]:
    """The module trees of a diffusers model folder's components of `family` (built on the meta device from
    their config.json): a model of the family's architecture at another size, whose shapes its reference
    does not have."""
    found = {}
    for component in model_family(family).components:
        path = Path(folder) / component / "config.json"
        if path.is_file():
            found[component] = adaptable(component, _meta_model(_read_config(path)))
    return found


def _meta_model(config: dict[str, Any]) -> nn.Module:
    config = dict(config)
    class_name = config.pop("_class_name")
    with torch.device("meta"):
        if "model_type" not in config:  # a diffusers model (UNet, transformer)
            import diffusers

            return getattr(diffusers, class_name).from_config(config)
        import transformers

        settings = {k: v for k, v in config.items() if k not in _TRANSFORMERS_BOOKKEEPING}
        return getattr(transformers, class_name)(
            transformers.AutoConfig.for_model(config["model_type"], **settings)
        )


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
