"""A reduced random SD3 / SD3.5 pipeline built in-process (2 joint blocks of two 64-wide heads, the real
head width; MMDiT-X's second attention in block 0 for SD3.5 medium; q/k RMS norms as SD3.5; 1-layer CLIP-L,
CLIP-G and T5 with the real vocabularies; a 16-channel autoencoder with a 2x factor), and writers of the
single files ComfyUI users hold: the transformer in Stability's MMDiT layout (an independent key map,
diffusers -> MMDiT, written here from Stability's module names rather than by inverting diffusers'), as an
all-in-one file with the text encoders and autoencoder inside, or transformer-only beside separate CLIP-L,
CLIP-G, T5 and autoencoder files."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.support.dit_parts import shipped_scheduler, t5_tokenizer, tiny_autoencoder, tiny_t5
from tests.support.flux import ldm_vae_state

CLIP_WIDTH, T5_WIDTH = 32, 64
SHIFT, SCALE = 0.0609, 1.5305  # SD3's autoencoder factors


def tiny_sd3_pipeline(*, medium: bool = True, seed: int = 0, max_tokens: int = 32):
    """`medium`: MMDiT-X (SD3.5 medium) with attn2 in block 0; else the plain MMDiT (SD3.5 large)."""
    from diffusers import (
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    from difflora.models.single_file import VOCAB_DIR

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=64,
        num_attention_heads=2,
        joint_attention_dim=T5_WIDTH,
        caption_projection_dim=128,
        pooled_projection_dim=2 * CLIP_WIDTH,
        out_channels=16,
        pos_embed_max_size=16,
        dual_attention_layers=(0,) if medium else (),
        qk_norm="rms_norm",
    )

    def clip(act: str) -> CLIPTextModelWithProjection:
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=CLIP_WIDTH,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=1,  # what a file's shapes imply for a 32-wide CLIP (64-wide heads, >= 1)
                max_position_embeddings=77,
                projection_dim=CLIP_WIDTH,
                hidden_act=act,
            )
        )

    clip_l, clip_g = clip("quick_gelu"), clip("gelu")
    t5 = tiny_t5(T5_WIDTH, head_width=16)
    vae = tiny_autoencoder(16, SHIFT, SCALE)
    scheduler = shipped_scheduler("sd35-medium")
    vocab = (str(VOCAB_DIR / "vocab.json"), str(VOCAB_DIR / "merges.txt"))
    tokenizer = CLIPTokenizer(*vocab, pad_token="<|endoftext|>", model_max_length=77)
    tokenizer_2 = CLIPTokenizer(*vocab, pad_token="!", model_max_length=77)
    tokenizer_3 = t5_tokenizer(max_tokens)
    pipe = StableDiffusion3Pipeline(
        transformer, scheduler, vae, clip_l, tokenizer, clip_g, tokenizer_2, t5, tokenizer_3
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------------- MMDiT writer


def _swap(tensor: torch.Tensor) -> torch.Tensor:
    """diffusers' continuous AdaLayerNorm holds (scale, shift); Stability's modulation (shift, scale)."""
    scale, shift = tensor.chunk(2)
    return torch.cat([shift, scale])


def mmdit_state(transformer) -> dict[str, torch.Tensor]:
    """diffusers SD3Transformer2DModel -> Stability's MMDiT names: for each MMDiT tensor, where it comes from."""
    sd = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    out: dict[str, torch.Tensor] = {"pos_embed": sd["pos_embed.pos_embed"]}

    def both(mmdit: str, diffusers: str, change=lambda t: t) -> None:
        for suffix in ("weight", "bias"):
            if f"{diffusers}.{suffix}" in sd:
                out[f"{mmdit}.{suffix}"] = change(sd[f"{diffusers}.{suffix}"])

    def qkv(mmdit: str, diffusers: list[str]) -> None:
        for suffix in ("weight", "bias"):
            out[f"{mmdit}.{suffix}"] = torch.cat([sd[f"{name}.{suffix}"] for name in diffusers])

    both("x_embedder.proj", "pos_embed.proj")
    both("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1")
    both("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2")
    both("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1")
    both("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2")
    both("context_embedder", "context_embedder")
    both("final_layer.linear", "proj_out")
    both("final_layer.adaLN_modulation.1", "norm_out.linear", _swap)
    last = transformer.config.num_layers - 1
    for i in range(transformer.config.num_layers):
        d, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        qkv(f"{x}attn.qkv", [f"{d}attn.to_{n}" for n in "qkv"])
        qkv(f"{c}attn.qkv", [f"{d}attn.add_{n}_proj" for n in "qkv"])
        out[f"{x}attn.ln_q.weight"], out[f"{x}attn.ln_k.weight"] = (
            sd[f"{d}attn.norm_q.weight"],
            sd[f"{d}attn.norm_k.weight"],
        )
        out[f"{c}attn.ln_q.weight"] = sd[f"{d}attn.norm_added_q.weight"]
        out[f"{c}attn.ln_k.weight"] = sd[f"{d}attn.norm_added_k.weight"]
        both(f"{x}attn.proj", f"{d}attn.to_out.0")
        both(f"{c}attn.proj", f"{d}attn.to_add_out")  # absent in the last block (context pre-only)
        if f"{d}attn2.to_q.weight" in sd:
            qkv(f"{x}attn2.qkv", [f"{d}attn2.to_{n}" for n in "qkv"])
            out[f"{x}attn2.ln_q.weight"] = sd[f"{d}attn2.norm_q.weight"]
            out[f"{x}attn2.ln_k.weight"] = sd[f"{d}attn2.norm_k.weight"]
            both(f"{x}attn2.proj", f"{d}attn2.to_out.0")
        both(f"{x}adaLN_modulation.1", f"{d}norm1.linear")
        both(f"{c}adaLN_modulation.1", f"{d}norm1_context.linear", _swap if i == last else lambda t: t)
        both(f"{x}mlp.fc1", f"{d}ff.net.0.proj")
        both(f"{x}mlp.fc2", f"{d}ff.net.2")
        both(f"{c}mlp.fc1", f"{d}ff_context.net.0.proj")
        both(f"{c}mlp.fc2", f"{d}ff_context.net.2")
    return out


