"""The embedded tiny model shipped inside difflora (an SD 1.x-style UNet and CLIP at 64 px, ~6 M
parameters). Named like SD 1.x in files; it has its own training defaults because it cannot learn a new
shape through attention alone."""

from __future__ import annotations

from difflora.models.families.base import UNET_ATTENTION, ModelFamily

# Measured on the embedded model's sample subject (a new shape): 1e-3 barely moved it, 4e-3 did.
TINY_MODEL_LR = 4e-3
# ~6 M parameters with 7 transformer blocks: measured on one H100 with the sample subject (a cross, 24
# images, rank 8, lr 4e-3, 16 generations), attention-only LoRA never drew it (cross score 0.26-0.39 for
# ranks 8-32, 100-600 steps, with or without the text encoder) while these targets reached 0.78 (88% of
# images pass) at 300 steps. Full-size SD models learn subjects through attention alone.
TINY_MODEL_UNET_TARGETS: tuple[str, ...] = (
    *UNET_ATTENTION,
    "conv1",
    "conv2",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
)


class Tiny(ModelFamily):
    name = "tiny"
    label = "embedded tiny model"
    native_resolution = 64
    # ---- file layouts
    consumer_stand_in = "sd1"
    ships_with_difflora = True

    default_unet_targets = TINY_MODEL_UNET_TARGETS
    default_learning_rate = TINY_MODEL_LR
    modelspec_architecture = "difflora-embedded/lora"
