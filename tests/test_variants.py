"""LoRA variants on the embedded model: rsLoRA, LoCon (--conv-rank/--conv-alpha) and LoRA+. Each trains a few
steps, saves, loads, generates and exports; the exported kohya file's ΔW per module must equal the update
the trained layers apply, computed here by hand from the checkpoint's raw A and B and the configured scale
(alpha/rank, alpha/sqrt(rank) for rsLoRA, conv alpha / conv rank for the convolutions)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

from difflora.config.export import ExportConfig
from difflora.config.generate import GenerateConfig
from difflora.formats.export import export_adapter
from difflora.formats.read import load_adapter
from difflora.generation.generate import generate
from difflora.training.checkpoint import latest_checkpoint, load_checkpoint
from difflora.training.trainer import train
from tests.support.variants import variant_config


def _train(out: Path, cache_dir: Path, **changes) -> Path:
    return train(variant_config(out, cache_dir, **changes), progress=False)


def _raw_updates(run_dir: Path, scale_of) -> dict[str, torch.Tensor]:
    """live module name -> scale · B @ A from the final checkpoint's raw peft parameters."""
    parameters = load_checkpoint(latest_checkpoint(run_dir / "checkpoints")).parameters
    updates = {}
    for key, down in parameters.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("unet.").split(".lora_A.")[0]
        up = parameters[key.replace(".lora_A.", ".lora_B.")]
        product = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
        updates[module] = scale_of(module, down.shape[0]) * product
    return updates


def _export_updates(path: Path) -> dict[str, torch.Tensor]:
    """kohya module name -> alpha/rank · up @ down, read straight from the exported file."""
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key).float() for key in handle.keys()}  # noqa: SIM118
    updates = {}
    for key, down in tensors.items():
        if not key.endswith(".lora_down.weight"):
            continue
        name = key.removesuffix(".lora_down.weight")
        up, alpha = tensors[f"{name}.lora_up.weight"], float(tensors[f"{name}.alpha"])
        product = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
        updates[name] = alpha / down.shape[0] * product
    return updates


def _check_export(adapter_path: Path, tmp_path: Path, expected: dict[str, torch.Tensor]) -> None:
    exported = export_adapter(
        ExportConfig(adapter=str(adapter_path), output=str(tmp_path / "export.safetensors"), dtype="fp32")
    )
    found = _export_updates(exported)
    assert set(found) == {"lora_unet_" + name.replace(".", "_") for name in expected}
    for name, update in expected.items():
        torch.testing.assert_close(found["lora_unet_" + name.replace(".", "_")], update, rtol=1e-4, atol=1e-6)


def _generates(adapter_path: Path, tmp_path: Path) -> None:
    settings = GenerateConfig(
        prompt="a red circle, zebrastripes style", adapters=(f"{adapter_path}:1",), steps=2, seed=1,
        out=str(tmp_path / "images"),
    )  # fmt: skip
    image = np.asarray(Image.open(generate(settings)[0]))
    assert image.shape == (64, 64, 3)


def test_rslora_scales_by_alpha_over_sqrt_rank_and_exports_it_baked(tmp_path, sample_cache):
    path = _train(tmp_path, sample_cache, rslora=True)
    adapter = load_adapter(path)
    assert {w.alpha for w in adapter.modules.values()} == {8.0 * math.sqrt(4)}  # baked: alpha·sqrt(rank)
    expected = _raw_updates(tmp_path / "style.run", lambda module, rank: 8.0 / math.sqrt(rank))
    assert all(update.abs().max() > 0 for update in expected.values())
    _check_export(path, tmp_path, expected)
    _generates(path, tmp_path)
    assert "rsLoRA" in (tmp_path / "style.run" / "plan.txt").read_text()


def test_locon_adapts_the_resnet_convolutions_at_their_own_rank(tmp_path, sample_cache):
    path = _train(tmp_path, sample_cache, conv_rank=2, conv_alpha=1.0)
    adapter = load_adapter(path)
    convs = {k: w for k, w in adapter.modules.items() if k.endswith((".conv1", ".conv2"))}
    assert convs and all(w.rank == 2 and w.alpha == 1.0 and w.down.ndim == 4 for w in convs.values())
    assert all(w.down.shape[2:] == (3, 3) for w in convs.values())  # the 3x3 kernels themselves
    attention = [w for k, w in adapter.modules.items() if k not in convs]
    assert attention and all(w.rank == 4 and w.alpha == 8.0 for w in attention)
    conv_scale = 1.0 / 2
    expected = _raw_updates(
        tmp_path / "style.run",
        lambda module, rank: conv_scale if module.endswith(("conv1", "conv2")) else 8.0 / 4,
    )
    _check_export(path, tmp_path, expected)
    _generates(path, tmp_path)


def test_loraplus_trains_b_at_ratio_times_the_rate(tmp_path, sample_cache):
    def first_step_b(out: Path, ratio: float) -> torch.Tensor:
        _train(out, sample_cache, loraplus_ratio=ratio, max_steps=1, lr_warmup_steps=0, weight_decay=0.0)
        parameters = load_checkpoint(latest_checkpoint(out / "style.run" / "checkpoints")).parameters
        return torch.cat([p.flatten() for k, p in sorted(parameters.items()) if ".lora_B." in k])

    plain, plus = first_step_b(tmp_path / "plain", 1.0), first_step_b(tmp_path / "plus", 16.0)
    # B starts at zero and Adam's first step moves each weight by the learning rate (times the gradient's
    # sign), so after one step LoRA+'s B is 16x plain LoRA's, weight by weight.
    moved = plain.abs() > 0
    assert moved.sum() > 0
    torch.testing.assert_close(plus[moved], 16.0 * plain[moved], rtol=1e-3, atol=0)
    meta = load_adapter(tmp_path / "plus" / "style.safetensors").meta
    assert meta.extra["difflora.train.loraplus_ratio"] == "16.0"
