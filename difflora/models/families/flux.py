"""Flux.1 (Black Forest Labs): a 12 B rectified-flow transformer of double-stream (image and text apart,
joint attention) and single-stream blocks over 2x2-packed latents of a 16-channel autoencoder; CLIP ViT-L's
pooled output and T5-XXL v1.1's hidden states condition it. `dev` is guidance-distilled (it takes the
guidance scale as an input, `guidance_in.*` in BFL's files); `schnell` is timestep-distilled and has none.

Shared machinery: the flow-matching objective is `flow.py`; the latent packing and position ids are
diffusers' `FluxPipeline` static methods, so training sees exactly what generation feeds the transformer.

File layouts: kohya, ComfyUI and Forge name the transformer in BFL's original layout
(`double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`, ...), whose fused q/k/v (and, in single blocks,
q/k/v/MLP) projections difflora trains as diffusers' split modules; `difflora.formats.flux_names` maps one
to the other and `difflora.formats.fused` converts the LoRAs exactly. Text encoders are `lora_te1_` (CLIP-L)
and `lora_te3_` (T5), kohya's convention (`networks/lora_flux.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from difflora.models.families.base import T5_TOKENIZER_FILE, ModelFamily
from difflora.models.families.conditioning import (
    TextConditioning,
    checked_text_length,
    default_text_length,
    padded_tokens,
)
from difflora.models.families.flow import FlowSchedule, TimestepSampling

if TYPE_CHECKING:
    import torch

# Attention of both block kinds: q/k/v/out of the image stream and of the text stream (double blocks),
# q/k/v of the single blocks (their output projection is shared with the MLP: `attention-mlp` adds it).
FLUX_ATTENTION: tuple[str, ...] = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
)
FLUX_MLP: tuple[str, ...] = (
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "proj_mlp",
)
# What BFL's single files hold, with or without ComfyUI's `model.diffusion_model.` prefix.
BFL_PREFIX = "model.diffusion_model."
BFL_DOUBLE, BFL_SINGLE, BFL_GUIDANCE = "double_blocks.", "single_blocks.", "guidance_in."
BFL_DISTILLED = ("distilled_guidance_layer.", BFL_PREFIX + "distilled_guidance_layer.")
T5_MAX_TOKENS = 512  # FluxPipeline's default and upper bound of max_sequence_length


class Flux(ModelFamily):
    name = "flux"
    label = "Flux.1 dev"
    # ---- model side
    components = ("transformer", "text_encoder", "text_encoder_2")
    denoiser = "transformer"
    text_encoders = ("text_encoder", "text_encoder_2")
    pipeline_class_name = "FluxPipeline"
    pipeline_has_safety_checker = False
    config_folder = "flux1-dev"
    checkpoint_layout = "bfl"
    checkpoint_encoder_names = ("CLIP ViT-L", "T5-XXL v1.1")
    default_prediction_type = "flow_matching"
    native_resolution = 1024
    default_unet_targets = FLUX_ATTENTION
    mlp_targets = FLUX_MLP
    # --train-text-encoder: CLIP-L only; T5-XXL stays frozen (and cached), as kohya's and diffusers' defaults.
    trainable_text_encoders = ("text_encoder",)
    guidance_embeds: ClassVar[bool] = True
    """Whether the transformer takes the guidance scale as an input (dev: guidance distillation)."""
    default_timestep_sampling: ClassVar[str] = "flux-shift"
    block_lists: ClassVar[dict[str, str]] = {
        "double": "transformer_blocks",
        "single": "single_transformer_blocks",
    }
    """Block kinds a LoRA can be limited to (`--blocks double=0-18`), with the module list holding them."""
    # The LoRA Block Weight extension's Flux vector (its BLOCKIDFLUX: CLIP, T5, IN, D00-D18, S00-S37, OUT)
    # weights the embedders as IN (BFL's img_in, txt_in, time_in, vector_in, guidance_in) and the final layer
    # as OUT (final_layer.adaLN_modulation and .linear), and each text encoder apart.
    edge_blocks: ClassVar[dict[str, str]] = {
        "x_embedder": "IN",
        "context_embedder": "IN",
        "time_text_embed": "IN",
        "norm_out": "OUT",
        "proj_out": "OUT",
    }
    text_encoder_blocks: ClassVar[dict[str, str]] = {"text_encoder": "CLIP", "text_encoder_2": "T5"}
    # Every block runs once per forward in this order (double-stream, then single-stream blocks); what sits
    # between them (embedders, final norm) is small and stays on the GPU.
    swappable_blocks: ClassVar[tuple[str, ...]] = ("transformer_blocks", "single_transformer_blocks")
    single_file_parts: ClassVar[dict[str, tuple[str, ...]]] = {
        "text_encoder": ("text_encoders.clip_l.transformer.",),
        "text_encoder_2": ("text_encoders.t5xxl.transformer.",),
        "vae": ("vae.", "first_stage_model."),
    }
    """Key prefixes of the other components in an all-in-one file (ComfyUI's layout); a transformer-only
    file takes them from separate files."""
    part_options: ClassVar[dict[str, str]] = {"text_encoder": "clip_l", "text_encoder_2": "t5", "vae": "vae"}
    """The option (`--clip-l`, `--t5`, `--vae`) that gives each component as a file of its own."""
    single_file_encoders: ClassVar[dict[str, str]] = {"text_encoder": "clip", "text_encoder_2": "t5"}

    def matches_model(self, unet: Mapping[str, Any], *, embedded: bool) -> bool:
        """A FluxTransformer2DModel config (any width or depth) with or without the guidance input; CLIP's
        pooled projection tells it from a Flux derivative that dropped it (Chroma)."""
        is_flux = {"joint_attention_dim", "num_single_layers", "pooled_projection_dim"} <= set(unet)
        return is_flux and bool(unet.get("guidance_embeds")) == self.guidance_embeds

    def matches_transformer_keys(self, keys: Collection[str]) -> bool:
        """Whether a BFL single-file transformer (its tensor names) is this variant: dev has `guidance_in`."""
        guided = any(key.startswith((BFL_GUIDANCE, BFL_PREFIX + BFL_GUIDANCE)) for key in keys)
        return guided == self.guidance_embeds

    def matches_transformer_file(self, keys: Collection[str]) -> bool:
        """Whether a single file holds a BFL transformer (its double blocks, with or without the prefix) with
        Flux's per-block modulation: a file with a distilled approximator instead is a Flux derivative's."""
        blocks = any(key.startswith((BFL_DOUBLE, BFL_PREFIX + BFL_DOUBLE)) for key in keys)
        return blocks and not any(key.startswith(BFL_DISTILLED) for key in keys)

    def missing_transformer_keys(self, keys: Collection[str]) -> list[str]:
        from difflora.models.bfl_file import REQUIRED, strip_prefix

        stripped = strip_prefix(dict.fromkeys(keys))
        return [key for key in REQUIRED if key not in stripped]

    def build_transformer(self, state: Mapping[str, Any], shipped: Mapping[str, Any], dtype: Any) -> Any:
        from difflora.models.bfl_file import build_transformer

        return build_transformer(state, shipped, dtype)

    def conditioning(
        self, unet: Mapping[str, Any], options: Mapping[str, Any] | None = None
    ) -> TextConditioning:
        return FluxConditioning(int((options or {}).get("max_sequence_length", T5_MAX_TOKENS)))

    def generation_defaults(self, pipe: Any) -> dict[str, Any]:
        """True CFG off (dev is guidance-distilled: `--guidance` is its embedded input), and T5 read at
        FluxPipeline's 512 tokens, or the tokenizer's own length where it was saved with less (a small
        model trained at that length)."""
        return {"true_cfg": 1.0, "max_sequence_length": default_text_length(pipe.tokenizer_2, T5_MAX_TOKENS)}

    def pipeline_arguments(
        self, options: Mapping[str, Any], *, negative_prompt: str, images: int
    ) -> dict[str, Any]:
        """FluxPipeline's `true_cfg_scale` and `max_sequence_length`. True CFG runs only with a negative
        prompt, so above 1 an empty one is passed where none was given."""
        tokens = checked_text_length(options, T5_MAX_TOKENS, "Flux.1's T5")
        scale = float(options["true_cfg"])
        arguments: dict[str, Any] = {"true_cfg_scale": scale, "max_sequence_length": tokens}
        if scale > 1 and not negative_prompt:
            arguments["negative_prompt"] = "" if images == 1 else [""] * images
        return arguments

    def prompt_embeddings(
        self, pipe: Any, prompt: str, negative_prompt: str, options: Mapping[str, Any]
    ) -> dict[str, Any]:
        """T5's hidden states and CLIP's pooled output at the options' T5 length; the negative's too where
        true CFG is on (FluxPipeline runs the negative prompt only then)."""
        tokens = int(options["max_sequence_length"])
        positive, pooled, _ = pipe.encode_prompt(prompt, None, max_sequence_length=tokens)
        found = {"prompt_embeds": positive, "pooled_prompt_embeds": pooled}
        if float(options["true_cfg"]) > 1:
            negative, negative_pooled, _ = pipe.encode_prompt(
                negative_prompt, None, max_sequence_length=tokens
            )
            found |= {"negative_prompt_embeds": negative, "negative_pooled_prompt_embeds": negative_pooled}
        return found

    def tokenizer_file(self, name: str) -> Path | None:
        """T5's tokenizer.json, shipped once (in flux1-dev/) for both variants."""
        return T5_TOKENIZER_FILE if name == "tokenizer_2" else None

    def prediction_type_of(self, scheduler_config: Mapping[str, Any]) -> str:
        return self.default_prediction_type

    def native_pixels(self, pipe: Any) -> int:
        """FluxPipeline's own default: 128 latent pixels (1024 px with the 8x autoencoder)."""
        return int(pipe.default_sample_size) * int(pipe.vae_scale_factor)

    def denoiser_downsamplings(self, denoiser_config: Mapping[str, Any]) -> int:
        """Once: 2x2 latent pixels are packed into one token (16-px buckets with the 8x autoencoder)."""
        return 1

    def flow_schedule(self, scheduler_config: Mapping[str, Any], sampling: Any) -> FlowSchedule:
        return FlowSchedule.from_scheduler(scheduler_config, sampling or self.default_sampling())

    def default_sampling(self) -> TimestepSampling:
        return TimestepSampling(self.default_timestep_sampling)

    # ---- file layouts
    kohya_text_encoder_prefixes: ClassVar[dict[str, str]] = {
        "text_encoder": "lora_te1",
        "text_encoder_2": "lora_te3",
    }
    kohya_denoiser_layout = "bfl"
    kohya_denoiser_aliases = ("lora_transformer",)
    kohya_base_version = "flux1"
    kohya_network_module = "networks.lora_flux"
    modelspec_states_prediction = False
    # kohya writes "flux1" for dev and schnell alike: schnell is told apart by its ModelSpec architecture.
    kohya_version_prefixes = ("flux1", "flux.1", "flux_1")
    modelspec_architecture = "flux-1-dev/lora"
    modelspec_prefixes = ("flux-1-dev", "flux-1/")  # kohya's ARCH_FLUX_1_UNKNOWN is "flux-1"
    modelspec_implementation = "https://github.com/black-forest-labs/flux"
    # ComfyUI maps every T5 Linear, as `lora_te3_` (kohya) and `lora_te2_` (OneTrainer, counting CLIP-L as 1).
    consumer_encoder_prefixes: ClassVar[dict[str, tuple[str, ...]]] = {
        "text_encoder_2": ("lora_te2", "lora_te3")
    }
    # A1111 loads no Flux LoRA; Forge's Flux loader is ComfyUI's key map.
    consumers = ("comfyui", "forge", "diffusers")


class FluxSchnell(Flux):
    name = "flux-schnell"
    label = "Flux.1 schnell"
    # ---- file layouts
    kohya_version_prefixes = ()
    modelspec_architecture = "flux-1-schnell/lora"
    modelspec_prefixes = ("flux-1-schnell",)

    # ---- model side
    config_folder = "flux1-schnell"
    guidance_embeds = False
    # schnell's scheduler samples unshifted (shift 1, no dynamic shifting): train where it samples.
    default_timestep_sampling = "sigmoid"


class FluxConditioning(TextConditioning):
    """CLIP ViT-L's pooled output and T5's last hidden state, as `FluxPipeline.encode_prompt` computes them
    (CLIP padded to its tokenizer's max length, T5 to `t5_tokens`, the pipeline's `max_sequence_length`);
    the transformer takes the packed latents with their position ids, zero text ids, σ and (dev) the
    guidance scale."""

    def __init__(self, t5_tokens: int = T5_MAX_TOKENS) -> None:
        self.t5_tokens = t5_tokens

    @property
    def cache_tag(self) -> str:
        return f"t5={self.t5_tokens}"

    def encode(
        self, tokenizers: Sequence[Any], encoders: Sequence[torch.nn.Module], captions: list[str]
    ) -> dict[str, torch.Tensor]:
        """captions -> {"hidden": [B, T5 tokens, T5 width], "pooled": [B, CLIP width]}."""
        clip, t5 = encoders
        clip_ids = padded_tokens(tokenizers[0], captions).input_ids.to(next(clip.parameters()).device)
        t5_tokens = padded_tokens(tokenizers[1], captions, max_length=self.t5_tokens)
        t5_ids = t5_tokens.input_ids.to(next(t5.parameters()).device)
        pooled = clip(clip_ids, output_hidden_states=False).pooler_output
        return {"hidden": t5(t5_ids, output_hidden_states=False)[0], "pooled": pooled}

    def predict(
        self,
        model: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        text: Mapping[str, torch.Tensor],
        batch: Mapping[str, Any],
        *,
        device: torch.device,
        dtype: torch.dtype,
        guidance: float,
    ) -> torch.Tensor:
        import torch

        config = getattr(model, "module", model).config  # DDP wraps the transformer
        size = noisy.shape[0]
        return packed_prediction(
            model,
            noisy,
            timesteps,
            text["hidden"],
            device=device,
            dtype=dtype,
            guidance=torch.full((size,), guidance, device=device) if config.guidance_embeds else None,
            pooled_projections=text["pooled"].to(device, dtype),
        )

    def probe(self, pipe: Any, model: torch.nn.Module, batch: int, resolution: int) -> Callable[[], Any]:
        import torch

        parameter = next(model.parameters())
        side = 2 * (resolution // (2 * int(pipe.vae_scale_factor)))
        latents = torch.randn(batch, int(pipe.vae.config.latent_channels), side, side)
        config = model.config
        text = {
            "hidden": torch.randn(batch, self.t5_tokens, int(config.joint_attention_dim)),
            "pooled": torch.randn(batch, int(config.pooled_projection_dim)),
        }
        sigmas = torch.full((batch,), 0.5)
        device, dtype = parameter.device, parameter.dtype
        return lambda: self.predict(
            model, latents, sigmas, text, {}, device=device, dtype=dtype, guidance=1.0
        )


def packed_prediction(
    model: torch.nn.Module,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    hidden: torch.Tensor,
    *,
    device: torch.device,
    dtype: torch.dtype,
    **inputs: Any,
) -> torch.Tensor:
    """A Flux-layout transformer's output for latents [B, C, H, W], shaped like them: the latents packed into
    2x2 patches with their position ids, the text's ids zero, as FluxPipeline (and ChromaPipeline) call it;
    `inputs` are the family's own (guidance, pooled projections, attention mask)."""
    import torch
    from diffusers import FluxPipeline

    size, channels, height, width = noisy.shape
    packed = FluxPipeline._pack_latents(noisy.to(device, dtype), size, channels, height, width)
    hidden = hidden.to(device, dtype)
    output = model(
        hidden_states=packed,
        timestep=timesteps.to(device, dtype),
        encoder_hidden_states=hidden,
        txt_ids=torch.zeros(hidden.shape[1], 3, device=device, dtype=dtype),
        img_ids=FluxPipeline._prepare_latent_image_ids(size, height // 2, width // 2, device, dtype),
        return_dict=False,
        **inputs,
    )[0]
    return FluxPipeline._unpack_latents(output, height, width, 1)  # latent pixels: a factor of 1
