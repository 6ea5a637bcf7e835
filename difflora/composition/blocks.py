"""Which block each adapted module lies in, for per-block weights (`difflora.config.blocks`).

A module's block comes from its name in the model, never from its position in a file: a UNet's modules by
their SGM path (`input_blocks.4...` -> IN04, `middle_block...` -> MID, `output_blocks.3...` -> OUT03; the
same walk of the UNet's own blocks that kohya and ComfyUI use, `formats.naming.sgm_block_prefixes`), a
transformer's by the module lists its family declares (`block_lists`: `transformer_blocks.3` -> DOUBLE3 for
Flux), a text encoder's as BASE. Modules outside every block have no block ("", factor 1).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Mapping
from typing import Any

from torch import nn

from difflora.config.spec import AdapterWeight
from difflora.formats.naming import sgm_block_prefixes

_SGM = re.compile(r"^(input_blocks|middle_block|output_blocks)(?:\.(\d+))?")
_SGM_KINDS = {"input_blocks": "IN", "middle_block": "MID", "output_blocks": "OUT"}
_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[str, str]] = weakref.WeakKeyDictionary()


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
        if hasattr(model, "down_blocks"):  # a UNet: its SGM layout
            prefixes = sgm_block_prefixes(model)
            parts = path.split(".")
            heads = (".".join(parts[:n]) for n in range(len(parts), 0, -1))
            blocks[path] = next((sgm_block(prefixes[h]) for h in heads if h in prefixes), "")
        else:
            blocks[path] = listed_block(path, block_lists)
    return blocks[path]


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
