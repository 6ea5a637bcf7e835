"""SDXL base: CLIP ViT-L + OpenCLIP ViT-bigG (hidden states concatenated, the second's pooled output as
`text_embeds`), context 2048, size/crop micro-conditioning, 1024 px. kohya trains and names it on the SGM
UNet (`input_blocks.4.1...`) with `lora_te1`/`lora_te2` for the two encoders."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from difflora.models.families.base import ModelFamily


class SDXL(ModelFamily):
    name = "sdxl"
    label = "SDXL base"
    # ---- model side
    checkpoint_encoder_names = ("CLIP ViT-L", "OpenCLIP ViT-bigG")
    unet_block_out_channels = (320, 640, 1280)
    pipeline_has_safety_checker = False

    components = ("unet", "text_encoder", "text_encoder_2")
    text_encoders = ("text_encoder", "text_encoder_2")
    pipeline_class_name = "StableDiffusionXLPipeline"
    config_folder = "sdxl"
    native_resolution = 1024
    cross_attention_dim = 2048
    checkpoint_text_encoders = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")
    size_conditioning = True
    kohya_text_encoder_prefixes: ClassVar[dict[str, str]] = {
        "text_encoder": "lora_te1",
        "text_encoder_2": "lora_te2",
    }
    kohya_unet_names = "sgm"
    kohya_base_version = "sdxl_base_v1-0"
    modelspec_architecture = "stable-diffusion-xl-v1-base/lora"
    modelspec_implementation = "https://github.com/Stability-AI/generative-models"

    # ---- file layouts
    kohya_version_prefixes = ("sdxl",)
    modelspec_prefixes = ("stable-diffusion-xl",)
    compvis_text_encoders: ClassVar[dict[str, str]] = {
        "text_encoder": "0_transformer",
        "text_encoder_2": "1_model",
    }
    a1111_version = "SDXL"

    def prompt_embeddings(
        self, pipe: Any, prompt: str, negative_prompt: str, options: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Both encoders' hidden states and the pooled projection, for the prompt and its negative."""
        positive, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt,
            device=pipe._execution_device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=negative_prompt or None,
        )
        return {
            "prompt_embeds": positive,
            "negative_prompt_embeds": negative,
            "pooled_prompt_embeds": pooled,
            "negative_pooled_prompt_embeds": negative_pooled,
        }
