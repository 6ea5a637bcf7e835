"""`export_adapter(config)`: write an adapter where other programs load it completely.

`comfyui` (the default) is kohya's naming, which ComfyUI, A1111/Forge and diffusers all load
(`difflora.formats.kohya`); `diffusers` is difflora's native diffusers PEFT layout. Before writing, the file's
keys go through each consumer's loading rules (`difflora.formats.compat`): a key some consumer would drop is
logged with the reason, so "lora key not loaded" is found here rather than in a user's workflow.

A DoRA adapter's magnitudes are written in float32 whatever the dtype (a magnitude's rounding error scales the
whole weight, not only the update); for `comfyui` they are converted to the per-input-column convention
against the base weights, and the export warns how far that is from the trained weights
(`difflora.formats.dora_export`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors_bytes

from difflora.adapter.types import Adapter
from difflora.config.export import ExportConfig
from difflora.errors import ConfigError, Interrupted, first_n
from difflora.formats import family as families
from difflora.formats.consumers.verdicts import verdicts
from difflora.formats.dora_export import base_weights, needs_conversion, to_column_magnitudes
from difflora.formats.kohya import to_kohya
from difflora.formats.naming import reference_table
from difflora.formats.native import adapter_state_dict, header_metadata
from difflora.formats.read import load_adapter
from difflora.formats.reference import ModuleInfo, folder_modules, reference_families
from difflora.safe_io import interrupted_write_message, write_atomic

logger = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def export_adapter(config: ExportConfig, *, source: tuple[Path, Adapter] | None = None) -> Path:
    """Write the adapter named by `config` in the requested format and dtype; returns the written path.
    `source`: the file and the adapter to write in its stead, already read (with weights baked in:
    `difflora.composition.weighted`)."""
    source, adapter = source or (Path(config.adapter), load_adapter(Path(config.adapter)))
    output = (
        Path(config.output)
        if config.output
        else source.with_name(f"{source.stem}.{config.format}.safetensors")
    )
    if output.resolve() == source.resolve():
        raise ConfigError(f"--output {output} is the adapter itself; choose another file name.")
    if output.exists() and not config.overwrite:
        raise ConfigError(
            f"{output} already exists; pass --overwrite to replace it, or choose another --output."
        )
    if config.format == "comfyui" and needs_conversion(adapter):
        conversion = to_column_magnitudes(adapter, base_weights(adapter, config.model))
        logger.warning("%s", conversion.summary())
        adapter = conversion.adapter
    existed = output.exists()
    modules = model_tree(adapter, config.model) if config.format == "comfyui" else None
    payload = export_bytes(adapter, config.format, DTYPES[config.dtype], modules=modules)
    try:
        write_atomic(output, payload, fault="export-write")
    except KeyboardInterrupt:
        raise Interrupted(interrupted_write_message(output, existed=existed)) from None
    logger.info("Wrote %s (%s, %s, %d modules)", output, config.format, config.dtype, len(adapter.modules))
    return output


def export_bytes(
    adapter: Adapter,
    format: str,
    dtype: torch.dtype,
    *,
    modules: Mapping[str, Mapping[str, ModuleInfo]] | None = None,
) -> bytes:
    """The exported file's bytes (safetensors), after checking every consumer would load every key.
    `modules`: the model's module tree where it is not the family's reference architecture."""
    if format == "comfyui":
        tensors, metadata = to_kohya(adapter, dtype=dtype, modules=modules)
    else:
        tensors = adapter_state_dict(adapter)
        metadata = header_metadata(adapter)
    tensors = {key: _cast(key, value, dtype) for key, value in tensors.items()}
    _report_consumers(list(tensors), metadata, families.export_family(adapter), format)
    return save_safetensors_bytes(tensors, metadata=metadata)


def model_tree(adapter: Adapter, model: str | None) -> dict[str, dict[str, ModuleInfo]] | None:
    """The base model's module tree, for an adapter of a family with a reference architecture whose shapes
    it does not fit (a reduced model of that architecture), read from the base's diffusers folder (`--model`,
    else the recorded base); None where the reference fits or no folder is at hand. Fused layers take their
    parts' sizes from it."""
    family = families.export_family(adapter)
    if family not in reference_families() or families.fits(adapter.modules, reference_table(family)):
        return None
    folder = model or adapter.meta.base_model
    if not folder or not Path(folder).is_dir():
        return None
    return folder_modules(folder, family) or None


def _cast(key: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The export dtype, except for alphas and DoRA magnitudes, which stay float32 (see the module docstring)."""
    keep = key.endswith((".alpha", ".dora_scale", ".lora_magnitude_vector"))
    return tensor.detach().to("cpu", torch.float32 if keep else dtype).contiguous()


def _report_consumers(keys: list[str], metadata: dict[str, str], family: str, format: str) -> None:
    for verdict in verdicts(keys, metadata, family):
        if format == "diffusers" and verdict.consumer != "diffusers":
            continue  # the diffusers layout is for diffusers; ComfyUI/A1111 users export comfyui
        if verdict.complete:
            logger.debug("%s", verdict.summary())
            continue
        examples = first_n([f"{key} ({why})" for key, why in verdict.dropped.items()], 3, separator="; ")
        logger.warning("%s. %s", verdict.summary(), examples)
