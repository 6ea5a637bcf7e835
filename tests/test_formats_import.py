"""Import of LoRA files written by other tools (kohya/A1111, diffusers, PEFT): every key applied or the file
refused with the keys named, never a silent partial load."""

from __future__ import annotations

import json

import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file

from difflora.adapter.inject import inject_weights
from difflora.errors import AdapterFormatError
from difflora.formats.read import load_adapter
from difflora.formats.reference import reference_modules
from tests.support.models import tiny_unet


def lora_pair(shape_in, out, rank, seed=0):
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(rank, *shape_in, generator=g)
    up = torch.randn(out, rank, *([1, 1] if len(shape_in) == 3 else []), generator=g)
    return down, up


def kohya_tensors(family, modules, *, rank=2, alpha=None, prefix_of=None):
    """kohya keys written by the FORMATS.md grammar for {module path: kohya name}, shaped from the real tree."""
    tensors = {}
    for index, (key, name) in enumerate(modules.items()):
        component, _, path = key.partition(".")
        info = reference_modules(family, component)[path]
        shape_in = (info.in_features, *info.kernel) if info.kind == "conv" else (info.in_features,)
        down, up = lora_pair(shape_in, info.out_features, rank, seed=index)
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
    return tensors


SD1_EXTRA = {  # beyond the default attention targets: feed-forward, 1x1 conv proj_in, TE MLP, 3x3 conv
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj": "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj",
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2": "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2",
    "unet.down_blocks.0.attentions.0.proj_in": "lora_unet_down_blocks_0_attentions_0_proj_in",
    "unet.down_blocks.0.resnets.0.conv1": "lora_unet_down_blocks_0_resnets_0_conv1",
    "text_encoder.text_model.encoder.layers.3.mlp.fc1": "lora_te_text_model_encoder_layers_3_mlp_fc1",
    "text_encoder.text_model.encoder.layers.3.self_attn.out_proj": "lora_te_text_model_encoder_layers_3_self_attn_out_proj",
}


def test_kohya_sd1_file_with_non_attention_modules_imports_every_module(tmp_path):
    tensors = kohya_tensors("sd1", SD1_EXTRA, rank=2, alpha=1.0)
    del tensors["lora_te_text_model_encoder_layers_3_mlp_fc1.alpha"]  # no alpha: scale 1 (alpha = rank)
    save_file(
        tensors,
        tmp_path / "k.safetensors",
        metadata={"ss_base_model_version": "sd_v1", "ss_output_name": "k"},
    )
    adapter = load_adapter(tmp_path / "k.safetensors")
    assert set(adapter.modules) == set(SD1_EXTRA)
    assert (
        adapter.meta.base_family == "sd1"
        and adapter.meta.name == "k"
        and adapter.meta.source_format == "kohya"
    )
    for key, name in SD1_EXTRA.items():
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        alpha = tensors[f"{name}.alpha"].item() if f"{name}.alpha" in tensors else 2.0
        expected = (alpha / 2) * (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
        torch.testing.assert_close(adapter.modules[key].delta(), expected)
    assert adapter.modules["unet.down_blocks.0.resnets.0.conv1"].down.shape[2:] == (3, 3)


def test_sgm_and_diffusers_spellings_name_the_same_modules(tmp_path):
    pairs = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k",
        "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_out.0": "lora_unet_output_blocks_11_1_transformer_blocks_0_attn1_to_out_0",
        "unet.mid_block.attentions.0.proj_out": "lora_unet_middle_block_1_proj_out",
    }
    save_file(kohya_tensors("sd1", pairs), tmp_path / "sgm.safetensors")
    assert set(load_adapter(tmp_path / "sgm.safetensors").modules) == set(pairs)


def test_sdxl_file_with_diffusers_unet_names_and_two_text_encoders(tmp_path):
    modules = {
        "unet.down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_v": "lora_unet_down_blocks_2_attentions_1_transformer_blocks_9_attn2_to_v",
        "unet.up_blocks.0.attentions.0.transformer_blocks.3.ff.net.2": "lora_unet_output_blocks_0_1_transformer_blocks_3_ff_net_2",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "text_encoder_2.text_model.encoder.layers.31.mlp.fc2": "lora_te2_text_model_encoder_layers_31_mlp_fc2",
    }
    save_file(kohya_tensors("sdxl", modules, alpha=4.0), tmp_path / "xl.safetensors")
    adapter = load_adapter(tmp_path / "xl.safetensors")
    assert adapter.meta.base_family == "sdxl" and set(adapter.modules) == set(modules)


def test_old_diffusers_processor_and_lora_layer_formats(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight": torch.randn(
            4, 320, generator=g
        ),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight": torch.randn(
            320, 4, generator=g
        ),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight": torch.randn(
            4, 320, generator=g
        ),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight": torch.randn(
            320, 4, generator=g
        ),
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora.down.weight": torch.randn(
            4, 768, generator=g
        ),
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora.up.weight": torch.randn(
            1280, 4, generator=g
        ),
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight": torch.randn(
            4, 768, generator=g
        ),
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.up.weight": torch.randn(
            3072, 4, generator=g
        ),
        "text_encoder.text_model.encoder.layers.0.self_attn.to_v_lora.down.weight": torch.randn(
            4, 768, generator=g
        ),
        "text_encoder.text_model.encoder.layers.0.self_attn.to_v_lora.up.weight": torch.randn(
            768, 4, generator=g
        ),
    }
    save_file(tensors, tmp_path / "old.safetensors")
    adapter = load_adapter(tmp_path / "old.safetensors")
    assert set(adapter.modules) == {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
        "text_encoder.text_model.encoder.layers.0.mlp.fc1",
        "text_encoder.text_model.encoder.layers.0.self_attn.v_proj",
    }
    assert all(w.alpha == w.rank for w in adapter.modules.values())  # no alpha anywhere: scale 1
    assert adapter.meta.base_family == "sd1"


