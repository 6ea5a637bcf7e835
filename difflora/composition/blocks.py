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
from difflora.models.families.base import ModelFamily

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


def listed_block(path: str, block_lists: Mapping[str, str], edges: Mapping[str, str] | None = None) -> str:
    """A transformer module's block by the family's module lists ("transformer_blocks.3.attn" -> "DOUBLE3"),
    else by its `edges` (module path prefix -> block: "x_embedder" -> "IN"); "" for neither."""
    for kind, module_list in block_lists.items():
        head, _, rest = path.partition(module_list + ".")
        index = rest.split(".")[0]
        if not head and rest and index.isdigit():
            return f"{kind.upper()}{int(index)}"
    return next((b for prefix, b in (edges or {}).items() if f"{path}.".startswith(f"{prefix}.")), "")


def module_block(
    model: nn.Module, path: str, block_lists: Mapping[str, str], edges: Mapping[str, str] | None = None
) -> str:
    """The block of module `path` (a live name) of a denoiser `model` (cached per model)."""
    blocks = _CACHE.setdefault(model, {})
    if path not in blocks:
        if hasattr(model, "down_blocks"):  # a UNet: its SGM layout (walked once per model)
            prefixes = _PREFIXES.get(model) or _PREFIXES.setdefault(model, sgm_block_prefixes(model))
            parts = path.split(".")
            heads = (".".join(parts[:n]) for n in range(len(parts), 0, -1))
            blocks[path] = next((sgm_block(prefixes[h]) for h in heads if h in prefixes), "")
        else:
            blocks[path] = listed_block(path, block_lists, edges)
    return blocks[path]


def model_blocks(model: nn.Module, family: ModelFamily) -> set[str]:
    """Every block of denoiser `model` of `family`, its edge blocks, its text encoders' blocks and BASE (the
    text encoders together): what a selector may name."""
    if hasattr(model, "down_blocks"):
        prefixes = _PREFIXES.get(model) or _PREFIXES.setdefault(model, sgm_block_prefixes(model))
        found = {sgm_block(path) for path in prefixes.values()}
    else:
        lists = family.block_lists.items()
        found = {f"{kind.upper()}{i}" for kind, path in lists for i in range(_length(model, path))}
        found |= {block for prefix, block in family.edge_blocks.items() if _length(model, prefix) >= 0}
    return (found - {""}) | {"BASE", *family.text_encoder_blocks.values()}


def _length(model: nn.Module, path: str) -> int:
    """How many children module `path` of `model` has (-1 where the model has no such module)."""
    try:
        return len(list(model.get_submodule(path).children()))
    except AttributeError:
        return -1  # a model of the family without this module


def check_blocks(specs: Sequence[AdapterWeight], pipe: Any, family: ModelFamily) -> list[AdapterWeight]:
    """`specs`, once none has a block selector naming no block of `pipe`'s denoiser (`BlockWeights.check`,
    before anything is composed; `family`: the pipeline's ModelFamily)."""
    if any(spec.blocks is not None for spec in specs):
        blocks = model_blocks(family.denoiser_of(pipe), family)
        for spec in specs:
            if spec.blocks is not None:
                spec.blocks.check(blocks, family.name)
    return list(specs)


def text_encoder_block(family: ModelFamily, component: str) -> str:
    """A text encoder's block: its own where the family weights them apart (Flux's CLIP, T5), else BASE."""
    return family.text_encoder_blocks.get(component, "BASE")


def block_weight(spec: AdapterWeight, pipe: Any, component: str, live: str, family: ModelFamily) -> float:
    """The weight a module of `component` (live name `live`) takes: the adapter's weight for the component,
    times its block's factor (`family`: the pipeline's)."""
    weight = spec.weight_for(component)
    if spec.blocks is None:
        return weight
    if component.startswith("text_encoder"):
        return weight * spec.block_factor(text_encoder_block(family, component))
    model = getattr(pipe, component)
    return weight * spec.block_factor(module_block(model, live, family.block_lists, family.edge_blocks))


def pipe_blocks(pipe: Any, family: ModelFamily) -> Callable[[str], str]:
    """module key ("<component>.<classic path>") -> its block in the loaded `pipe`."""
    from difflora.adapter.names import live_name

    def block(key: str) -> str:
        component, _, classic = key.partition(".")
        if component.startswith("text_encoder"):
            return text_encoder_block(family, component)
        model = getattr(pipe, component)
        return module_block(
            model, live_name(component, classic, model), family.block_lists, family.edge_blocks
        )

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
        spec.blocks.check(model_blocks(models[family.denoiser], family), family.name)

    def block(key: str) -> str:
        component, _, path = key.partition(".")
        if component.startswith("text_encoder"):
            return text_encoder_block(family, component)
        if component not in models:
            models[component] = _base_model(adapter, family.name, component)
        return module_block(models[component], path, family.block_lists, family.edge_blocks)

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
