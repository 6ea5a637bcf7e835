"""The model-family seam: what differs between base models, declared in one class per family.

Everything that is not family-specific (data, cache, training loop, composition math, safe I/O, serving,
CLI) asks a `ModelFamily` and never tests a family's name: adding a family adds a module here (and its
shipped configs), not a branch elsewhere. A family declares facts as class attributes, as ComfyUI's
`supported_models.py` does, and a variant subclasses and changes a few of them. Behaviour that differs
between families is a method here, with the machinery it shares (epsilon/v noising, later flow matching,
latent packing) in modules of its own that the families reuse.

This module sits at the bottom of the import graph: it imports nothing from difflora but `errors`, so
models/, formats/, training/ and generation/ can all ask it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from difflora.errors import ConfigError, ModelError
from difflora.models.families.conditioning import (
    PooledSizeConditioning,
    TextConditioning,
    takes_size_conditioning,
)

ARCHITECTURES_DIR = Path(__file__).resolve().parent.parent / "architectures"
# T5 v1.1's tokenizer, shipped once (with Flux.1 dev's configs) for every family that reads T5
T5_TOKENIZER_FILE = ARCHITECTURES_DIR / "flux1-dev" / "tokenizer_2" / "tokenizer.json"

# LoRA targets: the attention projections of a diffusers UNet and of a CLIP text encoder.
UNET_ATTENTION: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
CLIP_ATTENTION: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
UNET_MLP: tuple[str, ...] = ("ff.net.0.proj", "ff.net.2")
ALL_LINEAR: tuple[str, ...] = ("*",)
"""`--targets all-linear`: every Linear module of the denoiser (`difflora.adapter.inject.resolve_targets`)."""
FULL_MODEL_LR = 1e-4
MODEL_DEFAULTS_FILE = "difflora_defaults.json"
"""A model folder's own generation defaults (`{"true_cfg": 5.0, "max_sequence_length": 32}`): what a model
trained with non-default settings needs so that `difflora generate --model FOLDER` draws what it is told
with no extra flags (and training encodes text as generation will). `resolution` (any family): the side
of its default images and training resolution."""
RESOLUTION = "resolution"


class ModelFamily:
    """One base-model family. Subclasses set the class attributes; instances are stateless singletons
    registered in `difflora.models.families`."""

    name: ClassVar[str]
    """The family's key in adapter metadata (`difflora.base_family`) and everywhere in code."""
    label: ClassVar[str]
    """What messages and reports call it ("SD 1.x", "SDXL base")."""
    components: ClassVar[tuple[str, ...]] = ("unet", "text_encoder")
    """The pipeline components LoRA files name: the denoiser first, then the text encoders."""
    denoiser: ClassVar[str] = "unet"
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)
    pipeline_class_name: ClassVar[str] = "StableDiffusionPipeline"
    config_folder: ClassVar[str | None] = None
    """Folder under models/architectures/ with the shipped diffusers configs and tokenizers (None: none)."""
    has_reference: ClassVar[bool] = True
    """Whether its module tree can be built offline (on the meta device) from shipped configs."""
    trainable_text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")
    """The text encoders `--train-text-encoder` adds LoRA layers to (the others stay frozen)."""
    block_lists: ClassVar[dict[str, str]] = {}
    """Block kinds `--blocks` can limit a LoRA to, with the module list holding them (none for a UNet)."""
    edge_blocks: ClassVar[dict[str, str]] = {}
    """Per-block weights (`@in=0`) of the denoiser's modules outside `block_lists`: module path prefix ->
    block (a DiT's embedders IN, its final layer OUT, as the LoRA Block Weight extension groups them)."""
    text_encoder_blocks: ClassVar[dict[str, str]] = {}
    """A text encoder's own block for per-block weights where a block vector weights them apart (default
    BASE; a selector `base` still weights them all)."""
    swappable_blocks: ClassVar[tuple[str, ...]] = ()
    """The denoiser's module lists whose blocks `--blocks-to-swap` may keep in CPU memory, in forward order
    (the last N blocks of their concatenation are swapped); none: the family refuses the flag."""
    single_file_parts: ClassVar[dict[str, tuple[str, ...]]] = {}
    part_options: ClassVar[dict[str, str]] = {}
    single_file_encoders: ClassVar[dict[str, str]] = {}
    """How each text encoder of a transformer single file is built (`difflora.models.dit_files`): `clip`
    (CLIPTextModel), `clip-projection` (CLIPTextModelWithProjection, its `text_projection` kept) or `t5`."""
    single_file_vae: ClassVar[str] = "ldm"
    """The layout of its autoencoder's single file: `ldm` (the original AutoencoderKL layout) or `wan` (Wan
    2.1's causal video autoencoder, Qwen-Image's: `difflora.models.qwen_files`)."""
    checkpoint_layout: ClassVar[str] = "ldm"
    """The single-file layout its checkpoints come in: `ldm` (SD's original layout, told apart by
    `matches_checkpoint`) or `bfl` (Black Forest Labs' transformer file, by `matches_transformer_keys`)."""

    # ---------------------------------------------------------------- what it predicts, at what size
    default_prediction_type: ClassVar[str] = "epsilon"
    native_resolution: ClassVar[int | None] = 512

    # ---------------------------------------------------------------- detection from a single file
    cross_attention_dim: ClassVar[int | None] = None
    checkpoint_text_encoders: ClassVar[tuple[str, ...]] = ()
    """Text-encoder key prefixes of the original (ldm/sgm) single-file layout."""
    size_conditioning: ClassVar[bool] = False
    """Whether the UNet takes SDXL's pooled text embedding and size/crop time ids."""

    # ---------------------------------------------------------------- training defaults
    default_unet_targets: ClassVar[tuple[str, ...]] = UNET_ATTENTION
    mlp_targets: ClassVar[tuple[str, ...]] = UNET_MLP  # what --targets attention-mlp adds to the attention
    default_text_encoder_targets: ClassVar[tuple[str, ...]] = CLIP_ATTENTION
    default_learning_rate: ClassVar[float] = FULL_MODEL_LR

    # ---- model side
    checkpoint_encoder_names: ClassVar[tuple[str, ...]] = ()
    """What each of `checkpoint_text_encoders` is ("CLIP ViT-L"), in the same order: for messages."""
    unet_block_out_channels: ClassVar[tuple[int, ...] | None] = None
    """The UNet's width per level: with the context and the conditioning, what identifies its config."""
    supported_as: ClassVar[str | None] = None
    """How the list of supported bases names it, where that says more than `label`."""
    pipeline_has_safety_checker: ClassVar[bool] = True
    """Whether its diffusers pipeline class takes a safety checker (which difflora leaves out)."""

    def resolution_for(self, prediction_type: str) -> int | None:
        """The native resolution of the variant predicting `prediction_type`."""
        return self.native_resolution

    def architecture_label(self, prediction_type: str, resolution: int) -> str:
        """What messages and reports call a detected base ("SD 1.x", "SDXL base (v-prediction)")."""
        return self.prediction_label(prediction_type)

    def matches_checkpoint(self, context: int | None, encoders: set[str], conditioned: bool) -> bool:
        """Whether a single file's facts (cross-attention context, text-encoder key prefixes present,
        size/crop conditioning) are this family's."""
        return (
            self.cross_attention_dim is not None
            and context == self.cross_attention_dim
            and set(self.checkpoint_text_encoders) <= encoders
            and conditioned == self.size_conditioning
        )

    def matches_unet_config(self, unet: Mapping[str, Any]) -> bool:
        """Whether a diffusers UNet config is this family's: its shape, not only its conditioning (a
        smaller UNet with size conditioning is another architecture, whose files need other names)."""
        return (
            self.unet_block_out_channels is not None
            and tuple(unet.get("block_out_channels", ())) == self.unet_block_out_channels
            and unet.get("cross_attention_dim") == self.cross_attention_dim
            and takes_size_conditioning(unet) == self.size_conditioning
        )

    def matches_model(self, unet: Mapping[str, Any], *, embedded: bool) -> bool:
        """Whether a loaded model (its UNet config; `embedded`: the model shipped inside difflora) is
        this family's. The registry asks each family in detection order."""
        return embedded if self.ships_with_difflora else self.matches_unet_config(unet)

    def matches_denoisers(self, denoisers: Mapping[str, Mapping[str, Any]], *, embedded: bool) -> bool:
        """Whether a loaded model is this family's, given the configs of the denoiser components it has
        ({"unet": ...} for SD, {"transformer": ...} for a DiT): its own denoiser must be among them."""
        config = denoisers.get(self.denoiser)
        return config is not None and self.matches_model(config, embedded=embedded)

    def conditioning(
        self, unet: Mapping[str, Any], options: Mapping[str, Any] | None = None
    ) -> TextConditioning:
        """How this family's denoiser is conditioned on text (what is encoded, cached and passed);
        `options`: the model's `generation_options` (the text lengths generation encodes at)."""
        return PooledSizeConditioning() if self.size_conditioning else TextConditioning()

    # ---------------------------------------------------------------- generation options
    def generation_defaults(self, pipe: Any) -> dict[str, Any]:
        """The generation options beyond SD's that this family's pipeline takes (`--true-cfg`,
        `--max-sequence-length`), with the values used when neither the user nor the model folder gives
        one. SD's families take none."""
        return {}

    def generation_options(self, pipe: Any, given: Mapping[str, Any]) -> dict[str, Any]:
        """The options a render (and the text encoding of training) uses: the family's defaults, over them
        the model folder's `MODEL_DEFAULTS_FILE`, over those the values `given` (None: not given)."""
        options = self.generation_defaults(pipe)
        path, declared = declared_defaults(pipe)
        for name, value in declared.items():
            if name == RESOLUTION:  # every family's fact, read by `default_pixels`
                continue
            if name not in options:
                raise ModelError(
                    f"{path}: {name!r} is not a generation option of {self.label} models "
                    f"({', '.join(options) or 'they take none'}); remove it."
                )
            options[name] = value
        for name, value in given.items():
            if value is None:
                continue
            if name not in options:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag}: {self.label} models take no such option; leave it out.")
            options[name] = value
        return options

    def pipeline_arguments(
        self, options: Mapping[str, Any], *, negative_prompt: str, images: int
    ) -> dict[str, Any]:
        """The pipeline call's keyword arguments for `options` (`generation_options`), for a call rendering
        `images` images; they replace the generic ones (a negative prompt, say)."""
        return {}

    def prompt_embeddings(
        self, pipe: Any, prompt: str, negative_prompt: str, options: Mapping[str, Any]
    ) -> dict[str, Any]:
        """One prompt's text inputs as the pipeline call takes them in place of the prompt (`prompt_embeds`,
        ...), computed now by the pipeline's own `encode_prompt`: what lets a render run after training has
        freed the text encoders. The negative is computed always (used when guidance is on)."""
        positive, negative = pipe.encode_prompt(
            prompt, pipe._execution_device, 1, True, negative_prompt or None
        )
        return {"prompt_embeds": positive, "negative_prompt_embeds": negative}

    def tokenizer_file(self, name: str) -> Path | None:
        """A `tokenizer.json` that builds tokenizer `name` (None: a CLIP tokenizer from the shared vocabulary)."""
        return None

    def latent_encoder(self, vae: Any) -> Any:
        """The autoencoder as training encodes images with it: `encode(pixels [B, 3, H, W]).latent_dist`
        (`mean`, `std`, `sample`) giving latents [B, C, h, w] that `config.scaling_factor` and `shift_factor`
        normalise; `parameters()` and `dtype` as a module's. SD's and Flux's autoencoders are that already."""
        return vae

    def own_tokenizer(self, name: str) -> Any | None:
        """Tokenizer `name` built from the family's shipped files where neither CLIP's shared vocabulary nor
        a T5 `tokenizer_file` builds it (Qwen2's BPE); None: those do."""
        return None

    def matches_transformer_file(self, keys: Any) -> bool:
        """Whether a single file's tensor names are this family's transformer layout (`checkpoint_layout`
        `bfl`); ldm files are told apart by `matches_checkpoint`."""
        return False

    def matches_transformer_keys(self, keys: Any) -> bool:
        """Which variant of the transformer layout a file is (asked after `matches_transformer_file`)."""
        return False

    def missing_transformer_keys(self, keys: Any) -> list[str]:
        """What a transformer single file of this family's layout lacks to be complete (asked after
        `matches_transformer_file`); none for a family without that layout."""
        return []

    def build_transformer(self, state: Mapping[str, Any], shipped: Mapping[str, Any], dtype: Any) -> Any:
        """The diffusers transformer holding a transformer single file's weights (`state`, as read), its
        config read from the weights over the `shipped` one, cast to `dtype`."""
        raise ModelError(f"{self.label} models do not load from a transformer file; pass a diffusers folder.")

    def denoiser_of(self, pipe: Any) -> Any:
        """The pipeline's denoiser module (what LoRA layers train on)."""
        return getattr(pipe, self.denoiser)

    def prediction_type_of(self, scheduler_config: Mapping[str, Any]) -> str:
        """What a model of this family predicts, as its scheduler config says (diffusers' default: epsilon)."""
        return str(scheduler_config.get("prediction_type", "epsilon"))

    def default_pixels(self, pipe: Any) -> int:
        """The side of a default generated image (and of the default training resolution): the model
        folder's declared `resolution` (`MODEL_DEFAULTS_FILE`), else the family's `native_pixels`."""
        declared = declared_defaults(pipe)[1].get(RESOLUTION)
        return int(declared) if declared else self.native_pixels(pipe)

    def native_pixels(self, pipe: Any) -> int:
        """The UNet's sample size times the VAE's factor."""
        return int(self.denoiser_of(pipe).config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))

    def vae_factor(self, vae_config: Mapping[str, Any]) -> int:
        """How many image pixels one latent pixel spans per side: 2 per autoencoder level but the first."""
        return int(2 ** (len(vae_config["block_out_channels"]) - 1))

    def denoiser_downsamplings(self, denoiser_config: Mapping[str, Any]) -> int:
        """How many times the denoiser halves the latents (bucket sides must survive each): a UNet's levels."""
        return len(denoiser_config["block_out_channels"]) - 1

    def flow_schedule(self, scheduler_config: Mapping[str, Any], sampling: Any) -> Any:
        """The rectified-flow noising of a flow-matching family (`difflora.models.families.flow`), None for
        the DDPM families, which noise with their betas."""
        return None

    def target_preset(self, name: str) -> tuple[str, ...]:
        """The denoiser's LoRA targets of preset `name` (`--targets`): `attention` is the family's default,
        `attention-mlp` adds the feed-forward layers, `all-linear` every Linear."""
        presets = self.target_presets()
        if name not in presets:
            raise ValueError(f"unknown --targets preset {name!r}: choose one of {', '.join(presets)}")
        return presets[name]

    def target_presets(self) -> dict[str, tuple[str, ...]]:
        return {
            "attention": self.default_unet_targets,
            "attention-mlp": (*self.default_unet_targets, *self.mlp_targets),
            "all-linear": ALL_LINEAR,
        }

    # ---------------------------------------------------------------- file layouts
    kohya_text_encoder_prefixes: ClassVar[dict[str, str]] = {"text_encoder": "lora_te"}
    kohya_unet_names: ClassVar[Literal["diffusers", "sgm"]] = "diffusers"
    """Which UNet module paths kohya names use when writing: diffusers paths, or the SGM/LDM paths kohya
    uses for SDXL (every family reads both)."""
    kohya_base_version: ClassVar[str] = "sd_v1"
    """`ss_base_model_version`; A1111 lists any metadata-bearing LoRA as SD1 when it knows no better."""
    kohya_v_suffix: ClassVar[bool] = False
    """Whether a v-prediction base appends `_v` to `ss_base_model_version` (kohya's SD1/SD2 convention)."""
    modelspec_architecture: ClassVar[str] = "custom/lora"
    modelspec_architecture_v: ClassVar[str | None] = None
    """ModelSpec architecture of the v-prediction variant, where it has its own."""
    modelspec_implementation: ClassVar[str] = "diffusers"
    kohya_version_prefixes: ClassVar[tuple[str, ...]] = ()
    """`ss_base_model_version` values (by prefix) that state this family when reading a file: kohya's own
    and other trainers' (ai-toolkit writes `sd_1.5`, `sdxl_1.0`)."""
    kohya_v2_flag: ClassVar[bool] = False
    """kohya's `ss_v2`: written "True" for this family, and a file saying "True" is this family's."""
    modelspec_prefixes: ClassVar[tuple[str, ...]] = ()
    """`modelspec.architecture` values (by prefix) that state this family when reading a file."""
    consumer_stand_in: ClassVar[str | None] = None
    """The family whose consumer rules a file of this one is checked against when this one has no reference
    tree (no consumer ships it; its files are named like that family's)."""
    consumer_text_encoder_layers: ClassVar[dict[str, int]] = {}
    """Text encoders that ComfyUI and A1111 hold with more layers than diffusers does: {component: layers}."""
    compvis_text_encoders: ClassVar[dict[str, str]] = {"text_encoder": "transformer"}
    """How A1111 names each text encoder's modules: their path in the original checkpoint below the
    conditioner, flattened. `transformer` is an HF CLIP layout (`transformer_text_model_encoder_layers_N_...`),
    `model` an OpenCLIP one (`model_transformer_resblocks_N_...`); numbered embedders add `0_`, `1_`."""
    a1111_version: ClassVar[str] = "SD1"
    """The version A1111 lists this family's checkpoints as (SD1, SD2, SDXL); it files every other as SD1."""
    kohya_network_module: ClassVar[str] = "networks.lora"
    """kohya's `ss_network_module`: the network script that trains (and names) this family's LoRAs."""
    modelspec_states_prediction: ClassVar[bool] = True
    """Whether ModelSpec's `prediction_type` (epsilon / v) applies; a flow-matching family has none."""
    kohya_denoiser_layout: ClassVar[str | None] = None
    """The original (non-diffusers) module layout kohya, ComfyUI and Forge name the denoiser in, where the
    family has one that fuses or renames diffusers' modules ("bfl": Black Forest Labs' `double_blocks` /
    `single_blocks`, `difflora.formats.flux_names`); None: the UNet names above."""
    kohya_denoiser_aliases: ClassVar[tuple[str, ...]] = ()
    """Further kohya-grammar prefixes whose names are the denoiser's flattened diffusers paths (OneTrainer's
    `lora_transformer_`), read as this family's."""
    consumer_encoder_prefixes: ClassVar[dict[str, tuple[str, ...]]] = {}
    """Text encoders whose every Linear ComfyUI maps (not only CLIP's attention and MLP), under these kohya
    prefixes: {component: prefixes}."""
    consumers: ClassVar[tuple[str, ...]] = ("comfyui", "a1111", "diffusers")
    diffusers_converts_kohya: ClassVar[bool] = True
    """Whether diffusers' `load_lora_weights` converts this family's kohya-named files (SD3's loader converts
    none: only PEFT keys under its components' prefixes load)."""
    """The programs whose loading rules `inspect` and `export` check this family's files against."""
    ships_with_difflora: ClassVar[bool] = False
    """Whether the model is inside the package (loaded when `--model` is omitted; its configs sit beside its
    weights in `difflora.embedded`), so its adapters record a display name rather than a loadable base."""

    # ---------------------------------------------------------------- derived facts
    def config_dir(self) -> Path | None:
        return ARCHITECTURES_DIR / self.config_folder if self.config_folder else None

    def prediction_label(self, prediction_type: str) -> str:
        """The label with the prediction type where it is not the family's usual one."""
        if prediction_type == self.default_prediction_type:
            return self.label
        return f"{self.label} ({prediction_type.replace('_', '-')})"

    def kohya_version(self, *, v_prediction: bool = False) -> str:
        suffix = "_v" if v_prediction and self.kohya_v_suffix else ""
        return self.kohya_base_version + suffix

    def modelspec(self, *, v_prediction: bool = False) -> str:
        if v_prediction and self.modelspec_architecture_v:
            return self.modelspec_architecture_v
        return self.modelspec_architecture

    def __repr__(self) -> str:
        return f"<model family {self.name}>"


def declared_defaults(pipe: Any) -> tuple[Path | None, dict[str, Any]]:
    """The generation defaults a loaded model's folder declares (`MODEL_DEFAULTS_FILE`), with the file's
    path; none for a single file or a folder without it. The folder is the one `load_pipeline` recorded."""
    source = getattr(pipe, "_difflora_source", None)
    if source is None or source.kind not in ("folder", "embedded"):
        return None, {}
    path = Path(source.location) / MODEL_DEFAULTS_FILE
    if not path.is_file():
        return None, {}
    try:
        declared = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelError(f"{path}: unreadable ({error}); fix the JSON or remove the file.") from None
    if not isinstance(declared, dict):
        raise ModelError(f"{path}: must be a JSON object of option: value; fix it or remove the file.")
    return path, declared
