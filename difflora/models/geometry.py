"""A model's data geometry (native resolution, bucket step, tokenizer) read from its config files only.

`difflora check` plans buckets the way training will without loading any weights. A single-file checkpoint
is read through its detected architecture's shipped configs; a model that cannot be read this way (a hub
id, a refused file) falls back to SD1's geometry, and says so.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difflora.data.buckets import bucket_step
from difflora.data.captions import TokenCounter, clip_token_counter
from difflora.models.architecture import detect_architecture, folder_architecture
from difflora.models.families import ModelFamily
from difflora.models.loading import resolve_model
from difflora.models.single_file import base_tokenizers

logger = logging.getLogger(__name__)

FALLBACK_RESOLUTION, FALLBACK_STEP, FALLBACK_TOKENS = 512, 64, 75  # SD1 geometry when the model is not read


@dataclass(frozen=True)
class ModelGeometry:
    resolution: int | None  # native: UNet sample size × VAE factor
    step: int
    count_tokens: TokenCounter | None
    max_tokens: int
    note: str | None  # why a fallback was used


def model_geometry(model: str | None, *, prediction_type: str | None = None) -> ModelGeometry:
    """Native resolution, bucket step and token counter from a local model's config files and tokenizer."""
    try:
        from transformers import AutoTokenizer

        source = resolve_model(model)
        if source.kind == "single_file":
            return _single_file_geometry(Path(source.location), prediction_type)
        if source.kind not in ("embedded", "folder"):
            raise ValueError(f"{source.kind} models are not read by check")
        folder = Path(source.location)
        if not (folder / "unet").is_dir():  # a transformer model (Flux.1): its family's geometry
            architecture = folder_architecture(folder, prediction_type=prediction_type)
            if architecture is not None:
                tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
                return _family_geometry(folder, architecture.family, architecture.resolution, tokenizer)
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    except Exception as exc:  # a data check must work without a model at hand
        logger.debug("model not read (%s)", exc)
        note = (
            f"model not read ({exc}); assuming SD1 geometry: step {FALLBACK_STEP}, {FALLBACK_TOKENS} tokens"
        )
        return ModelGeometry(None, FALLBACK_STEP, None, FALLBACK_TOKENS, note)
    return geometry_from_configs(unet, vae, tokenizer)


def _single_file_geometry(path: Path, prediction_type: str | None) -> ModelGeometry:
    architecture = detect_architecture(path, prediction_type=prediction_type)
    tokenizer = base_tokenizers(architecture)["tokenizer"]
    # the detected resolution: an SD 2.x 512-px base uses 2.1's configs
    return _family_geometry(architecture.config_dir, architecture.family, architecture.resolution, tokenizer)


def _family_geometry(folder: Path, family: ModelFamily, resolution: int, tokenizer: Any) -> ModelGeometry:
    """The geometry of a config folder as its family reads it (its denoiser's downsamplings)."""
    denoiser = json.loads((folder / family.denoiser / "config.json").read_text())
    vae = json.loads((folder / "vae" / "config.json").read_text())
    step = bucket_step(family.vae_factor(vae), family.denoiser_downsamplings(denoiser))
    return ModelGeometry(
        resolution, step, clip_token_counter(tokenizer), tokenizer.model_max_length - 2, None
    )


def pipeline_geometry(pipe: Any) -> ModelGeometry:
    """The same geometry, read off a loaded pipeline (what training plans with), as its family says: the
    native size and how often the denoiser halves the latents (a transformer's packing once, 2x2)."""
    from difflora.models.identity import model_identity

    family = model_identity(pipe).model_family
    denoiser = dict(family.denoiser_of(pipe).config)
    step = bucket_step(family.vae_factor(dict(pipe.vae.config)), family.denoiser_downsamplings(denoiser))
    tokenizer = pipe.tokenizer
    tokens = clip_token_counter(tokenizer)
    return ModelGeometry(family.default_pixels(pipe), step, tokens, tokenizer.model_max_length - 2, None)


def geometry_from_configs(unet: dict[str, Any], vae: dict[str, Any], tokenizer: Any) -> ModelGeometry:
    """Native size = UNet sample size × the VAE's downscale factor; the bucket step keeps every
    downsampling of the UNet whole (see `bucket_step`); the token limit leaves room for BOS and EOS."""
    vae_factor = 2 ** (len(vae["block_out_channels"]) - 1)
    step = bucket_step(vae_factor, len(unet["block_out_channels"]) - 1)
    sample_size = unet["sample_size"]
    native = (sample_size if isinstance(sample_size, int) else sample_size[0]) * vae_factor
    return ModelGeometry(native, step, clip_token_counter(tokenizer), tokenizer.model_max_length - 2, None)
