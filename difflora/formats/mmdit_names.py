"""Stability AI's original module layout of the SD3 / SD3.5 transformer ("mmdit"), against diffusers' modules.

The original checkpoint (what kohya's `networks/lora_sd3.py` names, and ComfyUI loads as
`lora_unet_<flat path>`) fuses what diffusers splits: `joint_blocks.N.x_block.attn.qkv` is diffusers'
`transformer_blocks.N.attn.to_q`, `to_k`, `to_v` stacked by rows, `context_block.attn.qkv` the
`add_{q,k,v}_proj`, and MMDiT-X's `x_block.attn2.qkv` the `attn2.to_{q,k,v}`. Everything else is a rename,
except the modulations diffusers holds as (scale, shift) where the original holds (shift, scale): the final
layer's, and the last joint block's text-stream modulation (that block's text stream only feeds the
attention, so diffusers gives it a continuous AdaLayerNorm). The facts come from diffusers'
`convert_sd3_transformer_checkpoint_to_diffusers`, which loads the original checkpoints into diffusers' model.

`mmdit_layers(modules)` builds the layers from a module tree (the reference architecture or the live model):
the blocks are those the tree holds and every part's rows its module's own output size.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from difflora.formats.fused import FusedLayer, Part
from difflora.formats.reference import ModuleInfo

# (original path below `joint_blocks.N.`, diffusers paths below `transformer_blocks.N.` in row order)
JOINT_BLOCK: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("x_block.attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("context_block.attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("x_block.attn.proj", ("attn.to_out.0",)),
    ("context_block.attn.proj", ("attn.to_add_out",)),
    ("x_block.attn2.qkv", ("attn2.to_q", "attn2.to_k", "attn2.to_v")),
    ("x_block.attn2.proj", ("attn2.to_out.0",)),
    ("x_block.mlp.fc1", ("ff.net.0.proj",)),
    ("x_block.mlp.fc2", ("ff.net.2",)),
    ("context_block.mlp.fc1", ("ff_context.net.0.proj",)),
    ("context_block.mlp.fc2", ("ff_context.net.2",)),
    ("x_block.adaLN_modulation.1", ("norm1.linear",)),
    ("context_block.adaLN_modulation.1", ("norm1_context.linear",)),
)
CONTEXT_MODULATION = "context_block.adaLN_modulation.1"
# (original path, diffusers path, halves swapped) of the Linear layers outside the blocks (the patch
# embedding is a convolution: no LoRA preset targets it).
TOP_LEVEL: tuple[tuple[str, str, bool], ...] = (
    ("context_embedder", "context_embedder", False),
    ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1", False),
    ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2", False),
    ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1", False),
    ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2", False),
    ("final_layer.linear", "proj_out", False),
    ("final_layer.adaLN_modulation.1", "norm_out.linear", True),
)
MMDIT_ROOTS = ("joint_blocks", "t_embedder", "y_embedder", "final_layer")
"""The first segments that tell the layout's names apart (`context_embedder` is diffusers' name too)."""


def mmdit_layers(component: str, modules: Mapping[str, ModuleInfo]) -> list[FusedLayer]:
    """Every original layer whose parts are all modules of the tree `modules` (diffusers paths of the
    transformer -> shapes); its parts keyed "<component>.<diffusers path>"."""
    layers = []
    for index in _block_indices(modules):
        # a block without a text output projection is the last one: its text modulation is swapped
        last = f"transformer_blocks.{index}.attn.to_add_out" not in modules
        for path, parts in JOINT_BLOCK:
            full = tuple(f"transformer_blocks.{index}.{part}" for part in parts)
            swap = last and path == CONTEXT_MODULATION
            layers += _layer(component, f"joint_blocks.{index}.{path}", full, modules, swap=swap)
    for path, diffusers_path, swap in TOP_LEVEL:
        layers += _layer(component, path, (diffusers_path,), modules, swap=swap)
    return layers


def _block_indices(modules: Mapping[str, ModuleInfo]) -> list[int]:
    pattern = re.compile(r"transformer_blocks\.(\d+)\.")
    return sorted({int(m.group(1)) for path in modules if (m := pattern.match(path))})


def _layer(
    component: str, name: str, paths: tuple[str, ...], modules: Mapping[str, ModuleInfo], *, swap: bool
) -> list[FusedLayer]:
    """The layer (a one-item list), or none where the tree lacks a part (no attn2, the last block's text
    output) or a part is not a Linear."""
    if not all(path in modules and modules[path].kind == "linear" for path in paths):
        return []
    infos = [modules[path] for path in paths]
    parts = tuple(
        Part(f"{component}.{path}", info.out_features) for path, info in zip(paths, infos, strict=True)
    )
    return [FusedLayer(name=name, parts=parts, in_features=infos[0].in_features, swap_halves=swap)]
