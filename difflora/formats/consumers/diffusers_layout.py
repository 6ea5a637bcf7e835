"""diffusers' loading rules for a family whose kohya files name the denoiser in an original layout (Flux:
`FluxLoraLoaderMixin.lora_state_dict`, `_convert_kohya_flux_lora_to_diffusers` in diffusers 0.42), for
`difflora.formats.consumers`:

- a file with any `.lora_down.weight` is converted as kohya's: each original layer of the model
  (`lora_unet_double_blocks_N_img_attn_qkv`, ...; the fused ones split exactly, as difflora does) becomes
  PEFT keys, with the layer's alpha folded in, except the final layer's two modules, whose alpha is read and
  ignored (they load at scale 1: noted; difflora writes them with alpha = rank); `lora_te_`/`lora_te1_` CLIP modules load; other text-encoder keys (`lora_te3_`
  T5) are logged "Unsupported keys" and dropped; any other leftover key is a ValueError for the file;
- otherwise PEFT keys with a `transformer.` / `text_encoder.` prefix load where they name a module.
"""

from __future__ import annotations

from collections.abc import Sequence

from difflora.formats.consumers.diffusers import diffusers_peft
from difflora.formats.consumers.rules import Verdict
from difflora.formats.naming import UNET_PREFIX, NameTable, flat

_CLIP_PREFIXES = ("lora_te_", "lora_te1_")
_FINAL = f"{UNET_PREFIX}_final_layer_"
_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")


def diffusers_layout(keys: Sequence[str], table: NameTable) -> Verdict:
    keys = list(keys)
    if any(key.endswith(".lora_down.weight") for key in keys):
        return _kohya(keys, table)
    return diffusers_peft(keys, table)


def _kohya(keys: list[str], table: NameTable) -> Verdict:
    clip = {
        f"{prefix}{flat(key.partition('.')[2])}"
        for key in table.modules
        if key.startswith("text_encoder.")
        for prefix in _CLIP_PREFIXES
    }
    dropped: dict[str, str] = {}
    leftover: list[str] = []
    ignored = sorted(key for key in keys if key.startswith(_FINAL) and key.endswith(".alpha"))
    for key in keys:
        name, _, part = key.partition(".")
        if part not in _PARTS:
            leftover.append(key)
        elif name in table.layers or name in clip:
            continue
        elif name.startswith("lora_te"):
            dropped[key] = "Unsupported keys for ai-toolkit: text-encoder module diffusers does not convert"
        else:
            leftover.append(key)
    if leftover:
        listing = ", ".join(leftover[:5])
        return Verdict("diffusers", len(keys), 0, fatal=f"ValueError: incompatible keys: {listing}")
    verdict = Verdict("diffusers", len(keys), len(keys) - len(dropped), dropped)
    if ignored:
        verdict.notes.append(
            f"{len(ignored)} final-layer alpha(s) ignored: those modules load at scale 1 (right only where "
            "alpha equals the rank, as difflora writes them)"
        )
    return verdict
