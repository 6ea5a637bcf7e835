"""Kohya names of the real SD1.5 / SD2.1 / SDXL module trees (meta device): golden lists, counts, the SGM
block map stated in FORMATS.md, and diffusers' own converter reaching every exported module."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from difflora.formats.kohya import to_kohya
from difflora.formats.naming import parse_kohya_name, reference_table, resolve_kohya_name
from difflora.formats.reference import reference_model
from tests.support.formats import synthetic_adapter

GOLDEN = Path(__file__).resolve().parents[1] / "difflora" / "formats" / "golden"
# Module counts of attention-only adapters (FORMATS.md): transformer blocks x 8 for the UNet, layers x 4 per
# text encoder. SD2.1's text encoder has 23 layers (OpenCLIP-H without its unused last block).
COUNTS = {
    "sd1": {"lora_unet": 128, "lora_te": 48},
    "sd2": {"lora_unet": 128, "lora_te": 92},
    "sdxl": {"lora_unet": 560, "lora_te1": 48, "lora_te2": 128},
}


def exported_names(family: str) -> list[str]:
    tensors, _ = to_kohya(synthetic_adapter(family, rank=1))
    return sorted({key.split(".")[0] for key in tensors})


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_exported_names_match_golden_list_and_counts(family):
    names = exported_names(family)
    golden = (GOLDEN / f"{family}_attention.txt").read_text().split()
    assert names == golden, "naming changed: review, then run scripts/make_golden_keys.py"
    prefixes = Counter(name.split("_text_model")[0] if "_te" in name[:9] else "lora_unet" for name in names)
    assert dict(prefixes) == COUNTS[family]


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_text_encoder_names_are_classic_never_flattened(family):
    te_names = [n for n in exported_names(family) if not n.startswith("lora_unet_")]
    expected_prefixes = ("lora_te1_", "lora_te2_") if family == "sdxl" else ("lora_te_",)
    assert te_names and all(
        n.startswith(tuple(p + "text_model_encoder_layers_" for p in expected_prefixes)) for n in te_names
    )
    assert not any("_encoder_layers_" in n and "text_model" not in n for n in te_names)


def test_sdxl_unet_uses_sgm_block_names_from_formats_md():
    table = reference_table("sdxl")
    expected = {  # library/sdxl_model_util.make_unet_conversion_map, as FORMATS.md states it
        "down_blocks.1.attentions.0": "input_blocks.4.1",
        "down_blocks.1.attentions.1": "input_blocks.5.1",
        "down_blocks.2.attentions.0": "input_blocks.7.1",
        "down_blocks.2.attentions.1": "input_blocks.8.1",
        "mid_block.attentions.0": "middle_block.1",
        "up_blocks.0.attentions.0": "output_blocks.0.1",
        "up_blocks.0.attentions.2": "output_blocks.2.1",
        "up_blocks.1.attentions.0": "output_blocks.3.1",
        "up_blocks.1.attentions.2": "output_blocks.5.1",
    }
    for block, sgm in expected.items():
        key = f"unet.{block}.transformer_blocks.0.attn1.to_q"
        assert table.to_kohya[key] == "lora_unet_" + f"{sgm}.transformer_blocks.0.attn1.to_q".replace(
            ".", "_"
        )
    assert not any("down_blocks" in n or "up_blocks" in n for n in exported_names("sdxl"))


def test_sd1_unet_keeps_diffusers_names():
    names = exported_names("sd1")
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0" in names
    assert "lora_te_text_model_encoder_layers_11_self_attn_out_proj" in names


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_every_accepted_name_reads_back_to_its_module(family):
    table = reference_table(family)
    for key, name in table.to_kohya.items():
        assert resolve_kohya_name(name, [family]) == key
    for name, key in table.from_kohya.items():  # SGM and diffusers spellings, lora_te/lora_te1 aliases
        assert key in table.modules, name


def test_families_never_disagree_about_a_name():
    seen: dict[str, str] = {}
    for family in ("sd1", "sd2", "sdxl"):
        for name, key in reference_table(family).from_kohya.items():
            assert seen.setdefault(name, key) == key, name


def test_names_of_an_unknown_architecture_parse_without_guessing():
    from tests.support.models import tiny_unet

    for name, _ in tiny_unet().named_modules():
        if name.endswith(("to_q", "to_out.0", "proj_in", "ff.net.0.proj", "time_emb_proj")):
            assert parse_kohya_name("lora_unet_" + name.replace(".", "_")) == "unet." + name
    assert parse_kohya_name("lora_unet_no_such_layer_here") is None


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_diffusers_own_kohya_converter_reaches_every_exported_module(family):
    """diffusers' real converter (not our re-implementation) on the exported keys of the real architecture:
    nothing left over, and every converted name is a module of the meta-device model."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    tensors, _ = to_kohya(synthetic_adapter(family, rank=1, select=lambda p: True))
    unet = reference_model(family, "unet")
    state = _maybe_map_sgm_blocks_to_diffusers(dict(tensors), unet.config)
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(state)
    assert len(alphas) == len(tensors) // 3
    unet_keys = convert_unet_state_dict_to_peft(
        {k[5:]: v for k, v in converted.items() if k.startswith("unet.")}
    )
    unet_modules = {name for name, _ in unet.named_modules()}
    missing = {k.rsplit(".lora_", 1)[0] for k in unet_keys} - unet_modules
    assert not missing, sorted(missing)[:5]
    n_unet = sum(1 for k in tensors if k.startswith("lora_unet_") and k.endswith(".alpha"))
    assert len(unet_keys) == 2 * n_unet
    assert torch.is_tensor(next(iter(converted.values())))
