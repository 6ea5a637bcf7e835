"""Building what a training run trains: the base model with LoRA layers, the optimizer, the LR schedule.

Every function takes plain values (never the config object). Order matters in `load_models`: the base
model's identity (architecture, weight hash) is computed before any LoRA layer exists, and LoRA weights are
initialised right after seeding, so a seed always gives the same initial adapter.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from difflora.adapter.adaptive import add_adalora
from difflora.adapter.inject import add_lora, remove_adapter
from difflora.adapter.lycoris_peft import add_lycoris
from difflora.adapter.spec import LoraSpec
from difflora.errors import ConfigError
from difflora.models.dit_files import ComponentFiles
from difflora.models.families import ModelFamily
from difflora.models.identity import ModelIdentity, model_identity
from difflora.models.loading import load_pipeline
from difflora.models.quantize import (
    BITSANDBYTES,
    QuantizedBase,
    bitsandbytes_backend,
    fp8_base,
    quantize_base,
)
from difflora.training.block_swap import BlockSwap, blocks_for_swap, move_except
from difflora.training.optimizers import EXTRA_OPTIMIZERS, extra_optimizer
from difflora.training.text import TEXT_ENCODERS, pipeline_conditioning

logger = logging.getLogger(__name__)

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Models:
    pipe: Any  # the diffusers pipeline; its unet / text encoders carry the LoRA layers being trained
    identity: ModelIdentity
    unet_modules: list[str]  # live names of the adapted UNet modules
    text_encoder_modules: dict[str, list[str]]  # per trained text encoder: its adapted modules
    weight_dtype: torch.dtype
    tuners: dict[str, Any] = field(default_factory=dict)  # --adaptive-rank: peft's AdaLoraModel by component
    quantized: QuantizedBase | None = None  # --quantize-base: what was quantized
    block_swap: BlockSwap | None = None  # --blocks-to-swap: the denoiser's swapped blocks

    @property
    def denoiser(self) -> str:
        """The denoiser's component name ("unet", "transformer"), as the model's family says."""
        return self.identity.model_family.denoiser

    @property
    def train_text_encoder(self) -> bool:
        return bool(self.text_encoder_modules)

    @property
    def trained_components(self) -> dict[str, nn.Module]:
        """The UNet and each trained text encoder, by component name."""
        found = {self.denoiser: self.identity.model_family.denoiser_of(self.pipe)}
        found.update({name: getattr(self.pipe, name) for name in self.text_encoder_modules})
        return found

    @property
    def trainable(self) -> dict[str, nn.Parameter]:
        """LoRA parameters by "<component>.<parameter name>" (the checkpoint keys)."""
        return {
            f"{component}.{name}": parameter
            for component, module in self.trained_components.items()
            for name, parameter in module.named_parameters()
            if parameter.requires_grad
        }


def load_models(
    model_ref: str | None,
    *,
    device: torch.device,
    mixed_precision: str,
    lora: Callable[[ModelFamily], LoraSpec],
    train_text_encoder: bool,
    gradient_checkpointing: bool,
    seed: int,
    prediction_type: str | None = None,
    quantization: str | None = None,
    pipe: Any | None = None,
    files: ComponentFiles | None = None,
    blocks_to_swap: int = 0,
) -> Models:
    """The base with trainable LoRA layers, as `lora(family)` says for the loaded model's family (whose
    defaults it may use). `pipe`: a base already loaded (with this dtype, prediction type and quantization)
    by an earlier run of the same process, freed of its LoRA layers by `unload_lora`. `quantization` (int8,
    nf4) holds the UNet's and text encoders' Linear layers quantized. `blocks_to_swap` (CUDA): the denoiser's
    last N blocks keep their frozen weights in CPU memory (`difflora.training.block_swap`)."""
    weight_dtype = DTYPES[mixed_precision]
    if quantization in BITSANDBYTES:
        bitsandbytes_backend(quantization)  # a missing backend is reported before a large model loads
    # Loaded in the dtype the frozen weights train in: a full-size model never exists twice in memory.
    pipe = pipe or load_pipeline(model_ref, dtype=weight_dtype, prediction_type=prediction_type, files=files)
    identity = model_identity(pipe)  # before LoRA: the adapter records the pristine base
    encoders = [name for name in TEXT_ENCODERS if getattr(pipe, name, None) is not None]
    pipe.vae.requires_grad_(False)
    for name in encoders:
        getattr(pipe, name).requires_grad_(False)
    # After the identity (the adapter's base hash is the unquantized weights'), before LoRA wraps the layers.
    # Trained text encoders too: their LoRA layers sit on the quantized Linear layers as the UNet's do.
    family = identity.model_family
    if train_text_encoder:
        _check_text_encoders_train(family)
    denoiser = family.denoiser_of(pipe)
    frozen = {family.denoiser: denoiser, **{name: getattr(pipe, name) for name in encoders}}
    quantized = (
        quantize_base(frozen, quantization, device=device, compute_dtype=weight_dtype)
        if quantization in BITSANDBYTES
        else None
    )
    torch.manual_seed(seed)
    spec = lora(family)
    tuners: dict[str, Any] = {}
    unet_modules = _inject(denoiser, family.denoiser, spec, tuners)
    text_modules = {
        name: _inject(getattr(pipe, name), name, spec, tuners)
        for name in (encoders if train_text_encoder else [])
        if name in family.trainable_text_encoders
    }
    swapped = blocks_for_swap(denoiser, family, blocks_to_swap) if blocks_to_swap else []
    _place(pipe, denoiser, encoders, device, weight_dtype, vae_fp32=mixed_precision == "fp16", keep=swapped)
    _training_modes(pipe, denoiser, encoders, text_modules, gradient_checkpointing=gradient_checkpointing)
    if quantization == "fp8":  # after LoRA: peft would make A and B float8 like the weight it wraps
        # the denoiser only: text encoders read their layers' weight dtype (T5), and their output is cached
        quantized = fp8_base({family.denoiser: denoiser})
    swap = BlockSwap(swapped, device) if swapped else None  # after fp8: the float8 bits are what moves
    return Models(pipe, identity, unet_modules, text_modules, weight_dtype, tuners, quantized, swap)


def _check_text_encoders_train(family: ModelFamily) -> None:
    """--train-text-encoder on a family whose text encoders all stay frozen (T5 alone, Qwen2.5-VL) would
    silently train nothing and give up the text cache: refused."""
    if not family.trainable_text_encoders:
        raise ConfigError(
            f"--train-text-encoder: {family.label} models have no text encoder difflora trains "
            f"({', '.join(family.text_encoders)} stays frozen, its output cached); leave it out."
        )


def _training_modes(
    pipe: Any,
    denoiser: nn.Module,
    encoders: Sequence[str],
    trained: Mapping[str, Any],
    *,
    gradient_checkpointing: bool,
) -> None:
    """The UNet and the trained text encoders in train mode (the frozen ones in eval mode), with gradient
    checkpointing where asked."""
    denoiser.train()
    for name in encoders:
        getattr(pipe, name).train(name in trained)
    if gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
        for name in trained:
            getattr(pipe, name).gradient_checkpointing_enable()


def _inject(module: nn.Module, component: str, spec: LoraSpec, tuners: dict[str, Any]) -> list[str]:
    """Plain LoRA layers, LoKr/LoHa ones (--algo), or AdaLoRA ones (their rank allocator's owner goes into
    `tuners`)."""
    if spec.algo != "lora":
        return add_lycoris(module, component, spec)
    if spec.adaptive_init_rank is None:
        return add_lora(module, component, spec)
    matched, tuners[component] = add_adalora(module, component, spec)
    return matched


def _place(
    pipe: Any,
    denoiser: nn.Module,
    encoders: Sequence[str],
    device: torch.device,
    dtype: torch.dtype,
    *,
    vae_fp32: bool,
    keep: Sequence[nn.Module] = (),
) -> None:
    """Frozen weights in the mixed-precision dtype, trainable LoRA weights in float32 (as diffusers'
        `cast_training_params` does): optimizer updates to half-precision weights would round away. The VAE stays
        float32 under fp16, where SD and SDXL VAEs overflow to NaN (kohya's `--no_half_vae`). `keep`: swapped
    blocks, whose frozen weights stay in CPU memory."""
    for module in (denoiser, *(getattr(pipe, name) for name in encoders)):
        _move(module, device, dtype, keep=keep if module is denoiser else ())
        for parameter in module.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
    _move(pipe.vae, device, torch.float32 if vae_fp32 else dtype)


def _move(
    module: nn.Module, device: torch.device, dtype: torch.dtype, keep: Sequence[nn.Module] = ()
) -> None:
    """`module.to(device)`, casting only when a frozen weight is not in `dtype` yet. The pipeline is loaded
    in the training dtype, so normally nothing is cast, and diffusers' `to(dtype=...)` warning about
    modules to keep in float32 (printed even when there are none) never reaches the user."""
    if keep:
        move_except(module, keep, device)
    else:  # the module's own `to`: bitsandbytes' layers quantize as they reach the GPU
        module.to(device=device)
    # Quantized weights (integer tensors, --quantize-base) keep their dtype.
    if any(p.dtype != dtype for p in module.parameters() if not p.requires_grad and p.is_floating_point()):
        module.to(dtype=dtype)


def unload_lora(models: Models) -> None:
    """Give the base back as it was loaded, for the next adapter of a multi-folder run: LoRA layers
    removed, everything frozen, no gradient checkpointing."""
    if models.block_swap is not None:
        models.block_swap.remove()
    for component, module in models.trained_components.items():
        remove_adapter(module)
        module.requires_grad_(False)
        if component == models.denoiser and module.is_gradient_checkpointing:
            module.disable_gradient_checkpointing()
        elif component != models.denoiser and getattr(module, "is_gradient_checkpointing", False):
            module.gradient_checkpointing_disable()


def release_vae_encoder(pipe: Any) -> None:
    """Free the VAE's encoder once every latent is cached: training never encodes again and samples only
    decode, so this memory would sit idle through the run (part of keeping peak memory below the
    reference trainer's, see BENCHMARKS.md)."""
    pipe.vae.encoder = None
    pipe.vae.quant_conv = None


# ------------------------------------------------------------------------------------ optimizer


def make_optimizer(
    groups: list[dict[str, Any]], *, kind: str, weight_decay: float, cuda: bool, warmup: int = 0
) -> tuple[torch.optim.Optimizer, str]:
    """AdamW, or bitsandbytes' 8-bit AdamW when asked for (on CUDA, or on the CPU where the installed
    bitsandbytes runs it: >= 0.50), or with `auto` where it can run on CUDA (on the CPU a LoRA's optimizer
    state is too small for 8 bits to matter, so `auto` keeps AdamW there)."""
    if kind in EXTRA_OPTIMIZERS:  # `warmup`: the schedule-free optimizer's own
        return extra_optimizer(kind, groups, weight_decay=weight_decay, warmup=warmup), kind
    bnb = _bitsandbytes() if cuda or kind == "adamw8bit" else None
    if kind == "adamw8bit" and (bnb is None or (not cuda and not _runs_on_cpu(bnb))):
        reason = (
            "install it with `pip install bitsandbytes`"
            if bnb is None
            else "this bitsandbytes has no CPU 8-bit AdamW"
        )
        raise ConfigError(
            f"--optimizer adamw8bit needs the bitsandbytes package on CUDA or its CPU backend ({reason}); "
            "use --optimizer adamw (or auto)."
        )
    if kind == "adamw8bit" or (kind == "auto" and bnb is not None):
        return bnb.optim.AdamW8bit(groups, weight_decay=weight_decay), "adamw8bit"
    # A fused (else multi-tensor) AdamW instead of torch's CPU default, a Python loop over the many small
    # LoRA matrices: measured 3.7 ms (fused) vs 28 ms (loop) per step on the embedded model's 112 tensors.
    try:
        return torch.optim.AdamW(groups, weight_decay=weight_decay, fused=True), "adamw"
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device / dtype / torch
        return torch.optim.AdamW(groups, weight_decay=weight_decay, foreach=True), "adamw"


def _runs_on_cpu(bnb: Any) -> bool:
    """Whether bitsandbytes' 8-bit AdamW takes a step on the CPU (one 4096-element step: its 8-bit size)."""
    parameter = torch.nn.Parameter(torch.zeros(4096))
    parameter.grad = torch.ones(4096)
    try:
        bnb.optim.AdamW8bit([parameter]).step()
    except Exception:  # NotImplementedError, or a RuntimeError from a build without the CPU kernels
        return False
    return True


def _bitsandbytes() -> Any:
    try:
        import bitsandbytes
    except Exception:  # ImportError, or bitsandbytes failing to find its CUDA library
        return None
    return bitsandbytes


def lr_factor(step: int, *, kind: str, warmup: int, total: int) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based): linear warm-up from
    1/warmup to 1 over `warmup` steps, then constant, cosine (to 0) or linear (to 0) over the rest."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return 1.0 - progress
    return 1.0


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer, *, kind: str, warmup: int, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over `lr_factor`; its state_dict holds only numbers (the lambda is rebuilt on resume)."""

    def factor(step: int) -> float:
        return lr_factor(step, kind=kind, warmup=warmup, total=total)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ------------------------------------------------------------------------------------ CPU threads


def denoiser_probe(pipe: Any, *, batch: int, resolution: int) -> Callable[[], Any]:
    """One forward of the denoiser at the run's batch and size, with random inputs: what the thread probe
    (difflora.training.threads) times. Its family's conditioning knows the inputs it takes."""
    denoiser = model_identity(pipe).model_family.denoiser_of(pipe)
    return pipeline_conditioning(pipe).probe(pipe, denoiser, batch, resolution)
