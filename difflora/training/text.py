"""Captions -> the conditioning the denoiser takes, as its family encodes it (`ModelFamily.conditioning`:
what is encoded, what the text cache keeps, what goes beside the hidden states), so that nothing here
knows which family a model is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from difflora.models.families.conditioning import TextConditioning
from difflora.models.identity import model_identity

TextEncode = Callable[[list[str]], dict[str, torch.Tensor]]
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")  # the components that may hold one
TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2", "text_encoder_3": "tokenizer_3"}


def pipeline_text_encoders(pipe: Any) -> tuple[list[Any], dict[str, torch.nn.Module]]:
    """The pipeline's tokenizers and text encoders, in the order its encode_prompt uses them."""
    names = [name for name in TEXT_ENCODERS if getattr(pipe, name, None) is not None]
    return [getattr(pipe, TOKENIZERS[name]) for name in names], {name: getattr(pipe, name) for name in names}


def pipeline_conditioning(pipe: Any) -> TextConditioning:
    """How the pipeline's denoiser is conditioned on text, as its family says, encoding at the lengths
    generation uses (the model's generation options: Flux's T5 `max_sequence_length`)."""
    family = model_identity(pipe).model_family
    options = family.generation_options(pipe, {})
    return family.conditioning(dict(family.denoiser_of(pipe).config), options)


def caption_encoder(
    conditioning: TextConditioning, tokenizers: Sequence[Any], encoders: Sequence[torch.nn.Module]
) -> TextEncode:
    """captions -> {"hidden": [B, tokens, dim]} (+ what else the family's conditioning uses)."""
    return lambda captions: conditioning.encode(tokenizers, encoders, captions)
