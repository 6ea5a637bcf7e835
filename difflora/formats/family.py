"""Which base family an adapter or a foreign file is for.

The family decides the kohya naming (text-encoder prefixes, diffusers or SGM UNet names) and the metadata
A1111 uses to list a LoRA (`ss_base_model_version`), all declared on its `ModelFamily`. It comes from the
adapter's own record when there is one; otherwise from the file's metadata (what each family declares it
reads as its own); otherwise from which reference architecture the module names *and* shapes fit (the
cross-attention width tells the families apart).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from difflora.adapter.lycoris import is_lycoris
from difflora.adapter.types import Adapter, LoraWeights
from difflora.errors import AdapterCompatibilityError
from difflora.formats.naming import LAYOUT_ROOTS, UNET_PREFIX, NameTable, reference_table
from difflora.formats.reference import ModuleInfo, reference_families
from difflora.models.families import FALLBACK_FAMILY, FAMILY_NAMES, ModelFamily, families
from difflora.models.families import family as model_family


def family_of(name: str | None) -> ModelFamily:
    """The family a file records; an empty or unknown record is the fallback (an unrecognised architecture)."""
    return model_family(name if name in FAMILY_NAMES else FALLBACK_FAMILY)


def family_from_metadata(metadata: Mapping[str, str]) -> str | None:
    """The family a file's metadata states (difflora's own record, ModelSpec's architecture, which names a
    variant where kohya's version string may not, or kohya's), if any."""
    recorded = metadata.get("difflora.base_family", "")
    if recorded in FAMILY_NAMES:
        return recorded
    architecture = metadata.get("modelspec.architecture", "")
    stated = next((f.name for f in families() if architecture.startswith(f.modelspec_prefixes)), None)
    return stated or next((f.name for f in families() if _states(f, metadata)), None)


def _states(family: ModelFamily, metadata: Mapping[str, str]) -> bool:
    """Whether kohya's metadata names `family` (a family that declares no prefixes: never)."""
    version = metadata.get("ss_base_model_version", "")
    return version.startswith(family.kohya_version_prefixes) or (
        family.kohya_v2_flag and metadata.get("ss_v2") == "True"
    )


def family_from_prefixes(kohya_names: Iterable[str]) -> str | None:
    """The one family that writes every text-encoder prefix the file uses, among those whose denoiser
    naming the file's `lora_unet_` names follow (an original layout's roots, or none); None when the
    prefixes tell nothing (every one-encoder family writes `lora_te_`)."""
    names = list(kohya_names)
    used = {
        prefix
        for f in families()
        for prefix in f.kohya_text_encoder_prefixes.values()
        if any(name.startswith(prefix + "_") for name in names)
    }
    layouts = {layout for layout, roots in LAYOUT_ROOTS.items() if any(_in_roots(n, roots) for n in names)}
    writers = [
        f.name
        for f in families()
        if used
        and used <= set(f.kohya_text_encoder_prefixes.values())
        and (f.kohya_denoiser_layout in layouts if layouts else f.kohya_denoiser_layout is None)
    ]
    return writers[0] if len(writers) == 1 else None


def _in_roots(name: str, roots: Iterable[str]) -> bool:
    return any(name.startswith(f"{UNET_PREFIX}_{root}_") for root in roots)


def candidates(hint: str | None) -> list[str]:
    known = list(reference_families())
    return [hint, *[f for f in known if f != hint]] if hint in known else known


def shape_fits(weights: LoraWeights, info: ModuleInfo) -> bool:
    """Whether a LoRA's tensors fit a module. A 1x1 convolution and a Linear take the same LoRA (files
    differ in whether they write [r, in] or [r, in, 1, 1]); a kxk convolution needs a kxk down. Stricter than
    the check against a loaded model in difflora.composition.fit, because here the shapes pick the family.
    A LyCORIS module fits by its update's size (and its kernel where its tensors tell it)."""
    if is_lycoris(weights):
        kernel = info.kernel if info.kind == "conv" else (1, 1)
        return (
            weights.out_features == info.out_features
            and weights.in_numel == info.in_features * kernel[0] * kernel[1]
            and weights.kernel in (None, kernel)
        )
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
    return family_of(hint).name


def export_family(adapter: Adapter) -> str:
    recorded = adapter.meta.base_family
    return recorded if recorded in FAMILY_NAMES else infer_family(adapter.modules)


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
            f"in={info.in_features}, out={info.out_features} but has {_shape_text(modules[example])}. The "
            "adapter's recorded base family is wrong."
        )


def _shape_text(weights: LoraWeights) -> str:
    if is_lycoris(weights):
        return f"a {weights.kind} update of shape {weights.delta_shape()}"  # type: ignore[attr-defined]
    return f"down {tuple(weights.down.shape)}, up {tuple(weights.up.shape)}"
