"""ComfyUI's loading of a Flux LoRA, re-implemented for the tests independently of difflora's tables.

From ComfyUI @a125cd8: `comfy/utils.py` `flux_to_diffusers` (diffusers key -> BFL key, with (dim, offset, size)
slices for the split q/k/v/MLP and a row-half swap for the final modulation), `comfy/lora.py`
`model_lora_keys_unet` (the LoRA names mapped to each BFL weight: `lora_unet_<flat BFL>`,
`diffusion_model.<BFL>`, `transformer.<diffusers>`, `lycoris_<flat diffusers>`, `lora_transformer_<flat
diffusers>`, `<BFL>.linear1_qkv`), `load_lora` + `weight_adapter/lora.py` `LoRAAdapter.load` (the tensor
names each mapped name consumes; every other key is "lora key not loaded") and `calculate_weight` (the
slice narrowed, W += function(strength · alpha/rank · up @ down) in float32).

Shapes come from the diffusers model: depth and width are read from its config, nothing assumes Flux.1's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

Target = tuple[str, tuple[int, int, int] | None, Callable[[torch.Tensor], torch.Tensor] | None]


def swap_scale_shift(weight: torch.Tensor) -> torch.Tensor:
    shift, scale = weight.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def diffusers_to_bfl(config: Mapping, mlp_width: int) -> dict[str, Target]:
    """`flux_to_diffusers` for `.weight` keys: diffusers weight key -> (BFL weight key, slice, function)."""
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    table: dict[str, Target] = {}
    for i in range(config["num_layers"]):
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for n, name in enumerate(("to_q", "to_k", "to_v")):
            table[f"{d}.attn.{name}.weight"] = (f"{b}.img_attn.qkv.weight", (0, n * hidden, hidden), None)
        for n, name in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
            table[f"{d}.attn.{name}.weight"] = (f"{b}.txt_attn.qkv.weight", (0, n * hidden, hidden), None)
        for src, dst in (
            ("attn.to_out.0", "img_attn.proj"),
            ("norm1.linear", "img_mod.lin"),
            ("norm1_context.linear", "txt_mod.lin"),
            ("attn.to_add_out", "txt_attn.proj"),
            ("ff.net.0.proj", "img_mlp.0"),
            ("ff.net.2", "img_mlp.2"),
            ("ff_context.net.0.proj", "txt_mlp.0"),
            ("ff_context.net.2", "txt_mlp.2"),
        ):
            table[f"{d}.{src}.weight"] = (f"{b}.{dst}.weight", None, None)
    for i in range(config["num_single_layers"]):
        d, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for n, name in enumerate(("to_q", "to_k", "to_v")):
            table[f"{d}.attn.{name}.weight"] = (f"{b}.linear1.weight", (0, n * hidden, hidden), None)
        table[f"{d}.proj_mlp.weight"] = (f"{b}.linear1.weight", (0, 3 * hidden, mlp_width), None)
        table[f"{d}.norm.linear.weight"] = (f"{b}.modulation.lin.weight", None, None)
        table[f"{d}.proj_out.weight"] = (f"{b}.linear2.weight", None, None)
    for bfl, diffusers in (
        ("final_layer.linear", "proj_out"),
        ("img_in", "x_embedder"),
        ("txt_in", "context_embedder"),
        ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
        ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
        ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
        ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
        ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
        ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    ):
        table[f"{diffusers}.weight"] = (f"{bfl}.weight", None, None)
    table["norm_out.linear.weight"] = ("final_layer.adaLN_modulation.1.weight", None, swap_scale_shift)
    return table


def bfl_weights(
    diffusers_weights: Mapping[str, torch.Tensor], table: Mapping[str, Target]
) -> dict[str, torch.Tensor]:
    """The BFL checkpoint's weights (with `diffusion_model.`) assembled from diffusers' (path -> W), as
    the inverse of diffusers' own BFL -> diffusers conversion: fused rows stacked, the final halves swapped."""
    pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for key, (bfl, offset, function) in table.items():
        path = key.removesuffix(".weight")
        if path not in diffusers_weights:
            continue  # schnell: no guidance embedder
        weight = diffusers_weights[path]
        weight = function(weight) if function is not None else weight  # the swap is its own inverse
        pieces.setdefault(f"diffusion_model.{bfl}", []).append((offset[1] if offset else 0, weight))
    return {
        key: torch.cat([w for _, w in sorted(parts, key=lambda p: p[0])]) for key, parts in pieces.items()
    }


