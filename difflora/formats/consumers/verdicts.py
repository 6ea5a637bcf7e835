"""Will this LoRA file load completely in ComfyUI, A1111/Forge and diffusers? One verdict per consumer.

Each consumer's loader is re-implemented from its published behaviour (see ../shared/FORMATS.md), over
the module names of the architecture the file is for (the reference trees of `reference.py`):
- ComfyUI (`comfy/lora.py`): a key map from the model's own names (SGM `lora_unet_input_blocks_...`, diffusers
  `lora_unet_down_blocks_...`, old `unet.….processor.to_q`, CLIP `lora_te_/lora_te1_/lora_te2_text_model_
  encoder_layers_{i}_{q,k,v,out_proj|mlp_fc1|mlp_fc2}` and `text_encoder(_2).…`), then each mapped name consumes
  its tensors (`lora_up/lora_down`, `lora_A/lora_B`, `_lora.up`, `.lora.up`, `lora_linear_layer`, alpha,
  dora_scale, LoHa, LoKr, ...); every other key is logged "lora key not loaded" and silently dropped.
- A1111 (`extensions-builtin/Lora/networks.py`): the name before the first '.' goes through
  `convert_diffusers_name_to_compvis`, then the `_[qkv]_proj` and `lora_unet`->`diffusion_model`,
  `lora_te1_text_model`->`(0_)transformer_text_model` fallbacks, against the compvis module names; unmatched keys
  are reported as "Failed to match keys"; a matched module whose tensors no network type accepts makes the
  whole file fail. Listing: `ss_base_model_version`/`ss_v2` decide the version A1111 shows the LoRA for.
  Forge's loader is ComfyUI's, so the ComfyUI verdict describes Forge's loading. A family that A1111 does
  not load (Flux) is checked for ComfyUI, Forge (ComfyUI's key map) and diffusers, as it declares
  (`ModelFamily.consumers`); its original layout's names are in ComfyUI's map (`comfyui._layout_names`)
  and diffusers' kohya converter for it is `diffusers_layout`.
- diffusers (`load_lora_weights`): kohya conversion only if every key starts with lora_te_/lora_unet_/
  lora_te1_/lora_te2_ (else only `unet.`/`text_encoder.` keys are read); SGM blocks remapped positionally with
  layers_per_block (SGM keys are dropped if diffusers-named UNet keys are also present); any tensor the
  converter does not consume is a ValueError for the whole file; names rebuilt by turning '_' into '.' and
  re-joining a fixed set of compound words must name a module of the model, else PEFT drops them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from difflora.errors import ModelError, first_n
from difflora.formats.consumers.a1111 import a1111
from difflora.formats.consumers.comfyui import comfyui
from difflora.formats.consumers.diffusers import diffusers, diffusers_peft
from difflora.formats.consumers.diffusers_layout import diffusers_layout
from difflora.formats.consumers.rules import Verdict
from difflora.formats.family import family_of
from difflora.formats.naming import NameTable, reference_table
from difflora.formats.read import load_adapter
from difflora.formats.reference import reference_families
from difflora.models.families import ModelFamily
from difflora.models.families import family as model_family
from difflora.safe_io import read_safetensors


def verdicts(keys: Sequence[str], metadata: Mapping[str, str], family: str) -> list[Verdict]:
    """Every consumer's verdict on a file with these tensor `keys`, for a model of `family`. Families no
    consumer ships and difflora has no reference for are checked against their stand-in, whose naming they
    share."""
    checked_as = _checked_as(family_of(family))
    table = reference_table(checked_as)
    results = [_CHECKS[name](keys, metadata, table) for name in model_family(checked_as).consumers]
    if checked_as != family:
        label = model_family(checked_as).label
        for result in results:
            result.notes.append(f"no consumer ships a {family!r} model; names checked against {label}'s")
    return results


_CHECKS: dict[str, Callable[[Sequence[str], Mapping[str, str], NameTable], Verdict]] = {
    "comfyui": lambda keys, metadata, table: comfyui(keys, table),
    "forge": lambda keys, metadata, table: comfyui(keys, table, consumer="Forge"),
    "a1111": a1111,
    "diffusers": lambda keys, metadata, table: _diffusers(keys, table),
}


def _diffusers(keys: Sequence[str], table: NameTable) -> Verdict:
    """diffusers' loader for the family: its kohya converter (an original layout's or SD's), or PEFT keys only."""
    if not model_family(table.family).diffusers_converts_kohya:
        return diffusers_peft(keys, table)
    return (diffusers_layout if table.layers else diffusers)(keys, table)


def _checked_as(family: ModelFamily) -> str:
    if family.name in reference_families():
        return family.name
    if family.consumer_stand_in is None:
        raise ModelError(
            f"difflora has no reference architecture for {family.label} files to check them against."
        )
    return family.consumer_stand_in


def file_verdicts(path: str | Path, family: str | None = None) -> list[Verdict]:
    """Verdicts for a LoRA file on disk; the family is the file's own (as `load_adapter` reads it) if not given."""
    tensors, metadata = read_safetensors(path)
    if family is None:
        family = family_of(load_adapter(path).meta.base_family).name
    return verdicts(list(tensors), metadata, family)


def format_verdicts(results: Sequence[Verdict], *, limit: int = 10) -> list[str]:
    """Lines for `difflora inspect`: one summary per consumer, then each dropped key and why."""
    lines = []
    for verdict in results:
        lines.append(verdict.summary())
        dropped = [f"not loaded: {key}: {why}" for key, why in verdict.dropped.items()]
        if dropped:
            lines += ("    " + first_n(dropped, limit, separator="\n    ")).splitlines()
        lines += [f"    {note}" for note in verdict.notes]
    return lines
