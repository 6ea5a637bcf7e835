"""Where LoRA layers go by default: the attention projections, as kohya, diffusers and ComfyUI users expect.

A leaf (no torch): the configuration's defaults and the injection code read the same tuples.
"""

UNET_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")


def default_targets(component: str) -> tuple[str, ...]:
    return UNET_TARGETS if component == "unet" else TEXT_ENCODER_TARGETS
