"""Qwen-Image's single files, as ComfyUI users have them, loaded with no network: the transformer (Comfy-Org's
`qwen_image_*.safetensors`: diffusers' own module names, with or without `model.diffusion_model.`), the
Qwen2.5-VL text encoder (`qwen_2.5_vl_7b*.safetensors`: `model.*` for the language model, `visual.*` for the
vision tower, the layout of the original checkpoint before transformers 5 nested both under `model.`) and the
autoencoder (`qwen_image_vae.safetensors`: Wan 2.1's original layout, converted by diffusers' own
`convert_wan_vae_to_diffusers`, which AutoencoderKLQwenImage shares module for module).

Every configuration is the shipped one with each width, depth and count the weights hold read from them, so a
reduced model (the tests') loads as the full one does; a tensor left unplaced or a weight missing is an error.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from difflora.errors import ModelError

logger = logging.getLogger(__name__)

PREFIX = "model.diffusion_model."
BLOCKS = "transformer_blocks."
TEXT_HEAD_WIDTH = 128  # Qwen2.5-VL 7B's attention heads (3584 / 28); no tensor's shape says it
VISION_HEAD_WIDTH = 80  # its vision tower's (1280 / 16)


def _count(keys: Any, marker: str) -> int:
    indices = {int(k[k.index(marker) + len(marker) :].split(".")[0]) for k in keys if marker in k}
    return max(indices) + 1 if indices else 0


def _settings(shipped: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in shipped.items() if not k.startswith("_")}


def transformer_config(shapes: Mapping[str, tuple[int, ...]], shipped: Mapping[str, Any]) -> dict[str, Any]:
    """QwenImageTransformer2DModel's config from a transformer file's shapes (prefix stripped) over the
    shipped one, which gives the patch and the rotary axes (whose widths must add up to a head's)."""
    inner, in_channels = shapes["img_in.weight"]
    head = shapes[BLOCKS + "0.attn.norm_q.weight"][0]
    patch = int(shipped.get("patch_size", 2))
    axes = list(shipped["axes_dims_rope"])
    if sum(axes) != head:
        raise ModelError(f"the transformer's {head}-wide heads do not fit Qwen-Image's rotary axes {axes}.")
    return {
        **_settings(shipped),
        "in_channels": in_channels,
        "out_channels": shapes["proj_out.weight"][0] // (patch * patch),
        "num_layers": _count(shapes, BLOCKS),
        "attention_head_dim": head,
        "num_attention_heads": inner // head,
        "joint_attention_dim": shapes["txt_in.weight"][1],
    }


def build_transformer(state: Mapping[str, Any], shipped: Mapping[str, Any], dtype: Any) -> Any:
    """The shipped config's QwenImageTransformer2DModel holding a transformer file's weights, in `dtype`."""
    import diffusers

    prefixed = any(key.startswith(PREFIX) for key in state)
    stripped = {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)} if prefixed else state
    config = transformer_config({k: tuple(v.shape) for k, v in stripped.items()}, shipped)
    model = _empty(lambda: getattr(diffusers, shipped["_class_name"]).from_config(config))
    return load_all(model, dict(stripped), "Qwen-Image transformer", dtype)


