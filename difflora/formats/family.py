"""Which base family (sd1, sd2, sdxl, tiny, custom) an adapter or a foreign file is for, and what each
family is called in kohya's and ModelSpec's metadata.

The family decides the kohya naming (SDXL: `lora_te1`/`lora_te2` and SGM UNet names) and the metadata
A1111 uses to list a LoRA (`ss_base_model_version`). It comes from the adapter's own record when there is
one; otherwise from the file's metadata; otherwise from which reference architecture the module names *and*
shapes fit (cross-attention width 768 = SD1, 1024 = SD2, 2048 = SDXL).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from difflora.adapter.types import Adapter, LoraWeights
from difflora.errors import AdapterCompatibilityError
from difflora.formats.naming import NameTable, reference_table
from difflora.formats.reference import ModuleInfo, reference_families
from difflora.models.families import FAMILY_NAMES

FAMILIES: tuple[str, ...] = FAMILY_NAMES
_KOHYA_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
_MODELSPEC = {
    "sd1": "stable-diffusion-v1/lora",
    "sd2": "stable-diffusion-v2-512/lora",
    "sdxl": "stable-diffusion-xl-v1-base/lora",
    "tiny": "difflora-embedded/lora",
}
_RESOLUTION = {"sd1": 512, "sd2": 768, "sdxl": 1024}


def kohya_base_version(family: str, *, v_prediction: bool = False) -> str:
    """`ss_base_model_version`. The embedded and custom models use SD1-style naming and have no kohya value
    of their own, so they are written as SD1 (A1111 files any metadata-bearing LoRA as SD1 anyway)."""
    version = _KOHYA_VERSION.get(family, "sd_v1")
    return f"{version}_v" if v_prediction and family in ("sd1", "sd2") else version


def modelspec_architecture(family: str, *, v_prediction: bool = False) -> str:
    if family == "sd2" and v_prediction:
        return "stable-diffusion-v2-768-v/lora"
    return _MODELSPEC.get(family, "custom/lora")


def modelspec_implementation(family: str) -> str:
    return "https://github.com/Stability-AI/generative-models" if family == "sdxl" else "diffusers"


def resolution(family: str, config: Mapping[str, Any]) -> str:
    size = config.get("resolution") or _RESOLUTION.get(family)
    return f"{size}x{size}" if size else ""


def family_from_metadata(metadata: Mapping[str, str]) -> str | None:
    """The family a file's metadata states (difflora's own record, kohya's, or ModelSpec's), if any."""
    recorded = metadata.get("difflora.base_family", "")
    if recorded in FAMILIES:
        return recorded
    version = metadata.get("ss_base_model_version", "")
    architecture = metadata.get("modelspec.architecture", "")
    if version.startswith("sdxl") or architecture.startswith("stable-diffusion-xl"):
        return "sdxl"
    if (
        version.startswith("sd_v2")
        or metadata.get("ss_v2") == "True"
        or architecture.startswith("stable-diffusion-v2")
    ):
        return "sd2"
    if version.startswith(("sd_v1", "sd_1")) or architecture.startswith("stable-diffusion-v1"):
        return "sd1"
    return None


def candidates(hint: str | None) -> list[str]:
    known = list(reference_families())
    return [hint, *[f for f in known if f != hint]] if hint in known else known


def shape_fits(weights: LoraWeights, info: ModuleInfo) -> bool:
    """Whether a LoRA's tensors fit a module. A 1x1 convolution and a Linear take the same LoRA (files
    differ in whether they write [r, in] or [r, in, 1, 1]); a kxk convolution needs a kxk down. Stricter than
    the check against a loaded model in difflora.composition.fit, because here the shapes pick the family."""
    down, up = weights.down, weights.up
    if up.ndim < 2 or down.ndim < 2 or up.shape[1] != down.shape[0]:
        return False
    if down.shape[1] != info.in_features or up.shape[0] != info.out_features:
        return False
    kernel = tuple(down.shape[2:]) or (1, 1)
    return kernel == (info.kernel if info.kind == "conv" else (1, 1))


def fits(modules: Mapping[str, LoraWeights], table: NameTable) -> bool:
    return all(key in table.modules and shape_fits(w, table.modules[key]) for key, w in modules.items())


def infer_family(modules: Mapping[str, LoraWeights], hint: str | None = None) -> str:
    """The first reference family (the hinted one first) whose module names and shapes all fit."""
    for family in candidates(hint):
        if fits(modules, reference_table(family)):
            return family
    return hint if hint in FAMILIES else "custom"


def export_family(adapter: Adapter) -> str:
    recorded = adapter.meta.base_family
    return recorded if recorded in FAMILIES else infer_family(adapter.modules)


def check_shapes(modules: Mapping[str, LoraWeights], table: NameTable, family: str) -> None:
    """Refuse an adapter whose tensors do not fit the recorded architecture (a mislabelled base)."""
    if family not in reference_families():
        return
    wrong = [key for key, w in modules.items() if not shape_fits(w, table.modules[key])]
    if wrong:
        example = wrong[0]
        info = table.modules[example]
        raise AdapterCompatibilityError(
            f"{len(wrong)} module(s) do not fit the {family} architecture: {example} needs a LoRA of "
            f"in={info.in_features}, out={info.out_features} but has down {tuple(modules[example].down.shape)}, "
            f"up {tuple(modules[example].up.shape)}. The adapter's recorded base family is wrong."
        )
