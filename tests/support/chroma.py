"""A tiny random Chroma pipeline built in-process and writers of the single files ComfyUI users hold.

The transformer has Chroma's real configuration at reduced depth and width: 1 double + 1 single block of
one 128-wide head (the real head width, so the real rotary axes 16/56/56 apply), the real approximator
input (64 channels) and depth (5 layers) at a reduced hidden width of 32 (the real 5120 and 3072-wide blocks
would take gigabytes on a CPU test machine). T5 is a 1-layer, 32-wide encoder with the real vocabulary and
tokenizer; the autoencoder is 2-level (a 2x factor). The BFL writer is an independent key map, written from
the original module names (ComfyUI's `comfy/ldm/chroma/model.py` and `layers.py`: `double_blocks.N.img_attn.qkv`,
`single_blocks.N.linear1`, `distilled_guidance_layer.layers.N.in_layer`, `.norms.N.scale`, ...), never by
inverting difflora's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.support.dit_parts import shipped_scheduler, t5_tokenizer, tiny_autoencoder, tiny_t5
from tests.support.flux import SCALE, SHIFT, WIDTH, ldm_vae_state

APPROXIMATOR_WIDTH = 32  # reduced from Chroma's 5120


def tiny_chroma_transformer(*, latent_channels: int = 4, seed: int = 0):
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(seed)
    return ChromaTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=128,
        num_attention_heads=1,
        joint_attention_dim=WIDTH,
        axes_dims_rope=(16, 56, 56),
        approximator_num_channels=64,
        approximator_hidden_dim=APPROXIMATOR_WIDTH,
        approximator_layers=5,
    )


def tiny_chroma_pipeline(*, latent_channels: int = 4, seed: int = 0, max_tokens: int = 512):
    from diffusers import ChromaPipeline

    transformer = tiny_chroma_transformer(latent_channels=latent_channels, seed=seed)
    t5 = tiny_t5(WIDTH)
    vae = tiny_autoencoder(latent_channels, SHIFT, SCALE)
    scheduler = shipped_scheduler("chroma")
    tokenizer = t5_tokenizer(max_tokens)
    pipe = ChromaPipeline(scheduler, vae, t5, tokenizer, transformer)
    pipe.default_sample_size = 16  # 32-px images with the 2x autoencoder
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bfl_chroma_state(transformer) -> dict[str, torch.Tensor]:
    """diffusers ChromaTransformer2DModel -> Chroma's original names: for each tensor, where it comes from."""
    sd = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    out: dict[str, torch.Tensor] = {}

    def both(original: str, diffusers: str) -> None:
        for suffix in ("weight", "bias"):
            out[f"{original}.{suffix}"] = sd.pop(f"{diffusers}.{suffix}")

    both("img_in", "x_embedder")
    both("txt_in", "context_embedder")
    both("final_layer.linear", "proj_out")
    g = "distilled_guidance_layer"
    both(f"{g}.in_proj", f"{g}.in_proj")
    both(f"{g}.out_proj", f"{g}.out_proj")
    for i in range(transformer.config.approximator_layers):
        both(f"{g}.layers.{i}.in_layer", f"{g}.layers.{i}.linear_1")
        both(f"{g}.layers.{i}.out_layer", f"{g}.layers.{i}.linear_2")
        out[f"{g}.norms.{i}.scale"] = sd.pop(f"{g}.norms.{i}.weight")
    for i in range(transformer.config.num_layers):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        streams = (
            ("img", "to_out.0", ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"), "ff"),
            (
                "txt",
                "to_add_out",
                ("add_q_proj", "add_k_proj", "add_v_proj"),
                ("norm_added_q", "norm_added_k"),
                "ff_context",
            ),
        )
        for stream, attn_out, qkv, norms, mlp in streams:
            both(f"{b}{stream}_attn.proj", f"{d}attn.{attn_out}")
            both(f"{b}{stream}_mlp.0", f"{d}{mlp}.net.0.proj")
            both(f"{b}{stream}_mlp.2", f"{d}{mlp}.net.2")
            out[f"{b}{stream}_attn.norm.query_norm.scale"] = sd.pop(f"{d}attn.{norms[0]}.weight")
            out[f"{b}{stream}_attn.norm.key_norm.scale"] = sd.pop(f"{d}attn.{norms[1]}.weight")
            for suffix in ("weight", "bias"):
                out[f"{b}{stream}_attn.qkv.{suffix}"] = torch.cat(
                    [sd.pop(f"{d}attn.{n}.{suffix}") for n in qkv]
                )
    for i in range(transformer.config.num_single_layers):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        both(f"{b}linear2", f"{d}proj_out")
        out[f"{b}norm.query_norm.scale"] = sd.pop(f"{d}attn.norm_q.weight")
        out[f"{b}norm.key_norm.scale"] = sd.pop(f"{d}attn.norm_k.weight")
        for suffix in ("weight", "bias"):
            parts = [sd.pop(f"{d}attn.to_{n}.{suffix}") for n in "qkv"] + [sd.pop(f"{d}proj_mlp.{suffix}")]
            out[f"{b}linear1.{suffix}"] = torch.cat(parts)
    assert not sd, f"diffusers tensors the writer did not place: {sorted(sd)[:3]}"
    return out


def write_chroma_files(pipe, folder: Path, *, prefix: bool = False, dtype=torch.bfloat16) -> dict[str, Path]:
    """The transformer (original layout, optionally with ComfyUI's prefix) and separate T5 and VAE files."""
    folder.mkdir(parents=True, exist_ok=True)
    head = "model.diffusion_model." if prefix else ""
    transformer = {head + k: v.to(dtype) for k, v in bfl_chroma_state(pipe.transformer).items()}
    t5 = {k: v for k, v in pipe.text_encoder.state_dict().items() if k != "encoder.embed_tokens.weight"}
    files = {
        "model": (transformer, "chroma.safetensors"),
        "t5": (t5, "t5xxl.safetensors"),
        "vae": (ldm_vae_state(pipe.vae), "ae.safetensors"),
    }
    paths = {}
    for name, (state, filename) in files.items():
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / filename))
        paths[name] = folder / filename
    return paths
