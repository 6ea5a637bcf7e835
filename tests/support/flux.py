"""A tiny random Flux.1 pipeline built in-process (1 double + 1 single block of one 128-wide head, a 1-layer
CLIP and T5 at width 32 with the real vocabularies, an autoencoder of `latent_channels` channels and a 2x
factor), and writers of the single files ComfyUI users hold: the BFL transformer (with an independent key
map, diffusers -> BFL, written here from BFL's own module names rather than by inverting difflora's), the
CLIP-L and T5 files (Hugging Face names) and the autoencoder in its original layout."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.support.dit_parts import shipped_scheduler, t5_tokenizer, tiny_autoencoder, tiny_t5

WIDTH = 32  # the text encoders'
SHIFT, SCALE = 0.1159, 0.3611  # Flux's autoencoder factors


def tiny_flux_pipeline(
    *, guidance: bool = True, latent_channels: int = 4, seed: int = 0, max_tokens: int = 512
):
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
    )

    from difflora.models.single_file import VOCAB_DIR

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=128,
        num_attention_heads=1,
        joint_attention_dim=WIDTH,
        pooled_projection_dim=WIDTH,
        guidance_embeds=guidance,
    )
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=WIDTH,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=1,  # what a file's shapes imply for a 32-wide CLIP (64-wide heads, at least 1)
            max_position_embeddings=77,
            projection_dim=WIDTH,
        )
    )
    t5 = tiny_t5(WIDTH)
    vae = tiny_autoencoder(latent_channels, SHIFT, SCALE)
    scheduler = shipped_scheduler("flux")
    tokenizer = CLIPTokenizer(
        str(VOCAB_DIR / "vocab.json"),
        str(VOCAB_DIR / "merges.txt"),
        pad_token="<|endoftext|>",
        model_max_length=77,
    )
    tokenizer_2 = t5_tokenizer(max_tokens)
    pipe = FluxPipeline(scheduler, vae, clip, tokenizer, t5, tokenizer_2, transformer)
    pipe.default_sample_size = 16  # 32-px images with the 2x autoencoder
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------- BFL writer


def bfl_transformer_state(transformer) -> dict[str, torch.Tensor]:
    """diffusers FluxTransformer2DModel -> BFL names: for each BFL tensor, where it comes from."""
    sd = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    out: dict[str, torch.Tensor] = {}

    def both(bfl: str, diffusers: str) -> None:
        for suffix in ("weight", "bias"):
            if f"{diffusers}.{suffix}" in sd:
                out[f"{bfl}.{suffix}"] = sd[f"{diffusers}.{suffix}"]

    both("img_in", "x_embedder")
    both("txt_in", "context_embedder")
    both("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
    both("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
    both("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
    both("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
    both("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
    both("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")
    both("final_layer.linear", "proj_out")
    for suffix in ("weight", "bias"):  # BFL holds (shift, scale); diffusers (scale, shift)
        scale, shift = sd[f"norm_out.linear.{suffix}"].chunk(2)
        out[f"final_layer.adaLN_modulation.1.{suffix}"] = torch.cat([shift, scale])
    for i in range(transformer.config.num_layers):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for stream, mod, attn_out, q, k, v, nq, nk, mlp in (
            ("img", "norm1", "to_out.0", "to_q", "to_k", "to_v", "norm_q", "norm_k", "ff"),
            (
                "txt",
                "norm1_context",
                "to_add_out",
                "add_q_proj",
                "add_k_proj",
                "add_v_proj",
                "norm_added_q",
                "norm_added_k",
                "ff_context",
            ),
        ):
            both(f"{b}{stream}_mod.lin", f"{d}{mod}.linear")
            both(f"{b}{stream}_attn.proj", f"{d}attn.{attn_out}")
            both(f"{b}{stream}_mlp.0", f"{d}{mlp}.net.0.proj")
            both(f"{b}{stream}_mlp.2", f"{d}{mlp}.net.2")
            out[f"{b}{stream}_attn.norm.query_norm.scale"] = sd[f"{d}attn.{nq}.weight"]
            out[f"{b}{stream}_attn.norm.key_norm.scale"] = sd[f"{d}attn.{nk}.weight"]
            for suffix in ("weight", "bias"):
                out[f"{b}{stream}_attn.qkv.{suffix}"] = torch.cat(
                    [sd[f"{d}attn.{n}.{suffix}"] for n in (q, k, v)]
                )
    for i in range(transformer.config.num_single_layers):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        both(f"{b}modulation.lin", f"{d}norm.linear")
        both(f"{b}linear2", f"{d}proj_out")
        out[f"{b}norm.query_norm.scale"] = sd[f"{d}attn.norm_q.weight"]
        out[f"{b}norm.key_norm.scale"] = sd[f"{d}attn.norm_k.weight"]
        for suffix in ("weight", "bias"):
            parts = [sd[f"{d}attn.to_{n}.{suffix}"] for n in "qkv"] + [sd[f"{d}proj_mlp.{suffix}"]]
            out[f"{b}linear1.{suffix}"] = torch.cat(parts)
    return out


# The original autoencoder layout, from diffusers names (a 2-level encoder and decoder, one resnet each).
_VAE_RULES = [
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_([qkv])\.", r"\1.mid.attn_1.\2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.", r"\1.mid.attn_1.proj_out."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
]


def ldm_vae_state(vae) -> dict[str, torch.Tensor]:
    levels = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        name = key
        up = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.", name)
        if up:  # the decoder's levels are numbered from the bottom in the original layout
            level = levels - 1 - int(up.group(1))
            kind = f"block.{up.group(3)}" if up.group(2) == "resnets" else "upsample"
            name = f"decoder.up.{level}.{kind}." + name[up.end() :]
        for pattern, repl in _VAE_RULES:
            name = re.sub(pattern, repl, name)
        if ".mid.attn_1." in name and name.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # 1x1 convolutions there
        out[name] = value.detach().clone()
    return out


def write_flux_files(pipe, folder: Path, *, prefix: bool = False, dtype=torch.bfloat16) -> dict[str, Path]:
    """The transformer (BFL layout, optionally with ComfyUI's prefix) and separate CLIP-L, T5, VAE files."""
    folder.mkdir(parents=True, exist_ok=True)
    head = "model.diffusion_model." if prefix else ""
    transformer = {
        head + k: v.to(dtype).contiguous() for k, v in bfl_transformer_state(pipe.transformer).items()
    }
    t5 = {k: v for k, v in pipe.text_encoder_2.state_dict().items() if k != "encoder.embed_tokens.weight"}
    files = {
        "model": (transformer, "flux1.safetensors"),
        "clip_l": (pipe.text_encoder.state_dict(), "clip_l.safetensors"),
        "t5": (t5, "t5xxl.safetensors"),
        "vae": (ldm_vae_state(pipe.vae), "ae.safetensors"),
    }
    paths = {}
    for name, (state, filename) in files.items():
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / filename))
        paths[name] = folder / filename
    return paths
