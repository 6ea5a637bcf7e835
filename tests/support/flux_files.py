"""Flux LoRA files as other trainers write them, built from independent key tables (never difflora's writer).

- kohya (`networks/lora_flux.py`, `split_qkv`): BFL names `lora_unet_<flat BFL path>`, the split q/k/v (and
  single blocks' MLP input) stacked into the fused layer: downs concatenated, ups block-diagonal, alpha
  scaled with the rank so alpha/rank is unchanged; the final modulation's row halves swapped;
- ComfyUI / SimpleTuner's "comfyui" layout: the same layers as `diffusion_model.<BFL path>.lora_A/lora_B`;
- OneTrainer: `lora_transformer_<flat diffusers path>.lora_down/lora_up/alpha`;
- ai-toolkit: `transformer.<diffusers path>.lora_A/lora_B`, no alpha (read at scale 1), the scale in B;
- SimpleTuner / diffusers: PEFT keys with the alpha in the `lora_adapter_metadata` header.
The BFL table is `comfyui_flux.diffusers_to_bfl` (ComfyUI's, written from its source).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch
from torch import nn

from difflora.adapter.types import Adapter
from tests.support import comfyui_flux as comfy


def bfl_table(model: nn.Module) -> dict[str, comfy.Target]:
    return comfy.diffusers_to_bfl(dict(model.config), model.single_transformer_blocks[0].mlp_hidden_dim)


def fused_layers(adapter: Adapter, model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """BFL path -> (down, up, alpha) of every fused layer the adapter touches (block-sparse ups)."""
    weights = dict(model.named_modules())
    groups: dict[str, list[tuple[int, str]]] = {}
    for key, (bfl, offset, _) in bfl_table(model).items():
        module = "transformer." + key.removesuffix(".weight")
        if module in adapter.modules:
            groups.setdefault(bfl.removesuffix(".weight"), []).append((offset[1] if offset else 0, module))
    result = {}
    for bfl, parts in groups.items():
        parts.sort()
        loras = [adapter.modules[module] for _, module in parts]
        rows = _rows(weights, bfl, parts, model)
        down = torch.cat([w.down for w in loras])
        up = torch.zeros(rows, down.shape[0])
        column = 0
        for (start, _), w in zip(parts, loras, strict=True):
            up[start : start + w.up.shape[0], column : column + w.rank] = w.up
            column += w.rank
        if bfl == "final_layer.adaLN_modulation.1":
            up = comfy.swap_scale_shift(up)
        result[bfl] = (down, up, loras[0].scale * down.shape[0])
    return result


def _rows(weights: Mapping[str, nn.Module], bfl: str, parts: list, model: nn.Module) -> int:
    """Output rows of the fused BFL layer: what its diffusers modules hold together (all of them, trained
    or not)."""
    siblings = [k for k, (b, _, _) in bfl_table(model).items() if b == f"{bfl}.weight"]
    return sum(_base(weights[k.removesuffix(".weight")]).out_features for k in siblings)


def _base(module: nn.Module) -> nn.Linear:
    return getattr(module, "base_layer", module)


def kohya_file(adapter: Adapter, model: nn.Module) -> dict[str, torch.Tensor]:
    tensors = {}
    for bfl, (down, up, alpha) in fused_layers(adapter, model).items():
        name = "lora_unet_" + bfl.replace(".", "_")
        tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    return tensors


def comfyui_file(adapter: Adapter, model: nn.Module) -> dict[str, torch.Tensor]:
    tensors = {}
    for bfl, (down, up, alpha) in fused_layers(adapter, model).items():
        tensors |= {f"diffusion_model.{bfl}.lora_A.weight": down, f"diffusion_model.{bfl}.lora_B.weight": up}
        tensors[f"diffusion_model.{bfl}.alpha"] = torch.tensor(alpha)
    return tensors


def onetrainer_file(adapter: Adapter) -> dict[str, torch.Tensor]:
    tensors = {}
    for key, w in adapter.modules.items():
        name = "lora_transformer_" + key.removeprefix("transformer.").replace(".", "_")
        tensors |= {f"{name}.lora_down.weight": w.down, f"{name}.lora_up.weight": w.up}
        tensors[f"{name}.alpha"] = torch.tensor(w.alpha)
    return tensors


def ai_toolkit_file(adapter: Adapter) -> dict[str, torch.Tensor]:
    tensors = {}
    for key, w in adapter.modules.items():
        tensors |= {f"{key}.lora_A.weight": w.down, f"{key}.lora_B.weight": w.up * w.scale}
    return tensors


def simpletuner_file(adapter: Adapter) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {}
    for key, w in adapter.modules.items():
        tensors |= {f"{key}.lora_A.weight": w.down, f"{key}.lora_B.weight": w.up}
    rank, alpha = next(iter(adapter.modules.values())).rank, next(iter(adapter.modules.values())).alpha
    header = {"transformer.r": rank, "transformer.lora_alpha": alpha}
    return tensors, {"lora_adapter_metadata": json.dumps(header)}
