"""Captions -> the conditioning the UNet takes, computed exactly as the diffusers pipelines encode prompts,
so an adapter is trained on the embeddings it will meet at generation time.

- SD 1.x / 2.x (`StableDiffusionPipeline.encode_prompt`): the text encoder's last hidden state, captions
  padded to the tokenizer's max length, an attention mask only where the encoder asks for one.
- SDXL (`StableDiffusionXLPipeline.encode_prompt`): both encoders' penultimate hidden states, concatenated
  along the feature axis, plus the second encoder's pooled, projected output (`text_embeds`). With it the
  UNet takes `time_ids`: (original height, width, crop top, left, target height, width) per image.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

TextEncode = Callable[[list[str]], dict[str, torch.Tensor]]
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # SD1/SD2 have the first, SDXL both
TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}


def pipeline_text_encoders(pipe: Any) -> tuple[list[Any], dict[str, torch.nn.Module]]:
    """The pipeline's tokenizers and text encoders, in the order its encode_prompt uses them."""
    names = [name for name in TEXT_ENCODERS if getattr(pipe, name, None) is not None]
    return [getattr(pipe, TOKENIZERS[name]) for name in names], {name: getattr(pipe, name) for name in names}


def caption_encoder(tokenizers: Sequence[Any], encoders: Sequence[torch.nn.Module]) -> TextEncode:
    """captions -> {"hidden": [B, tokens, dim]} (+ "pooled": [B, dim] with two encoders, SDXL)."""
    if len(encoders) == 1:
        return lambda captions: {"hidden": _last_hidden(tokenizers[0], encoders[0], captions)}

    def encode(captions: list[str]) -> dict[str, torch.Tensor]:
        hidden, pooled = [], None
        for tokenizer, encoder in zip(tokenizers, encoders, strict=True):
            output = encoder(_token_ids(tokenizer, captions, encoder), output_hidden_states=True)
            if output[0].ndim == 2:  # the projected pooled output (CLIPTextModelWithProjection)
                pooled = output[0]
            hidden.append(output.hidden_states[-2])
        if pooled is None:
            raise ValueError("SDXL conditioning needs a text encoder with a projection (text_encoder_2)")
        return {"hidden": torch.cat(hidden, dim=-1), "pooled": pooled}

    return encode


def _tokens(tokenizer: Any, captions: list[str]) -> Any:
    """Padded to the tokenizer's max length and truncated, as the pipelines tokenize prompts."""
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )


def _token_ids(tokenizer: Any, captions: list[str], encoder: torch.nn.Module) -> torch.Tensor:
    return _tokens(tokenizer, captions).input_ids.to(next(encoder.parameters()).device)


def _last_hidden(tokenizer: Any, encoder: torch.nn.Module, captions: list[str]) -> torch.Tensor:
    tokens = _tokens(tokenizer, captions)
    device = next(encoder.parameters()).device
    mask = tokens.attention_mask.to(device) if getattr(encoder.config, "use_attention_mask", False) else None
    return encoder(tokens.input_ids.to(device), attention_mask=mask)[0]


def time_ids(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """SDXL's size and crop micro-conditioning [B, 6] from a collated batch: (original_size,
    crop_top_left, target_size), each (height, width) / (top, left), as the SDXL pipeline builds it."""
    parts = (batch["original_size"], batch["crop_top_left"], batch["target_size"])
    return torch.cat([part.reshape(-1, 2) for part in parts], dim=1).to(torch.float32)


def unet_conditioning(
    text: Mapping[str, torch.Tensor], batch: Mapping[str, Any], *, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """(encoder_hidden_states, added_cond_kwargs) for one batch: the second is None outside SDXL."""
    hidden = text["hidden"].to(device, dtype)
    if "pooled" not in text:
        return hidden, None
    added = {"text_embeds": text["pooled"].to(device, dtype), "time_ids": time_ids(batch).to(device, dtype)}
    return hidden, added
