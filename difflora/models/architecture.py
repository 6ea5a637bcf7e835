"""Which Stable Diffusion base a model is, decided from its weights' names and shapes (a single file's
safetensors header: nothing is loaded) or from a diffusers folder's configs.

Supported: SD 1.x (CLIP ViT-L text encoder, cross-attention context 768), SD 2.x (OpenCLIP ViT-H, 1024) and
SDXL base (CLIP ViT-L + OpenCLIP ViT-bigG, 2048, with size/crop conditioning). Anything else (SD3, Flux, an
SDXL refiner, an inpainting or other non-4-channel UNet, a LoRA passed as a model) is refused, naming the
keys that decided and what is supported.

An SD 2.x file looks the same whether it was trained for v-prediction at 768 px (2.0-v, 2.1) or for epsilon at
512 px (2.0-base, 2.1-base); the default is the former, as for SD 2.1, and `prediction_type="epsilon"` picks
the latter. A file that says what it predicts is believed: a `v_pred` marker key (the convention ComfyUI
reads) or kohya's `modelspec.prediction_type` metadata.

What identifies each base is declared by its family class (`difflora.models.families`: context width, text
encoders, conditioning, UNet widths, shipped configs); this module only reads a file's or folder's facts and
asks each family in turn, so a new base adds a family module, not a branch here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from difflora.errors import ModelError, first_n
from difflora.models.families import (
    DENOISERS,
    ModelFamily,
    checkpoint_families,
    family,
    shipped_families,
    transformer_file_families,
)
from difflora.safe_io import read_safetensors_header

PredictionType = Literal["epsilon", "v_prediction"]
PREDICTION_TYPES: tuple[str, ...] = get_args(PredictionType)


def _supported() -> str:
    names = [f.supported_as or f.label for f in shipped_families()]
    return f"{', '.join(names[:-1])} and {names[-1]}" if len(names) > 1 else names[0]


SUPPORTED = _supported()

UNET = "model.diffusion_model."
CONV_IN = UNET + "input_blocks.0.0.weight"
LABEL_EMB = UNET + "label_emb.0.0.weight"  # SDXL's size/crop conditioning (ldm `adm`)
VAE_KEY = "first_stage_model.encoder.conv_in.weight"
# Text-encoder prefixes of the original layouts (the HF CLIP wrapped by ldm/sgm, and OpenCLIP's own names),
# labelled for messages: "CLIP ViT-L (cond_stage_model.transformer)".
ENCODERS = {
    f"{name} ({prefix.rstrip('.')})": prefix
    for candidate in checkpoint_families()
    for name, prefix in zip(
        candidate.checkpoint_encoder_names, candidate.checkpoint_text_encoders, strict=True
    )
}
# Families difflora does not train, recognised by their block names (with or without the ldm prefix).
_FOREIGN: dict[str, str] = {}


@dataclass(frozen=True)
class Architecture:
    """A supported base: its family, what its UNet predicts, its native resolution, and the shipped
    diffusers config folder that builds it offline from a single file."""

    name: str  # a family with shipped configs (`checkpoint_families()`)
    prediction_type: PredictionType
    resolution: int

    @property
    def family(self) -> ModelFamily:
        return family(self.name)

    @property
    def config_dir(self) -> Path:
        return config_folder(self.name)

    @property
    def pipeline_class_name(self) -> str:
        return self.family.pipeline_class_name

    @property
    def label(self) -> str:
        """ "SD 1.x", "SD 2.x (v-prediction, 768 px)", "SDXL base": what messages and reports show."""
        return self.family.architecture_label(self.prediction_type, self.resolution)


def config_folder(name: str) -> Path:
    """The shipped diffusers config folder (no weights) of family `name`."""
    folder = family(name).config_dir()
    if folder is None:
        known = ", ".join(f.name for f in checkpoint_families())
        raise ModelError(f"No shipped configuration for {name!r}: known bases are {known}.")
    return folder


def check_prediction_type(prediction_type: str | None) -> None:
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ModelError(
            f"Unknown prediction type {prediction_type!r}: choose one of {', '.join(PREDICTION_TYPES)}."
        )


def make_architecture(name: str, prediction_type: str | None = None) -> Architecture:
    """The architecture of family `name`, predicting the family's usual type unless told; the resolution
    may follow the prediction type (SD 2.x: 768 px for v-prediction as SD 2.1, 512 px for epsilon)."""
    check_prediction_type(prediction_type)
    config_folder(name)  # only a family with shipped configs is an architecture
    chosen = prediction_type or family(name).default_prediction_type
    resolution = family(name).resolution_for(chosen) or 0
    return Architecture(name, chosen, resolution)  # type: ignore[arg-type]


def detect_architecture(
    path: str | Path, *, prediction_type: str | None = None, allow_pickle: bool = False
) -> Architecture:
    """The architecture of a single-file checkpoint (from its keys and shapes) or of a diffusers folder (from
    its configs). Raises ModelError for anything that is not one of the supported bases."""
    path = Path(path)
    if path.is_dir():
        found = folder_architecture(path, prediction_type=prediction_type)
        if found is None:
            raise ModelError(
                f"{path} is a diffusers Stable Diffusion model of a custom architecture (its UNet matches none "
                f"of {SUPPORTED}). difflora can train on it, but it is not one of the known bases."
            )
        return found
    shapes, metadata = checkpoint_shapes(path, allow_pickle=allow_pickle)
    transformer = classify_transformer_file(shapes, source=str(path))
    if transformer is not None:
        return _transformer_architecture(transformer, prediction_type, str(path))
    found = classify_checkpoint(shapes, source=str(path))
    return make_architecture(found, prediction_type or _declared_prediction(shapes, metadata))


def classify_transformer_file(shapes: Mapping[str, tuple[int, ...]], *, source: str) -> str | None:
    """The family of a transformer single file (BFL's or SD3's MMDiT layout), None for any other file."""
    claimed = [f for f in transformer_file_families() if f.matches_transformer_file(shapes)]
    if not claimed:
        return None
    missing = claimed[0].missing_transformer_keys(shapes)
    if missing:
        first = next(key for key in shapes if claimed[0].matches_transformer_file([key]))
        raise ModelError(
            f"{source} is a {claimed[0].label} transformer file ({first}) but lacks {', '.join(missing)}: it is "
            f"incomplete. difflora supports {SUPPORTED}."
        )
    return next(f.name for f in claimed if f.matches_transformer_keys(shapes))


def _transformer_architecture(name: str, prediction_type: str | None, source: str) -> Architecture:
    """A transformer family predicts what it was trained for: an SD prediction type is refused."""
    if prediction_type is not None and prediction_type != family(name).default_prediction_type:
        raise ModelError(
            f"{source} is {family(name).label}, which predicts {family(name).default_prediction_type}: "
            "--prediction-type is for SD bases; leave it out."
        )
    return Architecture(name, family(name).default_prediction_type, family(name).native_resolution or 0)  # type: ignore[arg-type]


def checkpoint_shapes(
    path: Path, *, allow_pickle: bool = False
) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Every tensor name of a checkpoint with its shape, and its metadata, without reading any weights."""
    if path.suffix.lower() == ".safetensors":
        header = read_safetensors_header(path, error=ModelError)
        metadata = dict(header.pop("__metadata__", None) or {})
        return {key: tuple(info["shape"]) for key, info in header.items()}, metadata
    if not allow_pickle:
        raise ModelError(
            f"{path.name} is a pickled checkpoint, which can run arbitrary code when loaded. Convert it to "
            ".safetensors, or pass --allow-pickle if you trust its source."
        )
    import torch

    # weights_only refuses code; the meta device gives shapes without reading the tensors' bytes.
    state: Any = torch.load(path, map_location="meta", weights_only=True)
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"{path} does not hold a state dict of tensors.")
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}, {}


