"""A1111's LoRA loading rules (extensions-builtin/Lora/networks.py) and weight math (network.py), re-implemented
for `difflora.formats.consumers` and the tests that check exported files against what A1111 computes."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import cache

import torch

from difflora.formats.consumers.rules import CLIP_SUFFIXES, Verdict, te_layer_names
from difflora.formats.family import family_of
from difflora.formats.naming import NameTable, flat, reference_table
from difflora.models.families import family as model_family

# ----------------------------------------------------------------------------------------------- A1111


@cache
def a1111_modules(family: str) -> frozenset[str]:
    """A1111's `network_layer_mapping` names (compvis model) for the layers a LoRA can patch."""
    table = reference_table(family)
    names = {f"diffusion_model_{flat(sgm)}" for sgm in table.sgm.values()}
    for component, stem in model_family(family).compvis_text_encoders.items():
        if _is_openclip(stem):  # OpenCLIP: one fused attention, MLP c_fc/c_proj
            for b in range(len(te_layer_names(table, component)) // len(CLIP_SUFFIXES)):
                block = f"{stem}_transformer_resblocks_{b}"
                names.update(
                    {f"{block}_attn", f"{block}_attn_out_proj", f"{block}_mlp_c_fc", f"{block}_mlp_c_proj"}
                )
        else:  # HF CLIP, named as in transformers below the embedder
            names.update(
                f"{stem}_{flat(key.partition('.')[2])}"
                for key in table.modules
                if key.startswith(component + ".")
            )
    return frozenset(names)


def _is_openclip(stem: str) -> bool:
    return stem.split("_")[-1] == "model"


def _first_encoder_is_openclip(family: str) -> bool:
    """A1111's `is_sd2`: the model's (first) text encoder is OpenCLIP, which decides how `lora_te_` names
    convert."""
    return _is_openclip(model_family(family).compvis_text_encoders.get("text_encoder", ""))


def convert_diffusers_name_to_compvis(key: str, openclip: bool) -> str:
    """A1111's conversion of kohya diffusers-form names to compvis names (same regexes, same order)."""
    rules: list[tuple[str, object]] = [
        (r"lora_unet_conv_in(.*)", lambda m: f"diffusion_model_input_blocks_0_0{m[0]}"),
        (r"lora_unet_conv_out(.*)", lambda m: f"diffusion_model_out_2{m[0]}"),
        (
            r"lora_unet_time_embedding_linear_(\d+)(.*)",
            lambda m: f"diffusion_model_time_embed_{int(m[0]) * 2 - 2}{m[1]}",
        ),
        (
            r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
            lambda m: (
                "diffusion_model_input_blocks_"
                f"{1 + int(m[0]) * 3 + int(m[2])}_{1 if m[1] == 'attentions' else 0}_{_resnet_suffix(m[1], m[3])}"
            ),
        ),
        (
            r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
            lambda m: (
                "diffusion_model_middle_block_"
                f"{1 if m[0] == 'attentions' else int(m[1]) * 2}_{_resnet_suffix(m[0], m[2])}"
            ),
        ),
        (
            r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
            lambda m: (
                "diffusion_model_output_blocks_"
                f"{int(m[0]) * 3 + int(m[2])}_{1 if m[1] == 'attentions' else 0}_{_resnet_suffix(m[1], m[3])}"
            ),
        ),
        (
            r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv",
            lambda m: f"diffusion_model_input_blocks_{3 + int(m[0]) * 3}_0_op",
        ),
        (
            r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
            lambda m: f"diffusion_model_output_blocks_{2 + int(m[0]) * 3}_{2 if int(m[0]) > 0 else 1}_conv",
        ),
        (r"lora_te_text_model_encoder_layers_(\d+)_(.+)", lambda m: _te_compvis(m, openclip, "")),
        (r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", lambda m: _te_compvis(m, True, "1_")),
    ]
    for pattern, build in rules:
        match = re.match(pattern, key)
        if match:
            return build(match.groups())  # type: ignore[operator]
    return key


_RESNET_COMPVIS = {
    "conv1": "in_layers_2",
    "conv2": "out_layers_3",
    "norm1": "in_layers_0",
    "norm2": "out_layers_0",
    "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection",
}


def _resnet_suffix(kind: str, suffix: str) -> str:
    return _RESNET_COMPVIS.get(suffix, suffix) if kind == "resnets" else suffix


def _te_compvis(groups: tuple[str, ...], openclip: bool, prefix: str) -> str:
    layer, rest = groups
    if not openclip:
        return f"transformer_text_model_encoder_layers_{layer}_{rest}"
    rest = rest.replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
    return f"{prefix}model_transformer_resblocks_{layer}_{rest}"


_A1111_TYPES = (  # network types and the tensors each needs (network_lora, network_hada, network_lokr, ...)
    ("LoRA", ({"lora_up.weight", "lora_down.weight"},)),
    ("LoHa", ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},)),
    (
        "LoKr",
        (
            {"lokr_w1", "lokr_w2"},
            {"lokr_w1_a", "lokr_w1_b", "lokr_w2"},
            {"lokr_w1", "lokr_w2_a", "lokr_w2_b"},
            {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"},
        ),
    ),
    ("full", ({"diff"},)),
    ("norm", ({"w_norm", "b_norm"},)),
    ("GLoRA", ({"a1.weight", "a2.weight", "b1.weight", "b2.weight"},)),
    ("OFT", ({"oft_blocks"}, {"oft_diag"})),
)


def _a1111_match(name: str, modules: frozenset[str], openclip: bool) -> str | None:
    key = convert_diffusers_name_to_compvis(name, openclip)
    if key in modules:
        return key
    projection = re.match(r"(.*)_([qkv]_proj)$", key)
    if projection and projection.group(1) in modules:
        return projection.group(1)
    if "lora_unet" in name:
        candidate = name.replace("lora_unet", "diffusion_model")
        return candidate if candidate in modules else None
    if "lora_te1_text_model" in name:
        for replacement in ("0_transformer_text_model", "transformer_text_model"):
            candidate = name.replace("lora_te1_text_model", replacement)
            if candidate in modules:
                return candidate
    return None


def a1111(keys: Sequence[str], metadata: Mapping[str, str], table: NameTable) -> Verdict:
    modules = a1111_modules(table.family)
    parts: dict[str, set[str]] = {}
    dropped: dict[str, str] = {}
    for key in keys:
        name, _, part = key.partition(".")
        if _a1111_match(name, modules, _first_encoder_is_openclip(table.family)) is None:
            dropped[key] = "Failed to match keys when loading network (no such compvis module)"
        else:
            parts.setdefault(name, set()).add(part)
    verdict = Verdict("A1111/Forge", len(keys), len(keys) - len(dropped), dropped)
    for name, have in parts.items():
        if not any(need <= have for _, options in _A1111_TYPES for need in options):
            verdict.fatal = f"no network type accepts the tensors of {name} ({', '.join(sorted(have))})"
            break
    verdict.notes.append(a1111_listing(metadata, table.family))
    return verdict


def a1111_listing(metadata: Mapping[str, str], family: str) -> str:
    """A1111's `detect_version` and what its Lora tab (lora_show_all off) does with the result."""
    version = metadata.get("ss_base_model_version", "")
    if version.startswith("sdxl_"):  # A1111's own test and version names (network.SdVersion)
        detected = "SDXL"
    elif metadata.get("ss_v2") == "True":
        detected = "SD2"
    elif metadata:
        detected = "SD1"
    else:
        return "listed for every checkpoint (no metadata: version Unknown)"
    if detected != family_of(family).a1111_version:
        return f"detected as {detected}: HIDDEN when a {family} checkpoint is loaded (set lora_show_all to see it)"
    return f"detected as {detected}: listed for {detected} checkpoints"


# ----------------------------------------------------------------------------------------------- weights


def patched_weight(
    weight: torch.Tensor, parts: Mapping[str, torch.Tensor], multiplier: float = 1.0
) -> torch.Tensor:
    """The weight A1111's built-in Lora extension makes of `weight` (as the networks before this one left
    it) with one kohya module's tensors `parts` ("lora_up.weight", "lora_down.weight", optional "alpha" and
    "dora_scale") at `multiplier` (network_lora.py `calc_updown`, network.py `finalize_updown` and
    `apply_weight_decompose`, A1111 1.10):

    - updown = (alpha / rank) · up @ down (scale 1 without alpha), reshaped to the weight;
    - dora_scale: V = weight + updown, updown = V · dora_scale / ‖V‖ − weight, the norm always per input
      column (no eps; a dora_scale shaped [out, 1] is broadcast against the [1, in] norms into an
      [out, in] matrix, scrambling the weight rather than failing);
    - weight + multiplier · updown.
    """
    weight = weight.float()
    up, down = parts["lora_up.weight"].float(), parts["lora_down.weight"].float()
    scale = float(parts["alpha"]) / down.shape[0] if "alpha" in parts else 1.0
    updown = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * scale
    dora_scale = parts.get("dora_scale")
    if dora_scale is not None:
        merged = updown + weight
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(merged.shape[1], *[1] * (merged.ndim - 1)).transpose(0, 1)
        updown = merged * (dora_scale.float() / norm) - weight
    return weight + multiplier * updown
