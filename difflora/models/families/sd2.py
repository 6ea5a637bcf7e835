"""SD 2.x: OpenCLIP ViT-H text encoder, context 1024. A single file looks the same whether it was trained
for v-prediction at 768 px (2.0-v, 2.1) or epsilon at 512 px (the -base models): the default is SD 2.1's."""

from __future__ import annotations

from typing import ClassVar

from difflora.models.families.base import ModelFamily


class SD2(ModelFamily):
    name = "sd2"
    label = "SD 2.x"
    # ---- model side
    checkpoint_encoder_names = ("OpenCLIP ViT-H",)
    unet_block_out_channels = (320, 640, 1280, 1280)
    supported_as = "SD 2.x (512 px epsilon or 768 px v-prediction)"

    config_folder = "sd21"
    default_prediction_type = "v_prediction"
    native_resolution = 768
    cross_attention_dim = 1024
    checkpoint_text_encoders = ("cond_stage_model.model.",)
    kohya_base_version = "sd_v2"
    kohya_v_suffix = True
    modelspec_architecture = "stable-diffusion-v2-512/lora"
    modelspec_architecture_v = "stable-diffusion-v2-768-v/lora"
    # ---- file layouts
    kohya_version_prefixes = ("sd_v2",)
    kohya_v2_flag = True
    modelspec_prefixes = ("stable-diffusion-v2",)
    # ComfyUI and A1111 hold OpenCLIP-H with all 24 blocks (diffusers' SD 2.x text encoder drops the last,
    # unused one), so layer 23 keys load there.
    consumer_text_encoder_layers: ClassVar[dict[str, int]] = {"text_encoder": 24}
    compvis_text_encoders: ClassVar[dict[str, str]] = {"text_encoder": "model"}
    a1111_version = "SD2"

    def resolution_for(self, prediction_type: str) -> int:
        """768 px for v-prediction (SD 2.1), 512 px for epsilon (SD 2.1-base)."""
        return 768 if prediction_type == "v_prediction" else 512

    def architecture_label(self, prediction_type: str, resolution: int) -> str:
        """Both variants share one single-file layout, so the label says which was chosen."""
        return f"{self.label} ({prediction_type.replace('_', '-')}, {resolution} px)"
