"""LoRA injection: the layer math peft performs is the contract W0·x + (alpha/rank)·B·A·x, checked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from difflora.adapter.inject import add_lora, extract_weights, parameter_report
from difflora.adapter.names import classic_name
from difflora.adapter.spec import TEXT_ENCODER_TARGETS, UNET_TARGETS, LoraSpec
from difflora.errors import TargetNotFoundError
from tests.support.models import tiny_text_encoder, tiny_unet

UNET_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"
UNET_OUT = "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"
TE_V = "encoder.layers.1.self_attn.v_proj"


def _unet_output(unet, seed=1):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 5, 32, generator=generator)
    with torch.no_grad():
        return unet(sample, torch.tensor([10, 500]), encoder_hidden_states=context).sample


def _te_output(encoder):
    ids = torch.tensor([[512, 5, 9, 77, 513, 513]])
    with torch.no_grad():
        return encoder(ids).last_hidden_state


def test_fresh_adapter_leaves_outputs_identical():
    base_unet, lora_unet = tiny_unet(), tiny_unet()
    base_te, lora_te = tiny_text_encoder(), tiny_text_encoder()
    add_lora(lora_unet, "unet", LoraSpec(rank=4, alpha=8))
    add_lora(lora_te, "text_encoder", LoraSpec(rank=4, alpha=8))
    assert torch.equal(_unet_output(base_unet), _unet_output(lora_unet))
    assert torch.equal(_te_output(base_te), _te_output(lora_te))


@pytest.mark.parametrize(
    ("factory", "component", "module_name", "rank", "alpha"),
    [
        (tiny_unet, "unet", UNET_Q, 4, 2.0),
        (tiny_unet, "unet", UNET_OUT, 8, 8.0),
        (tiny_text_encoder, "text_encoder", TE_V, 2, 5.0),
    ],
)
def test_adapted_projection_computes_w0x_plus_scaled_bax(factory, component, module_name, rank, alpha):
    model = factory()
    base = dict(model.named_modules())[module_name]
    w0, bias = base.weight.detach().clone(), base.bias.detach().clone() if base.bias is not None else None
    add_lora(model, component, LoraSpec(rank=rank, alpha=alpha))
    layer = dict(model.named_modules())[module_name]
    generator = torch.Generator().manual_seed(7)
    a = torch.randn(rank, w0.shape[1], generator=generator)
    b = torch.randn(w0.shape[0], rank, generator=generator)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
    x = torch.randn(3, w0.shape[1], generator=generator)
    expected = x @ w0.T + (alpha / rank) * (x @ a.T @ b.T)
    if bias is not None:
        expected = expected + bias
    with torch.no_grad():
        actual = layer(x)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_only_lora_parameters_train():
    unet, te = tiny_unet(), tiny_text_encoder()
    add_lora(unet, "unet", LoraSpec(rank=4, alpha=4))
    add_lora(te, "text_encoder", LoraSpec(rank=4, alpha=4))
    for model in (unet, te):
        trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        assert trainable, "no trainable parameters"
        assert all(".lora_A." in name or ".lora_B." in name for name in trainable)
        b_params = [p for name, p in model.named_parameters() if ".lora_B." in name]
        assert all(torch.count_nonzero(p) == 0 for p in b_params)


def test_targets_default_to_attention_projections():
    unet, te = tiny_unet(), tiny_text_encoder()
    unet_names = add_lora(unet, "unet", LoraSpec(rank=2, alpha=2))
    te_names = add_lora(te, "text_encoder", LoraSpec(rank=2, alpha=2))
    # tiny UNet: 2 down + 2 up cross-attn blocks (1 + 2 transformers) + mid = 8 transformers x 2 attns x 4
    attention_layers = [n for n, _ in tiny_unet().named_modules() if n.endswith(("attn1", "attn2"))]
    assert len(unet_names) == 4 * len(attention_layers)
    assert {n.split(".")[-1] if not n.endswith(".0") else "to_out.0" for n in unet_names} == set(UNET_TARGETS)
    assert len(te_names) == 2 * 4
    assert {n.split(".")[-1] for n in te_names} == set(TEXT_ENCODER_TARGETS)


def test_unknown_target_names_valid_ones_and_close_match():
    with pytest.raises(TargetNotFoundError) as caught:
        add_lora(tiny_unet(), "unet", LoraSpec(rank=2, alpha=2, unet_targets=("to_qq",)))
    message = str(caught.value)
    assert "'to_qq'" in message and "Did you mean 'to_q'" in message
    assert "to_out.0" in message and "proj_in" in message


def test_parameter_report_counts_rank_times_in_plus_out():
    te = tiny_text_encoder()
    total_before = sum(p.numel() for p in te.parameters())
    add_lora(te, "text_encoder", LoraSpec(rank=3, alpha=3))
    rows = {row.component: row for row in parameter_report({"text_encoder": te})}
    expected = 2 * 4 * 3 * (32 + 32)  # layers x projections x rank x (in + out)
    assert rows["text_encoder"].trainable == expected
    assert rows["text_encoder"].total == total_before + expected
    assert rows["total"].percent == pytest.approx(100 * expected / (total_before + expected))


def test_extracted_weights_use_classic_text_encoder_names_and_bake_rslora():
    te = tiny_text_encoder()
    add_lora(te, "text_encoder", LoraSpec(rank=4, alpha=3.0, rslora=True))
    weights = extract_weights(te, component="text_encoder")
    name = "text_model." + TE_V
    assert name in weights
    assert classic_name("text_encoder", TE_V, te) == name
    # rsLoRA scales by alpha/sqrt(rank); the stored alpha reproduces that with the plain alpha/rank rule
    assert weights[name].scale == pytest.approx(3.0 / math.sqrt(4))
