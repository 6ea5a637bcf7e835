"""The whole user path on the real architectures, from a single-file checkpoint and no network: train two
steps, generate with the adapter composed, export for ComfyUI / A1111, and read the export back with every
key accounted for and the same ΔW per module.

The checkpoints are SD 1.5 and SDXL base with their real configurations and random weights, written in the
original (ldm / sgm) key layout by tests/support/checkpoints.py (fp16 on disk: 2.1 GB and 6.9 GB), once per
session for this module and test_models_single_file.py (conftest.py's `real_checkpoint`). SDXL trains both
text encoders in float32: this machine's CPU has no bf16 instructions, where bf16 convolutions run about 100x
slower than float32 (a bf16 SDXL run here took over half an hour for two steps); float32 peaks at ~23 GB of resident memory (the 6.9 GB file mapped included).
Slow: about a minute for SD 1.5 and a few for SDXL on two CPU cores.
"""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from difflora.config.export import ExportConfig
from difflora.config.generate import GenerateConfig
from difflora.config.train import TrainConfig
from difflora.formats.export import export_adapter
from difflora.formats.read import load_adapter
from difflora.generation.generate import generate
from difflora.training.trainer import train

pytestmark = pytest.mark.slow

CASES = {
    # family: (mixed precision, train the text encoders, text-encoder key prefixes in the export)
    "sd1": ("no", False, ()),
    "sdxl": ("no", True, ("lora_te1_", "lora_te2_")),
}


def _images(folder: Path) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index, size in enumerate(((96, 64), (64, 64))):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
            folder / f"{index}.png"
        )
        (folder / f"{index}.txt").write_text("a photo of sks dog")
    return folder


@pytest.mark.parametrize("real_checkpoint", list(CASES), indirect=True)
def test_train_generate_export_from_a_single_file(real_checkpoint, tmp_path, monkeypatch):
    checkpoint = real_checkpoint
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    family = checkpoint.stem
    precision, text_encoders, te_prefixes = CASES[family]
    config = TrainConfig(
        data_dir=str(_images(tmp_path / "images")),
        model=str(checkpoint),
        output_dir=str(tmp_path / "adapters"),
        resolution=64,  # the smallest size both UNets accept (SDXL's bucket step is 32, SD 1.5's 64)
        batch_size=1,
        max_steps=2,
        save_every=0,
        sample_every=0,
        rank=4,
        mixed_precision=precision,
        train_text_encoder=text_encoders,
    )
    adapter_path = train(config, progress=False)
    gc.collect()
    plan = (tmp_path / "adapters" / "images.run" / "plan.txt").read_text()
    assert ("SDXL base" if family == "sdxl" else "SD 1.x") in plan
    adapter = load_adapter(adapter_path)
    assert adapter.meta.base_family == family
    assert all(torch.isfinite(w.delta()).all() for w in adapter.modules.values())
    expected_components = {"unet", "text_encoder", "text_encoder_2"} if text_encoders else {"unet"}
    assert set(adapter.components) == expected_components

    settings = GenerateConfig(
        prompt="a photo of sks dog", model=str(checkpoint), adapters=(f"{adapter_path}:1",), steps=2,
        seed=0, width=64, height=64, out=str(tmp_path / "images-out"),
    )  # fmt: skip
    written = generate(settings)  # loads the checkpoint (float32 on CPU) as `difflora generate` does
    gc.collect()
    assert Image.open(written[0]).size == (64, 64)

    exported = export_adapter(
        ExportConfig(adapter=str(adapter_path), output=str(tmp_path / "comfy.safetensors"))
    )
    with safe_open(str(exported), framework="pt") as handle:
        keys = list(handle.keys())
    modules = {key.split(".")[0] for key in keys}
    assert all(m.startswith(("lora_unet_", *te_prefixes)) or m.startswith("lora_te_") for m in modules)
    if family == "sdxl":  # SGM block names, as ComfyUI and A1111 name SDXL's UNet
        assert any(m.startswith("lora_unet_input_blocks_") for m in modules)
        assert {prefix for prefix in te_prefixes if any(m.startswith(prefix) for m in modules)} == set(
            te_prefixes
        )
    back = load_adapter(exported)  # the importer refuses a file with any key it cannot place
    assert set(back.modules) == set(adapter.modules)
    for name, weights in adapter.modules.items():
        torch.testing.assert_close(back.modules[name].delta(), weights.delta(), rtol=2e-2, atol=2e-4)
