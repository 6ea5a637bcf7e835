"""Synthetic adapters for the tiny pipelines, and readings of adapter files that do not go through
difflora's loader (so tests compare difflora against an independent computation)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from difflora.adapter.inject import add_lora, extract_weights
from difflora.adapter.names import adaptable_modules, classic_name
from difflora.adapter.spec import LoraSpec
from difflora.adapter.types import Adapter, AdapterMeta, LoraWeights
from difflora.formats.native import save_adapter
from difflora.models.identity import model_identity

CONV = "down_blocks.0.resnets.0.conv1"


def random_adapter(pipe, *, seed, unet, te=(), rank=4, alpha=4.0, odd=None, scale=0.2, name="") -> Adapter:
    """Random A/B for the modules whose names end with one of `unet` / `te`. `odd` = (suffix, rank, alpha)
    gives the first module with that suffix its own rank and alpha."""
    generator = torch.Generator().manual_seed(seed)
    identity = model_identity(pipe)
    modules = {}
    for component, suffixes in (("unet", unet), ("text_encoder", te)):
        model = getattr(pipe, component)
        for live, module in adaptable_modules(model).items():
            if not any(live == s or live.endswith("." + s) for s in suffixes):
                continue
            r, a = rank, alpha
            if (
                odd
                and live.endswith(odd[0])
                and not any(k.endswith(odd[0]) and w.rank != rank for k, w in modules.items())
            ):
                r, a = odd[1], odd[2]
            shape = module.weight.shape
            down = torch.randn(r, *shape[1:], generator=generator) * scale
            up = torch.randn(shape[0], r, *([1, 1] if len(shape) == 4 else []), generator=generator) * scale
            modules[f"{component}.{classic_name(component, live, model)}"] = LoraWeights(down, up, a)
    meta = AdapterMeta(name=name, base_architecture=identity.architecture, base_hash=identity.base_hash)
    return Adapter(modules, meta)


def write_sample_adapters(pipe, directory: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    adapters = {
        "style": random_adapter(
            pipe,
            seed=1,
            unet=("to_q", "to_k", "to_v", "to_out.0"),
            te=("q_proj", "v_proj"),
            rank=4,
            alpha=2.0,
        ),
        "subject": random_adapter(
            pipe,
            seed=2,
            unet=("to_k", "to_v"),
            te=("k_proj", "v_proj"),
            rank=2,
            alpha=8.0,
            odd=("to_v", 3, 1.5),
        ),
        "detail": random_adapter(pipe, seed=3, unet=("to_out.0", CONV), rank=8, alpha=8.0),
    }
    return {name: save_adapter(a, directory / f"{name}.safetensors") for name, a in adapters.items()}


def read_file_deltas(path: Path) -> dict[str, torch.Tensor]:
    """module key -> (α/r)·B·A from the raw file: tensors via safe_open, alpha via the header's regexes."""
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        config = json.loads(handle.metadata()["lora_adapter_metadata"])
    deltas = {}
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight")
        down, up = tensors[key].double(), tensors[module + ".lora_B.weight"].double()
        component, _, name = module.partition(".")
        peft_name = name.removeprefix("text_model.")
        alpha = config[f"{component}.lora_alpha"]
        for pattern, value in config.get(f"{component}.alpha_pattern", {}).items():
            if re.fullmatch(pattern, peft_name):
                alpha = value
        rank = down.shape[0]
        delta = (alpha / rank) * (up.flatten(1) @ down.flatten(1))
        deltas[module] = delta.reshape(up.shape[0], *down.shape[1:])
    return deltas


def base_weights(pipe) -> dict[str, torch.Tensor]:
    """W0 of every adaptable module, keyed like adapter modules (component.classic name)."""
    result = {}
    for component in ("unet", "text_encoder"):
        model = getattr(pipe, component)
        for live, module in adaptable_modules(model).items():
            result[f"{component}.{classic_name(component, live, model)}"] = module.weight.detach().clone()
    return result


def module_of(pipe, key: str):
    component, _, classic = key.partition(".")
    model = getattr(pipe, component)
    return model.get_submodule(classic.removeprefix("text_model.") if component != "unet" else classic)


def effective_forward_error(module, weight: torch.Tensor) -> float:
    """max |module(x) - x·Wᵀ - b| on random inputs: the effective weight of a peft (dynamic) layer."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if weight.ndim == 4:
            x = torch.randn(2, weight.shape[1], 8, 8, generator=generator)
            expected = F.conv2d(x.double(), weight, base.bias.double(), base.stride, base.padding)
        else:
            x = torch.randn(5, weight.shape[1], generator=generator)
            expected = F.linear(x.double(), weight, base.bias.double() if base.bias is not None else None)
        return float((module(x).double() - expected).abs().max())


def randomise_lora(model, seed: int) -> None:
    """Every LoRA tensor of `model` drawn at random (x 0.2): peft starts B at zero, which would hide a
    wrong up/down order or scale in a test."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def trained_adapter(pipe, *, rank=4, alpha=2.0, te_rank=2, te_alpha=6.0) -> Adapter:
    add_lora(pipe.unet, "unet", LoraSpec(rank=rank, alpha=alpha))
    add_lora(pipe.text_encoder, "text_encoder", LoraSpec(rank=te_rank, alpha=te_alpha))
    randomise_lora(pipe.unet, 1)
    randomise_lora(pipe.text_encoder, 2)
    modules = {f"unet.{k}": v for k, v in extract_weights(pipe.unet, component="unet").items()}
    modules |= {
        f"text_encoder.{k}": v
        for k, v in extract_weights(pipe.text_encoder, component="text_encoder").items()
    }
    meta = AdapterMeta(
        name="style",
        base_model="tiny",
        base_family="custom",
        base_architecture="custom-abc",
        base_hash="0123",
        trigger_words=["zebrastripes"],
        config_toml='rank = 4\nname = "style"\n',
        created_at="2026-11-22T00:00:00+00:00",
        extra={"difflora.train.steps": "12"},
    )
    return Adapter(modules=modules, meta=meta)


def peft_adapter(model, *, family: str, name: str = "") -> Adapter:
    """The peft LoRA ("default") on a `transformer` as difflora's in-memory Adapter, read directly from
    peft's layers (its own scaling gives the alpha)."""
    modules = {}
    for path, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            down = module.lora_A["default"].weight.detach().clone()
            up = module.lora_B["default"].weight.detach().clone()
            alpha = float(module.scaling["default"]) * down.shape[0]
            modules[f"transformer.{path}"] = LoraWeights(down=down, up=up, alpha=alpha)
    return Adapter(modules=modules, meta=AdapterMeta(name=name or f"{family}-test", base_family=family))


def peft_deltas(model) -> dict[str, torch.Tensor]:
    """Each adapted module of a `transformer`'s ΔW (float32) as peft computes it: `get_delta_weight`."""
    return {
        f"transformer.{path}": module.get_delta_weight("default").detach().float()
        for path, module in model.named_modules()
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {})
    }
