"""SD 1.x: CLIP ViT-L text encoder, cross-attention context 768, 512 px, epsilon."""

from __future__ import annotations

from difflora.models.families.base import ModelFamily


class SD1(ModelFamily):
    name = "sd1"
    label = "SD 1.x"
    # ---- model side
    checkpoint_encoder_names = ("CLIP ViT-L",)
    unet_block_out_channels = (320, 640, 1280, 1280)
    config_folder = "sd15"
    cross_attention_dim = 768
    checkpoint_text_encoders = ("cond_stage_model.transformer.",)
    kohya_base_version = "sd_v1"
    kohya_v_suffix = True
    modelspec_architecture = "stable-diffusion-v1/lora"

    # ---- file layouts
    kohya_version_prefixes = ("sd_v1", "sd_1")
    modelspec_prefixes = ("stable-diffusion-v1",)
