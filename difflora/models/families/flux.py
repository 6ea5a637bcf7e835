"""Flux.1 (Black Forest Labs): an MMDiT transformer (double-stream then single-stream blocks), CLIP-L
(pooled) and T5-XXL text encoders. dev is guidance-distilled (a guidance embedding); schnell is not.

File layouts: kohya, ComfyUI and Forge name the transformer in BFL's original layout
(`double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`, ...), whose fused q/k/v (and, in single blocks,
q/k/v/MLP) projections difflora trains as diffusers' split modules; `difflora.formats.flux_names` maps one
to the other and `difflora.formats.fused` converts the LoRAs exactly. Text encoders are `lora_te1_` (CLIP-L)
and `lora_te3_` (T5), kohya's convention (`networks/lora_flux.py`).
"""

from __future__ import annotations

from typing import ClassVar

from difflora.models.families.base import ModelFamily


class Flux(ModelFamily):
    name = "flux"
    label = "Flux.1 dev"
    components = ("transformer", "text_encoder", "text_encoder_2")
    denoiser = "transformer"
    text_encoders = ("text_encoder", "text_encoder_2")
    pipeline_class_name = "FluxPipeline"
    config_folder = "flux1-dev"

    # ---- file layouts
    kohya_text_encoder_prefixes: ClassVar[dict[str, str]] = {
        "text_encoder": "lora_te1",
        "text_encoder_2": "lora_te3",
    }
    kohya_denoiser_layout = "bfl"
    kohya_denoiser_aliases = ("lora_transformer",)
    kohya_base_version = "flux1"
    kohya_network_module = "networks.lora_flux"
    modelspec_states_prediction = False
    native_resolution = 1024  # also ModelSpec's resolution (the model side declares the same)
    # kohya writes "flux1" for dev and schnell alike: schnell is told apart by its ModelSpec architecture.
    kohya_version_prefixes = ("flux1", "flux.1", "flux_1")
    modelspec_architecture = "flux-1-dev/lora"
    modelspec_prefixes = ("flux-1-dev", "flux-1/")  # kohya's ARCH_FLUX_1_UNKNOWN is "flux-1"
    modelspec_implementation = "https://github.com/black-forest-labs/flux"
    # ComfyUI maps every T5 Linear, as `lora_te3_` (kohya) and `lora_te2_` (OneTrainer, counting CLIP-L as 1).
    consumer_encoder_prefixes: ClassVar[dict[str, tuple[str, ...]]] = {
        "text_encoder_2": ("lora_te2", "lora_te3")
    }
    # A1111 loads no Flux LoRA; Forge's Flux loader is ComfyUI's key map.
    consumers = ("comfyui", "forge", "diffusers")


class FluxSchnell(Flux):
    name = "flux_schnell"
    label = "Flux.1 schnell"
    config_folder = "flux1-schnell"

    # ---- file layouts
    kohya_version_prefixes = ()
    modelspec_architecture = "flux-1-schnell/lora"
    modelspec_prefixes = ("flux-1-schnell",)
