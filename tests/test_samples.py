"""Sample grids render with each LoRA layer fused (W0 + ΔW) and leave the training state exactly as it was."""

from __future__ import annotations

import numpy as np
import torch

from difflora.adapter.inject import add_lora, merged_lora
from difflora.adapter.spec import LoraSpec
from difflora.generation.pipeline import render

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def _trained_looking(pipe) -> None:
    """LoRA on the UNet with a non-zero B, as after some training steps."""
    add_lora(pipe.unet, "unet", LoraSpec(rank=4, alpha=8, unet_targets=ATTENTION))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in pipe.unet.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))


def _render(pipe) -> np.ndarray:
    images = render(pipe, ["a red square", "a blue circle"], seeds=[1, 2], steps=3, guidance=5.0)
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


def test_fused_layers_hold_w0_plus_the_update_computed_by_hand(pipeline):
    _trained_looking(pipeline)
    layer = pipeline.unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    assert layer.base_layer.bias is None  # to_q has none, so the layer is x @ W.T
    w0 = layer.base_layer.weight.detach().clone()
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    x = torch.randn(5, w0.shape[1])
    with merged_lora([pipeline.unet]):
        assert torch.allclose(layer.base_layer.weight, w0 + (8 / 4) * b @ a, atol=1e-6)
        fused = layer(x)
    assert torch.allclose(fused, x @ w0.T + 2.0 * (x @ a.T) @ b.T, atol=1e-5)


def test_fused_render_is_the_lora_render_and_training_state_comes_back_bit_for_bit(pipeline):
    _trained_looking(pipeline)
    pipeline.unet.train()
    before = {name: p.detach().clone() for name, p in pipeline.unet.state_dict().items()}
    grads = {name: p.requires_grad for name, p in pipeline.unet.named_parameters()}
    unfused = _render(pipeline)
    with merged_lora([pipeline.unet]):
        fused = _render(pipeline)
    # The same pictures: float rounding of (W0 + BA)x against W0x + B(Ax) moves a pixel by a level or two.
    assert np.abs(fused - unfused).max() <= 2
    assert np.abs(unfused - _render_without_lora(pipeline)).mean() > 1.0  # and the adapter does show
    after = pipeline.unet.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert {name: p.requires_grad for name, p in pipeline.unet.named_parameters()} == grads
    assert np.array_equal(_render(pipeline), unfused)  # the LoRA branch is on again


def _render_without_lora(pipe) -> np.ndarray:
    layers = [m for m in pipe.unet.modules() if hasattr(m, "enable_adapters") and hasattr(m, "lora_A")]
    grads = {p: p.requires_grad for p in pipe.unet.parameters()}
    for layer in layers:
        layer.enable_adapters(False)
    try:
        return _render(pipe)
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for parameter, wanted in grads.items():
            parameter.requires_grad_(wanted)


def test_batched_previews_are_the_one_by_one_images_in_order(pipeline):
    prompts, seeds = ["a red square", "a blue circle", "a red square"], [1, 2, 3]
    single = render(pipeline, prompts, seeds=seeds, steps=3, guidance=5.0)
    calls = []
    original_call = type(pipeline).__call__

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original_call(self, *args, **kwargs)

    type(pipeline).__call__ = counting
    try:
        batched = render(pipeline, prompts, seeds=seeds, steps=3, guidance=5.0, batch_pixels=2 * 16 * 16)
    finally:
        type(pipeline).__call__ = original_call
    assert len(calls) == 2  # two images per call at 16x16, then the third alone
    diffs = [
        np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max()
        for a, b in zip(single, batched, strict=True)
    ]
    assert max(diffs) <= 2, diffs  # the same pictures, up to rounding of the batched matmuls
    assert np.abs(np.asarray(single[0], dtype=np.int16) - np.asarray(single[1], dtype=np.int16)).mean() > 5
