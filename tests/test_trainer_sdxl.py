"""SDXL training on a tiny kwargs-built SDXL pipeline: both text encoders with their own learning rates,
the pooled embedding and size/crop micro-conditioning the UNet receives (checked against values computed by
hand), composition of the result; and the zero-terminal-SNR schedule. Each run is a few steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from difflora.config.export import ExportConfig
from difflora.config.generate import GenerateConfig
from difflora.config.train import TrainConfig
from difflora.errors import ConfigError
from difflora.formats.export import export_adapter
from difflora.formats.read import load_adapter
from difflora.generation.generate import generate
from difflora.generation.schedulers import make_scheduler
from difflora.training.run import Objective
from difflora.training.trainer import train
from tests.support.models import tiny_pipeline, tiny_sdxl_pipeline
from tests.support.training import tiny_train_config


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A saved tiny SDXL model and a folder with a landscape (60x24) and a portrait (24x60) image."""
    root = tmp_path_factory.mktemp("sdxl")
    tiny_sdxl_pipeline(root / "tok").save_pretrained(root / "model")
    data = root / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("wide", (60, 24)), ("tall", (24, 60))):
        pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(data / f"{name}.png")
        (data / f"{name}.txt").write_text(f"a red circle, {name}")
    return root


def _config(workspace: Path, out: Path, **changes) -> TrainConfig:
    return tiny_train_config(workspace, out, data="images", **changes)


def test_the_unet_gets_pooled_text_and_the_size_and_crop_of_each_image(workspace, tmp_path, monkeypatch):
    seen: list[dict[str, torch.Tensor]] = []
    forward = UNet2DConditionModel.forward

    def recording(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        # the training step: not the thread probe, a sample render or the plan's memory estimate (meta)
        if torch.is_grad_enabled() and sample.device.type != "meta":
            seen.append({k: v.detach().clone() for k, v in kwargs["added_cond_kwargs"].items()})
        return forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", recording)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = torch.get_num_threads()
    try:  # no --num-threads: the thread probe times SDXL's UNet too, with its added conditioning
        train(_config(workspace, tmp_path, flip=False, num_threads=None), progress=False)
    finally:
        torch.set_num_threads(threads)
    # By hand, at resolution 16 with the tiny model's bucket step 4: the 60x24 image (aspect 2.5) trains in
    # the 24x8 bucket (aspect 3 is the closest); scaled by 0.4 to cover it, 24x9.6 rounds to 24x10, and
    # the centred window starts 1 px from the top. The 24x60 image is its mirror: bucket 8x24, resized 10x24,
    # window 1 px from the left. time_ids = (original h, w, crop top, left, target h, w).
    expected = {
        (24.0, 60.0, 1.0, 0.0, 8.0, 24.0),
        (60.0, 24.0, 0.0, 1.0, 24.0, 8.0),
    }
    got = {tuple(call["time_ids"][0].tolist()) for call in seen}
    assert got == expected
    pooled = seen[0]["text_embeds"]
    assert pooled.shape == (1, 32)  # text_encoder_2's projection, one per image


def test_sdxl_trains_both_text_encoders_at_their_own_rates_and_composes(workspace, tmp_path):
    config = _config(
        workspace, tmp_path, train_text_encoder=True, text_encoder_lr=1e-3, text_encoder_2_lr=5e-4
    )
    path = train(config, progress=False)
    adapter = load_adapter(path)
    assert set(adapter.components) == {"unet", "text_encoder", "text_encoder_2"}
    extra = adapter.meta.extra
    assert float(extra["difflora.train.text_encoder_lr"]) == pytest.approx(1e-3)
    assert float(extra["difflora.train.text_encoder_2_lr"]) == pytest.approx(5e-4)
    assert adapter.meta.base_family == "custom"  # SDXL's conditioning, not its size: not exported as SDXL
    exported = export_adapter(ExportConfig(adapter=str(path), output=str(tmp_path / "kohya.safetensors")))
    assert set(load_adapter(exported).modules) == set(adapter.modules)  # both text encoders read back
    plan = (tmp_path / "images.run" / "plan.txt").read_text()
    assert "text encoder 2 lr 0.0005" in plan and "text encoder 2 " in plan

    def image(weight: float) -> np.ndarray:
        settings = GenerateConfig(
            prompt="a red circle", model=config.model, adapters=(f"{path}:{weight}",), steps=2, seed=3,
            out=str(tmp_path / f"out{weight}"),
        )  # fmt: skip
        return np.asarray(Image.open(generate(settings)[0]), dtype=np.float32)

    base, composed = image(0.0), image(1.0)
    assert base.shape == (16, 16, 3)
    assert np.abs(composed - base).mean() > 0.01  # the SDXL pipeline renders with the adapter applied


def test_zero_terminal_snr_reaches_zero_signal_and_needs_v_prediction(workspace, tmp_path):
    pipe = tiny_pipeline(tmp_path / "tok")
    plain = Objective.for_pipe(pipe, 0.0, 0.0)
    rescaled = Objective.for_pipe(pipe, 0.0, 0.0, zero_terminal_snr=True)
    assert plain.alphas_cumprod[-1] > 1e-3 and rescaled.alphas_cumprod[-1] == 0.0
    sampler = make_scheduler("euler", pipe.scheduler.config, zero_terminal_snr=True)
    assert sampler.config.rescale_betas_zero_snr and sampler.config.timestep_spacing == "trailing"
    with pytest.raises(ConfigError, match="needs a v-prediction model"):
        train(_config(workspace, tmp_path, zero_terminal_snr=True), progress=False)
