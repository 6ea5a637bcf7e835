"""Black Forest Labs' single-file layout: a transformer of `double_blocks.N.*` / `single_blocks.N.*` (with or
without ComfyUI's `model.diffusion_model.` prefix, in bf16, fp16 or fp8), loaded as diffusers'
FluxTransformer2DModel with no network, its configuration read from the weights (block counts, width,
latent channels, guidance input), never assumed.

The key map is diffusers' own (`convert_flux_transformer_checkpoint_to_diffusers`), restated here because
that converter splits the single blocks' fused `linear1` at a fixed width of 3072: this one splits at the
width the file has, so reduced test models load too (the slow test checks both agree at full width).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from difflora.errors import ModelError

PREFIX = "model.diffusion_model."
REQUIRED = ("img_in.weight", "txt_in.weight", "time_in.in_layer.weight", "final_layer.linear.weight")
# Modules renamed one to one (weight and bias), BFL name -> diffusers name; {i}: the block index.
_TOP = {
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "txt_in": "context_embedder",
    "img_in": "x_embedder",
    "final_layer.linear": "proj_out",
}
_DOUBLE = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
_DOUBLE_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_DOUBLE_QKV = {
    "img_attn.qkv": ("to_q", "to_k", "to_v"),
    "txt_attn.qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
}
_SINGLE = {"modulation.lin": "norm.linear", "linear2": "proj_out"}
_SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}


def strip_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """The transformer's tensors without ComfyUI's prefix (other components' keys dropped)."""
    if any(key.startswith(PREFIX) for key in state):
        return {key[len(PREFIX) :]: value for key, value in state.items() if key.startswith(PREFIX)}
    return dict(state)


def block_count(keys: Any, kind: str) -> int:
    """How many `double_blocks` / `single_blocks` a file has (the highest index + 1)."""
    indices = {int(key.split(".")[1]) for key in keys if key.startswith(kind + ".")}
    return max(indices) + 1 if indices else 0


def transformer_config(shapes: Mapping[str, tuple[int, ...]], shipped: Mapping[str, Any]) -> dict[str, Any]:
    """FluxTransformer2DModel's config from a BFL file's tensor shapes (prefix stripped), over the shipped
    config (which only supplies what weights cannot say: the rotary axes, patch size)."""
    missing = [key for key in REQUIRED if key not in shapes]
    if missing:
        raise ModelError(
            f"the transformer file lacks {', '.join(missing)}: it is not a complete Flux transformer. Pass the "
            "full BFL file (flux1-dev.safetensors) or a diffusers folder."
        )
    hidden, in_channels = shapes["img_in.weight"]
    head = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    if head != sum(shipped["axes_dims_rope"]):
        raise ModelError(
            f"the transformer's attention heads are {head} wide, where Flux's rotary embedding needs "
            f"{sum(shipped['axes_dims_rope'])}: convert it to a diffusers folder with its own config."
        )
    out_channels = shapes["final_layer.linear.weight"][0]
    return {
        **{k: v for k, v in shipped.items() if not k.startswith("_")},
        "in_channels": in_channels,
        "out_channels": None if out_channels == in_channels else out_channels,
        "num_layers": block_count(shapes, "double_blocks"),
        "num_single_layers": block_count(shapes, "single_blocks"),
        "attention_head_dim": head,
        "num_attention_heads": hidden // head,
        "joint_attention_dim": shapes["txt_in.weight"][1],
        "pooled_projection_dim": shapes["vector_in.in_layer.weight"][1],
        "guidance_embeds": "guidance_in.in_layer.weight" in shapes,
    }


def to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A BFL transformer state dict (prefix stripped) in diffusers' names; every key must be placed."""
    source = dict(state)
    out: dict[str, torch.Tensor] = {}
    hidden = source["img_in.weight"].shape[0]
    _rename(source, out, "", "", _TOP)
    for suffix in ("weight", "bias"):  # absent where the modulation is pruned (a distilled approximator)
        if f"final_layer.adaLN_modulation.1.{suffix}" in source:
            shift, scale = source.pop(f"final_layer.adaLN_modulation.1.{suffix}").chunk(2)
            out[f"norm_out.linear.{suffix}"] = torch.cat([scale, shift])
    for i in range(block_count(state, "double_blocks")):
        old, new = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        _rename(source, out, old, new, _DOUBLE)
        out |= {new + n: source.pop(old + o) for o, n in _DOUBLE_NORMS.items()}
        for fused, names in _DOUBLE_QKV.items():
            for suffix in ("weight", "bias"):
                parts = source.pop(f"{old}{fused}.{suffix}").chunk(3)
                out |= {f"{new}attn.{name}.{suffix}": part for name, part in zip(names, parts, strict=True)}
    for i in range(block_count(state, "single_blocks")):
        old, new = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        _rename(source, out, old, new, _SINGLE)
        out |= {new + n: source.pop(old + o) for o, n in _SINGLE_NORMS.items()}
        for suffix in ("weight", "bias"):
            fused = source.pop(f"{old}linear1.{suffix}")
            parts = fused.split([hidden, hidden, hidden, fused.shape[0] - 3 * hidden])
            names = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
            out |= {f"{new}{name}.{suffix}": part for name, part in zip(names, parts, strict=True)}
    if source:
        raise ModelError(
            f"the transformer file has keys no Flux transformer holds: {', '.join(sorted(source)[:3])}"
        )
    return out


def _rename(
    source: dict[str, torch.Tensor],
    out: dict[str, torch.Tensor],
    old: str,
    new: str,
    table: Mapping[str, str],
) -> None:
    for bfl, diffusers_name in table.items():
        for suffix in ("weight", "bias"):
            key = f"{old}{bfl}.{suffix}"
            if key in source:
                out[f"{new}{diffusers_name}.{suffix}"] = source.pop(key)


def build_transformer(
    state: Mapping[str, torch.Tensor], shipped: Mapping[str, Any], dtype: torch.dtype
) -> Any:
    """The shipped config's transformer class (FluxTransformer2DModel) holding a BFL file's weights, cast to
    `dtype` (fp8 files are upcast)."""
    import diffusers
    from accelerate import init_empty_weights

    stripped = strip_prefix(state)
    config = transformer_config({k: tuple(v.shape) for k, v in stripped.items()}, shipped)
    converted = {key: value.to(dtype) for key, value in to_diffusers(stripped).items()}
    with init_empty_weights():
        model = getattr(diffusers, shipped["_class_name"]).from_config(config)
    model.load_state_dict(converted, strict=True, assign=True)
    return model  # every tensor came from the file, already in dtype
