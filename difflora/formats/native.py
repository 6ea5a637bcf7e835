"""difflora's own adapter file: safetensors in diffusers' PEFT layout, so `pipe.load_lora_weights(path)` loads
it unchanged.

Keys: `unet.<module>.lora_A.weight` [rank, in] and `.lora_B.weight` [out, rank];
`text_encoder.text_model.encoder.layers.N.self_attn.q_proj.lora_A.weight`; `text_encoder_2.` for SDXL. A DoRA
module also has `.lora_magnitude_vector` (peft's shapes, `difflora.formats.dora`; `use_dora` in the metadata).
Alpha travels in the header's `lora_adapter_metadata` (diffusers builds its LoraConfig from it), and every
`difflora.*` header key says how the adapter was made: base model identity, rank/alpha per component,
targets, trigger words and the full configuration as TOML. Writes are atomic (temporary file, then rename).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors_bytes

from difflora import __version__
from difflora.adapter.types import COMPONENTS, Adapter, AdapterMeta, LoraWeights
from difflora.errors import AdapterFormatError, first_n
from difflora.formats.dora import PEFT_MAGNITUDE, peft_magnitude, read_peft_magnitude
from difflora.safe_io import write_atomic

FORMAT_VERSION = "1"


# ----------------------------------------------------------------------------------------------- saving


def adapter_state_dict(adapter: Adapter) -> dict[str, torch.Tensor]:
    if adapter.lycoris_kinds:  # peft's LoRA layout has no tensors for them, and diffusers loads none
        raise AdapterFormatError(
            f"The adapter holds {'/'.join(adapter.lycoris_kinds)} modules, which the diffusers PEFT layout cannot "
            "hold; export it with --format comfyui (LyCORIS keys), or merge it to a LoRA (difflora merge --rank)."
        )
    for component in adapter.components:
        kinds = {w.is_dora for w in adapter.component_modules(component).values()}
        if len(kinds) > 1:  # peft's use_dora is one per config: diffusers would make every module DoRA
            raise AdapterFormatError(
                f"The {component} has DoRA and plain LoRA modules; diffusers' PEFT layout makes all of a "
                "component's modules one kind. Export it with --format comfyui instead."
            )
    tensors = {}
    for key, weights in adapter.modules.items():
        tensors[f"{key}.lora_A.weight"] = weights.down.contiguous()
        tensors[f"{key}.lora_B.weight"] = weights.up.contiguous()
        if weights.is_dora:
            tensors[f"{key}.{PEFT_MAGNITUDE}"] = peft_magnitude(key, weights)
    return tensors


def peft_metadata(adapter: Adapter) -> dict[str, Any]:
    """diffusers' `lora_adapter_metadata`: a LoraConfig per component, keys packed with the component prefix.
    Per-module ranks/alphas that differ from the most common go into rank/alpha patterns (anchored regexes).
    Text-encoder names drop `text_model.`: peft matches them as suffixes, so they fit both the flattened
    (transformers 5) and the classic module tree."""
    metadata: dict[str, Any] = {}
    for component in adapter.components:
        modules = {_peft_name(component, n): w for n, w in adapter.component_modules(component).items()}
        rank = Counter(w.rank for w in modules.values()).most_common(1)[0][0]
        dora = {w.is_dora for w in modules.values()}
        alpha = Counter(w.alpha for w in modules.values()).most_common(1)[0][0]
        config = {
            "r": rank,
            "lora_alpha": alpha,
            "target_modules": sorted(modules),
            "rank_pattern": {_anchor(n): w.rank for n, w in modules.items() if w.rank != rank},
            "alpha_pattern": {_anchor(n): w.alpha for n, w in modules.items() if w.alpha != alpha},
            "use_dora": dora == {True},
            "lora_bias": False,
        }
        metadata.update({f"{component}.{key}": value for key, value in config.items()})
    return metadata


def _peft_name(component: str, name: str) -> str:
    return name.removeprefix("text_model.") if component.startswith("text_encoder") else name


def _anchor(name: str) -> str:
    return "^" + name.replace(".", r"\.") + "$"


def header_metadata(adapter: Adapter) -> dict[str, str]:
    meta = adapter.meta
    header = {
        "format": "pt",
        "lora_adapter_metadata": json.dumps(peft_metadata(adapter), indent=2, sort_keys=True),
        "difflora.format_version": FORMAT_VERSION,
        "difflora.version": meta.difflora_version or __version__,
        "difflora.name": meta.name,
        "difflora.base_model": meta.base_model,
        "difflora.base_family": meta.base_family,
        "difflora.base_architecture": meta.base_architecture,
        "difflora.base_hash": meta.base_hash,
        "difflora.prediction_type": meta.prediction_type,
        "difflora.trigger_words": json.dumps(meta.trigger_words),
        "difflora.config": meta.config_toml,
        "difflora.source_format": meta.source_format,
        "difflora.created_at": meta.created_at or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "difflora.components": json.dumps(adapter.summary(), sort_keys=True),
    }
    for key, value in meta.extra.items():
        header.setdefault(key, str(value))
    return header


def save_adapter(adapter: Adapter, path: str | os.PathLike) -> Path:
    """Write `adapter` to `path` atomically: a reader never sees a half-written file, and an existing file
    is replaced only once the new one is complete."""
    if not adapter.modules:
        raise AdapterFormatError("Refusing to save an adapter with no LoRA modules.")
    payload = save_safetensors_bytes(adapter_state_dict(adapter), metadata=header_metadata(adapter))
    return write_atomic(Path(path), payload)


# ----------------------------------------------------------------------------------------------- reading


def is_native_layout(tensors: dict[str, torch.Tensor]) -> bool:
    return all(
        key.split(".")[0] in COMPONENTS
        and key.endswith((".lora_A.weight", ".lora_B.weight", f".{PEFT_MAGNITUDE}"))
        for key in tensors
    )


def parse_native(tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, source: str) -> Adapter:
    peft_config = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    modules: dict[str, LoraWeights] = {}
    for key in sorted(tensors):
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        up = tensors.get(f"{module}.lora_B.weight")
        if up is None:
            raise AdapterFormatError(f"{source}: {module} has lora_A but no lora_B.")
        down = tensors[key]
        weights = LoraWeights(down=down, up=up, alpha=_alpha_for(module, down.shape[0], peft_config))
        magnitude = tensors.get(f"{module}.{PEFT_MAGNITUDE}")
        modules[module] = (
            weights if magnitude is None else read_peft_magnitude(module, magnitude, weights, source)
        )
    orphans = [
        k for k in tensors if k.endswith(".lora_B.weight") and k.replace("lora_B", "lora_A") not in tensors
    ]
    orphans += [k for k in tensors if k.endswith(f".{PEFT_MAGNITUDE}") and k.rsplit(".", 1)[0] not in modules]
    if orphans:
        raise AdapterFormatError(f"{source}: lora_B or magnitude without lora_A for {first_n(orphans, 3)}")
    return Adapter(
        modules=modules, meta=meta_from_header(metadata, native="difflora.format_version" in metadata)
    )


def _alpha_for(module: str, rank: int, peft_config: dict[str, Any]) -> float:
    """Alpha from diffusers' metadata (pattern first, then the component default). A PEFT file without
    metadata means scale 1 (alpha = rank), as diffusers loads it."""
    component, _, name = module.partition(".")
    name = _peft_name(component, name)
    patterns = peft_config.get(f"{component}.alpha_pattern") or {}
    if _anchor(name) in patterns:
        return float(patterns[_anchor(name)])
    for pattern, value in patterns.items():  # patterns written by other tools: peft's suffix rule
        if name == pattern or name.endswith("." + pattern):
            return float(value)
    alpha = peft_config.get(f"{component}.lora_alpha")
    if alpha is None:
        return float(rank)
    scale_root = bool(peft_config.get(f"{component}.use_rslora"))
    return float(alpha) * (rank**0.5) if scale_root else float(alpha)


def meta_from_header(metadata: dict[str, str], *, native: bool) -> AdapterMeta:
    def get(key: str, default: str = "") -> str:
        return metadata.get(f"difflora.{key}", default)

    known = {
        f"difflora.{k}"
        for k in (
            "format_version",
            "version",
            "name",
            "base_model",
            "base_family",
            "base_architecture",
            "base_hash",
            "prediction_type",
            "trigger_words",
            "config",
            "source_format",
            "created_at",
            "components",
        )
    }
    extra = {
        k: v for k, v in metadata.items() if k not in known and k not in ("format", "lora_adapter_metadata")
    }
    return AdapterMeta(
        name=get("name"),
        base_model=get("base_model"),
        base_family=get("base_family"),
        base_architecture=get("base_architecture"),
        base_hash=get("base_hash"),
        prediction_type=get("prediction_type", "epsilon"),
        trigger_words=json.loads(get("trigger_words", "[]") or "[]"),
        config_toml=get("config"),
        source_format=get("source_format", "difflora") if native else "diffusers-peft",
        created_at=get("created_at"),
        difflora_version=get("version", ""),
        extra=extra,
    )