def _clip_file_state(encoder) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection's tensors in Hugging Face's names (`text_model.*`, `text_projection`)."""
    return {k: v for k, v in encoder.state_dict().items() if not k.endswith("position_ids")}


def _t5_file_state(encoder) -> dict[str, torch.Tensor]:
    return {k: v for k, v in encoder.state_dict().items() if k != "encoder.embed_tokens.weight"}


def write_sd3_files(pipe, folder: Path, *, dtype=torch.bfloat16) -> dict[str, Path]:
    """The transformer-only file (no prefix) and separate CLIP-L, CLIP-G, T5 and autoencoder files."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "model": ({k: v.to(dtype) for k, v in mmdit_state(pipe.transformer).items()}, "sd3.5.safetensors"),
        "clip_l": (_clip_file_state(pipe.text_encoder), "clip_l.safetensors"),
        "clip_g": (_clip_file_state(pipe.text_encoder_2), "clip_g.safetensors"),
        "t5": (_t5_file_state(pipe.text_encoder_3), "t5xxl.safetensors"),
        "vae": (ldm_vae_state(pipe.vae), "vae.safetensors"),
    }
    paths = {}
    for name, (state, filename) in files.items():
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / filename))
        paths[name] = folder / filename
    return paths


def write_sd3_all_in_one(pipe, path: Path) -> Path:
    """Stability's all-in-one layout: `model.diffusion_model.*`, `text_encoders.{clip_l,clip_g,t5xxl}.
    transformer.*` and `first_stage_model.*` in one file, in the pipeline's dtype."""
    state = {"model.diffusion_model." + k: v for k, v in mmdit_state(pipe.transformer).items()}
    for name, encoder, read in (
        ("clip_l", pipe.text_encoder, _clip_file_state),
        ("clip_g", pipe.text_encoder_2, _clip_file_state),
        ("t5xxl", pipe.text_encoder_3, _t5_file_state),
    ):
        state |= {f"text_encoders.{name}.transformer.{k}": v for k, v in read(encoder).items()}
    state |= {"first_stage_model." + k: v for k, v in ldm_vae_state(pipe.vae).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path