def _declared_prediction(shapes: Mapping[str, Any], metadata: Mapping[str, str]) -> str | None:
    if "v_pred" in shapes:
        return "v_prediction"
    declared = metadata.get("modelspec.prediction_type", "").strip().lower()
    return {"v": "v_prediction", "v_prediction": "v_prediction", "epsilon": "epsilon"}.get(declared)


def classify_checkpoint(shapes: Mapping[str, tuple[int, ...]], *, source: str = "the checkpoint") -> str:
    """The family of an original-layout (ldm/sgm) checkpoint from its tensor names and shapes."""
    _refuse_other_kinds(shapes, source)
    if CONV_IN not in shapes:
        raise ModelError(
            f"{source} is not a Stable Diffusion checkpoint difflora recognises: it has no {CONV_IN} "
            f"(keys start with {_top_prefixes(shapes)}). Supported: {SUPPORTED}, as single files in the "
            "original layout or as diffusers folders."
        )
    _refuse_unusual_unet(shapes, source)
    context_key = next((k for k in shapes if k.startswith(UNET) and k.endswith(".attn2.to_k.weight")), None)
    context = shapes[context_key][-1] if context_key else None
    encoders = [prefix for prefix in ENCODERS.values() if any(k.startswith(prefix) for k in shapes)]
    conditioned = LABEL_EMB in shapes
    for candidate in checkpoint_families():
        if candidate.matches_checkpoint(context, set(encoders), conditioned):
            _require_vae(shapes, source)
            return candidate.name
    names = [label for label, prefix in ENCODERS.items() if prefix in encoders] or ["none"]
    hint = " A UNet-only file cannot be loaded: use the full checkpoint." if names == ["none"] else ""
    raise ModelError(
        f"{source} matches none of {SUPPORTED}. What decided: cross-attention context "
        f"{context if context else 'not found'}"
        f"{f' ({context_key})' if context_key else ''}; text encoders: {', '.join(names)}; size/crop "
        f"conditioning ({LABEL_EMB}): {'present' if conditioned else 'absent'}. {_signatures()}.{hint}"
    )


