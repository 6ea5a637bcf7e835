"""Per-consumer load verdicts (`difflora inspect`): known-bad files are caught for the right consumers, and
diffusers' real converter confirms the rule we re-implement for it."""

from __future__ import annotations

import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from difflora.cli import cli
from difflora.formats.consumers.a1111 import a1111_listing
from difflora.formats.consumers.verdicts import verdicts
from difflora.formats.kohya import to_kohya
from difflora.formats.native import adapter_state_dict, save_adapter
from difflora.formats.reference import reference_model
from tests.support.formats import synthetic_adapter

Q = "text_model_encoder_layers_0_self_attn_q_proj"


def by_consumer(keys, metadata=None, family="sd1"):
    return {v.consumer: v for v in verdicts(keys, metadata or {}, family)}


def test_exported_files_load_completely_everywhere():
    for family in ("sd1", "sd2", "sdxl"):
        tensors, metadata = to_kohya(synthetic_adapter(family, rank=1))
        assert all(v.complete for v in verdicts(list(tensors), metadata, family)), family


def test_naive_transformers5_text_encoder_names_are_dropped_by_every_consumer():
    keys = [
        f"lora_te_encoder_layers_0_self_attn_q_proj.{p}"
        for p in ("lora_down.weight", "lora_up.weight", "alpha")
    ]
    results = by_consumer(keys, {"ss_base_model_version": "sd_v1"})
    assert all(set(v.dropped) == set(keys) for v in results.values()), results
    good = [k.replace("lora_te_encoder", "lora_te_text_model_encoder") for k in keys]
    assert all(v.complete for v in by_consumer(good, {"ss_base_model_version": "sd_v1"}).values())


def test_native_peft_file_is_for_diffusers_only():
    """FORMATS.md: ComfyUI reads text_encoder.… PEFT keys but not unet.….lora_A; A1111 reads neither."""
    keys = list(adapter_state_dict(synthetic_adapter("sd1", rank=1)))
    results = by_consumer(keys)
    assert results["diffusers"].complete
    comfy_dropped = results["ComfyUI"].dropped
    assert comfy_dropped and all(k.startswith("unet.") for k in comfy_dropped)
    assert results["ComfyUI"].loaded == sum(k.startswith("text_encoder.") for k in keys)
    assert results["A1111/Forge"].loaded == 0


def test_tucker_and_loha_tensors_break_diffusers_but_not_comfyui():
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    keys = [f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.lora_mid.weight", f"{name}.alpha"]
    results = by_consumer(keys)
    assert "not correctly renamed" in results["diffusers"].fatal
    assert results["ComfyUI"].complete
    loha = [f"{name}.hada_w1_a", f"{name}.hada_w1_b", f"{name}.hada_w2_a", f"{name}.hada_w2_b"]
    assert by_consumer(loha)["A1111/Forge"].complete and by_consumer(loha)["diffusers"].fatal


def test_a1111_hides_a_lora_whose_metadata_names_another_base():
    assert "HIDDEN" in a1111_listing({"ss_base_model_version": "sd_v1"}, "sdxl")
    assert "listed for SDXL" in a1111_listing({"ss_base_model_version": "sdxl_base_v1-0"}, "sdxl")
    assert "every checkpoint" in a1111_listing({}, "sdxl")


def test_diffusers_positional_sgm_rule_matches_diffusers_itself():
    """SD1's first up block has no attention, so its upsampler is SGM slot 1; diffusers maps slot 1 to
    `attentions` and misses the layer. Our verdict must say so, and diffusers' own code must agree."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_unet_lora_key,
        _maybe_map_sgm_blocks_to_diffusers,
    )

    name = "lora_unet_output_blocks_2_1_conv"
    keys = [f"{name}.lora_down.weight", f"{name}.lora_up.weight"]
    assert set(by_consumer(keys)["diffusers"].dropped) == set(keys)
    assert by_consumer(keys)["ComfyUI"].complete and by_consumer(keys)["A1111/Forge"].complete
    mapped = _maybe_map_sgm_blocks_to_diffusers(
        {k: torch.zeros(1) for k in keys}, reference_model("sd1", "unet").config
    )
    (down,) = [k for k in mapped if k.endswith("lora_down.weight")]
    converted = _convert_unet_lora_key(down).rsplit(".lora.", 1)[0]  # diffusers' own renaming
    assert converted == "up_blocks.0.attentions.2.conv"
    assert converted not in dict(reference_model("sd1", "unet").named_modules())


def test_cli_export_and_inspect_print_the_verdicts(tmp_path):
    native = save_adapter(synthetic_adapter("sd1", rank=1), tmp_path / "style.safetensors")
    runner = CliRunner()
    result = runner.invoke(cli, ["export", str(native), "--dtype", "fp16"])
    assert result.exit_code == 0, result.output
    exported = tmp_path / "style.comfyui.safetensors"
    assert exported.is_file() and "ComfyUI: loads all 528 keys" in result.output
    inspected = runner.invoke(cli, ["inspect", str(exported)])
    assert inspected.exit_code == 0, inspected.output
    for line in (
        "ComfyUI: loads all 528 keys",
        "A1111/Forge: loads all 528 keys",
        "diffusers: loads all 528 keys",
    ):
        assert line in inspected.output
    assert "detected as SD1: listed for SD1 checkpoints" in inspected.output
    native_report = runner.invoke(cli, ["inspect", str(native)]).output
    assert "ComfyUI: 96/352 keys load" in native_report and "not loaded: unet." in native_report
    again = runner.invoke(cli, ["export", str(native)])
    assert again.exit_code != 0 and "--overwrite" in again.output


def test_a_file_with_a_damaged_pair_is_refused_on_import(tmp_path):
    from difflora.errors import AdapterFormatError
    from difflora.formats.read import load_adapter

    save_file(
        {
            f"lora_te_{Q}.lora_down.weight": torch.zeros(2, 768),
            f"lora_te_{Q}.lora_up.weight": torch.zeros(2, 768),
        },
        tmp_path / "swapped.safetensors",
    )
    try:
        load_adapter(tmp_path / "swapped.safetensors")
    except AdapterFormatError as error:
        assert "swapped" in str(error)
    else:
        raise AssertionError("a file with lora_up/lora_down of mismatched rank must be refused")


def test_locon_convolutions_export_in_kohya_names_every_consumer_loads():
    """--conv-rank adapts the ResNets' 3x3 convs: exported as lora_unet_..._conv1/_conv2 (SGM's in_layers_2 /
    out_layers_3 for SDXL), every key loaded by ComfyUI's, A1111's and diffusers' rules."""

    def resnet_conv(path: str) -> bool:
        return ".resnets." in path and path.endswith((".conv1", ".conv2"))

    # kohya's SDXL UNet is the SGM one: its ResNet convs are in_layers.2 and out_layers.3
    names = {"sd1": ("_conv1", "_conv2"), "sdxl": ("_in_layers_2", "_out_layers_3")}
    for family, suffixes in names.items():
        adapter = synthetic_adapter(family, rank=2, select=lambda p: resnet_conv(p) or p.endswith(".to_q"))
        tensors, metadata = to_kohya(adapter)
        convs = [k for k in tensors if k.endswith(tuple(f"{s}.lora_down.weight" for s in suffixes))]
        assert convs and all(tensors[k].shape[2:] == (3, 3) for k in convs), family
        assert all(v.complete for v in verdicts(list(tensors), metadata, family)), family
