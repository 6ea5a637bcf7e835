"""scripts/gpu_check.py --dry-run --bases qwen-image: the Qwen-Image rows on the reduced random Qwen-Image
(scripts/bench_support.py: its shipped configurations at reduced width and depth), so they cannot rot before a
GPU runs them. bf16 (float32 on the CPU) and fp8 + checkpointing train; the block-swap row reaches the trainer,
which refuses --blocks-to-swap without CUDA in one line, so the check fails (exit 1) with that row's status;
generation composes the first two adapters. The FLOP count of a step is checked against one made here
independently: 2 x the multiply-adds of every Linear the transformer runs plus each joint attention's two
products over image and text tokens."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from torch import nn

from tests.support.paths import REPO_ROOT

pytestmark = pytest.mark.slow  # trains three configurations and renders


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO_ROOT / "scripts" / "gpu_check.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_qwen_dry_run_trains_and_generates_and_refuses_the_swap_off_cuda(gpu_check, tmp_path) -> None:
    code = gpu_check.main(["--dry-run", "--bases", "qwen-image", "--json", str(tmp_path / "figures.json")])
    figures = json.loads((tmp_path / "figures.json").read_text())
    rows = [(r["model"], r["settings"], r["status"]) for r in figures["train"]]
    refusal = "failed: ConfigError: --blocks-to-swap needs a CUDA GPU (it moves blocks into GPU memory); leave it out here."
    assert rows == [
        ("tiny-qwen-image", "fp32", "ok"),
        ("tiny-qwen-image", "fp8, checkpointing", "ok"),
        ("tiny-qwen-image", "fp8, checkpointing, swap 3", refusal),
    ]
    assert code == 1  # the refused row fails the check
    (generated,) = figures["generate"]
    assert generated["status"] == "ok"
    forward = figures["train"][0]["forward_flops"]
    assert forward == pytest.approx(_forward_flops_by_hand(tmp_path), rel=0.01)


def _forward_flops_by_hand(tmp_path) -> float:
    """The reduced transformer with rank-16 LoRA on its attention at 64 px (4x4 tokens) and 512 text tokens."""
    from bench_support import tiny_qwen_image  # on sys.path once gpu_check is imported
    from diffusers import QwenImageTransformer2DModel
    from peft import LoraConfig

    folder = tiny_qwen_image(tmp_path / "models")
    model = QwenImageTransformer2DModel.from_pretrained(folder / "transformer")
    attention = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    model.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=attention))
    total = [0.0]

    def layer(module: nn.Module, inputs, output) -> None:
        total[0] += 2 * output.numel() * module.in_features

    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.register_forward_hook(layer)
    tokens, text = 16, 512
    inner = model.config.num_attention_heads * model.config.attention_head_dim
    joint = tokens + text
    total[0] += model.config.num_layers * 2 * 2 * joint * joint * inner  # Q·Kᵀ, then softmax · V
    with torch.no_grad():
        model(
            hidden_states=torch.randn(1, tokens, model.config.in_channels),
            encoder_hidden_states=torch.randn(1, text, model.config.joint_attention_dim),
            encoder_hidden_states_mask=torch.ones(1, text, dtype=torch.long),
            timestep=torch.tensor([0.5]),
            img_shapes=[[(1, 4, 4)]],
        )
    return total[0]