def _signatures() -> str:
    """ "SD 1.x has context 768 and cond_stage_model.transformer; ...": what each family needs."""
    described = []
    for candidate in checkpoint_families():
        needs = [prefix.rstrip(".") for prefix in candidate.checkpoint_text_encoders]
        needs += ["label_emb"] if candidate.size_conditioning else []
        described.append(
            f"{candidate.label} has context {candidate.cross_attention_dim} and {', '.join(needs)}"
        )
    return "; ".join(described)


def _refuse_other_kinds(shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
    """Files that are not SD UNet checkpoints at all: other families, a LoRA, an SDXL refiner."""
    for block, kind in _FOREIGN.items():
        key = next((k for k in shapes if k.startswith((block, UNET + block))), None)
        if key is not None:
            raise ModelError(f"{source} is {kind} ({key}). difflora supports {SUPPORTED}.")
    if "edm_mean" in shapes:
        raise ModelError(
            f"{source} is Playground v2.5 (an EDM-trained SDXL: edm_mean). difflora supports {SUPPORTED}."
        )
    lora = next((k for k in shapes if k.startswith(("lora_unet_", "lora_te")) or ".lora_" in k), None)
    if lora is not None:
        raise ModelError(
            f"{source} is a LoRA adapter ({lora}), not a base model. Pass a base checkpoint with --model and "
            "the adapter with --adapters."
        )
    refiner = "conditioner.embedders.0.model."
    if any(k.startswith(refiner) for k in shapes) and not any(
        k.startswith("conditioner.embedders.1.") for k in shapes
    ):
        raise ModelError(
            f"{source} is an SDXL refiner (its only text encoder, OpenCLIP ViT-bigG, is {refiner}*). The "
            f"refiner only polishes SDXL base images; train on the SDXL base. difflora supports {SUPPORTED}."
        )


def _refuse_unusual_unet(shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
    channels_out, channels_in = shapes[CONV_IN][:2]
    if channels_in == 9:
        raise ModelError(
            f"{source} is an inpainting UNet ({CONV_IN} takes 9 channels: latents, mask and masked image). "
            f"difflora trains text-to-image bases: {SUPPORTED}, whose UNet takes 4 channels."
        )
    if channels_in != 4:
        raise ModelError(
            f"{source} has a UNet taking {channels_in} input channels ({CONV_IN}; instruct-pix2pix takes 8, "
            f"the x4 upscaler 7). difflora trains text-to-image bases: {SUPPORTED}, whose UNet takes 4."
        )
    if channels_out != 320:
        raise ModelError(
            f"{source} has a UNet {channels_out} channels wide ({CONV_IN}), where {SUPPORTED} have 320: it "
            "is a non-standard (distilled or custom) architecture. Convert it to a diffusers folder and pass "
            "that folder."
        )


def _require_vae(shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
    if VAE_KEY not in shapes:
        raise ModelError(
            f"{source} has no VAE ({VAE_KEY} is missing). Use a checkpoint with its VAE included, or convert "
            "it to a diffusers folder with a VAE and pass that folder."
        )


def _top_prefixes(shapes: Mapping[str, Any], limit: int = 5) -> str:
    prefixes = sorted({key.split(".")[0] for key in shapes})
    return first_n([f"{p}." for p in prefixes], limit) if prefixes else "nothing: the file is empty"


# ------------------------------------------------------------------------------------------ folders


def folder_architecture(folder: Path, *, prediction_type: str | None = None) -> Architecture | None:
    """The architecture of a diffusers folder from its configs, None for a custom SD-style architecture
    (the embedded tiny model, a test model). Folders that are no SD text-to-image model are refused."""
    index = _read_json(folder / "model_index.json")
    pipeline = str(index.get("_class_name", "unknown"))
    unet_path = folder / "unet" / "config.json"
    transformer_path = folder / "transformer" / "config.json"
    if not unet_path.is_file() and transformer_path.is_file():
        return _folder_transformer(folder, pipeline, _read_json(transformer_path), prediction_type)
    if not unet_path.is_file():
        raise ModelError(
            f"{folder} holds a {pipeline}, which has no UNet (nor a transformer/config.json). difflora "
            f"supports {SUPPORTED}."
        )
    unet = _read_json(unet_path)
    if unet.get("in_channels", 4) != 4:
        raise ModelError(
            f"{folder} has a UNet taking {unet['in_channels']} input channels (an inpainting or image-"
            f"conditioned model, {pipeline}). difflora trains text-to-image bases: {SUPPORTED}."
        )
    if "Img2Img" in pipeline and index.get("text_encoder", [None])[0] is None:
        raise ModelError(f"{folder} is an SDXL refiner ({pipeline}). Train on the SDXL base instead.")
    scheduler = _read_json(folder / "scheduler" / "scheduler_config.json")
    predicts = prediction_type or scheduler.get("prediction_type", "epsilon")
    if predicts not in PREDICTION_TYPES:
        raise ModelError(
            f"{folder}'s scheduler predicts {predicts!r}; difflora trains epsilon and v_prediction models. "
            "If the scheduler config is wrong, give the right prediction type."
        )
    return architecture_from_configs(unet, _read_json(folder / "vae" / "config.json"), predicts)


def _folder_transformer(
    folder: Path, pipeline: str, config: Mapping[str, Any], prediction_type: str | None
) -> Architecture:
    """A diffusers folder whose denoiser is a transformer: one of the families' (any width or depth)."""
    matched = next(
        (f for f in shipped_families() if f.matches_denoisers({"transformer": config}, embedded=False)), None
    )
    if matched is None:
        raise ModelError(
            f"{folder} holds a {pipeline} whose transformer ({config.get('_class_name', 'unknown')}) is not one "
            f"difflora trains. difflora supports {SUPPORTED}."
        )
    return _transformer_architecture(matched.name, prediction_type, str(folder))


def pipeline_architecture(pipe: Any) -> Architecture | None:
    """The architecture of a loaded pipeline, from its components' configs (None for a custom one)."""
    denoisers = {name: dict(getattr(pipe, name).config) for name in DENOISERS if getattr(pipe, name, None)}
    for known in transformer_file_families():
        if known.matches_denoisers(denoisers, embedded=False):
            return make_architecture(known.name)
    predicts = pipe.scheduler.config.get("prediction_type", "epsilon")
    return architecture_from_configs(dict(pipe.unet.config), dict(pipe.vae.config), predicts)


def architecture_from_configs(
    unet: Mapping[str, Any], vae: Mapping[str, Any], prediction_type: str
) -> Architecture | None:
    """The family follows from the UNet config; the native size from the configs themselves (UNet sample
    size × VAE factor: an SD 2.x base folder says 512 px where a single file cannot)."""
    matched = next((f for f in checkpoint_families() if f.matches_unet_config(unet)), None)
    if matched is None:
        return None
    found = make_architecture(matched.name, prediction_type)
    size = unet.get("sample_size", 0)
    native = (size if isinstance(size, int) else size[0]) * 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    return Architecture(found.name, found.prediction_type, native or found.resolution)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path} is missing: the diffusers folder is incomplete.") from None
    except (OSError, json.JSONDecodeError) as error:
        raise ModelError(f"{path} cannot be read ({error}): the diffusers folder is damaged.") from None
