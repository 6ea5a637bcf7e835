"""LyCORIS files (LoKr, LoHa, full) are read with each module's exact ΔW, placed under kohya names for SD 1.x,
SDXL and Flux, described by `inspect`, refused by name when they cannot be placed, merged to a LoRA and exported
in the keys ComfyUI loads. Every file is made here from the published key grammar (tests/support/lycoris.py);
every expected ΔW is computed there, independently of difflora."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load, load_file, save_file

from difflora.adapter.lycoris import FullWeights, LokrWeights
from difflora.adapter.types import Adapter, LoraWeights
from difflora.composition.merge import merge_adapters
from difflora.config.spec import AdapterWeight
from difflora.errors import AdapterFormatError
from difflora.formats.consumers.verdicts import verdicts
from difflora.formats.describe import describe_adapter
from difflora.formats.export import export_bytes
from difflora.formats.lycoris import read_module
from difflora.formats.naming import reference_table
from difflora.formats.read import load_adapter, parse_state_dict
from tests.support.lycoris import LOKR_LAYOUTS, expected_delta, full_tensors, loha_tensors, lokr_tensors

SD1_Q = ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", (640, 640))
SD1_CONV = ("lora_unet_down_blocks_0_resnets_0_conv1", (320, 320, 3, 3))
SD1_OUT = ("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0", (1280, 1280))
SD1_TE = ("lora_te_text_model_encoder_layers_3_mlp_fc1", (3072, 768))
SDXL_K = ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", (640, 2048))
SDXL_TE2 = ("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", (1280, 1280))
SDXL_TE1 = ("lora_te1_text_model_encoder_layers_0_self_attn_v_proj", (768, 768))


def read(tensors: dict[str, torch.Tensor], family: str | None = None):
    metadata = {"ss_base_model_version": "sdxl_base_v1-0"} if family == "sdxl" else {}
    return parse_state_dict(tensors, metadata, source="test.safetensors")


def delta_of(adapter, kohya_name: str, family: str = "sd1") -> torch.Tensor:
    key = reference_table(family).from_kohya[kohya_name]
    return adapter.modules[key].delta().double()


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), float((got - want).abs().max())


@pytest.mark.parametrize("layout", [x for x in LOKR_LAYOUTS if x != "tucker"])
@pytest.mark.parametrize("module", [SD1_Q, SD1_CONV, SD1_TE], ids=["linear", "conv3x3", "text-encoder"])
def test_lokr_delta_equals_the_kronecker_formula(layout, module):
    name, shape = module
    tensors = lokr_tensors(name, shape, layout=layout, seed=len(layout))
    assert_close(delta_of(read(tensors), name), expected_delta(tensors, name, shape))


def test_lokr_tucker_conv_and_its_scale_rule():
    """Tucker W2 on a 3x3 conv; the scale is alpha/r with a factorised part, 1 with two full factors or no alpha."""
    name, shape = SD1_CONV
    tensors = lokr_tensors(name, shape, layout="tucker", alpha=5.0)
    assert_close(delta_of(read(tensors), name), expected_delta(tensors, name, shape))
    full = lokr_tensors(name, shape, layout="full-full", alpha=7.0)
    (weights,) = read(full).modules.values()
    assert isinstance(weights, LokrWeights) and weights.scale == 1.0  # alpha ignored: nothing factorised
    bare = lokr_tensors(name, shape, layout="lowrank-lowrank", alpha=None)
    assert_close(delta_of(read(bare), name), expected_delta(bare, name, shape))
    assert next(iter(read(bare).modules.values())).scale == 1.0


@pytest.mark.parametrize(
    ("module", "tucker"),
    [
        (SD1_Q, False),
        (SD1_CONV, False),
        (SD1_CONV, True),
    ],  # LyCORIS writes Tucker cores for convolutions only
    ids=["linear", "conv3x3", "conv3x3-tucker"],
)
def test_loha_delta_equals_the_hadamard_formula(module, tucker):
    name, shape = module
    tensors = loha_tensors(name, shape, tucker=tucker, seed=3)
    assert_close(delta_of(read(tensors), name), expected_delta(tensors, name, shape))


def test_full_diff_with_bias_on_linear_and_conv():
    tensors = full_tensors(*SD1_OUT, bias=True) | full_tensors(*SD1_CONV, seed=1)
    adapter = read(tensors)
    for name, shape in (SD1_OUT, SD1_CONV):
        assert_close(delta_of(adapter, name), expected_delta(tensors, name, shape))
    weights = adapter.modules[reference_table("sd1").from_kohya[SD1_OUT[0]]]
    assert isinstance(weights, FullWeights) and torch.equal(weights.diff_b, tensors[f"{SD1_OUT[0]}.diff_b"])


def test_sdxl_names_place_every_kind_with_a_lora_beside_them():
    g = torch.Generator().manual_seed(5)
    lora = {
        f"{SDXL_TE1[0]}.lora_down.weight": torch.randn(4, 768, generator=g),
        f"{SDXL_TE1[0]}.lora_up.weight": torch.randn(768, 4, generator=g),
        f"{SDXL_TE1[0]}.alpha": torch.tensor(2.0),
    }
    tensors = lokr_tensors(*SDXL_K, layout="lowrank-lowrank") | loha_tensors(*SDXL_TE2) | lora
    adapter = read(tensors, "sdxl")
    assert adapter.meta.base_family == "sdxl"
    for name, shape in (SDXL_K, SDXL_TE2):
        assert_close(delta_of(adapter, name, "sdxl"), expected_delta(tensors, name, shape))
    kinds = {w.kind for w in adapter.modules.values()}
    assert kinds == {"LoKr", "LoHa", "LoRA"}


def test_flux_fused_qkv_lokr_is_split_exactly_into_its_parts():
    """A LoKr on Flux's fused img_attn.qkv becomes one full module per part: each part's rows of ΔW."""
    name, shape = "lora_unet_double_blocks_0_img_attn_qkv", (9216, 3072)
    tensors = lokr_tensors(name, shape, layout="lowrank-lowrank", factor=8)
    adapter = read(tensors)
    want = expected_delta(tensors, name, shape)
    layer = reference_table("flux").layers[name]
    assert set(adapter.modules) == {part.key for part in layer.parts}
    for part, (start, stop) in zip(layer.parts, layer.row_ranges(), strict=True):
        assert_close(adapter.modules[part.key].delta().double(), want[start:stop])


def test_inspect_describes_the_kinds(tmp_path):
    tensors = lokr_tensors(*SD1_Q, layout="full-lowrank") | loha_tensors(*SD1_CONV) | full_tensors(*SD1_TE)
    save_file(tensors, tmp_path / "lyco.safetensors")
    text = describe_adapter(load_adapter(tmp_path / "lyco.safetensors"), tmp_path / "lyco.safetensors")
    assert "kinds: LoHa (x1), LoKr (x1)" in text and "kinds: full" in text
    assert "ComfyUI" in text  # the consumers' verdicts are still given


@pytest.mark.parametrize(
    ("tensors", "needles"),
    [
        (
            lokr_tensors("lora_unet_no_such_block_attn1_to_q", (640, 640), layout="full-full"),
            ["no_such_block"],
        ),
        ({f"{SD1_Q[0]}.lokr_w1": torch.ones(4, 4)}, [f"{SD1_Q[0]}.lokr_w1: LoKr", "needs lokr_w2"]),
        (loha_tensors(*SD1_Q) | {f"{SD1_Q[0]}.lora_up.weight": torch.ones(640, 2)}, ["mixes LoHa tensors"]),
        (
            {k: v for k, v in loha_tensors(*SD1_Q).items() if "w2_b" not in k},
            [f"{SD1_Q[0]}.hada_w2_a: LoHa", "Nothing was loaded"],
        ),
        (
            lokr_tensors(*SD1_Q, layout="lowrank-lowrank") | {f"{SD1_Q[0]}.lokr_w2_b": torch.ones(3, 160)},
            ["shape"],
        ),
        (full_tensors(*SD1_Q) | {f"{SD1_Q[0]}.diff_b": torch.ones(5)}, ["diff_b has shape"]),
        ({f"{SD1_Q[0]}.diff": torch.full((640, 640), float("nan"))}, ["NaN"]),
    ],
    ids=[
        "unknown-name",
        "incomplete-lokr",
        "mixed-kinds",
        "incomplete-loha",
        "ranks",
        "bias",
        "nan",
    ],
)
def test_unplaceable_or_damaged_modules_are_refused_by_name(tensors, needles):
    with pytest.raises(AdapterFormatError) as error:
        read(tensors)
    for needle in needles:
        assert needle in str(error.value)


def test_merge_to_a_lora_is_exact_and_truncation_reports_each_layer():
    """Merged with a LoRA at weights, a LoKr and a LoHa become LoRA pairs whose update is Σ wᵢ·ΔWᵢ; at --rank
    2 each layer's reported error is the relative Frobenius distance to that sum (small in-memory modules: the
    merge works on module keys, not names)."""
    linear, conv = ("m_linear", (48, 64)), ("m_conv", (16, 8, 3, 3))
    tensors = lokr_tensors(*linear, layout="lowrank-lowrank") | loha_tensors(*conv, rank=2)
    # as a file's reader leaves them: the conv's LoHa knows its weight's shape
    loha = replace(read_module(conv[0], _parts(tensors, conv[0]), "t"), module_shape=conv[1])
    lyco = Adapter(
        modules={"unet.linear": read_module(linear[0], _parts(tensors, linear[0]), "t"), "unet.conv": loha}
    )
    g = torch.Generator().manual_seed(9)
    lora = LoraWeights(down=torch.randn(3, 64, generator=g), up=torch.randn(48, 3, generator=g), alpha=6.0)
    pairs = [
        (AdapterWeight("lyco", 0.5), lyco),
        (AdapterWeight("lora", -1.5), Adapter(modules={"unet.linear": lora})),
    ]
    want = {
        "unet.linear": 0.5 * expected_delta(tensors, *linear)
        - 1.5 * 2.0 * lora.up.double() @ lora.down.double(),
        "unet.conv": 0.5 * expected_delta(tensors, *conv),
    }
    exact = merge_adapters(pairs)
    assert not exact.errors and set(exact.adapter.modules) == set(want)
    for key, delta in want.items():
        assert exact.adapter.modules[key].kind == "LoRA"
        assert_close(exact.adapter.modules[key].delta().double(), delta)
    truncated = merge_adapters(pairs, rank=2)
    assert set(truncated.errors) == set(want)
    for key, error in truncated.errors.items():
        got = truncated.adapter.modules[key].delta().double()
        assert truncated.adapter.modules[key].rank == 2
        assert error == pytest.approx(float((got - want[key]).norm() / want[key].norm()), rel=1e-4)


def _parts(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(name + "."): v for k, v in tensors.items() if k.startswith(name + ".")}


def test_export_writes_lycoris_keys_every_consumer_places():
    """`export --format comfyui` writes the LyCORIS tensors under kohya names; the file reads back to the same
    ΔW, and ComfyUI's and A1111's key rules load every key."""
    tensors = (
        lokr_tensors(*SD1_Q, layout="lowrank-full")
        | loha_tensors(*SD1_CONV, tucker=True)
        | full_tensors(*SD1_OUT, bias=True)
    )
    adapter = read(tensors)
    written = load(export_bytes(adapter, "comfyui", torch.float32))
    for name, shape in (SD1_Q, SD1_CONV, SD1_OUT):
        assert_close(expected_delta(written, name, shape), expected_delta(tensors, name, shape))
    assert {k for k in written if not k.endswith(".alpha")} == {
        k for k in tensors if not k.endswith(".alpha")
    }
    results = {v.consumer: v for v in verdicts(list(written), {}, "sd1")}
    assert results["ComfyUI"].complete and results["A1111/Forge"].complete, [
        v.summary() for v in results.values()
    ]
    with pytest.raises(AdapterFormatError, match="--format comfyui"):
        export_bytes(adapter, "diffusers", torch.float32)


def test_written_file_round_trips(tmp_path):
    tensors = lokr_tensors(*SD1_CONV, layout="tucker") | full_tensors(*SD1_TE)
    adapter = read(tensors)
    (tmp_path / "out.safetensors").write_bytes(export_bytes(adapter, "comfyui", torch.float32))
    again = load_adapter(tmp_path / "out.safetensors")
    for key, weights in adapter.modules.items():
        assert torch.equal(again.modules[key].delta(), weights.delta()), key
    assert set(load_file(tmp_path / "out.safetensors")) >= {f"{SD1_CONV[0]}.lokr_t2", f"{SD1_TE[0]}.diff"}


def test_comfyui_layout_lycoris_keys_are_read_like_kohya_ones():
    """`diffusion_model.<SGM path>.lokr_w1` (ComfyUI's own layout) names the same module as kohya's name."""
    tensors = lokr_tensors(*SD1_Q, layout="full-lowrank")
    sgm = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    comfy = {f"{sgm}.{key.partition('.')[2]}": value for key, value in tensors.items()}
    assert_close(delta_of(read(comfy), SD1_Q[0]), expected_delta(tensors, *SD1_Q))
