"""A small random diffusers Flux transformer with a peft LoRA on it, for the Flux file-layout tests.

Nothing here is difflora's: the model is diffusers', the LoRA peft's, and its weights are read straight from
peft's layers, so the tests compare difflora's files against an independent source of truth.
"""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from tests.support.adapters import randomise_lora

# Every Linear a LoRA may adapt in a Flux transformer, as peft target suffixes.
ALL_LINEAR = (
    "to_q",
    "to_k",
    "to_v",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_out.0",
    "to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "norm1.linear",
    "norm1_context.linear",
    "norm.linear",
    "proj_mlp",
    "proj_out",
    "x_embedder",
    "context_embedder",
    "linear_1",
    "linear_2",
    "norm_out.linear",
)


def small_flux(*, double: int = 2, single: int = 2, guidance: bool = True, seed: int = 0) -> nn.Module:
    """2 double + 2 single blocks, width 32 (2 heads of 16), float32, random weights."""
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=8,
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=24,
        pooled_projection_dim=12,
        guidance_embeds=guidance,
        axes_dims_rope=(4, 6, 6),
    ).eval()


def lora_model(
    targets: tuple[str, ...] = ALL_LINEAR, *, rank: int = 3, alpha: float = 6.0, seed: int = 1
) -> nn.Module:
    """`small_flux()` with a peft LoRA ("default") on `targets`, its B random (peft starts it at zero)."""
    model = small_flux()
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True)
    inject_adapter_in_model(config, model)
    randomise_lora(model, seed)
    return model


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every Linear's W0 by diffusers path (the base layer's under a peft wrapper)."""
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".lora_" not in name:
            weights[name.removesuffix(".base_layer")] = module.weight.detach().float()
    return weights
