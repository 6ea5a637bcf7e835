"""`--quantize-base int8|nf4`: the frozen base held quantized while the LoRA layers train in full precision
(QLoRA, Dettmers et al. 2023). Every `nn.Linear` of the given components becomes a bitsandbytes layer:
int8 is LLM.int8 (`Linear8bitLt`, 1 byte per weight and one scale per row), nf4 is 4-bit NormalFloat with
double-quantized block scales (`Linear4bit`, about half a byte per weight). peft then wraps them in its
own bitsandbytes LoRA layers, whose A and B are ordinary float32 matrices.

Why bitsandbytes on the CPU as well as on CUDA (checked with torch 2.13 here):
- bitsandbytes >= 0.50 (0.50.2 tested) runs both layers on the CPU, and peft has LoRA layers made for both
  (`peft.tuners.lora.bnb`, merge included), so the CPU tests run the very layers a CUDA run trains.
- torchao 0.18: peft's `TorchaoLoraLinear` takes int8 only (it refuses `Int4Tensor`); its `NF4Tensor` is no
  `TorchAOBaseTensor`, so peft would wrap it in a plain LoRA Linear whose merge writes into the packed
  weight; and diffusers 0.42 warns on every import with it installed (it looks for a moved class).
- optimum-quanto: peft 0.21 has no LoRA layer for its modules.

Convolutions stay as they are (bitsandbytes quantizes Linear layers only). The Linear layers hold 87% of
SDXL's UNet weights, 31% of SD 1.5's (whose proj_in/proj_out are 1x1 convolutions), 33% of the embedded
model's. The adapter belongs to the unquantized base: its identity (and weight hash) is taken before this
runs, and its A and B apply to the full-precision weights as they do to the quantized ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from types import ModuleType

import torch
from torch import nn

from difflora.errors import ConfigError

INSTALL = "pip install 'difflora[quantize]' (bitsandbytes >= 0.50, which runs on the CPU and on CUDA)"
# LLM.int8's outlier threshold: input features above it take a float16 path (bitsandbytes' and
# diffusers' BitsAndBytesConfig default).
INT8_THRESHOLD = 6.0
LAYER_NAMES = {"int8": "Linear8bitLt (LLM.int8)", "nf4": "Linear4bit (NF4, double-quantized scales)"}
BITSANDBYTES: tuple[str, ...] = tuple(LAYER_NAMES)
"""The kinds bitsandbytes quantizes; `fp8` is difflora's own (`difflora.models.fp8`)."""
COMPONENT_LABELS = {
    "unet": "UNet",
    "transformer": "transformer",
    "text_encoder": "text-encoder",
    "text_encoder_2": "text-encoder-2",
    "text_encoder_3": "text-encoder-3",
}
# The attribute peft's LoRA dispatch reads from the model to choose its bitsandbytes layers.
PEFT_FLAGS = {"int8": "is_loaded_in_8bit", "nf4": "is_loaded_in_4bit"}


@dataclass(frozen=True)
class QuantizedBase:
    """What `quantize_base` did, for the plan: the format, and per component its Linear layers quantized and
    the bytes of its weights before and after."""

    kind: str
    layers: dict[str, int]
    bytes_before: int
    bytes_after: int

    def describe(self) -> str:
        """One line of the plan."""
        if self.kind == "fp8":
            counts = ", ".join(f"{n} {COMPONENT_LABELS.get(c, c)}" for c, n in self.layers.items())
            return (
                f"fp8 (float8_e4m3fn storage, upcast per layer): {counts} Linear layers, their weights "
                f"{self.bytes_before / 2**20:.1f} -> {self.bytes_after / 2**20:.1f} MiB; LoRA trains in float32, "
                "samples render it unfused, and the adapter is for the unquantized base"
            )
        counts = ", ".join(
            f"{count} {COMPONENT_LABELS.get(name, name)}" for name, count in self.layers.items()
        )
        return (
            f"{self.kind} through bitsandbytes ({LAYER_NAMES[self.kind]}): {counts} Linear layers, their weights "
            f"{self.bytes_before / 2**20:.1f} -> {self.bytes_after / 2**20:.1f} MiB; LoRA trains in float32, "
            "and the adapter is for the unquantized base"
        )


def bitsandbytes_backend(kind: str) -> ModuleType:
    """bitsandbytes, imported; a ConfigError saying how to install it when it is missing or broken."""
    if kind not in LAYER_NAMES:
        raise ConfigError(f"--quantize-base must be one of {', '.join(LAYER_NAMES)}, got {kind!r}.")
    try:
        import bitsandbytes
    except Exception as error:  # ImportError, or a bitsandbytes that fails to load its native library
        raise ConfigError(
            f"--quantize-base {kind} holds the base in bitsandbytes' {LAYER_NAMES[kind]} layers, and "
            f"bitsandbytes cannot be imported here ({type(error).__name__}: {error}). Install it with "
            f"{INSTALL}, or train without --quantize-base."
        ) from error
    return bitsandbytes


