"""`difflora merge a:0.7,b:0.3 --into-base MODEL -o merged.safetensors`: a base checkpoint with the adapters
baked in, W = W0 + Σ wᵢ·ΔWᵢ in the base's dtype, written in the base file's own layout (ldm for SD 1.x/2.x,
sgm for SDXL), so that every loader of that base (difflora, diffusers' `from_single_file`, ComfyUI's
checkpoint loader, A1111) reads it as it read the base.

Where each adapted module lives in the original file is asked of the converter that read the base:
diffusers' own ldm -> diffusers functions. They are run on a *tagged* copy of the file's keys, each tensor
replaced by a free broadcast view whose every element is `key index · 2²⁰ + row` (float64, exact): after
the conversion, a module's weight names, row by row, the original tensor and row it came from, renames and
OpenCLIP's q/k/v split of `in_proj_weight` included. Nothing is guessed from names, and nothing is loaded
but the keys and shapes until the weights are written.

A BFL transformer file (Flux.1, with or without ComfyUI's `model.diffusion_model.` prefix) is read the same
way through difflora's own BFL -> diffusers conversion (difflora.models.bfl_file), so q, k and v (and a single
block's MLP input) land on the rows of the fused `qkv` / `linear1` the loader splits them from, and the final
modulation's update on the halves the loader swaps. Which reading applies is the family's
`checkpoint_layout`; the text encoders of an all-in-one file are found under the family's `single_file_parts`.

The update Σ wᵢ·ΔWᵢ comes from the exact merge (difflora.composition.merge: ranks concatenated), is added
in float32 to W0 read from the file, and is rounded once to the file's dtype.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from difflora.adapter.types import Adapter
from difflora.config.spec import AdapterWeight
from difflora.errors import AdapterCompatibilityError, ModelError

logger = logging.getLogger(__name__)

ROW_BITS = 20  # rows per tensor < 2**20 (the largest, CLIP's 49,408-token embedding, has 2**15.6)
BAKED_KEY = "difflora.baked_adapters"  # the file's metadata: which adapters, at which weights


@dataclass(frozen=True)
class Source:
    """Where an adapted module's weight lives in the original file: a tensor and its rows, in order."""

    key: str
    rows: torch.Tensor  # int64 row indices of `key`, one per output row of the module


@dataclass
class BakeResult:
    path: Path | None = None
    modules: int = 0
    tensors: dict[str, int] = field(default_factory=dict)  # original key -> rows changed

    def text(self) -> str:
        return (
            f"Baked {self.modules} adapted modules into {len(self.tensors)} tensors of the base "
            f"({sum(self.tensors.values()):,} rows changed)."
        )


def tagged(shapes: Mapping[str, Sequence[int]]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Each key's tag tensor (a broadcast view: no memory per element) and the keys by index."""
    keys = list(shapes)
    tensors = {}
    for index, key in enumerate(keys):
        shape = tuple(shapes[key])
        rows = shape[0] if shape else 1
        if rows >= 2**ROW_BITS:
            raise ModelError(f"{key} has {rows} rows, more than baking can address; report this checkpoint.")
        tag = torch.arange(rows, dtype=torch.float64) + float(index * 2**ROW_BITS)
        tensors[key] = tag.reshape(rows, *([1] * (len(shape) - 1))).expand(shape) if shape else tag[0]
    return tensors, keys


def decode(tensor: torch.Tensor, keys: Sequence[str], module: str) -> Source:
    """The original tensor and rows a converted weight's tags name; refuses a weight whose rows mix
    tensors or whose columns were rearranged (a conversion baking could not invert)."""
    flat = tensor.reshape(tensor.shape[0], -1)
    first = flat[:, 0]
    broadcast = all(
        stride == 0 for size, stride in zip(flat.shape[1:], flat.stride()[1:], strict=True) if size > 1
    )
    if not broadcast and not torch.equal(flat, first[:, None].expand_as(flat)):  # a copy: compare it
        raise ModelError(
            f"{module}: its weight's columns are rearranged from the original file; cannot bake it."
        )
    indices = torch.div(first, 2**ROW_BITS, rounding_mode="floor").long()
    if not torch.all(indices == indices[0]):
        raise ModelError(f"{module}: its weight gathers rows of several original tensors; cannot bake it.")
    return Source(keys[int(indices[0])], (first - indices[0].double() * 2**ROW_BITS).long())


def ldm_sources(
    shapes: Mapping[str, Sequence[int]],
    models: Mapping[str, Any],
    modules: Sequence[str],
    *,
    denoiser: str,
    text_prefixes: Sequence[str],
) -> dict[str, tuple[Source, tuple[int, ...]]]:
    """difflora module key -> (its Source, the module weight's shape), for each of `modules`. `models`: the
    base's components by name (built on the meta device will do: only their configs and shapes are read);
    `text_prefixes`: the file's text-encoder key prefixes, as the family declares them."""
    tags, keys = tagged(shapes)
    converted = {
        component: _convert(models, component, tags, denoiser=denoiser, text_prefixes=text_prefixes)
        for component in {m.partition(".")[0] for m in modules}
    }
    found = {}
    for module in modules:
        component, _, path = module.partition(".")
        tensor = converted[component].get(path + ".weight")
        if tensor is None:
            raise AdapterCompatibilityError(
                f"{module} is not a weight of this base file's {component}: the adapter was made for another "
                "model (difflora inspect shows its base)."
            )
        found[module] = (decode(tensor, keys, module), tuple(tensor.shape))
    return found


def _convert(
    models: Mapping[str, Any],
    component: str,
    tags: dict[str, torch.Tensor],
    *,
    denoiser: str,
    text_prefixes: Sequence[str],
) -> dict[str, torch.Tensor]:
    """diffusers' conversion of the tagged file for one component, keyed by the classic module paths. A
    text encoder is the one conversion whose every parameter has the component's own shape."""
    from diffusers.loaders import single_file_utils as sf

    model = models.get(component)
    if model is None:
        raise AdapterCompatibilityError(
            f"The base has no {component}; the adapter was made for another model."
        )
    if component == denoiser:
        return sf.convert_ldm_unet_checkpoint(dict(tags), dict(model.config))
    own = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    for candidate in _text_candidates(sf, model, tags, text_prefixes):
        classic = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in candidate.items()}
        bare = {k.removeprefix("text_model."): v for k, v in classic.items()}
        missing = torch.empty(0)
        if all(tuple(bare.get(n, classic.get(n, missing)).shape) == shape for n, shape in own.items()):
            return classic
    raise ModelError(
        f"None of diffusers' converters reads this base file's {component}: cannot bake into it."
    )


