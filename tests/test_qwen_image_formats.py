"""Qwen-Image LoRA files: export in kohya / musubi-tuner names (`lora_unet_<diffusers path, dots as _>`, which
ComfyUI maps) and in diffusers' `transformer.*` layout, and re-import with every key and the same ΔW, on the
reduced Qwen-Image of tests/support/qwen_image.py (real configuration at reduced width and depth) carrying a
peft LoRA on every Linear of its transformer.

The truths are independent of difflora: ΔW per module is peft's `get_delta_weight`; ComfyUI's key map is its
`model_lora_keys_unet` for QwenImage restated (comfy/lora.py: each `diffusion_model.<key>.weight` of its model,
whose module names are diffusers' own, maps from `lora_unet_<key with _>`, `diffusion_model.<key>`, `<key>`,
`transformer.<key>` and `lycoris_<key with _>`); diffusers loads the diffusers layout itself and fuses it."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load as load_safetensors_bytes

from difflora.adapter.types import Adapter, AdapterMeta, LoraWeights
from difflora.formats.consumers.verdicts import verdicts
from difflora.formats.export import export_bytes
from difflora.formats.family import family_from_metadata
from difflora.formats.naming import build_table
from difflora.formats.read import load_adapter, parse_state_dict
from difflora.formats.reference import adaptable
from difflora.safe_io import read_safetensors
from tests.support.adapters import peft_adapter, peft_deltas, randomise_lora
from tests.support.qwen_image import tiny_qwen_pipeline

FAMILY = "qwen-image"


@pytest.fixture(scope="module")
def pipe():
    return tiny_qwen_pipeline(seed=7)


@pytest.fixture(scope="module")
def model(pipe):
    """The pipeline's transformer with a peft LoRA (rank 3, alpha 6) on every Linear, its B random."""
    transformer = copy.deepcopy(pipe.transformer)
    linear = sorted({n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear) and n})
    inject_adapter_in_model(LoraConfig(r=3, lora_alpha=6.0, target_modules=linear), transformer)
    randomise_lora(transformer, 1)
    return transformer


def _adapter(model) -> Adapter:
    return peft_adapter(model, family=FAMILY, name="qwen-test")


def _tree(pipe) -> dict:
    return {"transformer": adaptable("transformer", pipe.transformer)}


def _comfyui_key_map(pipe) -> set[str]:
    """ComfyUI's QwenImage LoRA keys (comfy/lora.py), from the model's own weight names."""
    keys = [k.removesuffix(".weight") for k in pipe.transformer.state_dict() if k.endswith(".weight")]
    names = {f"lora_unet_{k.replace('.', '_')}" for k in keys} | {f"diffusion_model.{k}" for k in keys}
    return (
        names
        | set(keys)
        | {f"transformer.{k}" for k in keys}
        | {f"lycoris_{k.replace('.', '_')}" for k in keys}
    )


