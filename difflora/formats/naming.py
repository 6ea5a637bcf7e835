"""The one table between difflora's module names and kohya's (ComfyUI / A1111 / Forge / diffusers) names.

difflora names a module "<component>.<classic module path>" (diffusers UNet paths; CLIP paths with the classic
`text_model.` level). kohya names it `<prefix>_<path with "." replaced by "_">` where the prefix is `lora_unet` or the
family's text-encoder prefix (`lora_te`, or `lora_te1`/`lora_te2` for two encoders), and where the UNet paths
are diffusers paths or, for a family kohya trains on the SGM UNet, the original SGM/LDM paths
(`input_blocks.4.1...`): each family declares which (`ModelFamily.kohya_unet_names`).

Every table here is built from a live module tree (the reference architectures on the meta device, or the
model/adapter at hand): the SGM path of a module comes from walking the UNet's blocks, never from string
surgery on names, and reading a kohya name is a dictionary lookup in the inverted table. Only for an
architecture that has no reference (a custom model) is a kohya name parsed, segment by segment, against the
vocabulary of module-name segments seen in the reference trees; an ambiguous parse is refused.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache, lru_cache

from torch import nn

from difflora.formats.flux_names import BFL_ROOTS, bfl_layers
from difflora.formats.fused import FusedLayer
from difflora.formats.mmdit_names import MMDIT_ROOTS, mmdit_layers
from difflora.formats.reference import (
    ModuleInfo,
    components_of,
    reference_families,
    reference_model,
    reference_modules,
)
from difflora.models.families import ModelFamily, families
from difflora.models.families import family as model_family

UNET_PREFIX = "lora_unet"
# Prefix -> component when reading: every family's prefixes, whatever the file's family (ComfyUI and
# diffusers read `lora_te_` as the first of two text encoders too).
READ_PREFIXES = (
    {UNET_PREFIX: "unet"}
    | {prefix: component for f in families() for component, prefix in f.kohya_text_encoder_prefixes.items()}
    | {alias: f.denoiser for f in families() for alias in f.kohya_denoiser_aliases}
)
# Original layouts a family's denoiser may be named in (`ModelFamily.kohya_denoiser_layout`): each builds
# the fused/renamed layers from the denoiser's module tree.
DENOISER_LAYOUTS = {"bfl": bfl_layers, "mmdit": mmdit_layers}
LAYOUT_ROOTS = {"bfl": BFL_ROOTS, "mmdit": MMDIT_ROOTS}  # the first segments of each layout's module paths
SGM_ROOTS = ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out")
# SGM names of a ResnetBlock2D's layers (ldm ResBlock: in_layers = [norm, act, conv], out_layers =
# [norm, act, dropout, conv], emb_layers = [act, linear]).
_RESNET_SGM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP_LEVEL_SGM = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def flat(path: str) -> str:
    """kohya's module-name rule (networks/lora.py): every '.' becomes '_'."""
    return path.replace(".", "_")


# ------------------------------------------------------------------------------------------ SGM block map