def text_encoder(state: Mapping[str, torch.Tensor], folder_config: Mapping[str, Any], dtype: Any) -> Any:
    """Qwen2_5_VLForConditionalGeneration from a ComfyUI text-encoder file: `model.*` is the language model,
    `visual.*` the vision tower; the language-model head, which ComfyUI's files leave out and text encoding
    never reads, shares the token embedding where absent (as a tied checkpoint does)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(**_encoder_config(state, folder_config))
    model = _empty(lambda: Qwen2_5_VLForConditionalGeneration(config))
    renamed = {_encoder_key(key): value for key, value in state.items()}
    if "lm_head.weight" not in renamed:
        logger.debug("the text encoder file has no lm_head: tied to the token embedding")
        renamed["lm_head.weight"] = renamed["model.language_model.embed_tokens.weight"]
    return load_all(model, renamed, "Qwen2.5-VL text encoder", dtype)


def _encoder_key(key: str) -> str:
    if key.startswith("model.language_model.") or key.startswith("model.visual."):
        return key  # already transformers 5's layout
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model."):
        return "model.language_model." + key[len("model.") :]
    return key


def _encoder_config(state: Mapping[str, torch.Tensor], shipped: Mapping[str, Any]) -> dict[str, Any]:
    """The shipped Qwen2.5-VL config with the language model's and vision tower's sizes read from the file."""
    keys = {_encoder_key(k): v for k, v in state.items()}
    if "model.language_model.embed_tokens.weight" not in keys:
        raise ModelError("the text encoder file has no model.embed_tokens: it is not a Qwen2.5-VL file.")
    vocab, hidden = keys["model.language_model.embed_tokens.weight"].shape
    layer = "model.language_model.layers.0."
    text = dict(shipped["text_config"]) | {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": _count(keys, "model.language_model.layers."),
        "intermediate_size": keys[layer + "mlp.gate_proj.weight"].shape[0],
        "num_attention_heads": hidden // TEXT_HEAD_WIDTH,
        "num_key_value_heads": keys[layer + "self_attn.k_proj.weight"].shape[0] // TEXT_HEAD_WIDTH,
    }
    text["max_window_layers"] = text["num_hidden_layers"]
    if "model.visual.patch_embed.proj.weight" not in keys:
        raise ModelError(
            "the text encoder file has no vision tower (visual.*): pass the whole Qwen2.5-VL file "
            "(ComfyUI's qwen_2.5_vl_7b.safetensors)."
        )
    depth = _count(keys, "model.visual.blocks.")
    width = keys["model.visual.patch_embed.proj.weight"].shape[0]
    vision = dict(shipped["vision_config"]) | {
        "depth": depth,
        "hidden_size": width,
        "num_heads": width // VISION_HEAD_WIDTH,
        "intermediate_size": keys["model.visual.blocks.0.mlp.gate_proj.weight"].shape[0],
        "out_hidden_size": keys["model.visual.merger.mlp.2.weight"].shape[0],
        "fullatt_block_indexes": [i for i in shipped["vision_config"]["fullatt_block_indexes"] if i < depth],
    }
    return {k: v for k, v in shipped.items() if not k.startswith("_")} | {
        "text_config": text,
        "vision_config": vision,
    }


def vae(state: Mapping[str, torch.Tensor], shipped: Mapping[str, Any], dtype: Any) -> Any:
    """AutoencoderKLQwenImage from Wan 2.1's original layout (the width and latent channels read from it)."""
    import diffusers
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    if "encoder.conv1.weight" not in state:
        raise ModelError("the autoencoder file has no encoder.conv1: it is not Qwen-Image's (Wan 2.1) VAE.")
    settings = _settings(shipped) | {
        "base_dim": state["encoder.conv1.weight"].shape[0],
        "z_dim": state["conv2.weight"].shape[0],
    }
    model = _empty(lambda: getattr(diffusers, shipped["_class_name"]).from_config(settings))
    return load_all(model, convert_wan_vae_to_diffusers(dict(state)), "Qwen-Image autoencoder", dtype)


def _empty(build: Any) -> Any:
    """Built without allocating its weights (`load_all` assigns the file's)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return build()


def load_all(model: torch.nn.Module, state: dict[str, Any], what: str, dtype: Any) -> Any:
    """Every parameter and buffer from `state`, in `dtype`: one missing or one unplaced is an error."""
    result = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    missing = list(result.missing_keys) + [k for k, v in model.named_parameters() if v.is_meta]
    if missing or result.unexpected_keys:
        named = sorted(set(missing or result.unexpected_keys))[:3]
        raise ModelError(
            f"The {what} weights do not fit its architecture ({'missing' if missing else 'unexpected'}: "
            f"{', '.join(named)}): pass the matching file."
        )
    for name, buffer in model.named_buffers():
        if buffer.is_meta:  # rotary tables and the like, computed at construction
            raise ModelError(f"The {what} has an unset buffer {name}: report this as a difflora bug.")
    return model.eval()
