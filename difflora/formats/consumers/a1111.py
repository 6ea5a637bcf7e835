"""A1111's LoRA loading rules (extensions-builtin/Lora/networks.py) and weight math (network.py), re-implemented
for `difflora.formats.consumers` and the tests that check exported files against what A1111 computes."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import cache

import torch

from difflora.formats.consumers.rules import CLIP_SUFFIXES, Verdict, te_layer_names
from difflora.formats.naming import NameTable, flat, reference_table
from difflora.models.identity import KNOWN_FAMILIES

# ----------------------------------------------------------------------------------------------- A1111


@cache
def a1111_modules(family: str) -> frozenset[str]:
    """A1111's `network_layer_mapping` names (compvis model) for the layers a LoRA can patch."""
    table = reference_table(family)
    names = {f"diffusion_model_{flat(sgm)}" for sgm in table.sgm.values()}
    openclip = (
        [("text_encoder", "")] if family == "sd2" else [("text_encoder_2", "1_")] if family == "sdxl" else []
    )
    for component, prefix in openclip:
        for b in range(len(te_layer_names(table, component)) // len(CLIP_SUFFIXES)):
            stem = f"{prefix}model_transformer_resblocks_{b}"
            names.update({f"{stem}_attn", f"{stem}_attn_out_proj", f"{stem}_mlp_c_fc", f"{stem}_mlp_c_proj"})
    clip_prefix = {"sd2": None, "sdxl": "0_"}.get(family, "")  # SD1-style models hold HF CLIP unprefixed
    if clip_prefix is not None:
        names.update(
            f"{clip_prefix}transformer_{flat(key.partition('.')[2])}"
            for key in table.modules
            if key.startswith("text_encoder.")
        )
    return frozenset(names)


def convert_diffusers_name_to_compvis(key: str, is_sd2: bool) -> str:
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
        (r"lora_te_text_model_encoder_layers_(\d+)_(.+)", lambda m: _te_compvis(m, is_sd2, "")),
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


def _a1111_match(name: str, modules: frozenset[str], is_sd2: bool) -> str | None:
    key = convert_diffusers_name_to_compvis(name, is_sd2)
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
        if _a1111_match(name, modules, table.family == "sd2") is None:
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
    if version.startswith("sdxl_"):
        detected = "sdxl"
    elif metadata.get("ss_v2") == "True":
        detected = "sd2"
    elif metadata:
        detected = "sd1"
    else:
        return "listed for every checkpoint (no metadata: version Unknown)"
    label = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}[detected]
    expected = family if family in KNOWN_FAMILIES else "sd1"  # A1111 files the rest as SD1
    if detected != expected:
        return (
            f"detected as {label}: HIDDEN when a {family} checkpoint is loaded (set lora_show_all to see it)"
        )
    return f"detected as {label}: listed for {label} checkpoints"


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