def sgm_block_prefixes(unet: nn.Module) -> dict[str, str]:
    """diffusers block path -> SGM block path, walking the UNet's own down/mid/up blocks (the same layout
    kohya's `make_unet_conversion_map` and ComfyUI's `unet_to_diffusers` derive from the config)."""
    prefixes = dict(_UNET_TOP_LEVEL_SGM)
    index = 1  # input_blocks.0 is conv_in
    for i, block in enumerate(unet.down_blocks):
        attentions = getattr(block, "attentions", None)
        for j in range(len(block.resnets)):
            prefixes[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{index}.0"
            if attentions is not None:
                prefixes[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{index}.1"
            index += 1
        if block.downsamplers is not None:
            prefixes[f"down_blocks.{i}.downsamplers.0"] = f"input_blocks.{index}.0"
            index += 1
    if unet.mid_block is not None:
        prefixes["mid_block.resnets.0"] = "middle_block.0"
        for j in range(len(getattr(unet.mid_block, "attentions", []))):
            prefixes[f"mid_block.attentions.{j}"] = "middle_block.1"
        prefixes["mid_block.resnets.1"] = "middle_block.2"
    index = 0
    for i, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None)
        for j in range(len(block.resnets)):
            prefixes[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{index}.0"
            if attentions is not None:
                prefixes[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{index}.1"
            index += 1
        if block.upsamplers is not None:
            slot = 2 if attentions is not None else 1
            prefixes[f"up_blocks.{i}.upsamplers.0"] = f"output_blocks.{index - 1}.{slot}"
    return prefixes


def sgm_module_names(unet: nn.Module, modules: Iterable[str]) -> dict[str, str]:
    """diffusers module path -> SGM module path for each of `modules` (Linear/Conv paths of `unet`)."""
    prefixes = sgm_block_prefixes(unet)
    result = {}
    for name in modules:
        block = next((p for p in _prefixes_of(name) if p in prefixes), None)
        if block is None:
            raise KeyError(f"UNet module {name!r} lies outside every block of the SGM layout")
        rest = name[len(block) + 1 :]
        if ".resnets." in block:
            head, _, tail = rest.partition(".")
            rest = ".".join(filter(None, [_RESNET_SGM.get(head, head), tail]))
        elif ".downsamplers." in block:
            rest = "op" if rest == "conv" else rest
        result[name] = ".".join(filter(None, [prefixes[block], rest]))
    return result


def _prefixes_of(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:n]) for n in range(len(parts), 0, -1)]


# ------------------------------------------------------------------------------------------ the table


@dataclass
class NameTable:
    """Names of one architecture: difflora key ("<component>.<classic path>") <-> kohya module names."""

    family: str
    modules: dict[str, ModuleInfo]
    to_kohya: dict[str, str] = field(default_factory=dict)
    from_kohya: dict[str, str] = field(default_factory=dict)
    sgm: dict[str, str] = field(default_factory=dict)  # "unet.<diffusers path>" -> SGM path (all families)
    # A denoiser named in an original layout: kohya name -> its layer, and difflora key -> that kohya name
    # (several keys share one name where the layout fuses them).
    layers: dict[str, FusedLayer] = field(default_factory=dict)
    layer_of: dict[str, str] = field(default_factory=dict)


def build_table(
    family: str,
    modules: Mapping[str, Mapping[str, ModuleInfo]],
    unet: nn.Module | None = None,
) -> NameTable:
    """The table for `modules` ({component: {classic path: info}}). With the live `unet`, SGM names are
    known: families kohya names on the SGM UNet export under them, and every family reads them (kohya/A1111
    files name other UNets' blocks so too)."""
    table = NameTable(family, {f"{c}.{n}": info for c, names in modules.items() for n, info in names.items()})
    unet_names = list(modules.get("unet", {}))
    sgm = sgm_module_names(unet, unet_names) if unet is not None and unet_names else {}
    known = model_family(family)
    te = text_encoder_prefixes(known, modules)
    use_sgm = known.kohya_unet_names == "sgm"
    if known.kohya_denoiser_layout and known.denoiser in modules:
        _add_layout(table, known, modules[known.denoiser])
    for key in table.modules:
        component, _, path = key.partition(".")
        if component == known.denoiser and known.kohya_denoiser_layout:
            continue  # named by _add_layout
        if component in ("unet", known.denoiser):  # a denoiser in diffusers' own names (UNets, Qwen-Image)
            diffusers_form = f"{UNET_PREFIX}_{flat(path)}"
            table.from_kohya[diffusers_form] = key
            if path in sgm:
                table.sgm[key] = sgm[path]
                table.from_kohya[f"{UNET_PREFIX}_{flat(sgm[path])}"] = key
            table.to_kohya[key] = f"{UNET_PREFIX}_{flat(sgm[path])}" if use_sgm else diffusers_form
        elif component in te:
            table.to_kohya[key] = f"{te[component]}_{flat(path)}"
            for prefix, target in READ_PREFIXES.items():
                if target == component and prefix != UNET_PREFIX:
                    table.from_kohya.setdefault(f"{prefix}_{flat(path)}", key)
        else:  # a text encoder the family writes no kohya names for (SD3's T5): read as ComfyUI names it
            for prefix in known.consumer_encoder_prefixes.get(component, ()):
                table.from_kohya.setdefault(f"{prefix}_{flat(path)}", key)
    if not known.kohya_denoiser_layout:  # aliases of diffusers-named denoisers (OneTrainer's), read only
        for alias in known.kohya_denoiser_aliases:
            paths = modules.get(known.denoiser, {})
            table.from_kohya.update({f"{alias}_{flat(p)}": f"{known.denoiser}.{p}" for p in paths})
    return table


def _add_layout(table: NameTable, known: ModelFamily, modules: Mapping[str, ModuleInfo]) -> None:
    """The denoiser's layers in the family's original layout (written and read as `lora_unet_<flat path>`,
    as kohya names them), and the family's aliases that name its diffusers paths (read only)."""
    for layer in DENOISER_LAYOUTS[known.kohya_denoiser_layout](known.denoiser, modules):  # type: ignore[index]
        name = f"{UNET_PREFIX}_{flat(layer.name)}"
        table.layers[name] = layer
        table.layer_of.update({part.key: name for part in layer.parts})
    for alias in known.kohya_denoiser_aliases:
        table.from_kohya.update({f"{alias}_{flat(path)}": f"{known.denoiser}.{path}" for path in modules})


def text_encoder_prefixes(family: ModelFamily, components: Iterable[str]) -> dict[str, str]:
    """The family's kohya text-encoder prefixes, or, for a model with more encoders than its family names
    (a custom model with two), those of the first family that names them all."""
    encoders = set(components) - {"unet", family.denoiser}
    return next(
        (
            f.kohya_text_encoder_prefixes
            for f in (family, *families())
            if encoders <= set(f.kohya_text_encoder_prefixes)
        ),
        family.kohya_text_encoder_prefixes,
    )


@cache
def reference_table(family: str) -> NameTable:
    """The table of a reference architecture (`reference_families()`), built from its meta-device modules."""
    modules = {c: reference_modules(family, c) for c in components_of(family)}
    unet = reference_model(family, "unet") if "unet" in modules else None  # SGM names exist for UNets only
    return build_table(family, modules, unet=unet)


def table_for_keys(family: str, keys: Iterable[str]) -> NameTable:
    """A table for an adapter's own module keys. Known families take the reference table (so a module that
    does not exist in that architecture is caught); others are built from the adapter's names, which came
    from the live model it was trained on (diffusers paths, SD1-style naming)."""
    if family in reference_families():
        return reference_table(family)
    modules: dict[str, dict[str, ModuleInfo]] = {}
    for key in keys:
        component, _, path = key.partition(".")
        modules.setdefault(component, {})[path] = ModuleInfo("linear", 0, 0)
    return build_table(family, modules)


# ------------------------------------------------------------------------------------------ reading names


@lru_cache(maxsize=1)
def _segment_vocabulary() -> frozenset[str]:
    """Every dotted segment of every module path in the reference trees (down_blocks, to_out, q_proj, ...)."""
    words: set[str] = set()
    for family in reference_families():
        for key in reference_table(family).modules:
            words.update(segment for segment in key.split(".")[1:] if not segment.isdigit())
    return frozenset(words)


def parse_kohya_name(name: str) -> str | None:
    """For an architecture without a reference tree: the one way to cut `<prefix>_<body>` into module-path
    segments that are all known segment words or numbers. None when there is no parse or more than one."""
    prefix = next((p for p in sorted(READ_PREFIXES, key=len, reverse=True) if name.startswith(p + "_")), None)
    if prefix is None:
        return None
    pieces = name[len(prefix) + 1 :].split("_")
    parses = _parses(tuple(pieces), _segment_vocabulary())
    if len(parses) != 1:
        return None
    path = ".".join(parses[0])
    component = READ_PREFIXES[prefix]
    if component == "unet" and path.split(".")[0] in SGM_ROOTS:
        return None  # SGM paths need an architecture to map back to diffusers blocks
    return f"{component}.{path}"


@lru_cache(maxsize=4096)
def _parses(pieces: tuple[str, ...], vocabulary: frozenset[str]) -> list[tuple[str, ...]]:
    if not pieces:
        return [()]
    found = []
    for end in range(1, len(pieces) + 1):
        segment = "_".join(pieces[:end])
        if segment in vocabulary or re.fullmatch(r"\d+", segment):
            found += [(segment, *rest) for rest in _parses(pieces[end:], vocabulary)]
        if len(found) > 1:
            break
    return found


def resolve_kohya_name(name: str, candidates: Iterable[str]) -> str | None:
    """difflora key for kohya module `name`: looked up in each candidate family's table in order, then parsed."""
    for family in candidates:
        key = reference_table(family).from_kohya.get(name)
        if key is not None:
            return key
    return parse_kohya_name(name)
