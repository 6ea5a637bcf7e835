"""Flux LoRA export: kohya/ComfyUI names in BFL's fused layout, and diffusers' `transformer.*` layout.

A small random diffusers Flux transformer carries a peft LoRA; what difflora writes is loaded by
independent re-implementations of the consumers (tests/support/comfyui_flux.py: ComfyUI's key map and
`calculate_weight`) or by the consumers themselves (diffusers' `FluxLoraLoaderMixin`, its kohya converter),
and the weights they make are compared with W0 + ΔW as peft computes it.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner
from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import safe_open, save_file

from difflora.adapter.types import Adapter, AdapterMeta, LoraWeights
from difflora.cli import cli
from difflora.errors import AdapterCompatibilityError
from difflora.formats.consumers.diffusers_layout import diffusers_layout
from difflora.formats.consumers.verdicts import verdicts
from difflora.formats.export import export_bytes
from difflora.formats.kohya import to_kohya
from difflora.formats.naming import build_table
from difflora.formats.reference import adaptable, load_config, reference_modules
from tests.support import comfyui_flux as comfy
from tests.support import flux_files
from tests.support.adapters import peft_adapter, peft_deltas
from tests.support.flux_model import base_weights, lora_model, small_flux


@pytest.fixture(scope="module")
def model():
    return lora_model()


def comfyui_result(model, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict, set[str]]:
    """(ComfyUI's patched BFL weights, the BFL weights of W0 + peft's ΔW, keys ComfyUI does not load)."""
    config = dict(model.config)
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    table = comfy.diffusers_to_bfl(config, model.single_transformer_blocks[0].mlp_hidden_dim)
    base = base_weights(model)
    w0 = comfy.bfl_weights(base, table)
    patches, not_loaded = comfy.load_lora(tensors, comfy.lora_key_map(list(w0), table, hidden))
    deltas = peft_deltas(model)
    expected = comfy.bfl_weights({k: w + deltas.get(f"transformer.{k}", 0) for k, w in base.items()}, table)
    return comfy.patched(w0, patches), expected, not_loaded


def relative_errors(got: dict, expected: dict) -> dict[str, float]:
    return {k: float((got[k] - expected[k]).norm() / expected[k].norm()) for k in expected}


def test_kohya_export_names_each_bfl_layer_of_the_model(model):
    adapter = peft_adapter(model, family="flux")
    tensors, _ = to_kohya(
        adapter, dtype=torch.float32, modules={"transformer": adaptable("transformer", model)}
    )
    config = dict(model.config)
    table = comfy.diffusers_to_bfl(config, model.single_transformer_blocks[0].mlp_hidden_dim)
    expected = {
        "lora_unet_" + bfl.removesuffix(".weight").replace(".", "_")
        for key, (bfl, _, _) in table.items()
        if f"transformer.{key.removesuffix('.weight')}" in adapter.modules
    }
    names = {key.split(".")[0] for key in tensors}
    assert names == expected
    assert len(tensors) == 3 * len(names)  # lora_down, lora_up, alpha each
    for block in range(config["num_layers"]):
        assert tensors[f"lora_unet_double_blocks_{block}_img_attn_qkv.lora_down.weight"].shape[0] == 9
    for block in range(config["num_single_layers"]):
        assert tensors[f"lora_unet_single_blocks_{block}_linear1.lora_down.weight"].shape[0] == 12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_comfyui_loads_every_exported_key_and_makes_difflora_weights(model, dtype):
    adapter = peft_adapter(model, family="flux")
    live = {"transformer": adaptable("transformer", model)}
    tensors, _ = to_kohya(adapter, dtype=dtype, modules=live)
    patched, expected, not_loaded = comfyui_result(model, tensors)
    assert not not_loaded
    w0 = comfy.bfl_weights(base_weights(model), comfy.diffusers_to_bfl(dict(model.config), 128))
    assert all(not torch.equal(w0[k], expected[k]) for k in expected)  # every layer is adapted
    errors = relative_errors(patched, expected)
    # fp32: the fused update equals the split one to float32 rounding; fp16: the file's own rounding.
    assert max(errors.values()) < (1e-5 if dtype == torch.float32 else 2e-3), errors


def test_a_partly_trained_fused_layer_gets_zero_rows_and_still_matches():
    model = lora_model(("to_q", "to_v", "add_k_proj", "proj_mlp", "norm_out.linear"))
    tensors, _ = to_kohya(
        peft_adapter(model, family="flux"),
        dtype=torch.float32,
        modules={"transformer": adaptable("transformer", model)},
    )
    hidden = model.config.num_attention_heads * model.config.attention_head_dim
    up = tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    assert up.shape == (3 * hidden, 6) and up[hidden : 2 * hidden].abs().sum() == 0  # to_k untrained
    assert tensors["lora_unet_single_blocks_1_linear1.lora_down.weight"].shape[0] == 9  # q, v, mlp
    patched, expected, not_loaded = comfyui_result(model, tensors)
    assert not not_loaded and max(relative_errors(patched, expected).values()) < 1e-5


def test_diffusers_layout_loads_into_diffusers_with_the_same_updates(model, tmp_path):
    path = tmp_path / "flux.diffusers.safetensors"
    path.write_bytes(export_bytes(peft_adapter(model, family="flux"), "diffusers", torch.float32))
    state_dict, metadata = FluxLoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
    assert all(key.startswith("transformer.") for key in state_dict)
    fresh = small_flux()
    fresh.load_lora_adapter(state_dict, prefix="transformer", metadata=metadata, adapter_name="file")
    deltas = peft_deltas(model)
    loaded = {
        f"transformer.{name}": module.get_delta_weight("file")
        for name, module in fresh.named_modules()
        if "file" in getattr(module, "lora_A", {})
    }
    assert set(loaded) == set(deltas)
    for key, delta in loaded.items():
        torch.testing.assert_close(delta, deltas[key], rtol=0, atol=0)


def reference_adapter(family: str = "flux", rank: int = 2, alpha: float = 3.0) -> Adapter:
    """Random LoRAs on the first and last blocks and every top-level Linear of the full-size Flux.1 tree."""
    modules = reference_modules(family, "transformer")
    config = load_config(family, "transformer")
    edges = {
        f"transformer_blocks.{config['num_layers'] - 1}.",
        "transformer_blocks.0.",
        "single_transformer_blocks.0.",
        f"single_transformer_blocks.{config['num_single_layers'] - 1}.",
    }
    g = torch.Generator().manual_seed(0)
    chosen = {
        f"transformer.{path}": LoraWeights(
            torch.randn(rank, info.in_features, generator=g) * 0.1,
            torch.randn(info.out_features, rank, generator=g) * 0.1,
            alpha,
        )
        for path, info in modules.items()
        if path.startswith(tuple(edges)) or "blocks." not in path
    }
    return Adapter(chosen, AdapterMeta(name="full", base_family=family))


def test_full_size_kohya_export_is_converted_by_diffusers_to_the_same_updates():
    """diffusers' own kohya Flux converter (19/38 blocks, 3072 wide, as it hard-codes) splits the fused
    layers back with difflora's ΔW. It names the layers outside the blocks without `transformer.`, so
    `load_lora_weights` drops them: the diffusers verdict says so, key by key."""
    adapter = reference_adapter()
    tensors, metadata = to_kohya(adapter, dtype=torch.float32)
    converted = FluxLoraLoaderMixin.lora_state_dict({k: v.clone() for k, v in tensors.items()})
    converted = converted[0] if isinstance(converted, tuple) else converted
    modules = {k.removesuffix(".lora_A.weight") for k in converted if k.endswith(".lora_A.weight")}
    in_blocks = {key for key in adapter.modules if "blocks." in key}
    assert modules == in_blocks | {
        key.removeprefix("transformer.") for key in set(adapter.modules) - in_blocks
    }
    probe = torch.Generator().manual_seed(1)
    for key, weights in adapter.modules.items():
        # ΔW applied to random vectors (full-size ΔW matrices would take gigabytes): equal products of
        # 8 random vectors mean equal matrices, but for a chance of measure zero.
        vectors = torch.randn(weights.down.shape[1], 8, generator=probe)
        name = key if key in in_blocks else key.removeprefix("transformer.")
        got = converted[f"{name}.lora_B.weight"] @ (converted[f"{name}.lora_A.weight"] @ vectors)
        if name.startswith(("norm_out", "proj_out")):  # diffusers ignores the final layer's alpha
            got = got * weights.scale
        expected = weights.scale * (weights.up @ (weights.down @ vectors))
        assert float((got - expected).norm() / expected.norm()) < 1e-5, key
    comfyui, forge, diffusers = verdicts(list(tensors), metadata, "flux")
    assert comfyui.complete and forge.complete
    outside = {k for k in tensors if not k.startswith(("lora_unet_double_blocks", "lora_unet_single_blocks"))}
    assert set(diffusers.dropped) == outside and not diffusers.fatal


def test_full_size_exports_place_every_key_in_comfyuis_map():
    adapter = reference_adapter()
    config = load_config("flux", "transformer")
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    table = comfy.diffusers_to_bfl(config, 4 * hidden)
    bfl_keys = sorted({f"diffusion_model.{bfl}" for bfl, _, _ in table.values()})
    key_map = comfy.lora_key_map(bfl_keys, table, hidden)
    kohya, _ = to_kohya(adapter, dtype=torch.float32)
    native = load_safetensors_bytes(export_bytes(adapter, "diffusers", torch.float32))
    for tensors in (kohya, native):
        _, not_loaded = comfy.load_lora(tensors, key_map)
        assert not not_loaded
    names = [f.consumer for f in verdicts(list(kohya), {}, "flux")]
    assert names == ["ComfyUI", "Forge", "diffusers"]


def test_metadata_states_flux_as_kohya_and_modelspec_do(model, tmp_path):
    adapter = peft_adapter(model, family="flux")
    live = {"transformer": adaptable("transformer", model)}
    for family, architecture in (("flux", "flux-1-dev/lora"), ("flux-schnell", "flux-1-schnell/lora")):
        adapter.meta.base_family = family
        tensors, metadata = to_kohya(adapter, dtype=torch.float32, modules=live)
        assert metadata["ss_base_model_version"] == "flux1"
        assert metadata["ss_network_module"] == "networks.lora_flux"
        assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("3", "6.0")
        assert metadata["modelspec.architecture"] == architecture
        assert metadata["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
        assert metadata["modelspec.resolution"] == "1024x1024"
        assert "modelspec.prediction_type" not in metadata  # flow matching: neither epsilon nor v
        assert metadata["difflora.base_family"] == family
        alphas = {k: float(v) for k, v in tensors.items() if k.endswith(".alpha")}
        ranks = {k: tensors[k.replace(".alpha", ".lora_down.weight")].shape[0] for k in alphas}
        assert alphas and all(alphas[k] == 2.0 * ranks[k] for k in alphas)  # the true alpha, scale 2
    path = tmp_path / "meta.safetensors"
    path.write_bytes(export_bytes(adapter, "diffusers", torch.float32))
    with safe_open(str(path), "pt") as handle:
        header = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert (header["transformer.r"], header["transformer.lora_alpha"]) == (3, 6.0)


@pytest.mark.parametrize(
    ("targets", "loads"),
    [
        (("to_q", "to_out.0", "add_v_proj", "x_embedder", "norm_out.linear"), True),
        (("to_q", "ff.net.2"), False),
    ],
    ids=["attention-and-top-level", "block-mlp"],
)
def test_diffusers_verdict_on_onetrainer_files_is_what_diffusers_does(targets, loads):
    """diffusers converts OneTrainer's `lora_transformer_` names by block number and attention suffix: a
    block's other layers become the whole block, which PEFT refuses, failing the file."""
    model = lora_model(targets)
    tensors = flux_files.onetrainer_file(peft_adapter(model, family="flux"))
    table = build_table("flux", {"transformer": adaptable("transformer", model)})
    verdict = diffusers_layout(list(tensors), table)
    fresh = small_flux()
    converted = FluxLoraLoaderMixin.lora_state_dict(dict(tensors))
    if not loads:
        assert verdict.fatal and "ff_net_2" in verdict.fatal
        with pytest.raises(ValueError, match="not supported"):
            fresh.load_lora_adapter(converted, prefix="transformer", adapter_name="ot")
        return
    assert verdict.complete
    fresh.load_lora_adapter(converted, prefix="transformer", adapter_name="ot")
    deltas = peft_deltas(model)
    loaded = {
        f"transformer.{n}": m.get_delta_weight("ot")
        for n, m in fresh.named_modules()
        if "ot" in getattr(m, "lora_A", {})
    }
    assert set(loaded) == set(deltas)
    for key, delta in loaded.items():
        torch.testing.assert_close(delta, deltas[key], rtol=1e-5, atol=1e-6)


