"""Stable Diffusion 3 and 3.5 (Stability AI): a rectified-flow MMDiT over 2x2 patches of a 16-channel
autoencoder's latents, each joint block attending jointly over the image tokens and the text tokens; CLIP
ViT-L and OpenCLIP ViT-bigG (their penultimate hidden states side by side, zero-padded to T5's width, then
T5-XXL's hidden states after them along the sequence; their pooled projections concatenated) condition it.

Two families, as the files tell them apart: `sd3` is the plain MMDiT (SD3 medium, SD3.5 large and large
turbo: 24 or 38 joint blocks), `sd35-medium` is MMDiT-X (SD3.5 medium: its first 13 blocks add a second
image self-attention, `attn2`). Both load from a diffusers folder or from a single file in Stability's
layout (`joint_blocks.*`, `difflora.models.families.mmdit`), with the text encoders inside (ComfyUI's
`text_encoders.clip_l/clip_g/t5xxl.transformer.*`) or as files of their own (`--clip-l`, `--clip-g`, `--t5`).

Training follows diffusers' `train_dreambooth_lora_sd3.py`: σ drawn logit-normal (mean 0, std 1) and then
moved by the scheduler's constant shift (3.0), which is what that script does when it indexes the shifted
scheduler sigmas with a logit-normal u (`flow.py`'s `shift` sampling, without the 1000-step rounding); the
loss is unweighted on the velocity ε - x0; the transformer takes σ·1000, as the pipeline passes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from difflora.models.families import mmdit
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

# Joint attention of both streams: q/k/v/out of the image stream and of the text stream. The suffixes also
# match MMDiT-X's second image attention (`attn2.to_q`, ...) where a block has one.
SD3_ATTENTION: tuple[str, ...] = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
)
SD3_MLP: tuple[str, ...] = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length
T5_MAX_TOKENS = 512  # its upper bound
TIMESTEP_SCALE = 1000.0  # the scheduler's num_train_timesteps: the transformer takes σ·1000


class SD3(ModelFamily):
    name = "sd3"
    label = "Stable Diffusion 3 / 3.5 large"
    supported_as = "SD3 medium / SD3.5 large (MMDiT)"
    # ---- model side
    components = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
    denoiser = "transformer"
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    pipeline_class_name = "StableDiffusion3Pipeline"
    pipeline_has_safety_checker = False
    config_folder = "sd3.5-large"
    checkpoint_layout = "mmdit"
    checkpoint_encoder_names = ("CLIP ViT-L", "OpenCLIP ViT-bigG", "T5-XXL v1.1")
    default_prediction_type = "flow_matching"
    native_resolution = 1024
    default_unet_targets = SD3_ATTENTION
    mlp_targets = SD3_MLP
    # --train-text-encoder: both CLIPs (the reference script's); T5-XXL stays frozen and cached.
    trainable_text_encoders = ("text_encoder", "text_encoder_2")
    dual_attention: ClassVar[bool] = False
    """Whether some blocks have MMDiT-X's second image attention (SD3.5 medium)."""
    block_lists: ClassVar[dict[str, str]] = {"joint": "transformer_blocks"}
    edge_blocks: ClassVar[dict[str, str]] = {
        "pos_embed": "IN",
        "context_embedder": "IN",
        "time_text_embed": "IN",
        "norm_out": "OUT",
        "proj_out": "OUT",
    }
    swappable_blocks: ClassVar[tuple[str, ...]] = ("transformer_blocks",)
    single_file_parts: ClassVar[dict[str, tuple[str, ...]]] = {
        "text_encoder": ("text_encoders.clip_l.transformer.",),
        "text_encoder_2": ("text_encoders.clip_g.transformer.",),
        "text_encoder_3": ("text_encoders.t5xxl.transformer.",),
        "vae": ("first_stage_model.", "vae."),
    }
    part_options: ClassVar[dict[str, str]] = {
        "text_encoder": "clip_l",
        "text_encoder_2": "clip_g",
        "text_encoder_3": "t5",
        "vae": "vae",
    }
    single_file_encoders: ClassVar[dict[str, str]] = {
        "text_encoder": "clip-projection",
        "text_encoder_2": "clip-projection",
        "text_encoder_3": "t5",
    }

    def matches_model(self, unet: Mapping[str, Any], *, embedded: bool) -> bool:
        """An SD3Transformer2DModel config (any width or depth), with or without MMDiT-X's attention."""
        keys = {"caption_projection_dim", "pooled_projection_dim", "pos_embed_max_size", "num_layers"}
        is_sd3 = keys <= set(unet) and "num_mmdit_layers" not in unet  # AuraFlow shares some names
        return is_sd3 and bool(unet.get("dual_attention_layers")) == self.dual_attention

    def matches_transformer_file(self, keys: Collection[str]) -> bool:
        return mmdit.is_mmdit(keys)

    def matches_transformer_keys(self, keys: Collection[str]) -> bool:
        return mmdit.has_dual_attention(keys) == self.dual_attention

    def missing_transformer_keys(self, keys: Collection[str]) -> list[str]:
        return mmdit.missing_keys(keys)

    def build_transformer(self, state: Mapping[str, Any], shipped: Mapping[str, Any], dtype: Any) -> Any:
        return mmdit.build_transformer(state, shipped, dtype)

    def conditioning(
        self, unet: Mapping[str, Any], options: Mapping[str, Any] | None = None
    ) -> TextConditioning:
        return SD3Conditioning(int((options or {}).get("max_sequence_length", T5_TOKENS)))

    def generation_defaults(self, pipe: Any) -> dict[str, Any]:
        """T5 read at the pipeline's 256 tokens, or the tokenizer's own length where it was saved with less."""
        return {"max_sequence_length": default_text_length(pipe.tokenizer_3, T5_TOKENS)}

    def pipeline_arguments(
        self, options: Mapping[str, Any], *, negative_prompt: str, images: int
    ) -> dict[str, Any]:
        return {"max_sequence_length": checked_text_length(options, T5_MAX_TOKENS, "SD3's T5")}

    def prompt_embeddings(
        self, pipe: Any, prompt: str, negative_prompt: str, options: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The pipeline's own `encode_prompt`: the joint sequence and the pooled vector, the negative's too."""
        positive, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt,
            None,
            None,
            do_classifier_free_guidance=True,
            negative_prompt=negative_prompt or None,
            max_sequence_length=int(options["max_sequence_length"]),
        )
        return {
            "prompt_embeds": positive,
            "negative_prompt_embeds": negative,
            "pooled_prompt_embeds": pooled,
            "negative_pooled_prompt_embeds": negative_pooled,
        }

    def tokenizer_file(self, name: str) -> Path | None:
        """T5's tokenizer.json: the one shipped for Flux.1 (the same T5 v1.1 tokenizer)."""
        return T5_TOKENIZER_FILE if name == "tokenizer_3" else None

    def prediction_type_of(self, scheduler_config: Mapping[str, Any]) -> str:
        return self.default_prediction_type

    def native_pixels(self, pipe: Any) -> int:
        """StableDiffusion3Pipeline's default: the transformer's sample size times the autoencoder's factor."""
        return int(pipe.default_sample_size) * int(pipe.vae_scale_factor)

    def denoiser_downsamplings(self, denoiser_config: Mapping[str, Any]) -> int:
        """The patch: 2x2 latent pixels per token halve the latents once."""
        return int(math.log2(int(denoiser_config.get("patch_size", 2))))

    def flow_schedule(self, scheduler_config: Mapping[str, Any], sampling: Any) -> FlowSchedule:
        """Logit-normal σ moved by the scheduler's shift unless `--timestep-sampling` says otherwise."""
        chosen = sampling or TimestepSampling("shift", shift=float(scheduler_config.get("shift", 3.0)))
        return FlowSchedule.from_scheduler(scheduler_config, chosen)

    # ---- file layouts
    # kohya's `lora_te1_` (CLIP-L) and `lora_te2_` (CLIP-G), read as SDXL's two CLIPs are. Its T5 (kohya's
    # `lora_te3_`, which Flux.1 files use for their T5 too) is never trained here and not named.
    kohya_text_encoder_prefixes: ClassVar[dict[str, str]] = {
        "text_encoder": "lora_te1",
        "text_encoder_2": "lora_te2",
    }
    kohya_denoiser_layout = "mmdit"
    kohya_denoiser_aliases = ("lora_transformer",)  # OneTrainer's: diffusers paths flattened
    kohya_base_version = "sd3"
    kohya_network_module = "networks.lora_sd3"
    modelspec_states_prediction = False
    # kohya writes "sd3" for every SD3 / SD3.5 model: it does not say which family (medium's MMDiT-X or
    # the plain MMDiT), so a file is told apart by its ModelSpec architecture or its shapes instead.
    kohya_version_prefixes = ()
    # kohya's ModelSpec names: "stable-diffusion-3" followed by the variant ("-m", "-5-large", "-5-medium").
    modelspec_architecture = "stable-diffusion-3-5-large/lora"
    modelspec_prefixes = (
        "stable-diffusion-3-5-large",
        "stable-diffusion-3.5-large",
        "stable-diffusion-3-m",
        "stable-diffusion-3/",
    )
    modelspec_implementation = "https://github.com/Stability-AI/sd3.5"
    # ComfyUI maps every T5 Linear as `lora_te3_` (comfy/lora.py); A1111 loads no SD3 LoRA.
    consumer_encoder_prefixes: ClassVar[dict[str, tuple[str, ...]]] = {"text_encoder_3": ("lora_te3",)}
    consumers = ("comfyui", "diffusers")
    diffusers_converts_kohya = False  # SD3LoraLoaderMixin reads `transformer.` / `text_encoder*.` keys only


class SD35Medium(SD3):
    name = "sd35-medium"
    label = "Stable Diffusion 3.5 medium"
    supported_as = "SD3.5 medium (MMDiT-X)"
    config_folder = "sd3.5-medium"
    dual_attention = True
    modelspec_architecture = "stable-diffusion-3-5-medium/lora"
    modelspec_prefixes = ("stable-diffusion-3-5-medium", "stable-diffusion-3.5-medium")


class SD3Conditioning(TextConditioning):
    """`StableDiffusion3Pipeline.encode_prompt` restated for the text cache: CLIP-L's and CLIP-G's
    penultimate hidden states (77 tokens) side by side, zero-padded to T5's width, followed along the
    sequence by T5's last hidden state (`t5_tokens`); the pooled input is both CLIPs' projected pooled outputs
    side by side. The transformer takes the latents as they are (it patchifies itself) and σ·1000."""

    def __init__(self, t5_tokens: int = T5_TOKENS) -> None:
        self.t5_tokens = t5_tokens

    @property
    def cache_tag(self) -> str:
        return f"t5={self.t5_tokens}"

    def encode(
        self, tokenizers: Sequence[Any], encoders: Sequence[torch.nn.Module], captions: list[str]
    ) -> dict[str, torch.Tensor]:
        """captions -> {"hidden": [B, 77 + T5 tokens, T5 width], "pooled": [B, CLIP-L + CLIP-G widths]}."""
        import torch

        hidden, pooled = [], []
        for tokenizer, encoder in zip(tokenizers[:2], encoders[:2], strict=True):
            ids = padded_tokens(tokenizer, captions).input_ids.to(next(encoder.parameters()).device)
            output = encoder(ids, output_hidden_states=True)
            pooled.append(output[0])
            hidden.append(output.hidden_states[-2])
        t5 = encoders[2]
        ids = padded_tokens(tokenizers[2], captions, max_length=self.t5_tokens).input_ids
        t5_hidden = t5(ids.to(next(t5.parameters()).device))[0]
        clip = torch.cat(hidden, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5_hidden.shape[-1] - clip.shape[-1]))
        return {"hidden": torch.cat([clip, t5_hidden], dim=-2), "pooled": torch.cat(pooled, dim=-1)}

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
        """The velocity for latents [B, C, H, W]; `guidance` is unused (SD3 is not guidance-distilled)."""
        return model(
            hidden_states=noisy.to(device, dtype),
            timestep=(timesteps * TIMESTEP_SCALE).to(device, dtype),
            encoder_hidden_states=text["hidden"].to(device, dtype),
            pooled_projections=text["pooled"].to(device, dtype),
            return_dict=False,
        )[0]

    def probe(self, pipe: Any, model: torch.nn.Module, batch: int, resolution: int) -> Callable[[], Any]:
        import torch

        parameter = next(model.parameters())
        config = model.config
        side = 2 * (resolution // (2 * int(pipe.vae_scale_factor)))
        latents = torch.randn(batch, int(config.in_channels), side, side)
        text = {
            "hidden": torch.randn(batch, 77 + self.t5_tokens, int(config.joint_attention_dim)),
            "pooled": torch.randn(batch, int(config.pooled_projection_dim)),
        }
        sigmas = torch.full((batch,), 0.5)
        device, dtype = parameter.device, parameter.dtype
        return lambda: self.predict(
            model, latents, sigmas, text, {}, device=device, dtype=dtype, guidance=1.0
        )
