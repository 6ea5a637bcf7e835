"""Flux LoRA files written by other trainers import into Adapters with peft's ΔW on every layer and
compose like difflora's own; a file with keys difflora cannot place is refused, naming them.

Foreign files come from tests/support/flux_files.py (independent key tables), on a small random diffusers
Flux transformer whose peft LoRA is the reference; kohya names are placed in the live model's tree (its
width is not Flux.1's, so the reference architecture does not fit it)."""

from __future__ import annotations

import pytest
import torch

from difflora.adapter.inject import inject_weights
from difflora.adapter.types import LoraWeights
from difflora.errors import AdapterFormatError
from difflora.formats.kohya import to_kohya
from difflora.formats.naming import build_table
from difflora.formats.read import parse_state_dict
from difflora.formats.reference import adaptable
from tests.support import comfyui_flux, flux_files
from tests.support.adapters import peft_adapter, peft_deltas
from tests.support.flux_model import lora_model, small_flux


@pytest.fixture(scope="module")
def model():
    return lora_model()


def tables(model):
    return [build_table("flux", {"transformer": adaptable("transformer", model)})]


def assert_same_updates(adapter, deltas, *, exact: bool = False):
    assert set(adapter.modules) == set(deltas)
    for key, weights in adapter.modules.items():
        tolerance = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-5, "atol": 1e-6}
        torch.testing.assert_close(weights.delta(), deltas[key], **tolerance)


