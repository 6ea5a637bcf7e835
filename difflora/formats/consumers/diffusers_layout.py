"""diffusers' loading rules for a family whose kohya files name the denoiser in an original layout (Flux:
`FluxLoraLoaderMixin.lora_state_dict` and `load_lora_weights`, `_convert_kohya_flux_lora_to_diffusers` in
diffusers 0.42), for `difflora.formats.consumers`:

- a file with any `.lora_down.weight` is converted as kohya's: only keys starting `lora_unet_`, `lora_te_`
  or `lora_te1_` are kept (others, such as `lora_te3_` T5 modules, are filtered out); each original layer
  inside a numbered block (`lora_unet_double_blocks_N_img_attn_qkv`, ...; the fused ones split exactly, as
  difflora does) becomes `transformer.` PEFT keys with its alpha folded in; the layers outside the blocks
  (`img_in`, `txt_in`, `time_in`, `vector_in`, `guidance_in`, `final_layer`) come out without the
  `transformer.` prefix, so `load_lora_weights`, which keeps only `transformer.` keys, drops them; CLIP
  modules load; any other `lora_unet_` key is a ValueError for the whole file;
- a file with `lora_transformer_` keys (OneTrainer) is converted by name: attention projections and the
  layers outside the blocks load; any other layer inside a block is mapped to the whole block, which PEFT
  refuses ("Target module FluxTransformerBlock is not supported"), failing the whole file;
- otherwise PEFT keys with a `transformer.` / `text_encoder.` prefix load where they name a module.
"""

from __future__ import annotations

from collections.abc import Sequence

from difflora.formats.consumers.diffusers import diffusers_peft
from difflora.formats.consumers.rules import Verdict
from difflora.formats.naming import UNET_PREFIX, NameTable, flat

_CLIP_PREFIXES = ("lora_te_", "lora_te1_")
_KEPT = (f"{UNET_PREFIX}_", *_CLIP_PREFIXES)
_MIXTURE = "lora_transformer_"
_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")


def diffusers_layout(keys: Sequence[str], table: NameTable) -> Verdict:
    keys = list(keys)
    if any(key.startswith(_MIXTURE) for key in keys):
        return _mixture(keys, table)
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
    for key in keys:
        name, _, part = key.partition(".")
        layer = table.layers.get(name)
        if not name.startswith(_KEPT):
            dropped[key] = (
                "filtered out before conversion (diffusers converts lora_unet_/lora_te_/lora_te1_ only)"
            )
        elif part not in _PARTS or (layer is None and name not in clip):
            leftover.append(key)
        elif layer is not None and not _in_block(layer.name):
            dropped[key] = "converted without the transformer. prefix, so load_lora_weights drops it"
    if leftover:
        listing = ", ".join(leftover[:5])
        return Verdict("diffusers", len(keys), 0, fatal=f"ValueError: incompatible keys: {listing}")
    return Verdict("diffusers", len(keys), len(keys) - len(dropped), dropped)


def _mixture(keys: list[str], table: NameTable) -> Verdict:
    """`_convert_mixture_state_dict_to_diffusers`: names parsed by block number and attention suffix."""
    dropped: dict[str, str] = {}
    for key in keys:
        name = key.partition(".")[0]
        module = table.from_kohya.get(name, "")
        path = module.partition(".")[2]
        if name.startswith(f"{UNET_PREFIX}_"):
            dropped[key] = "lora_unet_ keys beside lora_transformer_ ones are discarded"
        elif not name.startswith((_MIXTURE, "lora_te1_")) or not module:
            return Verdict("diffusers", len(keys), 0, fatal=f"AssertionError / unparsed key: {key}")
        elif _in_block(path) and "attn." not in path:
            fatal = f"ValueError: {name} is mapped to its whole block, which PEFT cannot adapt"
            return Verdict("diffusers", len(keys), 0, fatal=fatal)
    return Verdict("diffusers", len(keys), len(keys) - len(dropped), dropped)


def _in_block(path: str) -> bool:
    """Whether an original layer lies inside a numbered block (`double_blocks.3.img_attn.qkv`)."""
    parts = path.split(".")
    return len(parts) > 2 and parts[1].isdigit()
