"""`difflora export FILE:W:TE@BLOCKS` bakes the weights and block weights into the written file, each module
keeping its kind: loaded at strength 1 by ComfyUI or A1111, the file is the spec. Checked key by key on an SD 1.x
file holding a LoKr (W1 whole and factorised), a Tucker LoHa, a full module with a bias and LoRAs, made in the
test from the published key grammar; every expected ΔW is computed by the formulas of tests/support/lycoris.py
(independent of difflora) times the weight and block factor by hand."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from difflora.cli import cli
from difflora.formats.consumers.verdicts import verdicts
from tests.support.lycoris import expected_delta, full_tensors, loha_tensors, lokr_tensors

# kohya name, shape, SD 1.x block by hand (down_blocks.i.attentions.j / resnets.j is IN(1+3i+j), up_blocks.i's
# layer j is OUT(3i+j), the text encoder BASE)
LOKR_Q = ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", (640, 640), "IN04")
LOKR_V = ("lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_attn1_to_v", (1280, 1280), "IN08")
LOHA_CONV = ("lora_unet_down_blocks_0_resnets_0_conv1", (320, 320, 3, 3), "IN01")
FULL_OUT = ("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0", (1280, 1280), "OUT03")
LORA_MID = ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_k", (1280, 1280), "MID")
LORA_UP = ("lora_unet_up_blocks_2_attentions_1_transformer_blocks_0_attn2_to_k", (640, 768), "OUT07")
FULL_TE = ("lora_te_text_model_encoder_layers_3_mlp_fc1", (3072, 768), "BASE")
MODULES = (LOKR_Q, LOKR_V, LOHA_CONV, FULL_OUT, LORA_MID, LORA_UP, FULL_TE)
SPEC = "@in=0.5,IN04=2,OUT03=-1,out=0,mid=1.5,base=3"
FACTORS = {"IN04": 2.0, "IN08": 0.5, "IN01": 0.5, "OUT03": -1.0, "OUT07": 0.0, "MID": 1.5, "BASE": 3.0}
WEIGHT, TE_WEIGHT = 0.8, 0.5


def lora(name: str, shape: tuple[int, ...], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"{name}.lora_down.weight": torch.randn(4, shape[1], generator=g) * 0.1,
        f"{name}.lora_up.weight": torch.randn(shape[0], 4, generator=g) * 0.1,
        f"{name}.alpha": torch.tensor(2.0),
    }


def delta(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if f"{name}.lora_down.weight" in tensors:
        down, up = tensors[f"{name}.lora_down.weight"].double(), tensors[f"{name}.lora_up.weight"].double()
        return float(tensors[f"{name}.alpha"]) / down.shape[0] * (up @ down)
    return expected_delta(tensors, name, shape)


@pytest.fixture
def source(tmp_path) -> tuple[str, dict[str, torch.Tensor]]:
    tensors = (
        lokr_tensors(*LOKR_Q[:2], layout="lowrank-full", seed=1)
        | lokr_tensors(*LOKR_V[:2], layout="full-lowrank", seed=2)
        | loha_tensors(*LOHA_CONV[:2], tucker=True, seed=3)
        | full_tensors(*FULL_OUT[:2], bias=True, seed=4)
        | lora(*LORA_MID[:2], seed=5)
        | lora(*LORA_UP[:2], seed=6)
        | full_tensors(*FULL_TE[:2], seed=7)
    )
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, path)
    return str(path), tensors


def test_export_bakes_weights_and_block_weights_key_by_key(source, tmp_path):
    path, tensors = source
    out = tmp_path / "baked.safetensors"
    spec = f"{path}:{WEIGHT}:{TE_WEIGHT}{SPEC}"
    result = CliRunner().invoke(cli, ["export", spec, "-o", str(out), "--dtype", "fp32"])
    assert result.exit_code == 0, result.output
    written = load_file(out)
    for name, shape, block in MODULES:
        weight = (TE_WEIGHT if block == "BASE" else WEIGHT) * FACTORS[block]
        mine = {k for k in tensors if k.startswith(name + ".")}
        if weight == 0:
            assert not any(k.startswith(name + ".") for k in written), name  # weighted 0: left out
            continue
        # the same keys (the same kind, rank and alpha), and the spec's ΔW
        assert {k for k in written if k.startswith(name + ".")} == mine, name
        got, want = delta(written, name, shape), weight * delta(tensors, name, shape)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7), name
        if f"{name}.diff_b" in tensors:
            assert torch.allclose(
                written[f"{name}.diff_b"].double(), weight * tensors[f"{name}.diff_b"].double()
            )
    results = {v.consumer: v for v in verdicts(list(written), {}, "sd1")}
    assert results["ComfyUI"].complete and results["A1111/Forge"].complete


def test_a_plain_file_exports_unchanged_and_bad_specs_are_refused_in_one_line(source, tmp_path):
    path, tensors = source
    result = CliRunner().invoke(
        cli, ["export", path, "-o", str(tmp_path / "plain.safetensors"), "--dtype", "fp32"]
    )
    assert result.exit_code == 0, result.output
    written = load_file(tmp_path / "plain.safetensors")
    assert all(torch.equal(written[k], v) for k, v in tensors.items() if not k.endswith(".alpha"))
    other = tmp_path / "other.safetensors"
    save_file(tensors, other)
    for spec, needle in [
        (f"{path}@otu=0", "Block selector 'otu' names no block of this sd1 model"),
        (f"{path}:0.5,{other}:1", "export takes one adapter, got 2"),
        (f"{path}:0@in=1", "is weighted 0"),
    ]:
        result = CliRunner().invoke(cli, ["export", spec, "-o", str(tmp_path / "x.safetensors")])
        assert result.exit_code != 0 and needle in result.output, result.output
        assert not (tmp_path / "x.safetensors").exists()
