"""Real-architecture SD 1.5, SD 2.1 and SDXL base checkpoints in the original single-file layout (ldm for SD
1.x/2.x, sgm for SDXL), with random weights: what a user downloads, without downloading anything.

The key list and every shape come from the real configs (difflora's shipped diffusers configs, models built
on the meta device) through this module's own diffusers -> original name mapping:
- UNet `model.diffusion_model.`: block paths from `difflora.formats.naming.sgm_module_names` (the table
  kohya/SGM export uses, built by walking the UNet), so a loaded file also checks that table.
- VAE `first_stage_model.`: `encoder.down.i.block.j`, `decoder.up.i` in reversed order, `mid.block_1/2`,
  `mid.attn_1.{norm,q,k,v,proj_out}` as 1x1 convolutions, `nin_shortcut`, `norm_out`.
- CLIP ViT-L: `cond_stage_model.transformer.text_model.` (SD 1.x) or `conditioner.embedders.0.transformer.
  text_model.` (SDXL): the HF layout under ldm's wrapper.
- OpenCLIP: `cond_stage_model.model.` (SD 2.x) or `conditioner.embedders.1.model.` (SDXL):
  `transformer.resblocks.i.{ln_1,attn.in_proj_*,attn.out_proj,ln_2,mlp.c_fc,mlp.c_proj}`, q/k/v fused,
  `positional_embedding`, `token_embedding`, `ln_final`, `text_projection` stored transposed.
Real files also hold tensors nobody loads (SD 2.x's 24th OpenCLIP block and projection, CLIP's
`position_ids`, ldm's noise-schedule buffers, OpenCLIP's `logit_scale`); they are written too, as entries
with no component.

Tensors are generated and written one at a time (RAM stays near the largest tensor, not the file): weights
normal / sqrt(fan_in), norm weights 1 + 0.01 * normal, biases 0.01 * normal. The last two differ from the
usual ones and zeros on purpose: a norm or bias loaded from the wrong key must not go unnoticed.
"""

from __future__ import annotations

import json
import math
import re
import struct
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from difflora.formats.naming import sgm_module_names
from difflora.formats.reference import reference_model
from difflora.models.architecture import config_folder

Family = Literal["sd1", "sd2", "sdxl"]
Layout = Literal["same", "conv1x1", "transposed", "fused"]

_ENCODERS: dict[str, dict[str, tuple[str, str]]] = {  # family -> component -> (kind, prefix)
    "sd1": {"text_encoder": ("clip", "cond_stage_model.transformer.")},
    "sd2": {"text_encoder": ("openclip", "cond_stage_model.model.")},
    "sdxl": {
        "text_encoder": ("clip", "conditioner.embedders.0.transformer."),
        "text_encoder_2": ("openclip", "conditioner.embedders.1.model."),
    },
}
_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64"}


@dataclass(frozen=True)
class Entry:
    """One tensor of the file: its original key, the diffusers parameters it holds (several for OpenCLIP's
    fused q, k, v) and how they are laid out. `component` is "" for tensors no diffusers model loads."""

    key: str
    component: str
    params: tuple[str, ...]
    shape: tuple[int, ...]
    layout: Layout = "same"
    integer: bool = False