LAYOUTS = {
    "kohya": lambda adapter, model: (flux_files.kohya_file(adapter, model), {}),
    "comfyui": lambda adapter, model: (flux_files.comfyui_file(adapter, model), {}),
    "onetrainer": lambda adapter, model: (flux_files.onetrainer_file(adapter), {}),
    "ai-toolkit": lambda adapter, model: (flux_files.ai_toolkit_file(adapter), {}),
    "simpletuner": lambda adapter, model: flux_files.simpletuner_file(adapter),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_trainers_layout_imports_with_the_same_updates(model, layout):
    tensors, metadata = LAYOUTS[layout](peft_adapter(model, family="flux"), model)
    adapter = parse_state_dict(tensors, metadata, source=f"{layout}.safetensors", tables=tables(model))
    assert_same_updates(adapter, peft_deltas(model))


@pytest.mark.parametrize("layout", ["kohya", "onetrainer"])
def test_an_imported_adapter_composes_on_the_model_like_difflora_own(model, layout):
    tensors, metadata = LAYOUTS[layout](peft_adapter(model, family="flux"), model)
    adapter = parse_state_dict(tensors, metadata, source="f.safetensors", tables=tables(model))
    fresh = small_flux()
    inject_weights(
        fresh, component="transformer", modules=adapter.component_modules("transformer"), adapter_name="in"
    )
    deltas = peft_deltas(model)
    composed = {
        f"transformer.{name}": module.get_delta_weight("in")
        for name, module in fresh.named_modules()
        if "in" in getattr(module, "lora_A", {})
    }
    assert set(composed) == set(deltas)
    for key, delta in composed.items():
        torch.testing.assert_close(delta, deltas[key], rtol=1e-5, atol=1e-6)


def test_difflora_kohya_export_round_trips_exactly(model):
    live = {"transformer": adaptable("transformer", model)}
    tensors, metadata = to_kohya(peft_adapter(model, family="flux"), dtype=torch.float32, modules=live)
    adapter = parse_state_dict(tensors, metadata, source="own.safetensors", tables=tables(model))
    assert adapter.meta.base_family == "flux" and adapter.meta.source_format == "kohya"
    original = peft_adapter(model, family="flux")
    for key, weights in adapter.modules.items():
        assert torch.equal(weights.down, original.modules[key].down)
        assert torch.equal(weights.up, original.modules[key].up)
    assert_same_updates(adapter, peft_deltas(model))


def test_a_fused_kohya_layer_with_a_dense_up_imports_exactly(model):
    """A LoRA trained on the fused layer (kohya without split_qkv): the parts share its down and take their
    rows of its up, so each part's ΔW is the fused ΔW's rows, bit for bit."""
    hidden = model.config.num_attention_heads * model.config.attention_head_dim
    mlp = model.single_transformer_blocks[0].mlp_hidden_dim
    g = torch.Generator().manual_seed(3)
    qkv = (torch.randn(4, hidden, generator=g), torch.randn(3 * hidden, 4, generator=g))
    linear1 = (torch.randn(5, hidden, generator=g), torch.randn(3 * hidden + mlp, 5, generator=g))
    tensors = {
        "lora_unet_double_blocks_1_img_attn_qkv.lora_down.weight": qkv[0],
        "lora_unet_double_blocks_1_img_attn_qkv.lora_up.weight": qkv[1],
        "lora_unet_double_blocks_1_img_attn_qkv.alpha": torch.tensor(2.0),
        "lora_unet_single_blocks_0_linear1.lora_down.weight": linear1[0],
        "lora_unet_single_blocks_0_linear1.lora_up.weight": linear1[1],
    }
    adapter = parse_state_dict(tensors, {}, source="dense.safetensors", tables=tables(model))
    fused_qkv = 0.5 * (qkv[1] @ qkv[0])
    fused_linear1 = linear1[1] @ linear1[0]  # no alpha: scale 1
    expected = {
        f"transformer.transformer_blocks.1.attn.to_{p}": fused_qkv[i * hidden : (i + 1) * hidden]
        for i, p in enumerate("qkv")
    }
    expected |= {
        f"transformer.single_transformer_blocks.0.attn.to_{p}": fused_linear1[i * hidden : (i + 1) * hidden]
        for i, p in enumerate("qkv")
    }
    expected["transformer.single_transformer_blocks.0.proj_mlp"] = fused_linear1[3 * hidden :]
    assert_same_updates(adapter, expected, exact=True)


@pytest.mark.parametrize(
    ("stray", "shape"),
    [
        ("lora_unet_double_blocks_0_img_attn_norm_query_norm.lora_down.weight", (2, 16)),
        ("lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight", (2, 32)),  # no block 7
    ],
    ids=["not-a-linear", "block-beyond-the-model"],
)
def test_a_file_with_keys_difflora_cannot_place_is_refused_naming_them(model, stray, shape):
    tensors = flux_files.kohya_file(peft_adapter(model, family="flux"), model)
    name = stray.split(".")[0]
    tensors |= {stray: torch.ones(shape), f"{name}.lora_up.weight": torch.ones(shape[1], shape[0])}
    with pytest.raises(AdapterFormatError, match="Nothing was loaded") as error:
        parse_state_dict(tensors, {}, source="stray.safetensors", tables=tables(model))
    assert name in str(error.value) and str(error.value).count("lora_unet_") == 1


def test_a_non_lora_tensor_in_a_comfyui_layout_file_is_refused_by_name(model):
    tensors = flux_files.comfyui_file(peft_adapter(model, family="flux"), model)
    tensors["diffusion_model.double_blocks.0.img_attn.qkv.diff_b"] = torch.ones(96)
    with pytest.raises(AdapterFormatError, match="diff_b") as error:
        parse_state_dict(tensors, {}, source="comfy.safetensors", tables=tables(model))
    assert "Nothing was loaded" in str(error.value)


def text_encoders():
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(4)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=64,
            d_model=16,
            d_kv=4,
            d_ff=32,
            num_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",
        )
    )
    return clip, t5


