"""The kohya LoRA format (what ComfyUI, A1111/Forge and diffusers all load): writing and reading it.

Keys: `<kohya module name>.lora_down.weight` [rank, in(, k, k)], `.lora_up.weight` [out, rank(, 1, 1)] and
`.alpha`, a 0-d float32 tensor holding the adapter's true alpha (rsLoRA already baked in, see
`difflora.adapter.inject.extract_weights`), so every consumer applies ΔW = strength · alpha/rank · up @ down. Alpha stays
float32 whatever the export dtype: all consumers read it with `.item()`, and an fp16 alpha would round
values such as 8·√8. A DoRA module also has `.dora_scale`, its axis told by its shape (`formats.dora`).
Module names come from `difflora.formats.naming` (the one table).

The file's metadata (kohya's, ModelSpec's and difflora's own, with kohya's hashes) comes from
`difflora.formats.kohya_metadata`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch

from difflora.adapter.lycoris import is_lycoris
from difflora.adapter.types import Adapter, AdapterMeta, LoraWeights, ModuleWeights
from difflora.errors import AdapterCompatibilityError, AdapterFormatError, first_n
from difflora.formats import family as families
from difflora.formats.dora import KOHYA_DORA_SCALE, kohya_dora_scale, read_kohya_dora_scale
from difflora.formats.fused import FusedLayer, fuse, split
from difflora.formats.kohya_metadata import FOREIGN_METADATA_PREFIXES, kohya_metadata
from difflora.formats.lycoris import (
    LYCORIS_PARTS,
    fuse_rows,
    lycoris_kind,
    module_tensors,
    read_module,
    split_rows,
)
from difflora.formats.naming import (
    READ_PREFIXES,
    UNET_PREFIX,
    NameTable,
    build_table,
    flat,
    reference_table,
    resolve_kohya_name,
    table_for_keys,
)
from difflora.formats.native import meta_from_header
from difflora.formats.reference import ModuleInfo, reference_families
from difflora.models.families import family as model_family

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------- writing


def to_kohya(
    adapter: Adapter,
    *,
    dtype: torch.dtype = torch.float16,
    modules: Mapping[str, Mapping[str, ModuleInfo]] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The adapter's tensors under kohya names, and the file's metadata (hashes included). `modules` is
    the live model's tree ({component: {path: shape}}) where it is not the family's reference architecture
    (a reduced model): fused layers take their parts' sizes from it."""
    family = families.export_family(adapter)
    table = build_table(family, modules) if modules else table_for_keys(family, adapter.modules)
    outside = sorted(set(adapter.modules) - set(table.to_kohya) - set(table.layer_of))
    if outside:
        raise AdapterCompatibilityError(
            f"{len(outside)} module(s) of this adapter do not exist in the {family} architecture: "
            f"{first_n(outside, 3)}. The adapter's base family is recorded wrongly; re-train or re-save it "
            "on its base."
        )
    families.check_shapes(adapter.modules, table, family)
    named = {table.to_kohya[key]: w for key, w in adapter.modules.items() if key in table.to_kohya}
    named |= _fused_layers(adapter, table)
    tensors: dict[str, torch.Tensor] = {}
    for name, weights in named.items():
        if is_lycoris(weights):  # LyCORIS tensors in the export dtype, alpha float32 (as a LoRA's)
            lycoris = module_tensors(name, weights)  # type: ignore[arg-type]
            tensors |= {
                k: v.to("cpu", torch.float32 if k.endswith(".alpha") else dtype) for k, v in lycoris.items()
            }
            continue
        tensors[f"{name}.lora_down.weight"] = weights.down.detach().to("cpu", dtype).contiguous()
        tensors[f"{name}.lora_up.weight"] = weights.up.detach().to("cpu", dtype).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(weights.alpha), dtype=torch.float32)
        if weights.is_dora:  # float32 like alpha: its rounding would scale the whole weight
            tensors[f"{name}.{KOHYA_DORA_SCALE}"] = kohya_dora_scale(weights).to("cpu", torch.float32)
    return tensors, kohya_metadata(adapter, family, tensors)


