"""SD3 / SD3.5 LoRA files: export in kohya's names on Stability's MMDiT layout (fused q/k/v converted
exactly) and in diffusers' `transformer.*` layout, and import of kohya, diffusers/SimpleTuner and OneTrainer
files, on the reduced random SD3.5 medium of tests/support/sd3.py carrying a peft LoRA on every Linear of
its transformer (attn2 and the last block's swapped text modulation included).

The truths are independent of difflora: ΔW per module is peft's `get_delta_weight`; the MMDiT names and the
fused ΔW are what tests/support/sd3.py's own diffusers -> MMDiT key map makes of a transformer whose weights
are those ΔW (so the row stacking and halves swap are its, not difflora's); ComfyUI's key map is its
`model_lora_keys_unet` for SD3 restated (every `diffusion_model.<original key>` as `lora_unet_<flat>`, and
the diffusers paths as `transformer.`, `lora_transformer_`, `lycoris_`); diffusers loads the diffusers
layout itself."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load as load_safetensors_bytes

from difflora.adapter.types import Adapter
from difflora.formats.consumers.verdicts import verdicts
from difflora.formats.export import export_bytes
from difflora.formats.family import family_from_metadata
from difflora.formats.naming import build_table, flat
from difflora.formats.read import load_adapter, parse_state_dict
from difflora.formats.reference import adaptable
from difflora.safe_io import read_safetensors
from tests.support.adapters import peft_adapter, peft_deltas, randomise_lora
from tests.support.sd3 import mmdit_state, tiny_sd3_pipeline

FAMILY = "sd35-medium"


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd3_pipeline(medium=True, seed=7)


@pytest.fixture(scope="module")
def model(pipe):
    """The pipeline's transformer with a peft LoRA (rank 3, alpha 6) on every Linear, its B random."""
    transformer = copy.deepcopy(pipe.transformer)
    linear = sorted(
        {name for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear) and name}
    )
    inject_adapter_in_model(LoraConfig(r=3, lora_alpha=6.0, target_modules=linear), transformer)
    randomise_lora(transformer, 1)
    return transformer


def _adapter(model) -> Adapter:
    return peft_adapter(model, family=FAMILY, name="sd3-test")


def _tree(pipe) -> dict:
    return {"transformer": adaptable("transformer", pipe.transformer)}