def test_inspect_gives_each_consumers_verdict_on_a_flux_file(tmp_path):
    adapter = reference_adapter()
    tensors, metadata = to_kohya(adapter)
    kohya = tmp_path / "kohya.safetensors"
    save_file(tensors, kohya, metadata=metadata)
    onetrainer = tmp_path / "onetrainer.safetensors"
    save_file(flux_files.onetrainer_file(adapter), onetrainer)
    result = CliRunner().invoke(cli, ["inspect", str(kohya)])
    assert result.exit_code == 0, result.output
    outside = [k for k in tensors if not k.startswith(("lora_unet_double_blocks", "lora_unet_single_blocks"))]
    assert "Architecture:   flux" in result.output and "imported from kohya" in result.output
    assert f"ComfyUI: loads all {len(tensors)} keys" in result.output
    assert f"Forge: loads all {len(tensors)} keys" in result.output
    assert f"diffusers: {len(tensors) - len(outside)}/{len(tensors)} keys load" in result.output
    result = CliRunner().invoke(cli, ["inspect", str(onetrainer)])
    assert result.exit_code == 0, result.output
    assert re.search(rf"transformer +{len(adapter.modules)} modules", result.output)
    assert f"ComfyUI: loads all {3 * len(adapter.modules)} keys" in result.output
    assert "diffusers: does NOT load" in result.output


