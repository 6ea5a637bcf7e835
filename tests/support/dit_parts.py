"""Parts the tiny DiT pipelines of the tests share (Flux, Chroma, SD3): a 1-layer T5 with T5's real
vocabulary and the tokenizer difflora ships for it, a 2-level autoencoder (a 2x factor: 32-px images, 16x16
latents) with a family's shift and scale factors, and a family's shipped scheduler config. Each builder
calls them where it built the part before, so the seeded weights stay the same."""

from __future__ import annotations

import json
from typing import Any

from difflora.models.architecture import config_folder
from difflora.models.families.base import T5_TOKENIZER_FILE


def tiny_t5(width: int, head_width: int = 8) -> Any:
    """A 1-layer gated-GELU T5 encoder of `width`, 4 heads of `head_width`, with T5's 32,128-token vocabulary."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=32128,
            d_model=width,
            d_kv=head_width,
            d_ff=64,
            num_layers=1,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
        )
    )


def t5_tokenizer(max_tokens: int) -> Any:
    """The T5 v1.1 tokenizer difflora ships, reading at most `max_tokens`."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast(
        tokenizer_file=str(T5_TOKENIZER_FILE),
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_ids=100,
        model_max_length=max_tokens,
    )


def tiny_autoencoder(latent_channels: int, shift: float, scale: float) -> Any:
    """A 2-level AutoencoderKL without quant convs (as Flux's and SD3's), 32 groups (a file's group count is
    in no tensor's shape)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 32),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=32,
        sample_size=32,
        shift_factor=shift,
        scaling_factor=scale,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def shipped_scheduler(family: str) -> Any:
    """The FlowMatchEulerDiscreteScheduler of the config difflora ships for `family`'s folder."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = config_folder(family) / "scheduler" / "scheduler_config.json"
    return FlowMatchEulerDiscreteScheduler.from_config(json.loads(config.read_text()))