def test_peft_adapter_file_takes_alpha_from_adapter_config(tmp_path):
    g = torch.Generator().manual_seed(0)
    prefix = "base_model.model.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file(
        {
            f"{prefix}.lora_A.weight": torch.randn(4, 640, generator=g),
            f"{prefix}.lora_B.weight": torch.randn(640, 4, generator=g),
        },
        tmp_path / "adapter_model.safetensors",
    )
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "use_rslora": True}))
    adapter = load_adapter(tmp_path / "adapter_model.safetensors")
    (key,) = adapter.modules
    assert key == "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert adapter.modules[key].alpha == pytest.approx(16.0)  # rsLoRA: 8·√4


def test_loha_file_is_refused_naming_its_keys(tmp_path):
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors = {
        f"{name}.hada_w1_a": torch.zeros(320, 4),
        f"{name}.hada_w1_b": torch.zeros(4, 320),
        f"{name}.alpha": torch.tensor(4.0),
    }
    save_file(tensors, tmp_path / "loha.safetensors")
    with pytest.raises(AdapterFormatError, match=r"hada_w1_a: LoHa") as error:
        load_adapter(tmp_path / "loha.safetensors")
    assert "Nothing was loaded" in str(error.value)


def test_unknown_module_names_and_mixed_layouts_are_refused(tmp_path):
    tensors = {
        "lora_unet_no_such_block_0_to_q.lora_down.weight": torch.zeros(2, 8),
        "lora_unet_no_such_block_0_to_q.lora_up.weight": torch.zeros(8, 2),
    }
    save_file(tensors, tmp_path / "unknown.safetensors")
    with pytest.raises(AdapterFormatError, match="lora_unet_no_such_block_0_to_q"):
        load_adapter(tmp_path / "unknown.safetensors")
    tensors |= {
        "unet.down_blocks.0.attn.lora_A.weight": torch.zeros(2, 8),
        "unet.down_blocks.0.attn.lora_B.weight": torch.zeros(8, 2),
        "unet.x.lora_magnitude_vector": torch.zeros(8),
    }
    save_file(tensors, tmp_path / "mixed.safetensors")
    with pytest.raises(AdapterFormatError, match="mixes kohya keys"):
        load_adapter(tmp_path / "mixed.safetensors")


def test_imported_kohya_file_of_a_custom_model_composes_onto_it(tmp_path):
    """Names of a model no reference knows (the tiny test UNet) are read segment by segment, and the
    imported adapter, feed-forward included, is applied exactly."""
    unet = tiny_unet()
    chosen = [
        n
        for n, m in unet.named_modules()
        if n.endswith(("attn2.to_k", "ff.net.2", "proj_in"))
        and isinstance(m, torch.nn.Linear | torch.nn.Conv2d)
    ]
    tensors = {}
    for i, name in enumerate(chosen):
        module = dict(unet.named_modules())[name]
        shape_in = (
            (module.in_channels, 1, 1) if isinstance(module, torch.nn.Conv2d) else (module.in_features,)
        )
        out = module.out_channels if isinstance(module, torch.nn.Conv2d) else module.out_features
        down, up = lora_pair(shape_in, out, 2, seed=i)
        kohya = "lora_unet_" + name.replace(".", "_")
        tensors |= {
            f"{kohya}.lora_down.weight": down,
            f"{kohya}.lora_up.weight": up,
            f"{kohya}.alpha": torch.tensor(1.0),
        }
    save_file(tensors, tmp_path / "tiny.safetensors")
    adapter = load_adapter(tmp_path / "tiny.safetensors")
    assert set(adapter.modules) == {f"unet.{n}" for n in chosen}
    inject_weights(unet, component="unet", modules=adapter.component_modules("unet"), adapter_name="imp")
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, LoraLayer)}
    assert set(layers) == set(chosen)
    for name, layer in layers.items():
        kohya = "lora_unet_" + name.replace(".", "_")
        down, up = tensors[f"{kohya}.lora_down.weight"], tensors[f"{kohya}.lora_up.weight"]
        expected = 0.5 * (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
        torch.testing.assert_close(layer.get_delta_weight("imp"), expected)


def test_the_diffusers_training_scripts_file_imports_with_its_updates(tmp_path):
    """What diffusers' train_text_to_image_lora.py writes at its end: `save_lora_weights` of the peft state
    dict converted to diffusers' names (`unet.<module>.lora.down.weight`, no alpha: alpha = rank)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = tiny_unet()
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_v"])
    )
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    assert all(".lora." in key for key in state)  # the spelling this test is about
    StableDiffusionPipeline.save_lora_weights(
        save_directory=str(tmp_path),
        unet_lora_layers=state,
        weight_name="lora.safetensors",
        safe_serialization=True,
    )
    adapter = load_adapter(tmp_path / "lora.safetensors")
    layers = {name: m for name, m in unet.named_modules() if isinstance(m, LoraLayer)}
    assert len(adapter.modules) == len(layers) > 0
    for name, layer in layers.items():
        expected = layer.lora_B["default"].weight @ layer.lora_A["default"].weight  # scale alpha/rank = 1
        assert torch.allclose(adapter.modules[f"unet.{name}"].delta(), expected.detach(), atol=1e-6)