def _kohya_deltas(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    deltas = {}
    for key, down in tensors.items():
        if key.endswith(".lora_down.weight"):
            name = key.removesuffix(".lora_down.weight")
            up, alpha = tensors[f"{name}.lora_up.weight"], float(tensors[f"{name}.alpha"])
            deltas[name] = (alpha / down.shape[0]) * up.double() @ down.double()
    return deltas


def test_kohya_export_names_every_module_as_comfyui_maps_it(pipe, model):
    tensors = load_safetensors_bytes(
        export_bytes(_adapter(model), "comfyui", torch.float32, modules=_tree(pipe))
    )
    deltas = peft_deltas(model)
    got = _kohya_deltas(tensors)
    assert set(got) == {f"lora_unet_{k.removeprefix('transformer.').replace('.', '_')}" for k in deltas}
    assert {key.split(".")[0] for key in tensors} <= _comfyui_key_map(pipe)
    for key, delta in deltas.items():
        name = f"lora_unet_{key.removeprefix('transformer.').replace('.', '_')}"
        assert torch.allclose(got[name], delta.double(), rtol=1e-5, atol=1e-6), key
    comfyui, diffusers = verdicts(list(tensors), {}, FAMILY)  # difflora's own consumer checks agree
    assert comfyui.consumer == "ComfyUI" and comfyui.complete, comfyui.summary()
    assert diffusers.consumer == "diffusers" and diffusers.complete, diffusers.summary()


@pytest.mark.slow  # diffusers' own loader and fuse: 12-35 s on a shared CPU
def test_diffusers_itself_loads_the_kohya_export_as_w0_plus_the_update(pipe, model, tmp_path):
    """QwenImageLoraLoaderMixin converts musubi-tuner / kohya names: every module lands with its ΔW."""
    path = tmp_path / "kohya.safetensors"
    path.write_bytes(export_bytes(_adapter(model), "comfyui", torch.float32, modules=_tree(pipe)))
    for key, delta in _diffusers_updates(pipe, path).items():
        assert torch.allclose(delta, peft_deltas(model)[key], rtol=1e-4, atol=1e-5), key


def test_diffusers_export_is_in_comfyuis_key_map_too(pipe, model):
    tensors = load_safetensors_bytes(export_bytes(_adapter(model), "diffusers", torch.float32))
    modules = {key.split(".lora_")[0] for key in tensors}
    assert modules <= _comfyui_key_map(pipe)
    assert modules == set(peft_deltas(model))


@pytest.mark.parametrize("fmt", ["comfyui", "diffusers"])
def test_reimport_gives_every_module_its_update(pipe, model, fmt, tmp_path):
    deltas = peft_deltas(model)
    path = tmp_path / f"{fmt}.safetensors"
    path.write_bytes(export_bytes(_adapter(model), fmt, torch.float32, modules=_tree(pipe)))
    tensors, metadata = read_safetensors(path)
    back = parse_state_dict(tensors, metadata, source=path.name, tables=[build_table(FAMILY, _tree(pipe))])
    assert set(back.modules) == set(deltas)
    for key, delta in deltas.items():
        assert torch.allclose(back.modules[key].delta().float(), delta, rtol=1e-5, atol=1e-6), key


def _diffusers_updates(pipe, path) -> dict[str, torch.Tensor]:
    """What diffusers' own Qwen-Image loader makes of a file: each Linear's fused weight minus W0 (a pipeline
    of the transformer alone: the loader reads only `transformer.` keys for this family)."""
    from diffusers import QwenImagePipeline

    parts = dict.fromkeys(("scheduler", "vae", "text_encoder", "tokenizer"))
    loaded = QwenImagePipeline(**parts, transformer=copy.deepcopy(pipe.transformer))
    loaded.load_lora_weights(str(path))
    loaded.fuse_lora(lora_scale=1.0)
    return {
        f"transformer.{name}": loaded.transformer.get_submodule(name).weight.detach() - module.weight
        for name, module in pipe.transformer.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


@pytest.mark.slow  # diffusers' own loader and fuse: 12-35 s on a shared CPU
def test_the_diffusers_layout_export_loads_in_diffusers_as_w0_plus_the_update(pipe, model, tmp_path):
    path = tmp_path / "exported.safetensors"
    path.write_bytes(export_bytes(_adapter(model), "diffusers", torch.float32))
    for key, delta in _diffusers_updates(pipe, path).items():
        assert torch.allclose(delta, peft_deltas(model)[key], rtol=1e-4, atol=1e-5), key


@pytest.mark.slow  # diffusers' own loader and fuse: 12-35 s on a shared CPU
def test_a_diffusers_saved_lora_reads_as_diffusers_loads_it(pipe, model, tmp_path):
    """What diffusers' `save_lora_weights` writes for Qwen-Image (the reference script saves through it)."""
    from diffusers import QwenImagePipeline
    from peft.utils import get_peft_model_state_dict

    QwenImagePipeline.save_lora_weights(
        tmp_path,
        transformer_lora_layers=get_peft_model_state_dict(model),
        transformer_lora_adapter_metadata=model.peft_config["default"].to_dict(),
    )
    path = tmp_path / "pytorch_lora_weights.safetensors"
    read = load_adapter(path)
    reference = _diffusers_updates(pipe, path)
    assert set(read.modules) == set(reference)
    for key, delta in peft_deltas(model).items():
        assert torch.allclose(read.modules[key].delta().float(), delta, rtol=1e-5, atol=1e-6), key


def test_the_kohya_metadata_states_the_family_and_reads_back(pipe, model):
    data = export_bytes(_adapter(model), "comfyui", torch.float32, modules=_tree(pipe))
    length = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + length])["__metadata__"]
    assert metadata["modelspec.architecture"] == "qwen-image/lora"
    assert family_from_metadata(metadata) == FAMILY


def test_a_full_size_attention_export_is_placed_by_comfyuis_and_diffusers_rules():
    """At full size (the shipped configs, meta device): a rank-1 LoRA on every attention projection of the 60
    blocks exports under names ComfyUI's QwenImage key map holds (restated from the model's own weights),
    and both consumers' rules load every key."""
    from difflora.formats.reference import reference_model, reference_modules

    modules = reference_modules(FAMILY, "transformer")
    attention = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    chosen = [path for path in modules if path.startswith("transformer_blocks.") and path.endswith(attention)]
    assert len(chosen) == 60 * 8
    adapter = Adapter(
        modules={
            f"transformer.{path}": LoraWeights(
                down=torch.ones(1, modules[path].in_features),
                up=torch.ones(modules[path].out_features, 1),
                alpha=1.0,
            )
            for path in chosen
        },
        meta=AdapterMeta(name="qwen-full", base_family=FAMILY),
    )
    tensors = load_safetensors_bytes(export_bytes(adapter, "comfyui", torch.float16))
    weights = [k.removesuffix(".weight") for k in reference_model(FAMILY, "transformer").state_dict()]
    comfy = {f"lora_unet_{k.replace('.', '_')}" for k in weights if k}
    assert {key.split(".")[0] for key in tensors} == {f"lora_unet_{p.replace('.', '_')}" for p in chosen}
    assert {key.split(".")[0] for key in tensors} <= comfy
    for verdict in verdicts(list(tensors), {}, FAMILY):
        assert verdict.complete and verdict.loaded == len(tensors) == 3 * 480, verdict.summary()
