"""Tiny kwargs-built Stable Diffusion components (no hub, no embedded model needed).

`tiny_pipeline()` builds a real StableDiffusionPipeline from small diffusers/transformers modules with a
small byte-level BPE vocabulary written at test time, so unit tests exercise the real code paths in well
under a second. End-to-end tests use the embedded model instead (difflora.embedded.EMBEDDED_MODEL_DIR).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_TOKENS = 16
TINY_HIDDEN = 32


def _byte_vocab() -> dict[str, int]:
    """CLIP's byte-to-unicode alphabet, each char alone and with the end-of-word marker, plus specials."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}


def write_tiny_tokenizer(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(_byte_vocab()))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return directory


def tiny_tokenizer(directory: Path):
    from transformers import CLIPTokenizer

    write_tiny_tokenizer(directory)
    return CLIPTokenizer(
        str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=TINY_TOKENS
    )


def tiny_unet(seed: int = 0, cross_attention_dim: int = TINY_HIDDEN):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def tiny_text_encoder(seed: int = 0, vocab_size: int = 514, *, projection: bool = False):
    """A 2-layer CLIP text encoder; `projection` gives SDXL's second encoder (pooled, projected output)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TINY_TOKENS,
        projection_dim=TINY_HIDDEN,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )


def tiny_pipeline(tmp_path: Path, seed: int = 0):
    """A complete StableDiffusionPipeline of tiny random modules (16x16 images, 8x8 latents)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder(seed),
        tokenizer=tiny_tokenizer(tmp_path / "tokenizer"),
        unet=tiny_unet(seed),
        scheduler=EulerDiscreteScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(tmp_path: Path, seed: int = 0):
    """A complete StableDiffusionXLPipeline of tiny random modules: two text encoders (the second with a
    projection, whose pooled output conditions the UNet with the size/crop time ids), 16x16 images."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * TINY_HIDDEN,  # both encoders' hidden states, concatenated
        attention_head_dim=8,
        norm_num_groups=8,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=TINY_HIDDEN + 6 * 8,  # pooled text + 6 time ids
    )
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder(seed),
        text_encoder_2=tiny_text_encoder(seed, projection=True),
        tokenizer=tiny_tokenizer(tmp_path / "tokenizer"),
        tokenizer_2=tiny_tokenizer(tmp_path / "tokenizer_2"),
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1
        ),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