def _expected_fused(pipe, deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MMDiT module -> ΔW, by the support key map applied to a transformer holding ΔW as its weights."""
    holder = copy.deepcopy(pipe.transformer)
    with torch.no_grad():
        for name, module in holder.named_modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(deltas[f"transformer.{name}"])
    return {
        key.removesuffix(".weight"): value
        for key, value in mmdit_state(holder).items()
        if key.endswith(".weight") and value.ndim == 2
    }


def _kohya_deltas(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    deltas = {}
    for key, down in tensors.items():
        if key.endswith(".lora_down.weight"):
            name = key.removesuffix(".lora_down.weight")
            up, alpha = tensors[f"{name}.lora_up.weight"], float(tensors[f"{name}.alpha"])
            deltas[name] = (alpha / down.shape[0]) * up.double() @ down.double()
    return deltas


def test_kohya_export_is_the_mmdit_layout_with_each_fused_update_exact(pipe, model):
    tensors = load_safetensors_bytes(
        export_bytes(_adapter(model), "comfyui", torch.float32, modules=_tree(pipe))
    )
    expected = _expected_fused(pipe, peft_deltas(model))
    got = _kohya_deltas(tensors)
    assert set(got) == {f"lora_unet_{flat(name)}" for name in expected}
    assert "lora_unet_joint_blocks_0_x_block_attn2_qkv" in got  # MMDiT-X's second attention
    assert "lora_unet_joint_blocks_1_context_block_attn_proj" not in got  # the last block has none
    for name, delta in expected.items():
        fused = got[f"lora_unet_{flat(name)}"]
        assert torch.allclose(fused, delta.double(), rtol=1e-5, atol=1e-6), name
    assert tensors["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"].shape[0] == 9  # 3 ranks


def test_every_exported_key_is_in_comfyuis_sd3_key_map(pipe, model):
    tensors = load_safetensors_bytes(
        export_bytes(_adapter(model), "comfyui", torch.float32, modules=_tree(pipe))
    )
    originals = [
        key.removesuffix(".weight") for key in mmdit_state(pipe.transformer) if key.endswith(".weight")
    ]
    key_map = {f"lora_unet_{flat(k)}" for k in originals} | {f"diffusion_model.{k}" for k in originals}
    assert {key.split(".")[0] for key in tensors} <= key_map
    comfyui, diffusers = verdicts(list(tensors), {}, FAMILY)  # difflora's own consumer checks agree
    assert comfyui.consumer == "ComfyUI" and comfyui.complete, comfyui.summary()
    # diffusers' SD3 loader converts no kohya names (SD3LoraLoaderMixin has no converter): nothing loads
    assert (diffusers.consumer, diffusers.loaded, diffusers.total) == ("diffusers", 0, len(tensors))


def test_diffusers_itself_loads_nothing_of_a_kohya_sd3_file(pipe, model, tmp_path):
    path = tmp_path / "kohya.safetensors"
    path.write_bytes(export_bytes(_adapter(model), "comfyui", torch.float32, modules=_tree(pipe)))
    loaded = copy.deepcopy(pipe)
    loaded.load_lora_weights(str(path))
    assert not any(".lora_" in name for name, _ in loaded.transformer.named_parameters())


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
    """What diffusers' own SD3 loader makes of a file: each Linear's fused weight minus W0."""
    loaded = copy.deepcopy(pipe)
    loaded.load_lora_weights(str(path))
    loaded.fuse_lora(lora_scale=1.0)
    return {
        f"transformer.{name}": loaded.transformer.get_submodule(name).weight.detach() - module.weight
        for name, module in pipe.transformer.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


@pytest.mark.parametrize("metadata", [True, False], ids=["with-lora-config", "bare"])
def test_a_diffusers_or_simpletuner_saved_lora_reads_as_diffusers_loads_it(pipe, model, tmp_path, metadata):
    """What diffusers' `save_lora_weights` writes for SD3 (SimpleTuner and the reference script save through
    it; with the LoRA config in the header, or bare, where every loader takes alpha = rank)."""
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    config = model.peft_config["default"].to_dict() if metadata else None
    StableDiffusion3Pipeline.save_lora_weights(
        tmp_path,
        transformer_lora_layers=get_peft_model_state_dict(model),
        transformer_lora_adapter_metadata=config,
    )
    path = tmp_path / "pytorch_lora_weights.safetensors"
    read = load_adapter(path)
    reference = _diffusers_updates(pipe, path)
    assert set(read.modules) == set(reference)
    for key, delta in reference.items():
        assert torch.allclose(read.modules[key].delta().float(), delta, rtol=1e-4, atol=1e-5), key
    if metadata:  # and then they are peft's own updates
        for key, delta in peft_deltas(model).items():
            assert torch.allclose(read.modules[key].delta().float(), delta, rtol=1e-5, atol=1e-6), key


def test_the_diffusers_layout_export_loads_in_diffusers_as_w0_plus_the_update(pipe, model, tmp_path):
    path = tmp_path / "exported.safetensors"
    path.write_bytes(export_bytes(_adapter(model), "diffusers", torch.float32))
    for key, delta in _diffusers_updates(pipe, path).items():
        assert torch.allclose(delta, peft_deltas(model)[key], rtol=1e-4, atol=1e-5), key


def test_onetrainer_names_read_as_the_diffusers_modules(pipe, model):
    adapter, deltas = _adapter(model), peft_deltas(model)
    tensors = {}
    for key, weights in adapter.modules.items():
        name = "lora_transformer_" + flat(key.removeprefix("transformer."))
        tensors |= {f"{name}.lora_down.weight": weights.down, f"{name}.lora_up.weight": weights.up}
        tensors[f"{name}.alpha"] = torch.tensor(weights.alpha)
    back = parse_state_dict(
        tensors, {}, source="onetrainer.safetensors", tables=[build_table(FAMILY, _tree(pipe))]
    )
    assert set(back.modules) == set(deltas)
    for key, delta in deltas.items():
        assert torch.allclose(back.modules[key].delta().float(), delta, rtol=1e-5, atol=1e-6), key


@pytest.mark.parametrize(
    ("architecture", "expected"),
    [
        ("stable-diffusion-3-5-medium/lora", "sd35-medium"),  # kohya's spelling of each variant
        ("stable-diffusion-3-5-large/lora", "sd3"),
        ("stable-diffusion-3-m/lora", "sd3"),  # SD3 medium (3.0): the plain MMDiT
        ("stable-diffusion-3.5-medium/lora", "sd35-medium"),
    ],
)
def test_modelspec_architectures_name_the_family(architecture, expected):
    assert family_from_metadata({"modelspec.architecture": architecture}) == expected


def test_the_kohya_metadata_states_the_variant_and_reads_back(pipe, model):
    tensors_bytes = export_bytes(_adapter(model), "comfyui", torch.float32, modules=_tree(pipe))
    metadata = safe_open_metadata(tensors_bytes)
    assert metadata["ss_base_model_version"] == "sd3"  # kohya's, for every variant
    assert metadata["ss_network_module"] == "networks.lora_sd3"
    assert metadata["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"
    assert family_from_metadata(metadata) == FAMILY


def safe_open_metadata(data: bytes) -> dict[str, str]:
    """A safetensors file's header metadata, read from its bytes (8-byte length, then the JSON header)."""
    import json

    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length])["__metadata__"]


