"""A diffusers SD-style model of an architecture difflora has no reference for (a fine-tune with another
UNet width, a test model). It trains and composes like SD 1.x; its files use SD 1.x-style names."""

from __future__ import annotations

from difflora.models.families.base import ModelFamily


class Custom(ModelFamily):
    name = "custom"
    label = "custom architecture"
    # ---- file layouts
    consumer_stand_in = "sd1"

    native_resolution = None
    has_reference = False