def _text_candidates(
    sf: Any, model: Any, tags: dict[str, torch.Tensor], prefixes: Sequence[str]
) -> list[dict[str, torch.Tensor]]:
    """The conversions diffusers' single-file loader chooses between for a text encoder under each prefix:
    HF CLIP in ldm's wrapper, or OpenCLIP (whose q, k and v are one `in_proj_weight`)."""
    candidates = []
    for prefix in prefixes:
        if prefix + "transformer.resblocks.0.attn.in_proj_weight" in tags:
            candidates.append(sf.convert_open_clip_checkpoint(model, dict(tags), prefix=prefix))
        else:
            own = {key: tensor for key, tensor in tags.items() if key.startswith(prefix)}
            candidates.append(sf.convert_ldm_clip_checkpoint(own, remove_prefix=prefix))
    return candidates


def bake_tensors(
    tensors: dict[str, torch.Tensor], sources: Mapping[str, tuple[Source, tuple[int, ...]]], merged: Adapter
) -> BakeResult:
    """Add each merged module's ΔW to the rows its Source names, in float32, rounding once to each tensor's
    dtype. `tensors` (the base file's) are replaced in place."""
    updates: dict[str, torch.Tensor] = {}
    result = BakeResult(modules=len(merged.modules))
    for module, weights in merged.modules.items():
        source, shape = sources[module]
        delta = weights.low_rank_delta()
        if tuple(delta.shape) != shape:
            raise AdapterCompatibilityError(
                f"{module}: the adapter's update is {tuple(delta.shape)}, the base's weight {shape}: the "
                "adapter was made for another model."
            )
        base = tensors[source.key]
        update = updates.setdefault(source.key, torch.zeros(base.shape, dtype=torch.float32))
        update.reshape(base.shape[0], -1).index_add_(0, source.rows, delta.reshape(shape[0], -1))
        result.tensors[source.key] = result.tensors.get(source.key, 0) + shape[0]
    for key, update in updates.items():
        tensors[key] = (tensors[key].float() + update).to(tensors[key].dtype)
    return result


def baked_metadata(
    metadata: Mapping[str, str], pairs: Sequence[tuple[AdapterWeight, Adapter]]
) -> dict[str, str]:
    """The base file's metadata plus which adapters it now holds, at which weights."""
    record = [
        {
            "name": spec.name,
            "weight": spec.weight,
            "te_weight": spec.text_encoder_weight,
            "adapter_name": adapter.meta.name,
            "base_hash": adapter.meta.base_hash,
        }
        for spec, adapter in pairs
    ]
    previous = json.loads(metadata.get(BAKED_KEY, "[]"))  # a base that already holds baked adapters
    return {**metadata, BAKED_KEY: json.dumps(previous + record)}