@pytest.mark.parametrize("name", ["sd35-medium", "sd3"])
def test_the_full_size_reference_names_every_linear_of_the_original_layout(name):
    """At full size (the shipped configs, meta device): the kohya names of the family's table are exactly the
    original checkpoint's Linear layers, each fused layer as wide as the original weight."""
    from difflora.formats.naming import reference_table
    from difflora.formats.reference import reference_model

    originals = {
        key.removesuffix(".weight"): tuple(value.shape)
        for key, value in mmdit_state(reference_model(name, "transformer")).items()
        if key.endswith(".weight") and value.ndim == 2
    }
    layers = reference_table(name).layers
    assert set(layers) == {f"lora_unet_{flat(path)}" for path in originals}
    for path, (rows, columns) in originals.items():
        layer = layers[f"lora_unet_{flat(path)}"]
        assert (layer.out_features, layer.in_features) == (rows, columns), path


def test_a_kohya_file_with_t5_modules_reads_them_as_the_third_text_encoder(pipe, model):
    """kohya's SD3 trainer names T5 `lora_te3_` (ComfyUI reads it so): its modules are T5's, not CLIP-G's."""
    adapter, deltas = _adapter(model), peft_deltas(model)
    tensors = load_safetensors_bytes(export_bytes(adapter, "comfyui", torch.float32, modules=_tree(pipe)))
    t5 = {
        name: module
        for name, module in pipe.text_encoder_3.named_modules()
        if name.endswith("SelfAttention.q")
    }
    generator = torch.Generator().manual_seed(3)
    expected = {}
    for name, module in t5.items():
        down = torch.randn(2, module.in_features, generator=generator)
        up = torch.randn(module.out_features, 2, generator=generator)
        kohya = f"lora_te3_{flat(name)}"
        tensors |= {f"{kohya}.lora_down.weight": down, f"{kohya}.lora_up.weight": up}
        tensors[f"{kohya}.alpha"] = torch.tensor(1.0)
        expected[f"text_encoder_3.{name}"] = 0.5 * up @ down
    trees = _tree(pipe) | {"text_encoder_3": adaptable("text_encoder_3", pipe.text_encoder_3)}
    back = parse_state_dict(tensors, {}, source="kohya-t5.safetensors", tables=[build_table(FAMILY, trees)])
    assert set(back.modules) == set(deltas) | set(expected)
    for key, delta in expected.items():
        assert torch.allclose(back.modules[key].delta().float(), delta, rtol=1e-5, atol=1e-6), key
