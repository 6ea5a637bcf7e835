"""Module names: the live paths of a loaded model and the classic names written to files.

transformers 5 flattened `CLIPTextModel` (no `text_model.` level), but every LoRA consumer (diffusers,
ComfyUI, A1111, kohya) names text-encoder modules `text_model.encoder.layers.N...`. Files always use the
classic form; `classic_name` / `live_name` are the one place that knows the difference.
"""

from __future__ import annotations

from peft.tuners.lora import LoraLayer
from torch import nn

TEXT_MODEL_PREFIX = "text_model."


def has_text_model_level(model: nn.Module) -> bool:
    return hasattr(model, "text_model")


def is_flattened_clip(component: str, model: nn.Module) -> bool:
    """A CLIP text encoder without the `text_model.` level (transformers 5). Other encoders (T5) never had
    it: files name their modules as the model does (`encoder.block.0.layer.0.SelfAttention.q`)."""
    clip = getattr(getattr(model, "config", None), "model_type", "clip_text_model") == "clip_text_model"
    return component.startswith("text_encoder") and clip and not has_text_model_level(model)


def classic_name(component: str, live: str, model: nn.Module) -> str:
    """Live module path -> the name written to files (adds `text_model.` for flattened CLIP encoders)."""
    if is_flattened_clip(component, model):
        return TEXT_MODEL_PREFIX + live
    return live


def live_name(component: str, classic: str, model: nn.Module) -> str:
    """Name from a file -> live module path in this model."""
    if is_flattened_clip(component, model):
        return classic.removeprefix(TEXT_MODEL_PREFIX)
    return classic


def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Linear and Conv2d modules (what peft's LoRA can adapt), by live name; LoRA sub-layers excluded."""
    found = {}
    for name, module in model.named_modules():
        if ".lora_" in name or name.endswith("base_layer"):
            continue
        if isinstance(module, nn.Linear | nn.Conv2d | LoraLayer):
            found[name] = module
    return found
