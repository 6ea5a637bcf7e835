"""diffusers' LoRA loading rules (load_lora_weights and its kohya converter), re-implemented for
`difflora.formats.consumers`."""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cache

from difflora.errors import first_n
from difflora.formats.consumers.rules import Verdict
from difflora.formats.naming import NameTable, flat, reference_table
from difflora.formats.reference import reference_model
from difflora.models.families import family as model_family

# ----------------------------------------------------------------------------------------------- diffusers

_KOHYA_PREFIXES = ("lora_te_", "lora_unet_", "lora_te1_", "lora_te2_")
_SGM_INNER = {
    "in_layers.2": "conv1",
    "out_layers.3": "conv2",
    "emb_layers.1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
    "op": "conv",
}
# Compound words diffusers' kohya converter re-joins after turning every '_' into '.'.
_DIFFUSERS_COMPOUNDS = frozenset(
    {
        "down_blocks",
        "mid_block",
        "up_blocks",
        "transformer_blocks",
        "proj_in",
        "proj_out",
        "conv_in",
        "conv_out",
        "time_emb_proj",
        "conv_shortcut",
        "to_q",
        "to_k",
        "to_v",
        "to_out",
        "time_embedding",
        "add_embedding",
        "linear_1",
        "linear_2",
        "text_model",
        "self_attn",
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
        "text_projection",
    }
)


