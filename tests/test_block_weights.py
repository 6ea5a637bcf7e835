"""Per-block weights: the grammar (`@out=1,in=0`, A1111 LoRA Block Weight vectors and presets), each family's
block table against the extension's published block lists, and block-weighted composition equal to the
per-module hand computation, in both modes, for a LoRA that lacks some blocks too."""

from __future__ import annotations

import json

import pytest
import torch

from difflora.composition.blocks import module_block
from difflora.composition.composer import Composer
from difflora.composition.merge import merge_adapters
from difflora.config.blocks import VECTOR_BLOCKS
from difflora.config.spec import parse_adapter_weights
from difflora.errors import AdapterSpecError
from difflora.formats.reference import reference_model
from tests.support.adapters import base_weights, effective_forward_error, module_of, random_adapter
from tests.support.formats import synthetic_adapter

# The extension's BLOCKID lists (hako-mikan/sd-webui-lora-block-weight scripts/lora_block_weight.py), "M00" = MID.
LBW = {
    17: "BASE IN01 IN02 IN04 IN05 IN07 IN08 M00 OUT03 OUT04 OUT05 OUT06 OUT07 OUT08 OUT09 OUT10 OUT11",
    12: "BASE IN04 IN05 IN07 IN08 M00 OUT00 OUT01 OUT02 OUT03 OUT04 OUT05",
    26: "BASE "
    + " ".join(f"IN{i:02d}" for i in range(12))
    + " M00 "
    + " ".join(f"OUT{i:02d}" for i in range(12)),
    20: "BASE "
    + " ".join(f"IN{i:02d}" for i in range(9))
    + " M00 "
    + " ".join(f"OUT{i:02d}" for i in range(9)),
}
# The tiny test UNet's blocks by hand from its config (2 cross-attention down blocks, 1 layer each; SGM order:
# conv_in, then per down block its layer and its downsampler; the up blocks' 2 layers each).
TINY_BLOCKS = {
    "down_blocks.0.attentions.0": "IN01",
    "down_blocks.0.resnets.0": "IN01",
    "down_blocks.1.attentions.0": "IN03",
    "down_blocks.1.resnets.0": "IN03",
    "mid_block": "MID",
    "up_blocks.0.attentions.0": "OUT00",
    "up_blocks.0.resnets.0": "OUT00",
    "up_blocks.0.attentions.1": "OUT01",
    "up_blocks.0.resnets.1": "OUT01",
    "up_blocks.1.attentions.0": "OUT02",
    "up_blocks.1.resnets.0": "OUT02",
    "up_blocks.1.attentions.1": "OUT03",
    "up_blocks.1.resnets.1": "OUT03",
}


def test_vectors_are_the_extension_s_orders():
    for size, names in LBW.items():
        assert VECTOR_BLOCKS[size] == tuple(n.replace("M00", "MID") for n in names.split())


@pytest.mark.parametrize(("family", "size", "lycoris"), [("sd1", 17, 26), ("sdxl", 12, 20)])
def test_attention_blocks_of_each_family_are_the_extension_s_lora_blocks(family, size, lycoris):
    """The blocks holding attention layers are exactly the blocks of the extension's LoRA vector (17 for SD
    1.x, 12 for SDXL); every UNet module lies in one of its LyCORIS vector's blocks (26, 20) or none."""
    unet = reference_model(family, "unet")
    names = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    attention = {module_block(unet, n, {}) for n in names if ".transformer_blocks." in n}
    assert attention == set(LBW[size].replace("M00", "MID").split()) - {"BASE"}
    every = {module_block(unet, n, {}) for n in names}
    assert every <= set(LBW[lycoris].replace("M00", "MID").split()) | {""}


def test_grammar_reads_groups_blocks_vectors_and_presets():
    (style, plain, vector) = parse_adapter_weights("style:0.8@out=1,mid=0.5,in=0,IN04=2,plain:0.3,v@OUTALL")
    assert str(style) == "style:0.8@out=1,mid=0.5,in=0,IN04=2" and plain.blocks is None
    factors = {b: style.block_factor(b) for b in ("OUT07", "MID", "IN01", "IN04", "BASE", "")}
    assert factors == {"OUT07": 1.0, "MID": 0.5, "IN01": 0.0, "IN04": 2.0, "BASE": 1.0, "": 1.0}
    # the extension's OUTALL row: 1,0,0,0,0,0,0,0,1,... (BASE, the text encoder, kept at 1)
    assert [vector.block_factor(b) for b in ("BASE", "IN01", "MID", "OUT03", "OUT11")] == [1, 0, 0, 1, 1]
    (flux,) = parse_adapter_weights("f:1@double=0.5,double3-5=2,single7=0")
    assert [flux.block_factor(b) for b in ("DOUBLE0", "DOUBLE4", "SINGLE7", "SINGLE8")] == [0.5, 2, 0, 1]


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("a@1,0,1", "3 values"),
        ("a@in", "not SELECTOR=FACTOR"),
        ("a@in=x", "not a number"),
        ("a@in5-2=1", "empty"),
    ],
)
def test_malformed_block_weights_are_refused_showing_the_grammar(spec, needle):
    with pytest.raises(AdapterSpecError, match=needle) as error:
        parse_adapter_weights(spec)
    assert "Grammar" in str(error.value)


SPEC = "a:0.8:0.5@in=0.5,IN03=2,mid=-1,OUT02=0,base=3,b:1.2@" + ",".join(f"{i / 10:g}" for i in range(26))


