"""`--quantize-base fp8`: the frozen base's Linear weights stored as float8 (e4m3fn, one byte per weight,
cast without scales as kohya's `--fp8_base` and ComfyUI's fp8 checkpoints do) and upcast one layer at a
time in the forward pass, while the LoRA layers train in float32. It holds the denoiser only (the text
encoders' outputs are cached, and T5 reads its layers' weight dtype to cast its activations).

The float8 bits are held as a uint8 buffer, so the `.to(dtype)` calls that place a model never upcast
them, and peft's LoRA layers, wrapping the base layer from outside, keep their float32 A and B. A layer of
this kind is not fused by `merged_lora` (its type is no plain Linear): samples during training are
rendered with the LoRA unfused, since an update fused into float8 weights would be rounded away.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn


class Float8Linear(nn.Module):
    """A frozen Linear whose weight is stored as float8 and upcast to the input's dtype for each call."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_bits", linear.weight.detach().to(FP8).view(torch.uint8))
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def stored_weight(self) -> torch.Tensor:
        """The float8 weight (a view of the stored bits)."""
        return self.weight_bits.view(FP8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.stored_weight.to(x.dtype), bias)


def to_fp8(components: Mapping[str, nn.Module]) -> dict[str, int]:
    """Replace every plain nn.Linear of `components` (LoRA's own A and B and layers already converted
    excepted) by a Float8Linear, in place; returns how many layers each component holds in float8."""
    counts = {}
    for component, module in components.items():
        for name, child in list(module.named_modules()):
            if type(child) is not nn.Linear or ".lora_" in name:
                continue
            parent_name, _, attribute = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, attribute, Float8Linear(child))
        counts[component] = sum(isinstance(child, Float8Linear) for child in module.modules())
    return counts
