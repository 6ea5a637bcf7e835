"""Which block each adapted module lies in, for per-block weights (`difflora.config.blocks`).

A module's block comes from its name in the model, never from its position in a file: a UNet's modules by
their SGM path (`input_blocks.4...` -> IN04, `middle_block...` -> MID, `output_blocks.3...` -> OUT03; the
same walk of the UNet's own blocks that kohya and ComfyUI use, `formats.naming.sgm_block_prefixes`), a
transformer's by the module lists its family declares (`block_lists`: `transformer_blocks.3` -> DOUBLE3 for
Flux), a text encoder's as BASE. Modules outside every block have no block ("", factor 1).
"""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difflora.adapter.types import Adapter
from difflora.config.spec import AdapterWeight
from difflora.errors import ConfigError
from difflora.formats.naming import sgm_block_prefixes
from difflora.models.families import family as model_family

_SGM = re.compile(r"^(input_blocks|middle_block|output_blocks)(?:\.(\d+))?")
_SGM_KINDS = {"input_blocks": "IN", "middle_block": "MID", "output_blocks": "OUT"}
_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[str, str]] = weakref.WeakKeyDictionary()
_PREFIXES: weakref.WeakKeyDictionary[nn.Module, dict[str, str]] = weakref.WeakKeyDictionary()


def sgm_block(sgm_path: str) -> str:
    """ "input_blocks.4.1.proj_in" -> "IN04", "middle_block.1..." -> "MID", anything else -> ""."""
    match = _SGM.match(sgm_path)
    if not match:
        return ""
    kind = _SGM_KINDS[match[1]]
    return kind if match[2] is None or kind == "MID" else f"{kind}{int(match[2]):02d}"


def listed_block(path: str, block_lists: Mapping[str, str]) -> str:
    """A transformer module's block by the family's module lists ("transformer_blocks.3.attn" -> "DOUBLE3")."""
    for kind, module_list in block_lists.items():
        head, _, rest = path.partition(module_list + ".")
        index = rest.split(".")[0]
        if not head and rest and index.isdigit():
            return f"{kind.upper()}{int(index)}"
    return ""


def module_block(model: nn.Module, path: str, block_lists: Mapping[str, str]) -> str:
    """The block of module `path` (a live name) of a denoiser `model` (cached per model)."""
    blocks = _CACHE.setdefault(model, {})
    if path not in blocks:
        if hasattr(model, "down_blocks"):  # a UNet: its SGM layout (walked once per model)
            prefixes = _PREFIXES.get(model) or _PREFIXES.setdefault(model, sgm_block_prefixes(model))
            parts = path.split(".")
            heads = (".".join(parts[:n]) for n in range(len(parts), 0, -1))
            blocks[path] = next((sgm_block(prefixes[h]) for h in heads if h in prefixes), "")
        else:
            blocks[path] = listed_block(path, block_lists)
    return blocks[path]


def model_blocks(model: nn.Module, block_lists: Mapping[str, str]) -> set[str]:
    """Every block of denoiser `model`, and BASE (the text encoders): what a selector may name."""
    if hasattr(model, "down_blocks"):
        prefixes = _PREFIXES.get(model) or _PREFIXES.setdefault(model, sgm_block_prefixes(model))
        found = {sgm_block(path) for path in prefixes.values()}
    else:
        found = {
            f"{kind.upper()}{i}" for kind, path in block_lists.items() for i in range(_length(model, path))
        }
    return (found - {""}) | {"BASE"}


def _length(model: nn.Module, path: str) -> int:
    try:
        return len(model.get_submodule(path))  # type: ignore[arg-type]
    except AttributeError:
        return 0  # a model of the family without this module list


def check_blocks(specs: Sequence[AdapterWeight], pipe: Any, family: Any) -> list[AdapterWeight]:
    """`specs`, once none has a block selector naming no block of `pipe`'s denoiser (`BlockWeights.check`,
    before anything is composed; `family`: the pipeline's ModelFamily)."""
    if any(spec.blocks is not None for spec in specs):
        blocks = model_blocks(family.denoiser_of(pipe), family.block_lists)
        for spec in specs:
            if spec.blocks is not None:
                spec.blocks.check(blocks, family.name)
    return list(specs)


def block_weight(
    spec: AdapterWeight, pipe: Any, component: str, live: str, block_lists: Mapping[str, str]
) -> float:
    """The weight a module of `component` (live name `live`) takes: the adapter's weight for the component,
    times its block's factor (the text encoders' block is BASE; `block_lists`: the family's)."""
    weight = spec.weight_for(component)
    if spec.blocks is None:
        return weight
    if component.startswith("text_encoder"):
        return weight * spec.block_factor("BASE")
    return weight * spec.block_factor(module_block(getattr(pipe, component), live, block_lists))


def pipe_blocks(pipe: Any, block_lists: Mapping[str, str]) -> Callable[[str], str]:
    """module key ("<component>.<classic path>") -> its block in the loaded `pipe`."""
    from difflora.adapter.names import live_name

    def block(key: str) -> str:
        component, _, classic = key.partition(".")
        if component.startswith("text_encoder"):
            return "BASE"
        model = getattr(pipe, component)
        return module_block(model, live_name(component, classic, model), block_lists)

    return block


def key_blocks(spec: AdapterWeight, adapter: Adapter) -> Callable[[str], str]:
    """module key -> block for an adapter's own modules, without a loaded model: its family's reference
    denoiser, else the one its recorded base folder configures, built on the meta device (what `merge` bakes
    block weights with). `spec`'s selectors are checked against that denoiser's blocks first
    (AdapterSpecError); ConfigError where neither model is at hand."""
    from difflora.formats.family import export_family

    family = model_family(export_family(adapter))
    models: dict[str, nn.Module] = {family.denoiser: _base_model(adapter, family.name, family.denoiser)}
    if spec.blocks is not None:
        spec.blocks.check(model_blocks(models[family.denoiser], family.block_lists), family.name)

    def block(key: str) -> str:
        component, _, path = key.partition(".")
        if component.startswith("text_encoder"):
            return "BASE"
        if component not in models:
            models[component] = _base_model(adapter, family.name, component)
        return module_block(models[component], path, family.block_lists)

    return block


def _base_model(adapter: Adapter, family: str, component: str) -> nn.Module:
    from difflora.formats.reference import reference_families, reference_model

    if family in reference_families():
        return reference_model(family, component)
    return _folder_model(adapter.meta.base_model, component)


def _folder_model(folder: str, component: str) -> nn.Module:
    config = Path(folder or ".") / component / "config.json"
    if not folder or not config.is_file():
        raise ConfigError(
            f"Block weights need the base model's block layout, and the adapter's base ({folder or 'unrecorded'}) "
            "is neither a family difflora knows nor a diffusers folder here; compose it with generate instead."
        )
    import diffusers

    settings = json.loads(config.read_text())
    with torch.device("meta"):
        return getattr(diffusers, settings["_class_name"]).from_config(settings)