def expected_factor(name: str, key: str) -> float:
    """The factor by hand: adapter a's rules, and b's 26-vector by block position in the extension's order."""
    if key.startswith("text_encoder."):
        return {"a": 3.0, "b": 0.0}[name]
    block = next((b for prefix, b in TINY_BLOCKS.items() if key.startswith(f"unet.{prefix}.")), "")
    if name == "a":
        return {"IN01": 0.5, "IN03": 2.0, "MID": -1.0, "OUT02": 0.0}.get(block, 1.0)
    return LBW[26].replace("M00", "MID").split().index(block) / 10 if block else 1.0


@pytest.mark.parametrize("mode", ["fused", "dynamic"])
def test_block_weighted_composition_equals_the_hand_computation(pipeline, mode):
    """Adapter b adapts the up blocks only: each of its modules takes its own block's value of the 26-vector
    (OUT00 the 15th), not the vector's first values (the misalignment positional block-weight nodes have)."""
    a = random_adapter(pipeline, seed=1, unet=("to_q", "conv1"), te=("q_proj",), name="a")
    b = random_adapter(pipeline, seed=2, unet=("to_v",), name="b")
    b.modules = {k: w for k, w in b.modules.items() if k.startswith("unet.up_blocks.")}
    base = base_weights(pipeline)
    composer = Composer(pipeline, mode)
    specs = parse_adapter_weights(SPEC)
    for spec, adapter in zip(specs, (a, b), strict=True):
        composer.add(adapter, spec.weight, spec.te_weight, name=spec.name)
    composer.set_weights(specs)
    want = {key: value.double().clone() for key, value in base.items()}
    for spec, adapter in zip(specs, (a, b), strict=True):
        for key, weights in adapter.modules.items():
            weight = spec.weight_for(key.partition(".")[0]) * expected_factor(spec.name, key)
            want[key] += weight * weights.delta().double().reshape(want[key].shape)
    assert any(expected_factor("b", k) == 1.4 for k in b.modules)  # OUT00 is present, IN/MID are not
    adapted = set(a.modules) | set(b.modules)
    for key, value in want.items():
        if mode == "dynamic" and key not in adapted:
            continue  # peft layers only where an adapter is; the fused check covers W0 elsewhere
        module = module_of(pipeline, key)
        if mode == "fused":
            assert torch.allclose(module.weight.double(), value, rtol=1e-5, atol=1e-6), key
        else:
            assert effective_forward_error(module, value) < 1e-4, key


def sd1_block(key: str) -> str:
    """SD 1.x's attention blocks by hand: down_blocks.i.attentions.j is IN(1+3i+j), up_blocks.i.attentions.j
    is OUT(3i+j) (kohya's and ComfyUI's diffusers-to-SGM map), the text encoder BASE."""
    parts = key.split(".")
    if parts[0] == "text_encoder":
        return "BASE"
    if parts[1] == "mid_block":
        return "MID"
    i, j = int(parts[2]), int(parts[4])
    return f"IN{1 + 3 * i + j:02d}" if parts[1] == "down_blocks" else f"OUT{3 * i + j:02d}"


def test_merge_bakes_block_weights_into_a_plain_lora():
    adapter = synthetic_adapter("sd1", rank=2, select=lambda path: path.endswith(("attn1.to_q", "q_proj")))
    (spec,) = parse_adapter_weights("x:0.5:2@in=0,IN05=3,OUT03=2,base=0.25")
    result = merge_adapters([(spec, adapter)])
    factors = {"BASE": 0.25, "IN05": 3.0, "OUT03": 2.0, "MID": 1.0}
    for key, weights in adapter.modules.items():
        block = sd1_block(key)
        factor = factors.get(block, 0.0 if block.startswith("IN") else 1.0)
        weight = spec.weight_for(key.partition(".")[0]) * factor
        if weight == 0:
            assert key not in result.adapter.modules, key  # a block weighted 0 is left out
            continue
        merged = result.adapter.modules[key]  # one LoRA merged exactly: its down, its up times w·f·α/r
        assert merged.kind == "LoRA" and torch.equal(merged.down, weights.down.float())
        assert torch.allclose(merged.up * merged.scale, weights.up * (weights.scale * weight), atol=1e-7), key
    assert "IN05" in {sd1_block(k) for k in result.adapter.modules}
    assert json.loads(result.adapter.meta.extra["difflora.merged_from"])[0]["blocks"] == spec.blocks.text


def test_report_weights_by_block_and_shows_each_block_s_share(pipeline):
    """The report's weights are the block-weighted ones; the shares are each block's part of Σ‖Σ wᵢΔWᵢ‖²."""
    adapter = random_adapter(pipeline, seed=3, unet=("to_q",), name="s")
    composer = Composer(pipeline, "fused")
    composer.add(adapter, name="s")
    (spec,) = parse_adapter_weights("s:0.5@in=0,OUT02=2")
    composer.set_weights([spec])
    report = composer.report()
    energy: dict[str, float] = {}
    for key, weights in adapter.modules.items():
        block = next(b for prefix, b in TINY_BLOCKS.items() if key.startswith(f"unet.{prefix}."))
        factor = {"IN01": 0.0, "IN03": 0.0, "OUT02": 2.0}.get(block, 1.0)
        layer = next(la for la in report.layers if la.module == key)
        assert layer.weights == (pytest.approx(0.5 * factor),)
        energy[block] = energy.get(block, 0.0) + float((0.5 * factor * weights.delta().double()).norm()) ** 2
    total = sum(energy.values())
    assert report.block_shares() == {b: pytest.approx(e / total) for b, e in energy.items()}
    assert "Share of the composed update per block: " in report.text()