def test_export_command_writes_a_flux_adapter_in_both_layouts(tmp_path):
    from difflora.config.export import ExportConfig
    from difflora.formats.export import export_adapter
    from difflora.formats.native import save_adapter
    from difflora.formats.read import load_adapter

    adapter = reference_adapter()
    native = save_adapter(adapter, tmp_path / "flux.safetensors")
    for layout in ("comfyui", "diffusers"):
        path = export_adapter(ExportConfig(adapter=str(native), format=layout, dtype="fp32"))
        back = load_adapter(path)
        assert back.meta.base_family == "flux" and set(back.modules) == set(adapter.modules)
        for key, weights in back.modules.items():
            vectors = torch.randn(weights.down.shape[1], 4)
            got = weights.scale * (weights.up @ (weights.down @ vectors))
            expected = adapter.modules[key].scale * (
                adapter.modules[key].up @ (adapter.modules[key].down @ vectors)
            )
            assert float((got - expected).norm() / expected.norm()) < 1e-6, key


def test_dora_exports_where_a_layer_is_one_module_and_is_refused_where_it_is_fused(model):
    live = {"transformer": adaptable("transformer", model)}
    adapter = peft_adapter(model, family="flux")
    renamed, fused = (
        "transformer.transformer_blocks.0.attn.to_out.0",
        "transformer.transformer_blocks.0.attn.to_q",
    )
    out_rows = adapter.modules[renamed].up.shape[0]
    adapter.modules = {renamed: adapter.modules[renamed]}
    adapter.modules[renamed].magnitude = torch.rand(out_rows) + 0.5
    tensors, _ = to_kohya(adapter, dtype=torch.float32, modules=live)
    assert "lora_unet_double_blocks_0_img_attn_proj.dora_scale" in tensors
    adapter.modules[fused] = LoraWeights(torch.ones(2, 32), torch.ones(32, 2), 2.0, magnitude=torch.ones(32))
    with pytest.raises(AdapterCompatibilityError, match="to_q") as error:
        to_kohya(adapter, dtype=torch.float32, modules=live)
    assert "--format diffusers" in str(error.value)


def test_export_of_a_reduced_flux_takes_layer_sizes_from_the_model_folder(model, tmp_path):
    """A Flux of another width than Flux.1's: the fused layers' part sizes come from `--model`'s configs."""
    from safetensors.torch import load_file

    from difflora.config.export import ExportConfig
    from difflora.formats.export import export_adapter
    from difflora.formats.native import save_adapter

    model.save_config(tmp_path / "base" / "transformer")
    native = save_adapter(peft_adapter(model, family="flux"), tmp_path / "small.safetensors")
    path = export_adapter(ExportConfig(adapter=str(native), model=str(tmp_path / "base"), dtype="fp32"))
    patched, expected, not_loaded = comfyui_result(model, load_file(path))
    assert not not_loaded and max(relative_errors(patched, expected).values()) < 1e-5