def _fused_layers(adapter: Adapter, table: NameTable) -> dict[str, ModuleWeights]:
    """The LoRAs of the denoiser's original layout: a layer that is one module renamed takes its LoRA as
    it is (DoRA included); one that fuses or reorders modules gets the LoRA fused exactly from its parts'
    (where a part is a LyCORIS module: one full module, the parts' updates stacked)."""
    grouped: dict[str, dict[str, ModuleWeights]] = {}
    for key, weights in adapter.modules.items():
        if key in table.layer_of:
            grouped.setdefault(table.layer_of[key], {})[key] = weights
    renamed = {
        name: next(iter(parts.values()))
        for name, parts in grouped.items()
        if len(table.layers[name].parts) == 1 and not table.layers[name].swap_halves
    }
    fused = {name: parts for name, parts in grouped.items() if name not in renamed}
    dora = sorted(key for parts in fused.values() for key, w in parts.items() if w.is_dora)
    if dora:
        raise AdapterCompatibilityError(
            f"{len(dora)} DoRA module(s) ({first_n(dora, 3)}) lie in layers the kohya layout fuses; a DoRA "
            "magnitude has no fused form. Export with --format diffusers instead."
        )
    return renamed | {
        name: (fuse_rows if any(map(is_lycoris, parts.values())) else fuse)(table.layers[name], parts)  # type: ignore[arg-type]
        for name, parts in fused.items()
    }


# ----------------------------------------------------------------------------------------------- reading

KOHYA_PREFIXES = tuple(f"{prefix}_" for prefix in READ_PREFIXES)
_LORA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha", KOHYA_DORA_SCALE)
# Tensor names of adapter kinds that are not a plain LoRA: recognised so the error can name the kind.
_OTHER_KINDS = {
    "hada_": "LoHa",
    "lokr_": "LoKr",
    "lora_mid": "LoCon-Tucker (lora_mid)",
    "oft_": "OFT",
    "diff": "full weight difference",
    "w_norm": "norm-layer weights",
    "b_norm": "norm-layer weights",
    "a1.weight": "GLoRA",
    "scale": "per-module scale",
}


def is_kohya_key(key: str) -> bool:
    return key.startswith(KOHYA_PREFIXES)


# ComfyUI's own layout (`diffusion_model.<original module path>.<tensor>`, what SimpleTuner's "comfyui" export
# writes): the module is the original checkpoint's, the tensors kohya's or PEFT's.
COMFYUI_PREFIX = "diffusion_model."
_COMFYUI_PARTS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
# ComfyUI's text encoders (`text_encoders.<name>.transformer.<module path>`) and the kohya prefix each is
# read under (`comfy/lora.py model_lora_keys_clip`; T5 is kohya's third encoder).
_COMFYUI_ENCODERS = {"clip_l": "lora_te1", "clip_h": "lora_te", "clip_g": "lora_te2", "t5xxl": "lora_te3"}
_COMFYUI_TEXT = "text_encoders."


def is_comfyui_key(key: str) -> bool:
    return key.startswith((COMFYUI_PREFIX, _COMFYUI_TEXT))


