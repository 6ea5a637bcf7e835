"""DoRA magnitudes in files: which tensor holds them in each layout, in which shape, along which axis.

- peft / diffusers / difflora's native layout: `<module>.lora_magnitude_vector`, one value per output row,
  shaped [out] for a Linear and [1, out, 1, 1] for a convolution (the shapes peft's DoRA layers keep, so
  diffusers' `load_lora_weights` loads the file into them unchanged);
- kohya / LyCORIS: `<module>.dora_scale`, per input column shaped [1, in] (convolution [1, in, 1, 1]), the
  convention every ComfyUI, A1111 and Forge version applies; per output row shaped [out, 1] ([out, 1, 1, 1])
  is what LyCORIS and OneTrainer write with their output-axis option, applied by newer ComfyUI and Forge
  only (see `difflora.formats.consumers.comfyui.patched_weight`). The shape tells the two apart.

The weight math is `difflora.adapter.dora`'s; converting one axis into the other is `formats.dora_export`'s.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from difflora.adapter.dora import AXIS_NAMES
from difflora.adapter.types import LoraWeights
from difflora.errors import AdapterFormatError

PEFT_MAGNITUDE = "lora_magnitude_vector"
KOHYA_DORA_SCALE = "dora_scale"


def peft_magnitude(module: str, weights: LoraWeights) -> torch.Tensor:
    """The `lora_magnitude_vector` tensor of a DoRA module whose magnitude is per output row."""
    assert weights.magnitude is not None
    if weights.magnitude_axis != "out":
        raise AdapterFormatError(
            f"{module} is a DoRA module with one magnitude {AXIS_NAMES[weights.magnitude_axis]} (kohya's "
            "dora_scale); peft and diffusers keep one per output row, so no diffusers PEFT file can hold it. "
            "Use it in ComfyUI/A1111 (export --format comfyui) or with difflora directly."
        )
    magnitude = weights.magnitude.reshape(-1).contiguous()
    return magnitude.reshape(1, -1, 1, 1) if weights.down.ndim == 4 else magnitude


def read_peft_magnitude(module: str, tensor: torch.Tensor, weights: LoraWeights, source: str) -> LoraWeights:
    """`weights` with the DoRA magnitude read from a `lora_magnitude_vector` tensor (one per output row)."""
    if tensor.numel() != weights.up.shape[0]:
        raise AdapterFormatError(
            f"{source}: {module}.{PEFT_MAGNITUDE} holds {tensor.numel()} values but the module has "
            f"{weights.up.shape[0]} output rows. The file is damaged; re-export it."
        )
    return replace(weights, magnitude=tensor.reshape(-1), magnitude_axis="out")


def kohya_dora_scale(weights: LoraWeights) -> torch.Tensor:
    """The `dora_scale` tensor in the shape the consumers tell its axis by: [1, in(, 1, 1)] per input
    column, [out, 1(, 1, 1)] per output row."""
    assert weights.magnitude is not None
    trailing = [1, 1] if weights.down.ndim == 4 else []
    magnitude = weights.magnitude.reshape(-1)
    if weights.magnitude_axis == "in":
        return magnitude.reshape(1, -1, *trailing).contiguous()
    return magnitude.reshape(-1, 1, *trailing).contiguous()


def read_kohya_dora_scale(name: str, tensor: torch.Tensor, weights: LoraWeights, source: str) -> LoraWeights:
    """`weights` with the DoRA magnitude of a `dora_scale` tensor, its axis read from its shape."""
    inputs, outputs = weights.down.shape[1], weights.up.shape[0]
    shape = tuple(tensor.shape)
    ones = all(size == 1 for size in shape[2:])
    if len(shape) >= 2 and ones and shape[:2] == (1, inputs):
        axis = "in"
    elif len(shape) >= 2 and ones and shape[:2] == (outputs, 1):
        axis = "out"
    else:
        raise AdapterFormatError(
            f"{source}: {name}.{KOHYA_DORA_SCALE} has shape {shape}; a DoRA magnitude of this module "
            f"({inputs} inputs, {outputs} outputs) is [1, {inputs}] per input column or [{outputs}, 1] per "
            "output row. The file is damaged or for another model."
        )
    return replace(weights, magnitude=tensor.reshape(-1), magnitude_axis=axis)
