"""A diffusers SD-style model of an architecture difflora has no reference for (a fine-tune with another
UNet width, a test model). It trains and composes like SD 1.x; its files use SD 1.x-style names."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from difflora.models.families.base import ModelFamily
from difflora.models.families.conditioning import (
    PooledSizeConditioning,
    TextConditioning,
    takes_size_conditioning,
)


class Custom(ModelFamily):
    name = "custom"
    label = "custom architecture"
    # ---- file layouts
    consumer_stand_in = "sd1"

    native_resolution = None
    has_reference = False

    # ---- model side
    def matches_model(self, unet: Mapping[str, Any], *, embedded: bool) -> bool:
        """Anything SD-shaped that no other family claims."""
        return True

    def conditioning(
        self, unet: Mapping[str, Any], options: Mapping[str, Any] | None = None
    ) -> TextConditioning:
        """What the UNet's config asks for: a custom model may be conditioned either way."""
        return PooledSizeConditioning() if takes_size_conditioning(unet) else TextConditioning()
