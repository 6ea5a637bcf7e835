"""Black Forest Labs' original module layout of the Flux transformer ("bfl"), against diffusers' modules.

BFL's checkpoint (what kohya trains on, ComfyUI and Forge load, and kohya/ComfyUI LoRA files name) fuses
what diffusers splits: `double_blocks.N.img_attn.qkv` is diffusers' `transformer_blocks.N.attn.to_q`, `to_k`,
`to_v` stacked by rows, `txt_attn.qkv` the `add_{q,k,v}_proj`, and `single_blocks.N.linear1` the single
block's `attn.to_q/k/v` and `proj_mlp`. Everything else is a rename, except the final modulation, whose two
halves BFL stores as (shift, scale) and diffusers as (scale, shift). The facts come from diffusers'
`convert_flux_transformer_checkpoint_to_diffusers`, which loads BFL checkpoints into diffusers' model.

`bfl_layers(modules)` builds the layers from a module tree (the reference architecture or the live model):
the blocks are those the tree holds and every part's rows its module's own output size, so nothing assumes
19 double and 38 single blocks or a 3072 width.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from difflora.formats.fused import FusedLayer, Part
from difflora.formats.reference import ModuleInfo

# (BFL path below `double_blocks.N.`, diffusers paths below `transformer_blocks.N.` in row order)
DOUBLE_BLOCK: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("img_attn.proj", ("attn.to_out.0",)),
    ("txt_attn.proj", ("attn.to_add_out",)),
    ("img_mlp.0", ("ff.net.0.proj",)),
    ("img_mlp.2", ("ff.net.2",)),
    ("txt_mlp.0", ("ff_context.net.0.proj",)),
    ("txt_mlp.2", ("ff_context.net.2",)),
    ("img_mod.lin", ("norm1.linear",)),
    ("txt_mod.lin", ("norm1_context.linear",)),
)
# (BFL path below `single_blocks.N.`, diffusers paths below `single_transformer_blocks.N.`)
SINGLE_BLOCK: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
    ("linear2", ("proj_out",)),
    ("modulation.lin", ("norm.linear",)),
)
# (BFL path, diffusers path, halves swapped) of the layers outside the blocks.
TOP_LEVEL: tuple[tuple[str, str, bool], ...] = (
    ("img_in", "x_embedder", False),
    ("txt_in", "context_embedder", False),
    ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1", False),
    ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2", False),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1", False),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2", False),
    ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1", False),
    ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2", False),
    ("final_layer.linear", "proj_out", False),
    ("final_layer.adaLN_modulation.1", "norm_out.linear", True),
)
# A Flux derivative's distilled modulation (Chroma's approximator, `distilled_guidance_layer`), in place of
# the per-block modulation: (original path below the root, diffusers path below it), N: its layer index.
APPROXIMATOR_ROOT = "distilled_guidance_layer"
APPROXIMATOR_LAYER: tuple[tuple[str, str], ...] = (("in_layer", "linear_1"), ("out_layer", "linear_2"))
APPROXIMATOR_TOP: tuple[str, ...] = ("in_proj", "out_proj")
BFL_NAMES_ONLY: tuple[str, ...] = (APPROXIMATOR_ROOT + ".",)
"""Layers ComfyUI maps by their original names only: its `flux_to_diffusers` (which gives the
`transformer.<diffusers path>` names of Flux and its derivatives) knows no approximator."""
BFL_ROOTS = (
    "double_blocks",
    "single_blocks",
    "img_in",
    "txt_in",
    "time_in",
    "vector_in",
    "guidance_in",
    "final_layer",
    APPROXIMATOR_ROOT,
)
_BLOCKS = (
    ("double_blocks", "transformer_blocks", DOUBLE_BLOCK),
    ("single_blocks", "single_transformer_blocks", SINGLE_BLOCK),
)


def bfl_layers(component: str, modules: Mapping[str, ModuleInfo]) -> list[FusedLayer]:
    """Every BFL layer whose parts are all modules of the tree `modules` (diffusers paths of the
    transformer -> shapes); its parts keyed "<component>.<diffusers path>"."""
    layers = []
    for bfl_root, root, table in _BLOCKS:
        for index in _block_indices(root, modules):
            for bfl_path, paths in table:
                full = tuple(f"{root}.{index}.{path}" for path in paths)
                layer = _layer(component, f"{bfl_root}.{index}.{bfl_path}", full, modules, swap=False)
                layers += [layer] if layer else []
    for bfl_path, path, swap in TOP_LEVEL:
        layer = _layer(
            component,
            bfl_path,
            (path,),
            modules,
            swap=swap,
        )
        layers += [layer] if layer else []
    return layers + _approximator_layers(component, modules)


def _approximator_layers(component: str, modules: Mapping[str, ModuleInfo]) -> list[FusedLayer]:
    """The approximator's Linears where the tree has them (renamed one to one, nothing fused)."""
    root = APPROXIMATOR_ROOT
    pairs = [(f"{root}.{name}", f"{root}.{name}") for name in APPROXIMATOR_TOP]
    for index in _block_indices(f"{root}.layers", modules):
        pairs += [(f"{root}.layers.{index}.{o}", f"{root}.layers.{index}.{d}") for o, d in APPROXIMATOR_LAYER]
    found = [_layer(component, original, (path,), modules, swap=False) for original, path in pairs]
    return [layer for layer in found if layer]


def _block_indices(root: str, modules: Mapping[str, ModuleInfo]) -> list[int]:
    pattern = re.compile(rf"{re.escape(root)}\.(\d+)\.")
    return sorted({int(m.group(1)) for path in modules if (m := pattern.match(path))})


def _layer(
    component: str,
    name: str,
    paths: tuple[str, ...],
    modules: Mapping[str, ModuleInfo],
    *,
    swap: bool,
) -> FusedLayer | None:
    if not all(path in modules for path in paths):
        return None
    infos = [modules[path] for path in paths]
    if len({info.in_features for info in infos}) != 1:
        raise ValueError(f"the parts of {name} take inputs of different widths: {paths}")
    parts = tuple(
        Part(f"{component}.{path}", info.out_features) for path, info in zip(paths, infos, strict=True)
    )
    return FusedLayer(name=name, parts=parts, in_features=infos[0].in_features, swap_halves=swap)
