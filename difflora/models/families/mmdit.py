"""Stability AI's single-file MMDiT layout (SD3, SD3.5): a transformer of `joint_blocks.N.{x_block,
context_block}.*` (with or without ComfyUI's `model.diffusion_model.` prefix), loaded as diffusers'
SD3Transformer2DModel with no network, its configuration read from the weights, never assumed: block count,
width, latent channels, patch size, positional table, MMDiT-X's second attention (`x_block.attn2`, SD3.5
medium's first 13 blocks) and the q/k RMS norms SD3.5 added.

The key map is diffusers' own `convert_sd3_transformer_checkpoint_to_diffusers`, which reads every width from
the tensors (reduced test models convert as full ones do); what it leaves unplaced is an error here.
torch and diffusers are imported inside the functions: the family package stays importable without them.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from difflora.errors import ModelError

PREFIX = "model.diffusion_model."
JOINT = "joint_blocks."
REQUIRED = (
    "x_embedder.proj.weight",
    "pos_embed",
    "context_embedder.weight",
    "t_embedder.mlp.0.weight",
    "y_embedder.mlp.0.weight",
    "final_layer.linear.weight",
)
HEAD_WIDTH = 64
"""SD3's attention heads: 64 wide in every released model (the head count is in no unnormed tensor's shape;
where q/k norms exist their width says it)."""


def strip_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """The transformer's tensors without ComfyUI's prefix (other components' keys dropped)."""
    if any(key.startswith(PREFIX) for key in state):
        return {key[len(PREFIX) :]: value for key, value in state.items() if key.startswith(PREFIX)}
    return dict(state)


def is_mmdit(keys: Collection[str]) -> bool:
    return any(key.startswith((JOINT, PREFIX + JOINT)) for key in keys)


def has_dual_attention(keys: Collection[str]) -> bool:
    """MMDiT-X (SD3.5 medium): some blocks' image stream has a second self-attention, `x_block.attn2`."""
    return any(".x_block.attn2." in key for key in keys if key.startswith((JOINT, PREFIX + JOINT)))


def missing_keys(keys: Collection[str]) -> list[str]:
    stripped = strip_prefix(dict.fromkeys(keys))
    return [key for key in REQUIRED if key not in stripped]


def _blocks(keys: Collection[str]) -> int:
    indices = {int(key.split(".")[1]) for key in keys if key.startswith(JOINT)}
    return max(indices) + 1 if indices else 0


def transformer_config(shapes: Mapping[str, tuple[int, ...]], shipped: Mapping[str, Any]) -> dict[str, Any]:
    """SD3Transformer2DModel's config from an MMDiT file's tensor shapes (prefix stripped), over the shipped
    config (which supplies only the sample size)."""
    missing = [key for key in REQUIRED if key not in shapes]
    if missing:
        raise ModelError(
            f"the transformer file lacks {', '.join(missing)}: it is not a complete SD3 transformer. Pass the "
            "full file (sd3.5_medium.safetensors) or a diffusers folder."
        )
    hidden, in_channels, patch = shapes["x_embedder.proj.weight"][:3]
    norm = shapes.get("joint_blocks.0.x_block.attn.ln_q.weight")
    head = norm[0] if norm else HEAD_WIDTH
    blocks = _blocks(shapes)
    positions = shapes["pos_embed"][1]
    side = round(positions**0.5)
    if side * side != positions:
        raise ModelError(f"the transformer's pos_embed holds {positions} positions, not a square table.")
    return {
        **{k: v for k, v in shipped.items() if not k.startswith("_")},
        "patch_size": patch,
        "in_channels": in_channels,
        "out_channels": shapes["final_layer.linear.weight"][0] // (patch * patch),
        "num_layers": blocks,
        "attention_head_dim": head,
        "num_attention_heads": hidden // head,
        "joint_attention_dim": shapes["context_embedder.weight"][1],
        "caption_projection_dim": shapes["context_embedder.weight"][0],
        "pooled_projection_dim": shapes["y_embedder.mlp.0.weight"][1],
        "pos_embed_max_size": side,
        "dual_attention_layers": sorted(
            {int(key.split(".")[1]) for key in shapes if key.startswith(JOINT) and ".x_block.attn2." in key}
        ),
        "qk_norm": "rms_norm" if norm else None,
    }


def build_transformer(state: Mapping[str, Any], shipped: Mapping[str, Any], dtype: Any) -> Any:
    """The shipped config's SD3Transformer2DModel holding an MMDiT file's weights, cast to `dtype` (fp8
    files are upcast); a tensor left unplaced or a weight missing is an error."""
    import diffusers
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    stripped = strip_prefix(state)
    config = transformer_config({k: tuple(v.shape) for k, v in stripped.items()}, shipped)
    source = dict(stripped)  # the converter pops what it places: what is left was not placed
    converted = convert_sd3_transformer_checkpoint_to_diffusers(source)
    if source:
        raise ModelError(
            f"the transformer file has keys no SD3 transformer holds: {', '.join(sorted(source)[:3])}"
        )
    with init_empty_weights():
        model = getattr(diffusers, shipped["_class_name"]).from_config(config)
    try:
        model.load_state_dict({k: v.to(dtype) for k, v in converted.items()}, strict=True, assign=True)
    except RuntimeError as error:
        first = str(error).splitlines()[1:2] or [str(error)]
        raise ModelError(f"the SD3 transformer's weights do not fit its layout: {first[0].strip()}") from None
    return model  # every tensor came from the file, already in dtype
