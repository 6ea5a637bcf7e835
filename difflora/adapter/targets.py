"""Where LoRA layers go by default: the attention projections, as kohya, diffusers and ComfyUI users expect.

A leaf (no torch): the configuration's defaults and the injection code read the same tuples.
"""

UNET_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
# LoCon (--conv-rank): the UNet ResNets' 3x3 convolutions, kohya's lora_unet_..._conv1 / _conv2.
CONV_TARGETS: tuple[str, ...] = ("conv1", "conv2")


def default_targets(component: str) -> tuple[str, ...]:
    return UNET_TARGETS if component == "unet" else TEXT_ENCODER_TARGETS