def comfyui_to_kohya(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors under kohya's names: `diffusion_model.X.Y.lora_A.weight` is the LoRA of original
    module X.Y, which kohya calls `lora_unet_X_Y`; `text_encoders.t5xxl.transformer.X.lora_A.weight` is
    `lora_te3_X` (tensors other than a LoRA's keep their name, for `from_kohya` to refuse by name)."""
    result = {}
    for key, tensor in tensors.items():
        prefix, path = _comfyui_module(key)
        known = (*_COMFYUI_PARTS, *_LORA_PARTS, *LYCORIS_PARTS)
        part = next((p for p in known if path.endswith("." + p)), None)
        if prefix is None or part is None:
            result[key] = tensor
            continue
        module = path[: -len(part) - 1]
        result[f"{prefix}_{flat(module)}.{_COMFYUI_PARTS.get(part, part)}"] = tensor
    return result


def _comfyui_module(key: str) -> tuple[str | None, str]:
    """(kohya prefix, the rest of the key) for a ComfyUI-layout key; no prefix for an unknown encoder."""
    if key.startswith(COMFYUI_PREFIX):
        return UNET_PREFIX, key.removeprefix(COMFYUI_PREFIX)
    encoder, _, rest = key.removeprefix(_COMFYUI_TEXT).partition(".")
    return _COMFYUI_ENCODERS.get(encoder), rest.removeprefix("transformer.")


def from_kohya(
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    *,
    source: str,
    tables: Sequence[NameTable] | None = None,
) -> Adapter:
    """An Adapter from kohya/A1111/ComfyUI-style keys (UNet names in diffusers or SGM form, a denoiser's
    original layout with its fused layers split exactly, with or without `.alpha`: missing means scale 1, as
    in kohya, ComfyUI and A1111). Every key is consumed or the file is refused with the keys named: a
    partial import would silently change what the LoRA does. `tables`: the architectures to place names in
    (default: every reference architecture, the file's own first)."""
    raw = {name: _module_weights(name, parts, source) for name, parts in _group(tensors, source).items()}
    hint = families.family_from_metadata(metadata) or families.family_from_prefixes(raw)
    if tables is None:
        tables = [reference_table(family) for family in families.candidates(hint)]
    table, keys, unplaced = _place(raw, tables)
    if table is not None and not unplaced:
        modules = _unfused(raw, keys, table, source)
        modules = {key: _match_kind(w, table.modules[key]) for key, w in modules.items()}
        return Adapter(modules=dict(sorted(modules.items())), meta=_meta_from_kohya(metadata, table.family))
    try:
        family, keys = _resolve_names(raw, hint, source)
    except AdapterFormatError:
        if table is None:
            raise
        listing = first_n(unplaced, 20, separator="\n  ")
        raise AdapterFormatError(
            f"{source}: {len(unplaced)} of {len(raw)} LoRA module name(s) match no module (or not its shape) of "
            f"the {model_family(table.family).label} architecture the rest of the file fits:\n  {listing}\n"
            "Nothing was loaded. Remove those keys, or use the model the file was trained for."
        ) from None
    return Adapter(
        modules=dict(sorted({keys[name]: weights for name, weights in raw.items()}.items())),
        meta=_meta_from_kohya(metadata, family),
    )


def _place(
    raw: dict[str, ModuleWeights], tables: Sequence[NameTable]
) -> tuple[NameTable | None, dict[str, str], list[str]]:
    """The first table holding every name with fitting shapes, or else the one holding the most: the table,
    each placed name's difflora key or layer, and the names it cannot place (None: no table places any)."""
    best: tuple[NameTable | None, dict[str, str], list[str]] = (None, {}, sorted(raw))
    for table in tables:
        keys = {name: table.from_kohya.get(name) or (name if name in table.layers else None) for name in raw}
        placed = {n: k for n, k in keys.items() if k is not None and _fits(raw[n], k, table)}
        unplaced = sorted(set(raw) - set(placed))
        if not unplaced:
            return table, placed, []
        if placed and len(unplaced) < len(best[2]):
            best = (table, placed, unplaced)
    return best


def _fits(weights: ModuleWeights, key: str, table: NameTable) -> bool:
    if key in table.layers:
        layer = table.layers[key]
        return families.shape_fits(weights, ModuleInfo("linear", layer.in_features, layer.out_features))
    return families.shape_fits(weights, table.modules[key])


def _unfused(
    raw: dict[str, ModuleWeights], keys: dict[str, str], table: NameTable, source: str
) -> dict[str, ModuleWeights]:
    """difflora key -> LoRA: fused layers split into their parts (a LyCORIS module into full modules, its
    update's rows), the rest as named; a module named twice (a fused layer and one of its parts, or two
    spellings) is refused."""
    modules: dict[str, ModuleWeights] = {}
    origin: dict[str, str] = {}
    for name, weights in raw.items():
        layer: FusedLayer | None = table.layers.get(keys[name])
        if layer is not None and weights.is_dora:
            raise AdapterFormatError(
                f"{source}: {name} is a DoRA module on a fused layer, whose magnitude difflora cannot split "
                "into the layer's parts; load the file in ComfyUI, or use a plain LoRA."
            )
        parts: dict[str, ModuleWeights] = {keys[name]: weights}
        if layer is not None:
            parts = split_rows(layer, weights) if is_lycoris(weights) else split(layer, weights)  # type: ignore[arg-type,assignment]
        for key, part in parts.items():
            if key in origin:
                raise AdapterFormatError(
                    f"{source}: {origin[key]} and {name} both name the module {key} (two spellings of one "
                    "layer, or a fused layer and one of its parts). Keep one of them."
                )
            origin[key], modules[key] = name, part
    return modules


def _group(tensors: dict[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    foreign: dict[str, str] = {}
    for key, tensor in tensors.items():
        name, _, part = key.partition(".")
        if part not in _LORA_PARTS and part not in LYCORIS_PARTS:
            kind = next(
                (k for prefix, k in _OTHER_KINDS.items() if part.startswith(prefix)), "unknown tensor"
            )
            foreign[key] = kind
            continue
        groups.setdefault(name, {})[part] = tensor
    if foreign:
        listing = first_n([f"{key}: {kind}" for key, kind in sorted(foreign.items())], 20, separator="\n  ")
        raise AdapterFormatError(
            f"{source}: {len(foreign)} key(s) are neither LoRA tensors (lora_down/lora_up/alpha/dora_scale) nor "
            "LyCORIS ones (lokr_*, hada_*, diff) and "
            f"cannot be applied as a LoRA:\n  {listing}\nNothing was loaded. Use the file in a tool "
            "that supports these adapter kinds (ComfyUI, A1111), or convert it to a plain LoRA."
        )
    return groups


def _module_weights(name: str, parts: dict[str, torch.Tensor], source: str) -> ModuleWeights:
    if lycoris_kind(parts):
        return read_module(name, parts, source)
    if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
        have = ", ".join(sorted(parts))
        raise AdapterFormatError(f"{source}: module {name} has {have} but needs both lora_down and lora_up.")
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    if up.ndim < 2 or up.shape[1] != down.shape[0]:
        raise AdapterFormatError(
            f"{source}: {name} has lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)}; the rank "
            "does not agree (lora_up and lora_down may be swapped). The file is damaged; re-export it."
        )
    rank = int(down.shape[0])
    alpha = float(parts["alpha"].float().item()) if "alpha" in parts else float(rank)
    if alpha == 0.0:
        logger.warning("%s: %s has alpha 0; read as alpha = rank, as kohya does.", source, name)
        alpha = float(rank)
    weights = LoraWeights(down=down, up=up, alpha=alpha)
    scale = parts.get(KOHYA_DORA_SCALE)
    return weights if scale is None else read_kohya_dora_scale(name, scale, weights, source)


def _resolve_names(raw: dict[str, LoraWeights], hint: str | None, source: str) -> tuple[str, dict[str, str]]:
    """Family and difflora key per kohya name where no architecture holds them all (custom architectures):
    each name on its own."""
    keys = {name: resolve_kohya_name(name, families.candidates(hint)) for name in raw}
    unknown = sorted(name for name, key in keys.items() if key is None)
    if unknown:
        listing = first_n(unknown, 20, separator="\n  ")
        raise AdapterFormatError(
            f"{source}: {len(unknown)} LoRA module name(s) match no module of a known architecture "
            f"({', '.join(model_family(name).label for name in reference_families())}):\n  {listing}\n"
            "Nothing was loaded. The file may be for another architecture (SD3, Flux, ...) or use a naming "
            "difflora does not read."
        )
    return families.family_of(hint).name, _unique(keys, source)


def _unique(keys: dict[str, str], source: str) -> dict[str, str]:
    seen: dict[str, str] = {}
    for name, key in keys.items():
        if key in seen:
            raise AdapterFormatError(
                f"{source}: {seen[key]} and {name} both name the module {key} (diffusers and SGM spellings "
                "of the same layer). Keep one of them."
            )
        seen[key] = name
    return keys


def _match_kind(weights: ModuleWeights, info: ModuleInfo) -> ModuleWeights:
    """Write a 1x1-convolution LoRA the way the module needs it ([r, in] for Linear, [r, in, 1, 1] for Conv);
    a LyCORIS module learns the weight's shape, which its update may not show (a 2-D product on a conv)."""
    kind = info.kind
    if is_lycoris(weights):
        shape = (info.out_features, info.in_features, *(info.kernel if kind == "conv" else ()))
        return replace(weights, module_shape=shape)  # type: ignore[type-var]
    down, up = weights.down, weights.up
    if kind == "conv" and down.ndim == 2:
        return replace(weights, down=down[:, :, None, None], up=up[:, :, None, None])
    if kind == "linear" and down.ndim == 4:
        return replace(weights, down=down.flatten(1), up=up.flatten(1))
    return weights


def _meta_from_kohya(metadata: dict[str, str], family: str) -> AdapterMeta:
    """A file difflora exported gives back its adapter's metadata exactly; any other file keeps all of its
    metadata in `extra` (for `difflora inspect`) and the facts difflora uses in the fields."""
    if "difflora.format_version" in metadata:
        meta = meta_from_header(metadata, native=True)
        meta.extra = {k: v for k, v in meta.extra.items() if not k.startswith(FOREIGN_METADATA_PREFIXES)}
        meta.source_format = "kohya"
        return meta
    version = metadata.get("ss_base_model_version", "")
    v_prediction = version.endswith("_v") or metadata.get("modelspec.prediction_type") == "v"
    trigger = metadata.get("modelspec.trigger_phrase", "")
    return AdapterMeta(
        name=metadata.get("ss_output_name", "") or metadata.get("modelspec.title", ""),
        base_model=metadata.get("ss_sd_model_name", ""),
        base_family=family,
        prediction_type="v_prediction" if v_prediction else "epsilon",
        trigger_words=[word.strip() for word in trigger.split(",") if word.strip()],
        source_format="kohya",
        created_at=metadata.get("modelspec.date", ""),
        difflora_version="",
        extra=dict(metadata),
    )