def lora_key_map(bfl_keys: list[str], table: Mapping[str, Target], hidden: int) -> dict[str, object]:
    """`model_lora_keys_unet` for a Flux model: LoRA module name -> BFL key or (key, slice[, function])."""
    key_map: dict[str, object] = {}
    for key in bfl_keys:
        stem = key.removeprefix("diffusion_model.").removesuffix(".weight")
        key_map[f"lora_unet_{stem.replace('.', '_')}"] = key
        key_map[key.removesuffix(".weight")] = key
    for key, (bfl, offset, function) in table.items():
        to = (
            (f"diffusion_model.{bfl}", offset, function) if (offset or function) else f"diffusion_model.{bfl}"
        )
        stem = key.removesuffix(".weight")
        key_map[f"transformer.{stem}"] = to
        key_map[f"lycoris_{stem.replace('.', '_')}"] = to
        key_map[f"lora_transformer_{stem.replace('.', '_')}"] = to
    for key in bfl_keys:
        if key.endswith(".linear1.weight"):
            key_map[key.replace(".linear1.weight", ".linear1_qkv")] = (key, (0, 0, hidden * 3), None)
    return key_map


_PAIRS = (
    (".lora_up.weight", ".lora_down.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_B", ".lora_A"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
)


def load_lora(lora: Mapping[str, torch.Tensor], key_map: Mapping[str, object]) -> tuple[list, set[str]]:
    """`load_lora`: the patches [(target, up, down, alpha)] and the keys not loaded."""
    patches, loaded = [], set()
    for name, target in key_map.items():
        alpha = lora.get(f"{name}.alpha")
        if alpha is not None:
            loaded.add(f"{name}.alpha")
        for up, down in _PAIRS:
            if name + up in lora:
                loaded.update({name + up, name + down})
                value = None if alpha is None else float(alpha.item())
                patches.append((target, lora[name + up], lora[name + down], value))
                break
    return patches, set(lora) - loaded


def patched(
    weights: Mapping[str, torch.Tensor], patches: list, strength: float = 1.0
) -> dict[str, torch.Tensor]:
    """`calculate_weight` for plain LoRA patches, in float32: W0 narrowed to the slice, += function(...)."""
    result = {key: w.clone().float() for key, w in weights.items()}
    for target, up, down, alpha in patches:
        key, offset, function = (target, None, None) if isinstance(target, str) else target
        weight = result[key]
        if offset is not None:
            weight = weight.narrow(offset[0], offset[1], offset[2])
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        diff = torch.mm(up.float().flatten(1), down.float().flatten(1)).reshape(weight.shape)
        change = (strength * scale) * diff
        weight += function(change) if function is not None else change
    return result


# ComfyUI's LORA_CLIP_MAP: the CLIP modules `model_lora_keys_clip` maps.
CLIP_MAP = {
    "mlp.fc1": "mlp_fc1",
    "mlp.fc2": "mlp_fc2",
    "self_attn.k_proj": "self_attn_k_proj",
    "self_attn.q_proj": "self_attn_q_proj",
    "self_attn.v_proj": "self_attn_v_proj",
    "self_attn.out_proj": "self_attn_out_proj",
}


def text_encoder_key_map(clip_layers: int, t5_linears: list[str]) -> dict[str, str]:
    """`model_lora_keys_clip` for Flux's encoders (clip_l, t5xxl): CLIP-L's attention and MLP as
    `lora_te_`/`lora_te1_text_model_encoder_layers_{b}_{...}`; every T5 Linear as `lora_te2_` (OneTrainer) and
    `lora_te3_` + its path with '.' -> '_' (clip_l present, no clip_g: T5's index counts up from 2)."""
    key_map = {}
    for b in range(clip_layers):
        for path, flat in CLIP_MAP.items():
            weight = f"clip_l.transformer.text_model.encoder.layers.{b}.{path}.weight"
            key_map[f"lora_te_text_model_encoder_layers_{b}_{flat}"] = weight
            key_map[f"lora_te1_text_model_encoder_layers_{b}_{flat}"] = weight
    for path in t5_linears:
        weight = f"t5xxl.transformer.{path}.weight"
        key_map[f"lora_te2_{path.replace('.', '_')}"] = weight
        key_map[f"lora_te3_{path.replace('.', '_')}"] = weight
    return key_map
