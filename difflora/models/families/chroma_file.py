"""Chroma's single file: BFL's Flux layout (`double_blocks.N.*`, `single_blocks.N.*`, with or without
ComfyUI's `model.diffusion_model.` prefix) less every modulation Linear, plus the approximator
`distilled_guidance_layer.*`, loaded as diffusers' ChromaTransformer2DModel with no network. The config is
read from the weights (block counts, width, heads, the approximator's widths and depth), never assumed.

The key map is diffusers' `convert_chroma_transformer_checkpoint_to_diffusers`, restated: the blocks are
Flux's (`difflora.models.bfl_file.to_diffusers`, which splits the single blocks' `linear1` at the file's
width where diffusers' converter assumes 3072), the approximator's layers are renamed here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from difflora.errors import ModelError

APPROXIMATOR = "distilled_guidance_layer."
# BFL name below `distilled_guidance_layer.` -> diffusers name (weights and biases; the norms' scales).
_LAYER = {"in_layer": "linear_1", "out_layer": "linear_2"}


def approximator_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pop the approximator's tensors out of `state` (prefix stripped), in diffusers' names."""
    out = {}
    for key in [k for k in state if k.startswith(APPROXIMATOR)]:
        rest = key[len(APPROXIMATOR) :]
        layer = re.fullmatch(r"layers\.(\d+)\.(in_layer|out_layer)\.(weight|bias)", rest)
        norm = re.fullmatch(r"norms\.(\d+)\.scale", rest)
        if layer:
            rest = f"layers.{layer.group(1)}.{_LAYER[layer.group(2)]}.{layer.group(3)}"
        elif norm:
            rest = f"norms.{norm.group(1)}.weight"
        elif not re.fullmatch(r"(in_proj|out_proj)\.(weight|bias)", rest):
            raise ModelError(f"the transformer file has {key}, which no Chroma approximator holds.")
        out[APPROXIMATOR + rest] = state.pop(key)
    return out


def transformer_config(shapes: Mapping[str, tuple[int, ...]], shipped: Mapping[str, Any]) -> dict[str, Any]:
    """ChromaTransformer2DModel's config from a file's tensor shapes (prefix stripped) over the shipped one
    (which supplies only the rotary axes and the patch size)."""
    from difflora.models.bfl_file import block_count

    hidden, in_channels = shapes["img_in.weight"]
    head = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    if head != sum(shipped["axes_dims_rope"]):
        raise ModelError(
            f"the transformer's attention heads are {head} wide, where Chroma's rotary embedding needs "
            f"{sum(shipped['axes_dims_rope'])}: convert it to a diffusers folder with its own config."
        )
    approximator_hidden, approximator_in = shapes[APPROXIMATOR + "in_proj.weight"]
    out_channels = shapes["final_layer.linear.weight"][0]
    layers = {int(k.split(".")[2]) for k in shapes if k.startswith(APPROXIMATOR + "layers.")}
    return {
        **{k: v for k, v in shipped.items() if not k.startswith("_")},
        "in_channels": in_channels,
        "out_channels": None if out_channels == in_channels else out_channels,
        "num_layers": block_count(shapes, "double_blocks"),
        "num_single_layers": block_count(shapes, "single_blocks"),
        "attention_head_dim": head,
        "num_attention_heads": hidden // head,
        "joint_attention_dim": shapes["txt_in.weight"][1],
        "approximator_num_channels": approximator_in,
        "approximator_hidden_dim": approximator_hidden,
        "approximator_layers": max(layers) + 1 if layers else 0,
    }


def build_transformer(
    state: Mapping[str, torch.Tensor], shipped: Mapping[str, Any], dtype: torch.dtype
) -> Any:
    """The shipped config's class (ChromaTransformer2DModel) holding a Chroma file's weights in `dtype`."""
    import diffusers
    from accelerate import init_empty_weights

    from difflora.models.bfl_file import strip_prefix, to_diffusers

    stripped = strip_prefix(state)
    config = transformer_config({k: tuple(v.shape) for k, v in stripped.items()}, shipped)
    blocks = dict(stripped)
    converted = approximator_to_diffusers(blocks) | to_diffusers(blocks)
    with init_empty_weights():
        model = getattr(diffusers, shipped["_class_name"]).from_config(config)
    converted = {key: value.to(dtype) for key, value in converted.items()}
    model.load_state_dict(converted, strict=True, assign=True)
    return model  # every tensor came from the file, already in dtype
