"""LoKr and LoHa layers trained through peft (`--algo lokr|loha`) are read out with exactly the update peft
computes, exported in LyCORIS keys that ComfyUI's key rules place completely, and read back unchanged."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load, load_file

import difflora.training.trainer as trainer
from difflora.adapter.lycoris_peft import add_lycoris, extract_lycoris
from difflora.adapter.spec import LoraSpec
from difflora.adapter.types import Adapter, AdapterMeta
from difflora.composition.composer import compose
from difflora.config.spec import AdapterWeight
from difflora.errors import ConfigError
from difflora.formats.export import export_bytes
from difflora.formats.read import load_adapter, parse_state_dict
from difflora.formats.reference import adaptable
from difflora.models.identity import model_identity
from difflora.models.loading import load_pipeline
from tests.support.adapters import module_of
from tests.support.models import tiny_pipeline
from tests.support.training import make_workspace, tiny_train_config

SPECS = {  # one model holds the three (disjoint targets, one peft adapter name each)
    "lokr": LoraSpec(
        2,
        2.0,
        algo="lokr",
        factor=4,
        unet_targets=("to_q", "to_out.0", "conv1"),
        text_encoder_targets=("q_proj",),
    ),
    "lokr-full": LoraSpec(
        16, 4.0, algo="lokr", factor=4, unet_targets=("to_k",), text_encoder_targets=("k_proj",)
    ),
    "loha": LoraSpec(
        3, 6.0, algo="loha", unet_targets=("to_v", "conv2"), text_encoder_targets=("v_proj", "fc1")
    ),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny pipeline with each spec's layers (its own adapter name), their weights randomised as if trained."""
    pipe = tiny_pipeline(tmp_path_factory.mktemp("tiny"))
    pipe.module_trees = _tables(pipe)  # before peft wraps the layers
    generator = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        # several adapters in one model is this fixture's design; peft warns at the second one
        warnings.filterwarnings("ignore", "Already found a `peft_config` attribute", UserWarning)
        for name, spec in SPECS.items():
            add_lycoris(pipe.unet, "unet", spec, adapter_name=name)
            add_lycoris(pipe.text_encoder, "text_encoder", spec, adapter_name=name)
    with torch.no_grad():
        for parameter in [*pipe.unet.parameters(), *pipe.text_encoder.parameters()]:
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return pipe


@pytest.mark.parametrize("name", list(SPECS))
def test_extracted_update_is_peft_s_own(trained, name):
    modules = extract_lycoris(trained.unet, component="unet", adapter_name=name)
    assert modules
    layers = dict(trained.unet.named_modules())
    for classic, weights in modules.items():
        want = layers[classic].get_delta_weight(name).double()
        assert torch.allclose(weights.delta().double(), want, rtol=1e-5, atol=1e-7), classic
    kinds = {(w.kind, getattr(w, "factorised", True)) for w in modules.values()}
    expected = {"lokr": {("LoKr", True)}, "lokr-full": {("LoKr", False)}, "loha": {("LoHa", True)}}[name]
    assert kinds == expected  # the two-full-factor LoKr, whose scale consumers do not apply, is covered


def test_only_the_new_layers_train(trained):
    names = [n for n, p in trained.unet.named_parameters() if p.requires_grad]
    assert names and all(".lokr_" in n or ".hada_" in n for n in names)


@pytest.mark.parametrize("name", list(SPECS))
def test_trained_lycoris_exports_with_every_key_placed_by_comfyui(trained, name):
    modules = {
        f"{component}.{key}": weights
        for component in ("unet", "text_encoder")
        for key, weights in extract_lycoris(
            getattr(trained, component), component=component, adapter_name=name
        ).items()
    }
    family = model_identity(trained).family
    adapter = Adapter(modules=modules, meta=AdapterMeta(name=name, base_family=family))
    payload = export_bytes(adapter, "comfyui", torch.float32, modules=trained.module_trees)
    written = load(payload)
    assert not [key for key in written if not comfyui_loads(key, trained.module_trees)]
    again = parse_state_dict(written, {}, source=name)
    assert set(again.modules) == set(modules)
    for key, weights in modules.items():
        assert torch.allclose(again.modules[key].delta(), weights.delta(), rtol=1e-6, atol=1e-7), key


# ComfyUI's rules (comfy/lora.py model_lora_keys_unet/_clip, comfy/weight_adapter/lokr.py, loha.py load):
# the UNet map holds `lora_unet_<diffusers path with _>` for every weight of the loaded model, the CLIP map
# `lora_te_text_model_encoder_layers_<i>_<one of these>`; LoKr/LoHa consume these tensors, the loader `alpha`.
COMFY_CLIP = (
    "mlp_fc1",
    "mlp_fc2",
    "self_attn_k_proj",
    "self_attn_q_proj",
    "self_attn_v_proj",
    "self_attn_out_proj",
)
COMFY_TENSORS = {
    "lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha",
}  # fmt: skip


def comfyui_loads(key: str, trees) -> bool:
    module, _, tensor = key.partition(".")
    unet = {"lora_unet_" + path.replace(".", "_") for path in trees["unet"]}
    clip = {f"lora_te_text_model_encoder_layers_{i}_{name}" for i in range(32) for name in COMFY_CLIP}
    return (module in unet or module in clip) and tensor in COMFY_TENSORS


def _tables(pipe):
    """The tiny model's module trees: its shapes are not SD 1.x's, its names are."""
    return {
        component: adaptable(component, getattr(pipe, component)) for component in ("unet", "text_encoder")
    }


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("train"))


@pytest.mark.parametrize(("algo", "kind"), [("lokr", "LoKr"), ("loha", "LoHa")])
def test_train_algo_saves_a_lycoris_file_comfyui_places_and_difflora_composes(
    workspace, tmp_path, algo, kind
):
    """`train --algo lokr --factor 4` / `--algo loha`: the adapter file holds LyCORIS keys under kohya names,
    every one placed by ComfyUI's rules, it reads back with its header, and it composes exactly."""
    targets = ("to_q", "to_v", "conv1")
    changes = {"factor": 4} if algo == "lokr" else {}
    config = tiny_train_config(
        workspace, tmp_path, data="stripes", algo=algo, unet_targets=targets, **changes
    )
    path = trainer.train(config, progress=False)
    written = load_file(path)
    base = load_pipeline(str(workspace / "model"))
    trees = {c: adaptable(c, getattr(base, c)) for c in ("unet", "text_encoder")}
    assert written and not [key for key in written if not comfyui_loads(key, trees)]
    adapter = load_adapter(path)
    assert {w.kind for w in adapter.modules.values()} == {kind}
    assert adapter.meta.config_toml and f'algo = "{algo}"' in adapter.meta.config_toml
    assert any(float(w.delta().abs().max()) > 0 for w in adapter.modules.values())  # it trained
    key = "unet.down_blocks.0.resnets.0.conv1"
    w0 = module_of(base, key).weight.detach().double().clone()
    compose(base, [AdapterWeight(path.stem, 0.6)], adapter_dirs=[path.parent])
    want = w0 + 0.6 * adapter.modules[key].delta().double().reshape(w0.shape)
    assert torch.allclose(module_of(base, key).weight.double(), want, rtol=1e-5, atol=1e-7)


def test_algo_refuses_lora_only_variants_naming_the_flags(workspace, tmp_path):
    with pytest.raises(ConfigError) as error:
        tiny_train_config(
            workspace, tmp_path, data="stripes", algo="loha", dora=True, factor=2, loraplus_ratio=16
        )
    message = str(error.value)
    assert "--dora" in message and "--factor" in message and "--loraplus-ratio" in message