def transformer_sources(
    shapes: Mapping[str, Sequence[int]],
    modules: Sequence[str],
    *,
    denoiser: str,
    parts: Mapping[str, Sequence[str]],
) -> dict[str, tuple[Source, tuple[int, ...]]]:
    """difflora module key -> (its Source, the module weight's shape) in a BFL transformer file: the
    denoiser's through the loader's conversion of the tagged keys, a text encoder's (an all-in-one file's)
    under one of `parts[component]`, the family's key prefixes, where the loader reads it one to one."""
    from difflora.models.bfl_file import strip_prefix, to_diffusers

    tags, keys = tagged(shapes)
    converted = to_diffusers(strip_prefix(tags)) if any(m.startswith(denoiser + ".") for m in modules) else {}
    found = {}
    for module in modules:
        component, _, path = module.partition(".")
        if component == denoiser:
            tensor = converted.get(path + ".weight")
        else:
            names = (path, path.removeprefix("text_model."))  # CLIP stored with or without `text_model.`
            candidates = [p + n + ".weight" for p in parts.get(component, ()) for n in names]
            tensor = next((tags[key] for key in candidates if key in tags), None)
        if tensor is None:
            raise AdapterCompatibilityError(
                f"{module} is not a weight of this transformer file (a transformer-only file holds no text "
                "encoder): bake into an all-in-one checkpoint, or compose the adapter at generation."
            )
        found[module] = (decode(tensor, keys, module), tuple(tensor.shape))
    return found


def _ldm_file(architecture: Any, shapes: Mapping[str, Sequence[int]], modules: Sequence[str]) -> Any:
    from difflora.formats.reference import reference_model

    family = architecture.family
    components = {m.partition(".")[0] for m in modules}
    models = {c: reference_model(architecture.name, c) for c in components if c in family.components}
    return ldm_sources(
        shapes, models, modules, denoiser=family.denoiser, text_prefixes=family.checkpoint_text_encoders
    )


def _transformer_file(architecture: Any, shapes: Mapping[str, Sequence[int]], modules: Sequence[str]) -> Any:
    family = architecture.family
    return transformer_sources(shapes, modules, denoiser=family.denoiser, parts=family.single_file_parts)


# How each single-file layout (`ModelFamily.checkpoint_layout`) is read back to its modules' rows.
LAYOUT_SOURCES = {"ldm": _ldm_file, "bfl": _transformer_file}


def bake_into_base(
    pairs: Sequence[tuple[AdapterWeight, Adapter]], base: str | os.PathLike, output: str | os.PathLike
) -> BakeResult:
    """Write `output`: the single-file checkpoint `base` with Σ wᵢ·ΔWᵢ of `pairs` added, in its own layout,
    dtype and metadata, plus the record of what was baked (BAKED_KEY)."""
    from safetensors.torch import load_file, save

    from difflora.composition.merge import merge_adapters
    from difflora.models.architecture import detect_architecture
    from difflora.safe_io import read_safetensors_header, write_atomic

    base, output = Path(base), Path(output)
    architecture = detect_architecture(base)
    sources_of = LAYOUT_SOURCES.get(architecture.family.checkpoint_layout)
    if sources_of is None:
        raise ModelError(
            f"--into-base: {base} is a {architecture.label} file, whose layout baking cannot write yet. "
            "Compose the adapters at generation instead (difflora generate --adapters)."
        )
    merged = merge_adapters(pairs, name=output.stem).adapter
    header = read_safetensors_header(base, error=ModelError)
    shapes = {key: info["shape"] for key, info in header.items() if key != "__metadata__"}
    sources = sources_of(architecture, shapes, sorted(merged.modules))
    tensors = load_file(str(base))  # the whole base once, then its bytes once more while writing
    result = bake_tensors(tensors, sources, merged)
    metadata = baked_metadata(header.get("__metadata__") or {}, pairs)
    write_atomic(output, save(tensors, metadata=metadata))
    result.path = output
    logger.info("Wrote %s (%s with %d adapters baked in).", output, architecture.label, len(pairs))
    return result


def bake(
    adapters: Sequence[AdapterWeight],
    base: str | os.PathLike,
    output: str | os.PathLike,
    *,
    adapter_dirs: Sequence[str | os.PathLike] = (),
) -> BakeResult:
    """Load the adapters named (as `difflora merge` finds them) and bake them into the checkpoint `base`."""
    from difflora.composition.find import adapter_dirs as search_dirs
    from difflora.composition.find import find_adapter
    from difflora.config.spec import adapter_set
    from difflora.errors import Interrupted
    from difflora.formats.read import load_adapter
    from difflora.safe_io import interrupted_write_message

    directories = search_dirs(adapter_dirs)
    pairs = [(spec, load_adapter(find_adapter(spec.name, directories))) for spec in adapter_set(adapters)]
    existed = Path(output).exists()
    try:
        return bake_into_base(pairs, base, output)
    except KeyboardInterrupt:
        raise Interrupted(interrupted_write_message(Path(output), existed=existed)) from None