def test_text_encoder_modules_are_lora_te1_for_clip_and_lora_te3_for_t5(model):
    clip, t5 = text_encoders()
    live = {
        "transformer": adaptable("transformer", model),
        "text_encoder": adaptable("text_encoder", clip),
        "text_encoder_2": adaptable("text_encoder_2", t5),
    }
    adapter = peft_adapter(model, family="flux")
    g = torch.Generator().manual_seed(9)
    for component in ("text_encoder", "text_encoder_2"):
        for path, info in live[component].items():
            down, up = (
                torch.randn(2, info.in_features, generator=g),
                torch.randn(info.out_features, 2, generator=g),
            )
            adapter.modules[f"{component}.{path}"] = LoraWeights(down, up, 4.0)
    tensors, metadata = to_kohya(adapter, dtype=torch.float32, modules=live)
    names = {key.split(".")[0] for key in tensors}
    assert "lora_te1_text_model_encoder_layers_1_self_attn_q_proj" in names
    assert "lora_te3_encoder_block_1_layer_0_SelfAttention_q" in names
    assert "lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0" in names
    te_names = {n for n in names if n.startswith("lora_te")}
    comfy_map = comfyui_flux.text_encoder_key_map(clip.config.num_hidden_layers, list(live["text_encoder_2"]))
    assert te_names <= set(comfy_map)  # ComfyUI places every text-encoder key (CLIP-L's MLP and attention)
    back = parse_state_dict(tensors, metadata, source="te.safetensors", tables=[build_table("flux", live)])
    assert set(back.modules) == set(adapter.modules)
    for key, weights in back.modules.items():
        torch.testing.assert_close(weights.delta(), adapter.modules[key].delta(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"ss_base_model_version": "flux1"}, "flux"),  # kohya writes it for dev and schnell alike
        ({"ss_base_model_version": "flux1", "modelspec.architecture": "flux-1-schnell/lora"}, "flux-schnell"),
        ({"modelspec.architecture": "flux-1-dev/lora"}, "flux"),
        ({"modelspec.architecture": "flux-1/lora"}, "flux"),  # kohya's "unknown Flux" architecture
        (
            {
                "ss_base_model_version": "sdxl_base_v1-0",
                "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
            },
            "sdxl",
        ),
    ],
)
def test_flux_files_are_told_apart_by_their_metadata(metadata, expected):
    from difflora.formats.family import family_from_metadata

    assert family_from_metadata(metadata) == expected


def test_text_encoder_prefixes_name_the_family_only_with_the_denoisers_naming():
    from difflora.formats.family import family_from_prefixes

    te1 = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    assert family_from_prefixes([te1, "lora_unet_input_blocks_4_1_proj_in"]) == "sdxl"
    assert family_from_prefixes([te1, "lora_unet_double_blocks_0_img_attn_qkv"]) is None  # dev or schnell
    assert family_from_prefixes(["lora_te3_encoder_block_0_layer_0_SelfAttention_q"]) is None


def test_comfyui_layout_with_text_encoders_imports(model):
    """SimpleTuner's "comfyui" layout: `diffusion_model.<BFL>` and `text_encoders.{clip_l,t5xxl}.transformer.`."""
    clip, t5 = text_encoders()
    live = {
        "transformer": adaptable("transformer", model),
        "text_encoder": adaptable("text_encoder", clip),
        "text_encoder_2": adaptable("text_encoder_2", t5),
    }
    tensors = flux_files.comfyui_file(peft_adapter(model, family="flux"), model)
    g = torch.Generator().manual_seed(2)
    expected = dict(peft_deltas(model))
    for component, name, path in (
        ("text_encoder", "clip_l", "text_model.encoder.layers.1.mlp.fc2"),
        ("text_encoder_2", "t5xxl", "encoder.block.0.layer.1.DenseReluDense.wi_1"),
    ):
        info = live[component][path]
        down, up = (
            torch.randn(2, info.in_features, generator=g),
            torch.randn(info.out_features, 2, generator=g),
        )
        stem = f"text_encoders.{name}.transformer.{path}"
        tensors |= {
            f"{stem}.lora_A.weight": down,
            f"{stem}.lora_B.weight": up,
            f"{stem}.alpha": torch.tensor(1.0),
        }
        expected[f"{component}.{path}"] = 0.5 * (up @ down)
    adapter = parse_state_dict(tensors, {}, source="comfy.safetensors", tables=[build_table("flux", live)])
    assert_same_updates(adapter, expected)