def diffusers(keys: Sequence[str], table: NameTable) -> Verdict:
    keys = list(keys)
    if not keys or not all(key.startswith(_KOHYA_PREFIXES) for key in keys):
        return diffusers_peft(keys, table)
    known = model_family(table.family)
    if known.denoiser != "unet" and not known.kohya_denoiser_layout and known.diffusers_converts_kohya:
        return _diffusers_named_transformer(keys, table)
    groups: dict[str, set[str]] = {}
    for key in keys:
        name, _, part = key.partition(".")
        groups.setdefault(name, set()).add(part)
    has_sgm = any(_is_sgm(n) for n in groups)
    mixed = has_sgm and any(n.startswith("lora_unet_") and not _is_sgm(n) for n in groups)
    why: dict[str, str] = {}  # module name -> why its keys are dropped
    leftover: list[str] = []
    for name, parts in groups.items():
        if mixed and _is_sgm(name):
            why[name] = "SGM-named key dropped: the file also has diffusers-named UNet keys"
            continue
        if "lora_down.weight" not in parts:
            leftover += [f"{name}.{part}" for part in sorted(parts)]
            continue
        if "lora_up.weight" not in parts:
            return Verdict("diffusers", len(keys), 0, fatal=f"{name} has lora_down but no lora_up (KeyError)")
        leftover += [
            f"{name}.{p}"
            for p in sorted(parts - {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"})
        ]
        if _diffusers_module(name, table) is None:
            why[name] = "diffusers' converted name is no module of the model (PEFT drops it)"
    if leftover:
        listing = first_n(leftover, 5)
        return Verdict("diffusers", len(keys), 0, fatal=f"ValueError: keys not correctly renamed: {listing}")
    dropped = {key: why[key.split(".")[0]] for key in keys if key.split(".")[0] in why}
    # lora_pipeline.lora_state_dict: "a DoRA checkpoint that is not compatible in Diffusers at the moment",
    # every dora_scale key is filtered out and the module is loaded as a plain LoRA.
    dropped |= {key: _DORA_DROPPED for key in keys if key.endswith(".dora_scale") and key not in dropped}
    return Verdict("diffusers", len(keys), len(keys) - len(dropped), dropped)


def _diffusers_named_transformer(keys: list[str], table: NameTable) -> Verdict:
    """A transformer named by its diffusers paths, flattened (Qwen-Image's kohya / musubi-tuner files):
    diffusers' converter for the family (`_convert_non_diffusers_qwen_lora_to_diffusers`) rebuilds each of
    its Linear layers' paths, keeping the module names' own underscores; a name that is no layer of the
    model, or a text-encoder key, is dropped (tests/test_qwen_image_formats.py loads files in diffusers)."""
    denoiser = model_family(table.family).denoiser
    dropped = {}
    for key in keys:
        target = table.from_kohya.get(key.split(".")[0], "")
        if not target.startswith(denoiser + ".") or target not in table.modules:
            dropped[key] = "diffusers' converted name is no module of the model (PEFT drops it)"
    return Verdict("diffusers", len(keys), len(keys) - len(dropped), dropped)


_DORA_DROPPED = "diffusers filters out kohya dora_scale keys and applies the module as a plain LoRA"


def _is_sgm(name: str) -> bool:
    return bool(
        re.match(r"lora_unet_(input_blocks|middle_block|output_blocks|time_embed|label_emb|out)_", name)
    )


def _diffusers_module(name: str, table: NameTable) -> str | None:
    """The module diffusers' converter reaches for kohya module `name`, or None."""
    prefix = next(p for p in _KOHYA_PREFIXES if name.startswith(p))
    component = {"lora_unet_": "unet", "lora_te2_": "text_encoder_2"}.get(prefix, "text_encoder")
    body = name[len(prefix) :]
    if component == "unet" and _is_sgm(name):
        path = _sgm_positional(body, table)
    else:
        target = table.from_kohya.get(name) or table.from_kohya.get(
            f"lora_te_{body}" if component == "text_encoder" else name
        )
        path = target.partition(".")[2] if target and target.startswith(component + ".") else None
        if path is not None and any("_" in s and s not in _DIFFUSERS_COMPOUNDS for s in path.split(".")):
            return None
    return f"{component}.{path}" if path is not None and f"{component}.{path}" in table.modules else None


@cache
def _sgm_inverse(family: str) -> dict[str, tuple[str, str]]:
    """flattened SGM path -> (SGM path, diffusers path) of the family's UNet modules."""
    table = reference_table(family)
    return {flat(sgm): (sgm, key.partition(".")[2]) for key, sgm in table.sgm.items()}


def _sgm_positional(body: str, table: NameTable) -> str | None:
    """diffusers' `_maybe_map_sgm_blocks_to_diffusers`: block numbers by layers_per_block, inner slot 0 =
    resnets, 1 = attentions, 2 = upsamplers (positional, whatever the block really holds)."""
    inverse = _sgm_inverse(table.family)
    if body not in inverse:
        return None
    sgm_path, diffusers_path = inverse[body]
    match = re.match(r"(input_blocks|middle_block|output_blocks)\.(\d+)\.(\d+)\.(.+)", sgm_path)
    if not match:
        return diffusers_path  # conv_in, time_embed, label_emb, out: mapped directly
    kind, block, slot, rest = match.group(1), int(match.group(2)), int(match.group(3)), match.group(4)
    rest = _SGM_INNER.get(rest, rest)
    per = reference_model(table.family, "unet").config.layers_per_block + 1
    if kind == "middle_block":
        inner = {0: "resnets.0", 1: "attentions.0", 2: "resnets.1"}.get(block)
        return f"mid_block.{inner}.{rest}" if inner else None
    inner = ("resnets", "attentions", "upsamplers")[slot] if slot < 3 else None
    if kind == "input_blocks":
        if rest == "conv" and sgm_path.endswith(".op"):
            return f"down_blocks.{(block - 1) // per}.downsamplers.0.conv"
        return f"down_blocks.{(block - 1) // per}.{inner}.{(block - 1) % per}.{rest}"
    layer = block % per if slot < 2 else 0
    return f"up_blocks.{block // per}.{inner}.{layer}.{rest}"


def diffusers_peft(keys: Sequence[str], table: NameTable) -> Verdict:
    from difflora.formats.diffusers_peft import split_key

    dropped: dict[str, str] = {}
    for key in keys:
        component = key.split(".")[0]
        known = model_family(table.family)
        if component not in known.components:
            kohya = (
                "kohya key in a file that is not all-kohya" if known.diffusers_converts_kohya else "kohya key"
            )
            reason = (
                f"{kohya}: not converted"
                if key.startswith(("lora_",))
                else f"no {'./'.join(known.components)}. prefix: not read"
            )
            dropped[key] = reason
            continue
        parsed = split_key(key)
        if parsed is None or parsed[0] not in table.modules:
            dropped[key] = "no such module in the model (PEFT drops it)"
    return Verdict("diffusers", len(keys), len(keys) - len(dropped), dropped)