def quantize_base(
    components: Mapping[str, nn.Module], kind: str, *, device: torch.device, compute_dtype: torch.dtype
) -> QuantizedBase:
    """Quantize every Linear layer of `components` in place, on `device` (bitsandbytes quantizes when a
    weight moves to its device). Layers already quantized are left alone, so a base reused by the next
    adapter of a multi-folder run is not quantized twice."""
    bnb = bitsandbytes_backend(kind)
    layers, before, after = {}, 0, 0
    for name, module in components.items():
        before += _linear_bytes(module)
        layers[name] = _quantize_module(module, kind, bnb, device=device, compute_dtype=compute_dtype)
        after += _linear_bytes(module)
        setattr(module, PEFT_FLAGS[kind], True)
    return QuantizedBase(kind=kind, layers=layers, bytes_before=before, bytes_after=after)


def _quantize_module(
    module: nn.Module, kind: str, bnb: ModuleType, *, device: torch.device, compute_dtype: torch.dtype
) -> int:
    """Replace each plain nn.Linear (bitsandbytes' layers subclass it, hence the exact type) by its
    quantized counterpart; returns how many layers of `module` are quantized."""
    for name, child in list(module.named_modules()):
        if type(child) is not nn.Linear or ".lora_" in name:  # LoRA's own A and B stay trainable floats
            continue
        parent_name, _, attribute = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attribute, _quantized_linear(child, kind, bnb, device, compute_dtype))
    quantized = (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)
    return sum(isinstance(child, quantized) for child in module.modules())


def _quantized_linear(
    linear: nn.Linear, kind: str, bnb: ModuleType, device: torch.device, compute_dtype: torch.dtype
) -> nn.Module:
    features = (linear.in_features, linear.out_features)
    bias = linear.bias is not None
    weight = linear.weight.data
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(
            *features, bias=bias, has_fp16_weights=False, threshold=INT8_THRESHOLD, device="meta"
        )
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(
            *features, bias=bias, compute_dtype=compute_dtype, quant_type="nf4", device="meta"
        )
        layer.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, quant_type="nf4", compress_statistics=True, module=layer
        )
        # bitsandbytes 0.50 repacks a CPU weight for AVX512-BF16 kernels on its first eval-mode forward
        # without grad (a sample grid) and never back, so the next training step fails; the packing only
        # serves inference, and training shares these weights.
        layer.support_avx512bf16_for_cpu = False
    if bias:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    # Under autocast nn.Linear computes in the autocast dtype whatever its input's; bitsandbytes' layers
    # answer in the input's dtype (and recast their bias to it), so a float32 input (the prepared UNet
    # returns float32, which becomes the next sampling step's latents) would meet bfloat16 norms next.
    layer.register_forward_pre_hook(partial(_cast_input, dtype=compute_dtype))
    try:
        return layer.to(device)  # bitsandbytes quantizes here
    except (RuntimeError, NotImplementedError) as error:
        raise ConfigError(
            f"bitsandbytes {getattr(bnb, '__version__', '?')} cannot quantize to {kind} on {device.type} "
            f"({error}). Upgrade it with {INSTALL}, or train without --quantize-base."
        ) from error


def _cast_input(
    module: nn.Module, args: tuple[torch.Tensor, ...], *, dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    return (args[0].to(dtype), *args[1:])


def _linear_bytes(module: nn.Module) -> int:
    """Bytes held by the Linear layers' weights: parameters, buffers and bitsandbytes' 4-bit block scales
    (kept on the weight's quant_state, not as a tensor of the module)."""
    total = 0
    for child in module.modules():
        if not isinstance(child, nn.Linear):
            continue
        tensors = [*child.parameters(recurse=False), *child.buffers(recurse=False)]
        state = getattr(child.weight, "quant_state", None)
        if state is not None:
            tensors += [state.absmax, state.code]
            nested = getattr(state, "state2", None)
            if nested is not None:
                tensors += [nested.absmax, nested.code]
        scales = getattr(child.weight, "SCB", None)
        if scales is not None:
            tensors.append(scales)
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def fp8_base(components: Mapping[str, nn.Module]) -> QuantizedBase:
    """`--quantize-base fp8`: every frozen Linear of `components` held as float8 (`difflora.models.fp8`)."""
    from difflora.models.fp8 import Float8Linear, to_fp8

    before = sum(_linear_bytes(module) for module in components.values())
    layers = to_fp8(components)
    stored = [m for module in components.values() for m in module.modules() if isinstance(m, Float8Linear)]
    after = sum(_linear_bytes(module) for module in components.values())  # Linear layers left (LoRA's)
    after += sum(
        m.weight_bits.numel() + (m.bias.numel() * m.bias.element_size() if m.bias is not None else 0)
        for m in stored
    )
    return QuantizedBase(kind="fp8", layers=layers, bytes_before=before, bytes_after=after)
