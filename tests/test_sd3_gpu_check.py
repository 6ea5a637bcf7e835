"""scripts/gpu_check.py --dry-run --bases sd35-medium: the SD3.5 rows on the reduced random SD3.5 medium
(scripts/bench_support.py: its shipped configurations at reduced width and depth, MMDiT-X's second attention
kept in its first block), so they cannot rot before a GPU runs them. bf16 (float32 on the CPU) and fp8 +
checkpointing train; the block-swap row reaches the trainer, which refuses --blocks-to-swap without CUDA in
one line, so the check fails (exit 1) with that row's status; generation composes the first two adapters. The
FLOP count of a forward pass is checked against one made here independently: 2 x the multiply-adds of every
Linear and Conv2d the transformer runs, plus each attention's two products (the joint one over image and text
tokens, MMDiT-X's second one over the image tokens alone)."""

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


def test_the_sd35_dry_run_trains_and_generates_and_refuses_the_swap_off_cuda(gpu_check, tmp_path) -> None:
    code = gpu_check.main(["--dry-run", "--bases", "sd35-medium", "--json", str(tmp_path / "figures.json")])
    figures = json.loads((tmp_path / "figures.json").read_text())
    rows = [(r["model"], r["px"], r["settings"], r["status"]) for r in figures["train"]]
    refusal = "failed: ConfigError: --blocks-to-swap needs a CUDA GPU (it moves blocks into GPU memory); leave it out here."
    assert rows == [
        ("tiny-sd35-medium", 64, "fp32", "ok"),
        ("tiny-sd35-medium", 64, "fp8, checkpointing", "ok"),
        ("tiny-sd35-medium", 64, "fp8, checkpointing, swap 3", refusal),
    ]
    assert code == 1  # the refused row fails the check
    for row in figures["train"][:2]:
        assert (
            row["step_seconds"] > 0
            and row["estimate_gib"] > 0
            and row["step_flops"] > row["forward_flops"] > 0
        )
    (generated,) = figures["generate"]
    assert generated["status"] == "ok" and generated["fused_seconds"] > 0
    forward = figures["train"][0]["forward_flops"]
    assert forward == _forward_flops_by_hand(tmp_path)  # exact: both count the same products


def _forward_flops_by_hand(tmp_path) -> float:
    """The reduced transformer with rank-16 LoRA on its attention at 64 px (8x8 latents, 4x4 patches) and
    77 CLIP + 32 T5 tokens (the reduced T5 tokenizer's length)."""
    from bench_support import tiny_sd35  # on sys.path once gpu_check is imported
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig

    folder = tiny_sd35(tmp_path / "models", "sd35-medium")
    model = SD3Transformer2DModel.from_pretrained(folder / "transformer")
    attention = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    model.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=attention))
    total = [0.0]

    def layer(module: nn.Module, inputs, output) -> None:
        if isinstance(module, nn.Linear):
            total[0] += 2 * output.numel() * module.in_features
        else:  # the patch embedding: each output value sums in_channels x kernel area products
            total[0] += (
                2 * output.numel() * module.in_channels * module.kernel_size[0] * module.kernel_size[1]
            )

    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.register_forward_hook(layer)
    tokens, text = 16, 77 + 32
    inner = model.config.num_attention_heads * model.config.attention_head_dim
    joint = tokens + text
    total[0] += model.config.num_layers * 2 * 2 * joint * joint * inner  # Q·Kᵀ, then softmax · V
    total[0] += len(model.config.dual_attention_layers) * 2 * 2 * tokens * tokens * inner  # attn2
    with torch.no_grad():
        model(
            hidden_states=torch.randn(1, model.config.in_channels, 8, 8),
            encoder_hidden_states=torch.randn(1, text, model.config.joint_attention_dim),
            pooled_projections=torch.randn(1, model.config.pooled_projection_dim),
            timestep=torch.tensor([500.0]),
        )
    return total[0]
