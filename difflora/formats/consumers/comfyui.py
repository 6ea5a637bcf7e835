"""ComfyUI's LoRA loading rules (comfy/lora.py), re-implemented for `difflora.formats.consumers`."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

from difflora.formats.consumers.rules import CLIP_SUFFIXES, Verdict, te_layer_names
from difflora.formats.naming import NameTable, flat, reference_table

# ----------------------------------------------------------------------------------------------- ComfyUI


@cache
def comfyui_names(family: str) -> frozenset[str]:
    table = reference_table(family)
    names: set[str] = set()
    for key, sgm in table.sgm.items():
        path = key.removeprefix("unet.")
        names.update({f"lora_unet_{flat(sgm)}", f"lora_unet_{flat(path)}", f"lycoris_{flat(path)}"})
        names.add(f"diffusion_model.{sgm}")
        processor = path.replace(".to_", ".processor.to_")
        processor = processor[:-2] if processor.endswith(".to_out.0") else processor
        names.update({processor, f"unet.{processor}"})
    encoders = ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]
    for component in encoders:
        for b, c in te_layer_names(table, component):
            flat_name = f"text_model_encoder_layers_{b}_{CLIP_SUFFIXES[c]}"
            if component == "text_encoder":
                names.update({f"lora_te_{flat_name}", f"lora_te1_{flat_name}"})
            else:
                names.add(f"lora_te2_{flat_name}")
            names.add(f"{component}.text_model.encoder.layers.{b}.{c}")
    return frozenset(names)


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


def comfyui(keys: Sequence[str], table: NameTable) -> Verdict:
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
    return Verdict("ComfyUI", len(keys), len(keys) - len(dropped), dropped)


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
