"""Export to the kohya layout: ΔW in the file equals difflora's, diffusers' own loader applies every key with
the same effective weights, metadata carries what kohya/A1111/ModelSpec readers look for, and the round trip
native -> comfyui -> import gives back the same adapter."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors import safe_open

from difflora.adapter.inject import add_lora, extract_weights, inject_weights
from difflora.adapter.spec import LoraSpec
from difflora.adapter.types import Adapter, AdapterMeta
from difflora.config.export import ExportConfig
from difflora.errors import AdapterCompatibilityError, ConfigError
from difflora.formats.export import export_adapter
from difflora.formats.native import save_adapter
from difflora.formats.read import load_adapter
from tests.support.formats import synthetic_adapter
from tests.support.models import tiny_pipeline


def trained_like_adapter(pipe, *, rank=4, alpha=6.0, rslora=True) -> Adapter:
    """An adapter made the way training makes one (peft layers, rsLoRA), with non-zero B."""
    modules = {}
    for component in ("unet", "text_encoder"):
        model = getattr(pipe, component)
        add_lora(model, component, LoraSpec(rank=rank, alpha=alpha, rslora=rslora), adapter_name="t")
        torch.manual_seed(1)
        for layer in model.modules():
            if isinstance(layer, LoraLayer):
                torch.nn.init.normal_(layer.lora_B["t"].weight, std=0.05)
        for name, weights in extract_weights(model, component=component, adapter_name="t").items():
            modules[f"{component}.{name}"] = weights
    meta = AdapterMeta(
        name="style",
        base_family="custom",
        trigger_words=["zxq"],
        config_toml="[train]\nseed = 7\nlearning_rate = 0.001\n",
        created_at="2026-11-22T10:00:00+00:00",
        extra={
            "difflora.train.steps": "120",
            "difflora.train.tag_frequency": json.dumps({"img": {"zxq": 3}}),
        },
    )
    return Adapter(modules=modules, meta=meta)


def read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()  # noqa: SIM118


def delta_from_file(tensors: dict[str, torch.Tensor], name: str, strength: float = 1.0) -> torch.Tensor:
    """ΔW = strength · alpha/rank · up @ down, as FORMATS.md states every consumer computes it."""
    down = tensors[f"{name}.lora_down.weight"].float()
    up = tensors[f"{name}.lora_up.weight"].float()
    alpha = tensors[f"{name}.alpha"].item() if f"{name}.alpha" in tensors else down.shape[0]
    product = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
    return strength * alpha / down.shape[0] * product


def kohya_name(key: str) -> str:
    """FORMATS.md's SD1-style grammar, written out independently of difflora.formats.naming."""
    component, _, path = key.partition(".")
    return {"unet": "lora_unet_", "text_encoder": "lora_te_"}[component] + path.replace(".", "_")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    adapter = trained_like_adapter(tiny_pipeline(tmp))
    native = save_adapter(adapter, tmp / "style.safetensors")
    files = {dtype: export_adapter(ExportConfig(adapter=str(native), dtype=dtype)) if dtype == "fp16"
             else export_adapter(ExportConfig(adapter=str(native), dtype=dtype, output=str(tmp / f"style-{dtype}.safetensors")))
             for dtype in ("fp16", "fp32")}  # fmt: skip
    return tmp, adapter, native, files


