"""How a denoiser is conditioned on text: shared machinery that families pick from (a family chooses one in
`ModelFamily.conditioning`), computed exactly as the diffusers pipelines encode prompts, so an adapter is
trained on the embeddings it will meet at generation time.

- `TextConditioning` (SD 1.x / 2.x, `StableDiffusionPipeline.encode_prompt`): the text encoder's last hidden
  state, captions padded to the tokenizer's max length, an attention mask only where the encoder asks for one.
- `PooledSizeConditioning` (SDXL, `StableDiffusionXLPipeline.encode_prompt`): every encoder's penultimate
  hidden states, concatenated along the feature axis, plus the projecting encoder's pooled output
  (`text_embeds`). With it the UNet takes `time_ids`: (original height, width, crop top, left, target
  height, width) per image, SDXL's size and crop micro-conditioning.

What `encode` returns is what the text cache stores: "hidden" always, "pooled" where the family uses it.
torch is imported inside the methods: this package stays importable without it (see `base.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class TextConditioning:
    """The cross-attention context alone: one text encoder's last hidden state."""

    @property
    def cache_tag(self) -> str:
        """What, besides the encoders' weights and tokenizers, decides the embeddings (the text cache keys
        on it): nothing here; Flux's T5 length."""
        return ""

    def encode(
        self, tokenizers: Sequence[Any], encoders: Sequence[torch.nn.Module], captions: list[str]
    ) -> dict[str, torch.Tensor]:
        """captions -> {"hidden": [B, tokens, dim]}."""
        tokens = padded_tokens(tokenizers[0], captions)
        encoder = encoders[0]
        device = next(encoder.parameters()).device
        wants_mask = getattr(encoder.config, "use_attention_mask", False)
        mask = tokens.attention_mask.to(device) if wants_mask else None
        return {"hidden": encoder(tokens.input_ids.to(device), attention_mask=mask)[0]}

    def added_inputs(
        self, text: Mapping[str, torch.Tensor], batch: Mapping[str, Any]
    ) -> dict[str, torch.Tensor] | None:
        """The denoiser's `added_cond_kwargs` for one collated batch (None: it takes none)."""
        return None

    def probe_inputs(
        self, unet_config: Mapping[str, Any], batch: int, resolution: int, dtype: torch.dtype
    ) -> dict[str, torch.Tensor] | None:
        """Random `added_cond_kwargs` of the right shapes, to time a forward pass without real data."""
        return None

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
        """The denoiser's output for latents `noisy` [B, C, H, W] at `timesteps`, shaped like them, run in
        `dtype` on `device`. The UNet takes the hidden states and the added inputs; `guidance` is for
        guidance-distilled models."""
        added = self.added_inputs(text, batch)
        moved = {name: value.to(device, dtype) for name, value in added.items()} if added else None
        hidden = text["hidden"].to(device, dtype)
        return model(noisy.to(dtype), timesteps, hidden, added_cond_kwargs=moved).sample

    def probe(self, pipe: Any, model: torch.nn.Module, batch: int, resolution: int) -> Callable[[], Any]:
        """One forward of the denoiser at a run's batch and size with random inputs (the thread probe)."""
        import torch

        config = model.config
        side = resolution // int(pipe.vae_scale_factor)
        parameter = next(model.parameters())
        latents = torch.randn(batch, int(config.in_channels), side, side, dtype=parameter.dtype)
        tokens = int(pipe.tokenizer.model_max_length)
        hidden = torch.randn(batch, tokens, int(config.cross_attention_dim), dtype=parameter.dtype)
        timesteps = torch.full((batch,), 500, dtype=torch.long)
        added = self.probe_inputs(dict(config), batch, resolution, parameter.dtype)
        return lambda: model(latents, timesteps, hidden, added_cond_kwargs=added)


class PooledSizeConditioning(TextConditioning):
    """Hidden states of every encoder side by side, the pooled projection, and size/crop time ids."""

    def encode(
        self, tokenizers: Sequence[Any], encoders: Sequence[torch.nn.Module], captions: list[str]
    ) -> dict[str, torch.Tensor]:
        """captions -> {"hidden": [B, tokens, sum of dims], "pooled": [B, projection dim]}."""
        import torch

        hidden, pooled = [], None
        for tokenizer, encoder in zip(tokenizers, encoders, strict=True):
            ids = padded_tokens(tokenizer, captions).input_ids.to(next(encoder.parameters()).device)
            output = encoder(ids, output_hidden_states=True)
            if output[0].ndim == 2:  # the projected pooled output (CLIPTextModelWithProjection)
                pooled = output[0]
            hidden.append(output.hidden_states[-2])
        if pooled is None:
            raise ValueError("pooled text conditioning needs a text encoder with a projection")
        return {"hidden": torch.cat(hidden, dim=-1), "pooled": pooled}

    def added_inputs(
        self, text: Mapping[str, torch.Tensor], batch: Mapping[str, Any]
    ) -> dict[str, torch.Tensor] | None:
        return {"text_embeds": text["pooled"], "time_ids": time_ids(batch)}

    def probe_inputs(
        self, unet_config: Mapping[str, Any], batch: int, resolution: int, dtype: torch.dtype
    ) -> dict[str, torch.Tensor] | None:
        import torch

        time_width = 6 * int(unet_config["addition_time_embed_dim"])
        pooled = int(unet_config["projection_class_embeddings_input_dim"]) - time_width
        sizes = [[resolution, resolution, 0, 0, resolution, resolution]] * batch
        return {
            "text_embeds": torch.randn(batch, pooled, dtype=dtype),
            "time_ids": torch.tensor(sizes, dtype=dtype),
        }


def time_ids(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Size and crop micro-conditioning [B, 6] from a collated batch: (original_size, crop_top_left,
    target_size), each (height, width) / (top, left), as the SDXL pipeline builds it."""
    import torch

    parts = (batch["original_size"], batch["crop_top_left"], batch["target_size"])
    return torch.cat([part.reshape(-1, 2) for part in parts], dim=1).to(torch.float32)


def takes_size_conditioning(unet_config: Mapping[str, Any]) -> bool:
    """Whether a diffusers UNet config asks for pooled text embeddings and time ids."""
    return unet_config.get("addition_embed_type") == "text_time"


def padded_tokens(tokenizer: Any, captions: list[str], max_length: int | None = None) -> Any:
    """Padded to `max_length` (default: the tokenizer's max length) and truncated, as the pipelines
    tokenize prompts."""
    return tokenizer(
        captions,
        padding="max_length",
        max_length=max_length or tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )


def default_text_length(tokenizer: Any, pipeline_default: int) -> int:
    """The pipeline's default `max_sequence_length`, or the tokenizer's own length where it was saved
    shorter (a small model trained at that length): what generation reads unless told otherwise."""
    return min(pipeline_default, int(getattr(tokenizer, "model_max_length", pipeline_default)))


def checked_text_length(options: Mapping[str, Any], upper: int, model: str) -> int:
    """`options["max_sequence_length"]`, refused in one line outside what the model's encoder reads."""
    from difflora.errors import ConfigError

    tokens = int(options["max_sequence_length"])
    if not 1 <= tokens <= upper:
        raise ConfigError(f"--max-sequence-length {tokens}: {model} reads 1 to {upper} tokens.")
    return tokens
