"""`--quantize-base fp8`: weights stored as float8_e4m3fn and upcast per layer, LoRA in float32, samples
rendered with the LoRA unfused; trained on the tiny random Flux."""

from __future__ import annotations

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from difflora.adapter.inject import merged_lora
from difflora.config.train import TrainConfig
from difflora.models.fp8 import Float8Linear, to_fp8
from difflora.training.trainer import train
from tests.support.adapters import read_file_deltas
from tests.support.flux import tiny_flux_pipeline
from tests.support.paths import copy_samples


def test_a_float8_linear_computes_with_the_weight_rounded_to_float8():
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    x = torch.randn(5, 16)
    layer = Float8Linear(linear)
    rounded = linear.weight.detach().to(torch.float8_e4m3fn).to(torch.float32)
    assert layer.weight_bits.dtype == torch.uint8 and layer.weight_bits.numel() == 16 * 8
    assert torch.equal(layer(x), torch.nn.functional.linear(x, rounded, linear.bias))
    layer.to(torch.bfloat16)  # placing a model in a dtype leaves the float8 bits alone
    assert torch.equal(layer.stored_weight.to(torch.float32), rounded)


def test_lora_on_a_float8_base_stays_float32_and_is_never_fused():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    inject_adapter_in_model(
        LoraConfig(r=2, lora_alpha=2, target_modules=["0"], init_lora_weights=False), model
    )
    assert to_fp8({"model": model}) == {"model": 2}
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if ".lora_" in n)
    x = torch.randn(3, 16)
    unfused = model(x)
    with merged_lora([model]):  # a float8 base layer keeps peft's unfused path
        assert torch.equal(model(x), unfused)
    lora = model[0]
    base = lora.get_base_layer()
    delta = lora.lora_B["default"].weight @ lora.lora_A["default"].weight * lora.scaling["default"]
    hidden = torch.relu(base(x) + x @ delta.T)
    assert torch.allclose(unfused, model[2](hidden), atol=1e-6)


def test_training_a_tiny_flux_on_an_fp8_base(tmp_path):
    folder = tmp_path / "flux"
    tiny_flux_pipeline(max_tokens=32).save_pretrained(folder)
    data = copy_samples("style", tmp_path / "style", [0])
    config = TrainConfig(
        data_dir=str(data),
        model=str(folder),
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        batch_size=1,
        resolution=32,
        sample_every=1,
        sample_steps=2,
        sample_prompts=("a red stripe",),
        sample_seeds=(1,),
        grad_log_every=0,
        rank=4,
        learning_rate=5e-2,
        num_threads=2,
        quantize_base="fp8",
    )
    path = train(config, progress=False)
    deltas = read_file_deltas(path)
    assert deltas and all(float(delta.abs().max()) > 0 for delta in deltas.values())
    plan = (path.parent / "style.run" / "plan.txt").read_text()
    assert "fp8 (float8_e4m3fn storage" in plan
    assert list((path.parent / "style.run" / "samples").glob("step-*.png"))
