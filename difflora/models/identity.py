"""Which base model a pipeline is: its family, an architecture fingerprint and a weight hash.

Adapters record this identity, so that applying one to another architecture is refused and applying it to
another fine-tune of the same architecture is a warning.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from difflora.adapter.types import COMPONENTS
from difflora.errors import ModelError
from difflora.hashing import sha256_json, weights_fingerprint
from difflora.models.families import (
    DENOISERS,
    ModelFamily,
    checkpoint_families,
    families,
    family,
    shipped_families,
)
from difflora.models.loading import ModelSource

# The full-size families whose module trees difflora knows (kohya names, consumers' key rules): those
# with shipped configs, which single files are detected as.
KNOWN_FAMILIES: tuple[str, ...] = tuple(known.name for known in checkpoint_families())


@dataclass(frozen=True)
class ModelIdentity:
    """What an adapter records about its base. `architecture` is a readable family name plus a hash of the
    component configs (two models with the same architecture accept each other's adapters); `base_hash`
    also covers the weights (a different hash on the same architecture only earns a warning)."""

    family: str  # a registered family's name (`difflora.models.families`)
    architecture: str
    base_hash: str
    prediction_type: str
    name: str

    @property
    def model_family(self) -> ModelFamily:
        return family(self.family)


def model_identity(pipe: Any) -> ModelIdentity:
    """Family, architecture fingerprint and base hash of a loaded pipeline. Computed once per pipeline
    (before any adapter is fused into its weights) and remembered on it."""
    cached = getattr(pipe, "_difflora_identity", None)
    if cached is not None:
        return cached
    identity = _compute_identity(pipe)
    pipe._difflora_identity = identity
    return identity


def _compute_identity(pipe: Any) -> ModelIdentity:
    denoisers = {name: dict(getattr(pipe, name).config) for name in DENOISERS if getattr(pipe, name, None)}
    detected = _family(denoisers, pipe)
    # keyed by the denoiser's component name: an SD model's fingerprint is what it always was
    configs = {detected.denoiser: _stable_config(denoisers[detected.denoiser])}
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        encoder = getattr(pipe, name, None)
        if encoder is not None:
            configs[name] = _stable_config(encoder.config.to_dict())
    structure = sha256_json(configs)[:12]
    source: ModelSource | None = getattr(pipe, "_difflora_source", None)
    name = source.display if source else str(getattr(pipe, "name_or_path", "unknown"))
    return ModelIdentity(
        family=detected.name,
        architecture=f"{detected.name}-{structure}",
        base_hash=base_weights_fingerprint(pipe),
        prediction_type=detected.prediction_type_of(pipe.scheduler.config),
        name=name,
    )


def _family(denoisers: dict[str, dict[str, Any]], pipe: Any) -> ModelFamily:
    """The first family, in the registry's detection order, that claims the model (the last claims every
    SD-shaped one)."""
    source: ModelSource | None = getattr(pipe, "_difflora_source", None)
    embedded = source is not None and source.kind == "embedded"
    found = next((f for f in families() if f.matches_denoisers(denoisers, embedded=embedded)), None)
    if found is None:
        raise ModelError(
            f"{type(pipe).__name__} has no denoiser difflora knows (looked for {', '.join(DENOISERS)}): "
            f"difflora supports {', '.join(f.label for f in shipped_families())}."
        )
    return found


def _stable_config(config: dict[str, Any]) -> dict[str, Any]:
    """Config entries that define the architecture (not paths, versions or dtypes)."""
    volatile = ("_name_or_path", "_diffusers_version", "transformers_version", "torch_dtype", "dtype")
    cleaned = {k: v for k, v in config.items() if k not in volatile and not k.startswith("_")}
    return json.loads(json.dumps(cleaned, sort_keys=True, default=str))


def base_weights_fingerprint(pipe: Any) -> str:
    """The hash of the UNet and text-encoder weights (see `difflora.hashing.weights_fingerprint`)."""
    modules = {name: getattr(pipe, name, None) for name in COMPONENTS}
    return weights_fingerprint({name: module for name, module in modules.items() if module is not None})