def original_tensor(entry: Entry, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The tensor `entry` holds in the file, rebuilt from the diffusers parameters `params` (by name)."""
    tensors = [params[name] for name in entry.params]
    if entry.layout == "fused":
        return torch.cat(tensors, dim=0)
    if entry.layout == "conv1x1":
        return tensors[0][:, :, None, None]
    if entry.layout == "transposed":
        return tensors[0].T
    return tensors[0]


# ------------------------------------------------------------------------------------------ the key list


def checkpoint_entries(family: Family) -> list[Entry]:
    """Every tensor of a `family` checkpoint in the original layout, in file order."""
    entries = _unet_entries(reference_model(family, "unet"))
    entries += _vae_entries(_meta_vae(family))
    for component, (kind, prefix) in _ENCODERS[family].items():
        model = reference_model(family, component)
        if kind == "clip":
            entries += _clip_entries(model, component, prefix)
        else:
            entries += _openclip_entries(model, component, prefix, dropped_layers=int(family == "sd2"))
    if family != "sdxl":  # ldm's LatentDiffusion keeps its noise schedule in the state dict; sgm does not
        entries += [
            Entry(name, "", (), (1000,)) for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev")
        ]
    return entries


def _unet_entries(unet: nn.Module) -> list[Entry]:
    names = [name for name, _ in unet.named_parameters()]
    modules = sorted({name.rpartition(".")[0] for name in names})
    original = sgm_module_names(unet, modules)
    shapes = dict(_shapes(unet))
    return [
        Entry(f"model.diffusion_model.{original[module]}.{leaf}", "unet", (name,), shapes[name])
        for name in names
        for module, _, leaf in [name.rpartition(".")]
    ]


def _meta_vae(family: Family) -> nn.Module:
    from diffusers import AutoencoderKL

    config = json.loads((config_folder(family) / "vae" / "config.json").read_text())
    with torch.device("meta"):
        return AutoencoderKL.from_config(config)


_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_key(name: str, up_blocks: int) -> str:
    """The ldm VAE name of diffusers VAE parameter `name` (ldm numbers decoder levels from the bottom)."""
    side, _, rest = name.partition(".")
    if match := re.fullmatch(
        r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", rest
    ):
        kind, level, part, index, tail = match.groups()
        level = str(up_blocks - 1 - int(level)) if kind == "up" else level
        if part == "resnets":
            return f"{side}.{kind}.{level}.block.{index}.{_vae_resnet(tail)}"
        return f"{side}.{kind}.{level}.{'downsample' if kind == 'down' else 'upsample'}.{tail}"
    if match := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", rest):
        return f"{side}.mid.block_{int(match[1]) + 1}.{_vae_resnet(match[2])}"
    if match := re.fullmatch(r"mid_block\.attentions\.0\.(.+)\.(weight|bias)", rest):
        return f"{side}.mid.attn_1.{_VAE_ATTENTION[match[1]]}.{match[2]}"
    if rest.startswith("conv_norm_out."):
        return f"{side}.norm_out.{rest.partition('.')[2]}"
    return name  # conv_in, conv_out, quant_conv, post_quant_conv keep their names


def _vae_resnet(tail: str) -> str:
    layer, _, leaf = tail.partition(".")
    return f"{'nin_shortcut' if layer == 'conv_shortcut' else layer}.{leaf}"


def _vae_entries(vae: nn.Module) -> list[Entry]:
    up_blocks = len(vae.decoder.up_blocks)
    entries = []
    for name, shape in _shapes(vae):
        key = _vae_key(name, up_blocks)
        # ldm's VAE attention projections are 1x1 convolutions where diffusers has linear layers
        conv = ".mid.attn_1." in key and len(shape) == 2
        entries.append(Entry(f"first_stage_model.{key}", "vae", (name,), (*shape, 1, 1) if conv else shape,
                             "conv1x1" if conv else "same"))  # fmt: skip
    return entries


def _clip_entries(model: nn.Module, component: str, prefix: str) -> list[Entry]:
    """The HF CLIP layout under ldm's wrapper, with its `text_model.` level (which transformers 5 dropped
    from CLIPTextModel's own names)."""
    entries = [
        Entry(f"{prefix}text_model.{name.removeprefix('text_model.')}", component, (name,), shape)
        for name, shape in _shapes(model)
    ]
    positions = model.config.max_position_embeddings
    entries.append(Entry(f"{prefix}text_model.embeddings.position_ids", "", (), (1, positions), integer=True))
    return entries


_OPENCLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def _openclip_entries(model: nn.Module, component: str, prefix: str, *, dropped_layers: int) -> list[Entry]:
    """OpenCLIP's own names. `dropped_layers`: blocks the real file holds beyond the HF model (SD 2.x's
    text encoder uses the penultimate layer, so diffusers drops the last of OpenCLIP ViT-H's 24 blocks)."""
    text = getattr(model, "text_model", model)
    shapes = dict(_shapes(model))
    base = "text_model." if text is not model else ""
    entries = [
        Entry(prefix + new, component, (base + old,), shapes[base + old])
        for old, new in _OPENCLIP_TOP.items()
    ]
    layers = len(text.encoder.layers)
    for i in range(layers + dropped_layers):
        owner = component if i < layers else ""
        entries += _openclip_layer(text.encoder.layers[0], f"{prefix}transformer.resblocks.{i}.", owner,
                                   f"{base}encoder.layers.{i}." if owner else "")  # fmt: skip
    if "text_projection.weight" in shapes:
        out_features, in_features = shapes["text_projection.weight"]
        entries.append(
            Entry(
                f"{prefix}text_projection",
                component,
                ("text_projection.weight",),
                (in_features, out_features),
                "transposed",
            )
        )
        entries.append(Entry(f"{prefix}logit_scale", "", (), ()))
    else:  # SD 2.x: the file keeps OpenCLIP's projection, which a CLIPTextModel has no place for
        width = text.config.hidden_size
        entries.append(Entry(f"{prefix}text_projection", "", (), (width, width)))
    return entries


def _openclip_layer(layer: nn.Module, key_prefix: str, component: str, param_prefix: str) -> Iterator[Entry]:
    shapes = dict(_shapes(layer))
    for leaf in ("weight", "bias"):
        q, k, v = (f"self_attn.{p}_proj.{leaf}" for p in "qkv")
        fused = (shapes[q][0] * 3, *shapes[q][1:])
        params = tuple(param_prefix + n for n in (q, k, v)) if component else ()
        yield Entry(f"{key_prefix}attn.in_proj_{leaf}", component, params, fused, "fused")
    for old, new in _OPENCLIP_LAYER.items():
        for leaf in ("weight", "bias"):
            name = f"{old}.{leaf}"
            params = (param_prefix + name,) if component else ()
            yield Entry(f"{key_prefix}{new}.{leaf}", component, params, shapes[name])


def _shapes(model: nn.Module) -> Iterator[tuple[str, tuple[int, ...]]]:
    for name, parameter in model.named_parameters():
        yield name, tuple(parameter.shape)


# ------------------------------------------------------------------------------------------ writing


def random_tensor(entry: Entry, *, seed: int) -> torch.Tensor:
    """The float32 (or int64) value of `entry`, a pure function of (key, seed): regenerated identically."""
    if entry.integer:
        return torch.arange(math.prod(entry.shape), dtype=torch.int64).reshape(entry.shape)
    if entry.key.endswith("logit_scale"):
        return torch.tensor(math.log(1 / 0.07))
    if entry.key in ("betas", "alphas_cumprod", "alphas_cumprod_prev"):
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        cumprod = torch.cumprod(1 - betas, 0)
        previous = torch.cat([torch.ones(1, dtype=torch.float64), cumprod[:-1]])
        return {"betas": betas, "alphas_cumprod": cumprod, "alphas_cumprod_prev": previous}[entry.key].float()
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(entry.key.encode()))
    noise = torch.randn(entry.shape, generator=generator)
    if len(entry.shape) == 1 and not entry.key.endswith("bias"):  # the only 1-D weights are norm scales
        return noise.mul_(0.01).add_(1)
    if len(entry.shape) == 1:
        return noise.mul_(0.01)
    return noise.mul_(1 / math.sqrt(math.prod(entry.shape[1:])))


