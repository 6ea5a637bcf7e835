"""Options that had no test: --lora-dropout (training differs with it; the saved adapter carries no
dropout), the 8-bit optimizer (on the CPU where bitsandbytes runs it), and attention through PyTorch's
scaled-dot-product kernel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import difflora.training.trainer as trainer
from difflora.config.spec import AdapterWeight
from difflora.training.setup import _bitsandbytes, make_optimizer
from tests.support.models import tiny_pipeline
from tests.support.training import make_workspace, tiny_train_config


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("options"))


def _train(workspace: Path, out: Path, **changes) -> dict[str, torch.Tensor]:
    config = tiny_train_config(workspace, out, data="stripes", cache_dir=str(workspace / "cache"), **changes)
    return load_file(str(trainer.train(config, progress=False)))


def test_lora_dropout_changes_training_and_is_not_in_the_adapter(workspace, tmp_path):
    from difflora.composition.composer import Composer
    from difflora.generation.pipeline import render
    from difflora.models.loading import load_pipeline

    plain = _train(workspace, tmp_path / "plain")
    again = _train(workspace, tmp_path / "again")
    dropped = _train(workspace, tmp_path / "dropped", lora_dropout=0.5)
    assert all(torch.equal(plain[k], again[k]) for k in plain)  # the runs are deterministic...
    assert any(not torch.equal(plain[k], dropped[k]) for k in plain)  # ...so dropout is what changed them
    assert {k: v.shape for k, v in dropped.items()} == {k: v.shape for k, v in plain.items()}
    # composed with peft's own layers (dynamic), the adapter renders without dropout: deterministic, and equal
    # to the fused weights W0 + ΔW, which no dropout can touch
    pipe = load_pipeline(str(workspace / "model"))
    path = str(tmp_path / "dropped" / "stripes.safetensors")
    composer = Composer(pipe, "dynamic")
    composer.set([AdapterWeight(path)])
    layers = [m for m in pipe.unet.modules() if hasattr(m, "lora_dropout")]
    assert layers and all(isinstance(d, torch.nn.Identity) for m in layers for d in m.lora_dropout.values())
    pipe.unet.train()  # even in training mode: an Identity drops nothing
    settings = dict(seeds=[3], steps=2, guidance=3.0, scheduler="euler", width=16, height=16)
    first, second = (np.asarray(render(pipe, ["a striped cat"], **settings)[0]) for _ in range(2))
    assert np.array_equal(first, second)


def test_adamw8bit_runs_on_the_cpu_where_bitsandbytes_allows(workspace, tmp_path):
    from difflora.training.setup import _runs_on_cpu

    bnb = _bitsandbytes()
    if bnb is None or not _runs_on_cpu(bnb):
        pytest.skip("bitsandbytes is missing or has no CPU 8-bit AdamW here (it needs >= 0.50)")
    g = torch.Generator().manual_seed(0)
    big = torch.nn.Parameter(torch.randn(8, 4096, generator=g))  # >= 4096 elements: 8-bit state
    start = big.detach().clone()
    reference = torch.nn.Parameter(start.clone())
    gradient = torch.randn(8, 4096, generator=g)
    optimizer, name = make_optimizer(
        [{"params": [big], "lr": 1e-3}], kind="adamw8bit", weight_decay=0.0, cuda=False
    )
    assert name == "adamw8bit" and type(optimizer).__name__ == "AdamW8bit"
    exact = torch.optim.AdamW([{"params": [reference], "lr": 1e-3}], weight_decay=0.0)
    for _ in range(3):
        big.grad, reference.grad = gradient.clone(), gradient.clone()
        optimizer.step()
        exact.step()
    assert optimizer.state[big]["state1"].dtype == torch.uint8  # the moments are stored in 8 bits
    # AdamW's 3 steps move each weight ~3e-3; the 8-bit moments' rounding shifts that by ~1% on average
    # (more for the few weights whose gradient is tiny beside their block's largest)
    travel = (reference.detach() - start).abs().mean()
    error = (reference.detach() - big.detach()).abs().mean()
    assert float(error) < 0.05 * float(travel)
    weights = _train(workspace, tmp_path / "8bit", optimizer="adamw8bit")
    baseline = _train(workspace, tmp_path / "32bit", optimizer="adamw")
    assert all(torch.isfinite(v).all() for v in weights.values())
    plan = (tmp_path / "8bit" / "stripes.run" / "plan.txt").read_text()
    assert "optimizer   adamw8bit" in plan
    ups = [k for k in weights if "lora_B" in k or "lora_up" in k]
    assert ups and all(weights[k].abs().sum() > 0 for k in ups)  # it trained: B left its zero start
    assert set(weights) == set(baseline)


def test_attention_runs_through_scaled_dot_product_attention(tmp_path, monkeypatch):
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    pipe = tiny_pipeline(tmp_path)
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    attentions = [m for m in pipe.unet.modules() if isinstance(m, Attention)]
    assert attentions and all(isinstance(m.processor, AttnProcessor2_0) for m in attentions)
    tokens = pipe.tokenizer(["a cat"], padding="max_length", max_length=8, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(tokens)[0]
        assert len(calls) == len(
            pipe.text_encoder.text_model.encoder.layers
            if hasattr(pipe.text_encoder, "text_model")
            else pipe.text_encoder.encoder.layers
        )
        calls.clear()
        pipe.unet(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=hidden)
    assert len(calls) == len(attentions)  # every attention of the UNet, once per forward pass