def test_file_delta_equals_difflora_composition_for_every_module(exported):
    tmp, adapter, _, files = exported
    tensors, _ = read_file(files["fp32"])
    assert len(tensors) == 3 * len(adapter.modules)
    pipe = tiny_pipeline(tmp)
    for component in ("unet", "text_encoder"):
        model = getattr(pipe, component)
        inject_weights(
            model, component=component, modules=adapter.component_modules(component), adapter_name="x"
        )
        layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
        assert len(layers) == len(adapter.component_modules(component))
        for live, layer in layers.items():
            key = f"{component}.{'text_model.' + live if component == 'text_encoder' else live}"
            expected = delta_from_file(tensors, kohya_name(key))
            torch.testing.assert_close(layer.get_delta_weight("x").float(), expected, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(adapter.modules[key].delta(), expected, rtol=1e-5, atol=1e-7)


def test_alpha_is_the_true_alpha_with_rslora_baked_in(exported):
    files = exported[3]
    tensors, _ = read_file(files["fp16"])
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert tensors[f"{name}.alpha"].ndim == 0
    assert tensors[f"{name}.alpha"].item() == pytest.approx(6.0 * math.sqrt(4))  # rsLoRA: alpha·√rank
    assert tensors[f"{name}.lora_down.weight"].dtype == torch.float16
    assert tensors[f"{name}.lora_down.weight"].shape[0] == 4


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_diffusers_load_lora_weights_applies_every_key_with_the_same_weights(exported, dtype):
    tmp, adapter, _, files = exported
    tensors, _ = read_file(files[dtype])
    pipe = tiny_pipeline(tmp)
    before = {
        c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in ("unet", "text_encoder")
    }
    pipe.load_lora_weights(str(files[dtype]), adapter_name="k")
    loaded = sum(
        isinstance(m, LoraLayer) for c in ("unet", "text_encoder") for m in getattr(pipe, c).modules()
    )
    assert loaded == len(adapter.modules)  # every module of the file became a LoRA layer
    pipe.fuse_lora(lora_scale=1.0, components=["unet", "text_encoder"], adapter_names=["k"])
    tolerance = {"fp16": 2e-3, "fp32": 1e-5}[dtype]
    for key, weights in adapter.modules.items():
        component, _, path = key.partition(".")
        live = path.removeprefix("text_model.") if component == "text_encoder" else path
        state = getattr(pipe, component).state_dict()
        fused = state.get(f"{live}.base_layer.weight", state.get(f"{live}.weight"))
        delta = fused.float() - before[component][f"{live}.weight"].float()
        torch.testing.assert_close(delta, delta_from_file(tensors, kohya_name(key)), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(
            delta, weights.delta(), rtol=0, atol=tolerance * weights.delta().abs().max().item()
        )


def test_round_trip_gives_back_the_same_adapter_and_metadata(exported):
    native, files = exported[2], exported[3]
    original = load_adapter(native)
    for path in files.values():
        back = load_adapter(path)
        assert set(back.modules) == set(original.modules)
        for key, weights in original.modules.items():
            assert back.modules[key].alpha == pytest.approx(weights.alpha, rel=1e-7)
            torch.testing.assert_close(
                back.modules[key].down.float(), weights.down.to(back.modules[key].down.dtype).float()
            )
            torch.testing.assert_close(
                back.modules[key].up.float(), weights.up.to(back.modules[key].up.dtype).float()
            )
        assert back.meta.source_format == "kohya"
        for field in (
            "name",
            "base_family",
            "base_hash",
            "prediction_type",
            "trigger_words",
            "config_toml",
            "created_at",
        ):
            assert getattr(back.meta, field) == getattr(original.meta, field), field
        assert back.meta.extra == original.meta.extra


def test_metadata_has_kohya_modelspec_training_facts_and_true_hashes(exported):
    _, _, _, files = exported
    raw = files["fp16"].read_bytes()
    _, metadata = read_file(files["fp16"])
    for key in (
        "ss_v2",
        "ss_base_model_version",
        "ss_network_module",
        "ss_network_dim",
        "ss_network_alpha",
        "ss_network_args",
    ):
        assert key in metadata, key
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_network_dim"] == "4" and float(metadata["ss_network_alpha"]) == pytest.approx(12.0)
    assert metadata["ss_output_name"] == "style"
    assert (
        metadata["ss_steps"] == "120"
        and metadata["ss_seed"] == "7"
        and float(metadata["ss_learning_rate"]) == 1e-3
    )
    assert json.loads(metadata["ss_tag_frequency"]) == {"img": {"zxq": 3}}
    assert metadata["modelspec.sai_model_spec"] == "1.0.1" and metadata["modelspec.trigger_phrase"] == "zxq"
    header_length = int.from_bytes(raw[:8], "little")
    assert metadata["sshs_model_hash"] == hashlib.sha256(raw[8 + header_length :]).hexdigest()
    assert len(metadata["sshs_legacy_hash"]) == 8
    assert "lora_adapter_metadata" not in metadata


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_real_architecture_export_versions_and_round_trip(tmp_path, family):
    adapter = synthetic_adapter(family, rank=1)
    native = save_adapter(adapter, tmp_path / "a.safetensors")
    path = export_adapter(ExportConfig(adapter=str(native), dtype="fp32"))
    _, metadata = read_file(path)
    version = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[family]
    assert metadata["ss_base_model_version"] == version and metadata["ss_v2"] == str(family == "sd2")
    back = load_adapter(path)
    assert back.meta.base_family == family and set(back.modules) == set(adapter.modules)
    for key, weights in adapter.modules.items():  # fp32 export: the very same tensors and alpha
        assert torch.equal(back.modules[key].down, weights.down) and torch.equal(
            back.modules[key].up, weights.up
        )
        assert back.modules[key].alpha == weights.alpha


def test_mislabelled_base_is_refused(tmp_path):
    adapter = synthetic_adapter("sd1", rank=1)
    adapter.meta.base_family = "sd2"  # SD1 cross-attention (768) does not fit SD2 (1024)
    native = save_adapter(adapter, tmp_path / "a.safetensors")
    with pytest.raises(AdapterCompatibilityError, match="do not fit the sd2 architecture"):
        export_adapter(ExportConfig(adapter=str(native)))


def test_export_refuses_to_overwrite_silently(exported):
    _, _, native, files = exported
    with pytest.raises(ConfigError, match="--overwrite"):
        export_adapter(ExportConfig(adapter=str(native)))
    assert export_adapter(ExportConfig(adapter=str(native), overwrite=True)) == files["fp16"]
    with pytest.raises(ConfigError, match="--dtype"):
        ExportConfig(adapter="x", dtype="int8")  # type: ignore[arg-type]


def test_diffusers_format_export_keeps_the_native_layout_in_the_chosen_dtype(exported):
    _, adapter, native, _ = exported
    path = export_adapter(ExportConfig(adapter=str(native), format="diffusers", dtype="bf16"))
    assert path.name == "style.diffusers.safetensors"
    back = load_adapter(path)
    assert back.meta.source_format == "difflora" and set(back.modules) == set(adapter.modules)
    assert all(w.down.dtype == torch.bfloat16 for w in back.modules.values())
    for key, weights in adapter.modules.items():
        assert back.modules[key].alpha == pytest.approx(weights.alpha)