def write_single_file(
    path: str | Path, family: Family, *, dtype: torch.dtype = torch.float16, seed: int = 0
) -> list[Entry]:
    """Write a `family` checkpoint with random weights to `path` (.safetensors), one tensor at a time.
    Returns the entries written, in file order."""
    entries = checkpoint_entries(family)
    with Path(path).open("wb") as out:
        out.write(_header(entries, dtype))
        for entry in entries:
            tensor = random_tensor(entry, seed=seed).to(_dtype_of(entry, dtype))
            out.write(tensor.reshape(-1).view(torch.uint8).numpy().data)  # no extra copy of the bytes
    return entries


def write_header_only(path: str | Path, family: Family, *, dtype: torch.dtype = torch.float16) -> list[Entry]:
    """The same file with every tensor left as zeros in a sparse file: instant and taking no disk space, for
    tests that read only the header (architecture detection)."""
    entries = checkpoint_entries(family)
    header = _header(entries, dtype)
    data = sum(math.prod(entry.shape) * _dtype_of(entry, dtype).itemsize for entry in entries)
    with Path(path).open("wb") as out:
        out.write(header)
        out.truncate(len(header) + data)
    return entries


def _dtype_of(entry: Entry, dtype: torch.dtype) -> torch.dtype:
    return torch.int64 if entry.integer else dtype


def _header(entries: list[Entry], dtype: torch.dtype) -> bytes:
    """The 8-byte length and the JSON header; tensors follow in `entries` order."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for entry in entries:
        size = math.prod(entry.shape) * _dtype_of(entry, dtype).itemsize
        header[entry.key] = {
            "dtype": _DTYPES[_dtype_of(entry, dtype)],
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format asks for the data to start 8-byte aligned
    return struct.pack("<Q", len(encoded)) + encoded
