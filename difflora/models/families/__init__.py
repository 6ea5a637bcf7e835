"""Model families: one module per family, one registry. `family("sdxl")` is the only way code outside this
package learns what a family does; it never compares family names itself.

Detection order matters where signatures overlap: full-size families first, then the embedded model, then
`custom` (anything SD-shaped that matches none).
"""

from __future__ import annotations

from difflora.errors import ModelError
from difflora.models.families.base import ModelFamily
from difflora.models.families.chroma import Chroma
from difflora.models.families.custom import Custom
from difflora.models.families.flux import Flux, FluxSchnell
from difflora.models.families.qwen_image import QwenImage
from difflora.models.families.sd1 import SD1
from difflora.models.families.sd2 import SD2
from difflora.models.families.sd3 import SD3, SD35Medium
from difflora.models.families.sdxl import SDXL
from difflora.models.families.tiny import Tiny

_REGISTRY: dict[str, ModelFamily] = {
    f.name: f
    for f in (
        SD1(),
        SD2(),
        SDXL(),
        Flux(),
        FluxSchnell(),
        Chroma(),
        SD3(),
        SD35Medium(),
        QwenImage(),
        Tiny(),
        Custom(),
    )
}

FAMILY_NAMES: tuple[str, ...] = tuple(_REGISTRY)
"""Every family difflora knows, in detection order."""

FALLBACK_FAMILY: str = Custom.name
"""The family of an SD-shaped model that matches no other, and of files that record none."""


def family(name: str) -> ModelFamily:
    """The family called `name` (as recorded in adapters' `difflora.base_family`)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelError(
            f"Unknown model family {name!r}: difflora knows {', '.join(FAMILY_NAMES)}."
        ) from None


def families() -> tuple[ModelFamily, ...]:
    return tuple(_REGISTRY.values())


def checkpoint_families() -> tuple[ModelFamily, ...]:
    """The families an original-layout (ldm/sgm) single-file checkpoint can be detected as (those with
    shipped configs and that layout)."""
    return tuple(
        f for f in _REGISTRY.values() if f.config_folder is not None and f.checkpoint_layout == "ldm"
    )


def shipped_families() -> tuple[ModelFamily, ...]:
    """Every family with shipped configs, whatever layout its single files come in (what `--model` takes)."""
    return tuple(f for f in _REGISTRY.values() if f.config_folder is not None)


def transformer_file_families() -> tuple[ModelFamily, ...]:
    """The families whose single files are transformer files (BFL's, SD3's MMDiT), in detection order."""
    return tuple(f for f in shipped_families() if f.checkpoint_layout != "ldm")


DENOISERS: tuple[str, ...] = tuple(dict.fromkeys(f.denoiser for f in _REGISTRY.values()))
"""The pipeline components that are a family's denoiser ("unet", "transformer")."""


__all__ = [
    "DENOISERS",
    "FALLBACK_FAMILY",
    "FAMILY_NAMES",
    "ModelFamily",
    "checkpoint_families",
    "families",
    "family",
    "shipped_families",
    "transformer_file_families",
]
