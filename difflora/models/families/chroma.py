"""Chroma (lodestones): an 8.9 B rectified-flow transformer derived from Flux.1 schnell, trained openly. It
keeps Flux's double-stream and single-stream blocks, its 2x2-packed latents of the same 16-channel
autoencoder and its rotary positions, so it reuses Flux's machinery (`flux.py`, `flow.py`, BFL's file
layout and `difflora.formats.flux_names`). What differs from Flux, and where it is handled:

- No guidance input and no CLIP: there is no `guidance_in` and no `vector_in` (CLIP's pooled output), and
  T5-XXL v1.1 is the only text encoder, the pipeline's `text_encoder` / `tokenizer` (Flux's second ones).
  `--clip-l` is refused (`part_options` has no `clip_l`).
- Distilled modulation: Flux computes every block's scale/shift/gate from the timestep embedding with a
  Linear per block (`img_mod.lin`, `txt_mod.lin`, `modulation.lin`, `final_layer.adaLN_modulation`);
  Chroma prunes them all and computes every modulation vector at once with one small MLP, the
  approximator `distilled_guidance_layer.*` (in_proj, 5 residual layers of in_layer/out_layer with RMS
  norms, out_proj; 64 -> 5120 -> 3072), fed the timestep and a per-vector index embedding. A file is told
  apart from Flux's by that module (`distilled_guidance_layer.in_proj`, as diffusers' single-file
  detection does), a diffusers folder by its `approximator_*` config.
- T5 with its attention mask: `ChromaPipeline` encodes with T5's padding mask and masks the padded text
  tokens in the transformer's joint attention, all but the first pad (`ChromaConditioning`); Flux encodes
  and attends unmasked. The text cache keeps the mask beside the hidden states.
- Real classifier-free guidance: Chroma is not guidance-distilled; the pipeline runs the negative prompt
  at `guidance_scale` (5 by default, difflora's `--guidance` default too), no `true_cfg`.
- Scheduler: the shipped one (`architectures/chroma1-hd/`) has FLUX.1-dev's settings, shift 3.0 with
  dynamic shifting between 0.5 and 1.15 (as typed in for Chroma1-HD; its README says what is unchecked),
  unlike schnell's unshifted one; `ChromaPipeline` computes the shift μ from the image's token count, so
  training draws σ shifted by the same μ (`flux-shift`) and trains where it samples.
- Default resolution 1024 px (`ChromaPipeline.default_sample_size` 128 latent pixels x 8).
- Targets: Flux's attention and MLP presets; the pruned modulation Linears do not exist, and the
  approximator is trained only with `all-linear`.
- Files: kohya/ComfyUI names are Flux's original layout with Flux's exact fused-q/k/v conversion, the
  approximator by its original names (`lora_unet_distilled_guidance_layer_layers_0_in_layer`); ComfyUI's
  Chroma model class subclasses its Flux one, so its Flux key map applies, which gives no diffusers name to
  the approximator. diffusers' `ChromaPipeline` loads `transformer.*` PEFT keys (FluxLoraLoaderMixin).
  The metadata written (`ss_base_model_version` "chroma", ModelSpec "chroma/lora") is difflora's choice;
  an attention-only file without it has Flux.1's names and shapes and is read as Flux.1's.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from difflora.models.families.base import T5_TOKENIZER_FILE
from difflora.models.families.conditioning import (
    TextConditioning,
    checked_text_length,
    default_text_length,
    padded_tokens,
)
from difflora.models.families.flux import BFL_DISTILLED, T5_MAX_TOKENS, FluxSchnell, packed_prediction

if TYPE_CHECKING:
    import torch

APPROXIMATOR = "distilled_guidance_layer."
REQUIRED = ("img_in.weight", "txt_in.weight", APPROXIMATOR + "in_proj.weight", "final_layer.linear.weight")


class Chroma(FluxSchnell):
    name = "chroma"
    label = "Chroma"
    # ---- model side
    components = ("transformer", "text_encoder")
    text_encoders = ("text_encoder",)
    pipeline_class_name = "ChromaPipeline"
    config_folder = "chroma1-hd"
    checkpoint_encoder_names = ("T5-XXL v1.1",)
    trainable_text_encoders = ()  # T5-XXL stays frozen and cached, as for Flux
    default_timestep_sampling = "flux-shift"
    edge_blocks: ClassVar[dict[str, str]] = {
        "x_embedder": "IN",
        "context_embedder": "IN",
        "distilled_guidance_layer": "IN",
        "norm_out": "OUT",
        "proj_out": "OUT",
    }
    text_encoder_blocks: ClassVar[dict[str, str]] = {"text_encoder": "T5"}
    single_file_parts: ClassVar[dict[str, tuple[str, ...]]] = {
        "text_encoder": ("text_encoders.t5xxl.transformer.",),
        "vae": ("vae.", "first_stage_model."),
    }
    part_options: ClassVar[dict[str, str]] = {"text_encoder": "t5", "vae": "vae"}
    single_file_encoders: ClassVar[dict[str, str]] = {"text_encoder": "t5"}

    def matches_model(self, unet: Mapping[str, Any], *, embedded: bool) -> bool:
        """A ChromaTransformer2DModel config (any width or depth): it has the approximator's settings."""
        return "approximator_layers" in unet and "num_single_layers" in unet

    def matches_transformer_file(self, keys: Collection[str]) -> bool:
        """A file with the approximator (diffusers' `CHECKPOINT_KEY_NAMES["chroma"]` test); BFL's Flux files
        have none, and Flux does not claim a file that has one."""
        return any(key.startswith(BFL_DISTILLED) for key in keys)

    def matches_transformer_keys(self, keys: Collection[str]) -> bool:
        return True

    def missing_transformer_keys(self, keys: Collection[str]) -> list[str]:
        from difflora.models.bfl_file import strip_prefix

        stripped = strip_prefix(dict.fromkeys(keys))
        return [key for key in REQUIRED if key not in stripped]

    def build_transformer(self, state: Mapping[str, Any], shipped: Mapping[str, Any], dtype: Any) -> Any:
        from difflora.models.families.chroma_file import build_transformer

        return build_transformer(state, shipped, dtype)

    def conditioning(
        self, unet: Mapping[str, Any], options: Mapping[str, Any] | None = None
    ) -> TextConditioning:
        return ChromaConditioning(int((options or {}).get("max_sequence_length", T5_MAX_TOKENS)))

    def generation_defaults(self, pipe: Any) -> dict[str, Any]:
        """T5 read at ChromaPipeline's 512 tokens, or the tokenizer's own length where it was saved shorter."""
        return {"max_sequence_length": default_text_length(pipe.tokenizer, T5_MAX_TOKENS)}

    def pipeline_arguments(
        self, options: Mapping[str, Any], *, negative_prompt: str, images: int
    ) -> dict[str, Any]:
        return {"max_sequence_length": checked_text_length(options, T5_MAX_TOKENS, "Chroma's T5")}

    def prompt_embeddings(
        self, pipe: Any, prompt: str, negative_prompt: str, options: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The pipeline's own `encode_prompt`: T5's states and attention masks, the negative's too."""
        positive, _, mask, negative, _, negative_mask = pipe.encode_prompt(
            prompt,
            negative_prompt or "",
            do_classifier_free_guidance=True,
            max_sequence_length=int(options["max_sequence_length"]),
        )
        return {
            "prompt_embeds": positive,
            "prompt_attention_mask": mask,
            "negative_prompt_embeds": negative,
            "negative_prompt_attention_mask": negative_mask,
        }

    def tokenizer_file(self, name: str) -> Path | None:
        """T5's tokenizer.json: the one shipped for Flux.1 (the same T5 v1.1 tokenizer)."""
        return T5_TOKENIZER_FILE if name == "tokenizer" else None

    # ---- file layouts
    # Only the transformer trains: no text-encoder prefixes are written (T5 is never trained here).
    kohya_text_encoder_prefixes: ClassVar[dict[str, str]] = {}
    consumer_encoder_prefixes: ClassVar[dict[str, tuple[str, ...]]] = {}
    kohya_base_version = "chroma"
    kohya_version_prefixes = ("chroma",)
    modelspec_architecture = "chroma/lora"
    modelspec_prefixes = ("chroma",)
    modelspec_implementation = "https://huggingface.co/lodestones/Chroma"
    # ComfyUI loads Chroma LoRAs by BFL names (its Flux key map); diffusers' ChromaPipeline by its own.
    consumers = ("comfyui", "diffusers")


class ChromaConditioning(TextConditioning):
    """`ChromaPipeline._get_t5_prompt_embeds` restated for the text cache: T5's last hidden state computed
    with the tokenizer's padding mask, and the transformer's text mask (every real token and the first pad,
    1; the other pads, 0). The transformer takes the packed latents with their position ids, zero text ids,
    σ, and the text mask extended with ones over the image tokens (`_prepare_attention_mask`)."""

    def __init__(self, t5_tokens: int = T5_MAX_TOKENS) -> None:
        self.t5_tokens = t5_tokens

    @property
    def cache_tag(self) -> str:
        return f"t5={self.t5_tokens},masked"

    def encode(
        self, tokenizers: Sequence[Any], encoders: Sequence[torch.nn.Module], captions: list[str]
    ) -> dict[str, torch.Tensor]:
        """captions -> {"hidden": [B, T5 tokens, T5 width], "mask": [B, T5 tokens] (float 0/1)}."""
        import torch

        t5 = encoders[0]
        device = next(t5.parameters()).device
        tokens = padded_tokens(tokenizers[0], captions, max_length=self.t5_tokens)
        padding = tokens.attention_mask.to(device)
        hidden = t5(tokens.input_ids.to(device), output_hidden_states=False, attention_mask=padding)[0]
        positions = torch.arange(padding.shape[1], device=device).unsqueeze(0)
        mask = (positions <= padding.sum(dim=1, keepdim=True)).to(hidden.dtype)
        return {"hidden": hidden, "mask": mask}

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
        """The velocity for latents [B, C, H, W]; `guidance` is unused (Chroma takes no guidance input)."""
        import torch

        size, _, height, width = noisy.shape
        image = torch.ones(size, (height // 2) * (width // 2), device=device, dtype=dtype)  # its 2x2 patches
        return packed_prediction(
            model,
            noisy,
            timesteps,
            text["hidden"],
            device=device,
            dtype=dtype,
            attention_mask=torch.cat([text["mask"].to(device, dtype), image], dim=1),
        )

    def probe(self, pipe: Any, model: torch.nn.Module, batch: int, resolution: int) -> Callable[[], Any]:
        import torch

        parameter = next(model.parameters())
        side = 2 * (resolution // (2 * int(pipe.vae_scale_factor)))
        latents = torch.randn(batch, int(pipe.vae.config.latent_channels), side, side)
        width = int(model.config.joint_attention_dim)
        text = {
            "hidden": torch.randn(batch, self.t5_tokens, width),
            "mask": torch.ones(batch, self.t5_tokens),
        }
        sigmas = torch.full((batch,), 0.5)
        device, dtype = parameter.device, parameter.dtype
        return lambda: self.predict(
            model, latents, sigmas, text, {}, device=device, dtype=dtype, guidance=1.0
        )
