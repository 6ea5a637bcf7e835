"""ComfyUI's LoRA loading rules (comfy/lora.py) and weight math (comfy/weight_adapter), re-implemented for
`difflora.formats.consumers` and the tests that check exported files against what ComfyUI computes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cache

import torch

from difflora.formats.consumers.rules import CLIP_SUFFIXES, Verdict, te_layer_names
from difflora.formats.flux_names import BFL_NAMES_ONLY
from difflora.formats.naming import NameTable, flat, reference_table
from difflora.models.families import family as model_family

# ----------------------------------------------------------------------------------------------- ComfyUI


@cache
def comfyui_names(family: str) -> frozenset[str]:
    table = reference_table(family)
    names: set[str] = set(_layout_names(table)) | _diffusers_denoiser_names(table)
    for key, sgm in table.sgm.items():
        path = key.removeprefix("unet.")
        names.update({f"lora_unet_{flat(sgm)}", f"lora_unet_{flat(path)}", f"lycoris_{flat(path)}"})
        names.add(f"diffusion_model.{sgm}")
        processor = path.replace(".to_", ".processor.to_")
        processor = processor[:-2] if processor.endswith(".to_out.0") else processor
        names.update({processor, f"unet.{processor}"})
    for component in model_family(family).text_encoders:
        names.update(_whole_encoder_names(table, component))
        for b, c in te_layer_names(table, component):
            flat_name = f"text_model_encoder_layers_{b}_{CLIP_SUFFIXES[c]}"
            if component == "text_encoder":
                names.update({f"lora_te_{flat_name}", f"lora_te1_{flat_name}"})
            else:
                names.add(f"lora_te2_{flat_name}")
            names.add(f"{component}.text_model.encoder.layers.{b}.{c}")
    return frozenset(names)


def _layout_names(table: NameTable) -> set[str]:
    """A denoiser in an original layout (Flux's BFL), as `model_lora_keys_unet` maps it: every original
    weight as `lora_unet_<flat path>` and `diffusion_model.<path>`, a single block's fused `linear1` also as
    `<path>.linear1_qkv`, and each diffusers module (sliced into its fused weight) as `transformer.<path>`,
    `lycoris_<flat path>` (SimpleTuner) and `lora_transformer_<flat path>` (OneTrainer)."""
    names: set[str] = set()
    for kohya_name, layer in table.layers.items():
        names.update({kohya_name, f"diffusion_model.{layer.name}"})
        if layer.name.endswith(".linear1"):
            names.add(f"{layer.name}_qkv")
        if layer.name.startswith(BFL_NAMES_ONLY):
            continue
        for part in layer.parts:
            component, _, path = part.key.partition(".")
            names.update({part.key, f"lycoris_{flat(path)}", f"lora_{component}_{flat(path)}"})
    return names


def _diffusers_denoiser_names(table: NameTable) -> set[str]:
    """A transformer that ComfyUI holds under diffusers' own module names (Qwen-Image; no original layout):
    `model_lora_keys_unet` maps each weight as `lora_unet_<flat path>`, `diffusion_model.<path>`, `<path>`,
    `transformer.<path>` and `lycoris_<flat path>`."""
    known = model_family(table.family)
    if known.kohya_denoiser_layout or known.denoiser == "unet":
        return set()
    paths = [k.partition(".")[2] for k in table.modules if k.startswith(known.denoiser + ".")]
    forms = ("lora_unet_{}", "lycoris_{}")
    names = {form.format(flat(path)) for form in forms for path in paths}
    return names | {
        f"{prefix}{path}" for prefix in ("", "diffusion_model.", "transformer.") for path in paths
    }


def _whole_encoder_names(table: NameTable, component: str) -> set[str]:
    """A text encoder ComfyUI maps every Linear of (T5, by `lora_te<N>_<flat path>`), as the family declares."""
    prefixes = model_family(table.family).consumer_encoder_prefixes.get(component, ())
    paths = [k.partition(".")[2] for k in table.modules if k.startswith(component + ".")]
    return {f"{prefix}_{flat(path)}" for prefix in prefixes for path in paths}


_COMFY_PAIRS = (  # (up, down) tensor names after the module name
    (".lora_up.weight", ".lora_down.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_B", ".lora_A"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
)
_COMFY_SINGLES = (
    ".alpha",
    ".dora_scale",
    ".lora_mid.weight",
    ".diff",
    ".diff_b",
    ".set_weight",
    ".w_norm",
    ".b_norm",
)
_COMFY_SINGLES += tuple(f".hada_{n}" for n in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2"))
_COMFY_SINGLES += tuple(f".lokr_{n}" for n in ("w1", "w2", "w1_a", "w1_b", "w2_a", "w2_b", "t2"))
_COMFY_SINGLES += tuple(f".{n}.weight" for n in ("a1", "a2", "b1", "b2"))


def comfyui(keys: Sequence[str], table: NameTable, consumer: str = "ComfyUI") -> Verdict:
    """`consumer`: Forge's loader is ComfyUI's key map, so its verdict is this one under its name."""
    known = comfyui_names(table.family)
    present = set(keys)
    loaded: set[str] = set()
    for name in {_module_part(key) for key in keys} & known:
        for up, down in _COMFY_PAIRS:
            if name + up in present:
                loaded.update({name + up, name + down})
                break
        loaded.update(name + single for single in _COMFY_SINGLES if name + single in present)
    dropped = {
        key: "lora key not loaded: no such layer in ComfyUI's key map" for key in keys if key not in loaded
    }
    return Verdict(consumer, len(keys), len(keys) - len(dropped), dropped)


def _module_part(key: str) -> str:
    """Module name of a tensor key under every layout ComfyUI reads (kohya: before the first '.')."""
    if key.startswith(("lora_", "lycoris_")):
        return key.split(".")[0]
    for up, down in _COMFY_PAIRS:
        for suffix in (up, down):
            if key.endswith(suffix):
                return key[: -len(suffix)]
    for single in _COMFY_SINGLES:
        if key.endswith(single):
            return key[: -len(single)]
    return key


# ----------------------------------------------------------------------------------------------- weights

DORA_EPS = float(torch.finfo(torch.float32).eps)


def patched_weight(
    weight: torch.Tensor, parts: Mapping[str, torch.Tensor], strength: float = 1.0
) -> torch.Tensor:
    """The weight ComfyUI's LoraLoader makes of `weight` (the layer's weight as the patches before this one
    left it, in ComfyUI's float32 intermediate dtype) with one kohya module's tensors `parts` ("lora_up.weight",
    "lora_down.weight", optional "alpha" and "dora_scale"), at `strength` (comfy/weight_adapter/lora.py
    `calculate_weight`, comfy/weight_adapter/base.py `weight_decompose`):

    - scale = alpha / rank (1 without alpha), diff = scale · up @ down reshaped to the weight;
    - no dora_scale: weight + strength · diff;
    - dora_scale: V = weight + diff, re-normalised to dora_scale along the axis its shape names: when
      dora_scale.shape[0] equals the weight's output size (LyCORIS/OneTrainer output axis, handled since
      ComfyUI PR #7727) the norm is per output row *of the weight before the patch* (not of V; ComfyUI PR
      #15458 proposes V), otherwise per input column of V; the norm gets float32's eps. Then
      V · dora_scale / norm at strength 1, else weight + strength · (V · dora_scale / norm − weight).
    """
    weight = weight.float()
    up, down = parts["lora_up.weight"].float(), parts["lora_down.weight"].float()
    scale = float(parts["alpha"]) / down.shape[0] if "alpha" in parts else 1.0
    diff = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * scale
    dora_scale = parts.get("dora_scale")
    if dora_scale is None:
        return weight + strength * diff
    calculated = weight + diff
    if dora_scale.shape[0] == weight.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(weight.shape[0], *[1] * (weight.ndim - 1))
    else:
        norm = calculated.transpose(0, 1).reshape(calculated.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(calculated.shape[1], *[1] * (calculated.ndim - 1)).transpose(0, 1)
    decomposed = calculated * (dora_scale.float() / (norm + DORA_EPS))
    return decomposed if strength == 1.0 else weight + strength * (decomposed - weight)
