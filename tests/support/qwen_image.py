"""A reduced Qwen-Image built in-process: the real configurations (difflora's shipped ones) at reduced width and
depth, since a CPU test cannot hold the real 7 B Qwen2.5-VL text encoder or the 20 B transformer. Kept real:
128-wide attention heads with the (16, 56, 56) rotary axes, the 2x2 patch and 16 latent channels, the text
encoder's full 152,064-token vocabulary (the shipped tokenizer's ids reach 151,664), its grouped-query
attention, multimodal rotary sections and biased q/k/v, a vision tower of the real kind, and the autoencoder's
levels and causal 3D convolutions. Reduced: 2 transformer blocks of 2 heads, 2 text layers 256 wide (2 heads,
1 key/value head), 1 vision block, an autoencoder 8 channels wide at its first level.

`write_qwen_files` writes it as ComfyUI users' single files: the transformer with ComfyUI's
`model.diffusion_model.` prefix, the text encoder in the original Qwen2.5-VL layout (`model.*`, `visual.*`,
no `lm_head`, as ComfyUI's files), and the autoencoder in Wan 2.1's original layout, that layout restated here
independently of diffusers' converter (`wan_layout`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from difflora.models.families import family

TEXT_WIDTH = 256
VAE_WIDTH = 8


def _shipped(component: str) -> dict[str, Any]:
    folder = family("qwen-image").config_dir()
    assert folder is not None
    return json.loads((folder / component / "config.json").read_text())


def tiny_transformer(seed: int = 0) -> Any:
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    config = {k: v for k, v in _shipped("transformer").items() if not k.startswith("_")}
    config |= {"num_layers": 2, "num_attention_heads": 2, "joint_attention_dim": TEXT_WIDTH}
    return QwenImageTransformer2DModel(**config).eval()


def tiny_text_encoder(seed: int = 0) -> Any:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    shipped = _shipped("text_encoder")
    text = shipped["text_config"] | {
        "hidden_size": TEXT_WIDTH,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_window_layers": 2,
    }
    vision = shipped["vision_config"] | {
        "depth": 1,
        "hidden_size": 160,
        "num_heads": 2,
        "intermediate_size": 64,
        "out_hidden_size": TEXT_WIDTH,
        "fullatt_block_indexes": [],
    }
    settings = {k: v for k, v in shipped.items() if k not in ("architectures", "model_type")}
    config = Qwen2_5_VLConfig(**settings | {"text_config": text, "vision_config": vision})
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_vae(seed: int = 0) -> Any:
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    config = {k: v for k, v in _shipped("vae").items() if not k.startswith("_")}
    return AutoencoderKLQwenImage(**config | {"base_dim": VAE_WIDTH}).eval()


def tiny_qwen_pipeline(seed: int = 0) -> Any:
    """The reduced model as a QwenImagePipeline with the shipped tokenizer and scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    known = family("qwen-image")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(_shipped_scheduler())
    return QwenImagePipeline(
        scheduler=scheduler,
        vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder(seed + 1),
        tokenizer=known.own_tokenizer("tokenizer"),
        transformer=tiny_transformer(seed + 2),
    )


def _shipped_scheduler() -> dict[str, Any]:
    folder = family("qwen-image").config_dir()
    assert folder is not None
    return json.loads((folder / "scheduler" / "scheduler_config.json").read_text())


def comfy_text_encoder_state(encoder: Any) -> dict[str, torch.Tensor]:
    """The encoder as ComfyUI's Qwen2.5-VL files hold it: `model.*` (language model), `visual.*`, no head."""
    state = {}
    for key, value in encoder.state_dict().items():
        if key.startswith("model.language_model."):
            state["model." + key[len("model.language_model.") :]] = value
        elif key.startswith("model.visual."):
            state[key[len("model.") :]] = value
    return state


def wan_layout(vae_state: dict[str, torch.Tensor], res_blocks: int = 2) -> dict[str, torch.Tensor]:
    """AutoencoderKLQwenImage's tensors under Wan 2.1's original names (its `encoder.downsamples.N`, flat
    `decoder.upsamples.N` with an upsampler after each level's res blocks but the last, `residual.0/2/3/6`
    for norm1/conv1/norm2/conv2, `middle.0/1/2`, `head.0/2`, `conv1`/`conv2` for the quant convolutions)."""
    renames = {
        ".norm1.": ".residual.0.",
        ".conv1.": ".residual.2.",
        ".norm2.": ".residual.3.",
        ".conv2.": ".residual.6.",
        ".conv_shortcut.": ".shortcut.",
    }
    out = {}
    for key, value in vae_state.items():
        name = key
        for side in ("encoder", "decoder"):
            name = name.replace(f"{side}.conv_in.", f"{side}.conv1.")
            name = name.replace(f"{side}.norm_out.", f"{side}.head.0.")
            name = name.replace(f"{side}.conv_out.", f"{side}.head.2.")
            name = name.replace(f"{side}.mid_block.attentions.0.", f"{side}.middle.1.")
            name = name.replace(f"{side}.mid_block.resnets.0.", f"{side}.middle.0.")
            name = name.replace(f"{side}.mid_block.resnets.1.", f"{side}.middle.2.")
        name = name.replace("encoder.down_blocks.", "encoder.downsamples.")
        if name.startswith("decoder.up_blocks."):
            name = _flat_upsample(name, res_blocks)
        for old, new in (("quant_conv.", "conv1."), ("post_quant_conv.", "conv2.")):
            if name.startswith(old):
                name = new + name[len(old) :]
        if ".residual." not in name and (
            ".downsamples." in name or ".upsamples." in name or ".middle." in name
        ):
            for old, new in renames.items():
                name = name.replace(old, new)
        out[name] = value
    return out


def _flat_upsample(name: str, res_blocks: int) -> str:
    """`decoder.up_blocks.B.resnets.R.*` / `.upsamplers.0.*` -> `decoder.upsamples.N.*`: each level holds
    res_blocks + 1 res blocks and then its upsampler."""
    parts = name.split(".")
    level, kind = int(parts[2]), parts[3]
    per_level = res_blocks + 2  # res blocks and the upsampler
    index = level * per_level + (int(parts[4]) if kind == "resnets" else res_blocks + 1)
    return ".".join(["decoder", "upsamples", str(index), *parts[5:]])


def write_qwen_files(pipe: Any, folder: Path) -> dict[str, Path]:
    """The pipeline's transformer, text encoder and autoencoder as ComfyUI users' single files."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    states = {
        "transformer": {"model.diffusion_model." + k: v for k, v in pipe.transformer.state_dict().items()},
        "text_encoder": comfy_text_encoder_state(pipe.text_encoder),
        "vae": wan_layout(pipe.vae.state_dict()),
    }
    paths = {}
    for name, state in states.items():
        paths[name] = folder / f"qwen_image_{name}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(paths[name]))
    return paths
