"""Flux.1 dev and schnell with their real configurations at full width, reduced in depth so they fit this
machine: 1 double and 1 single transformer block (of 19 and 38), the full CLIP-L, T5-XXL v1.1 at full width
with 1 encoder layer (of 24), the full 16-channel autoencoder; random weights written as ComfyUI users hold
them (a BFL transformer file, bf16, with the `model.diffusion_model.` prefix for dev and without for
schnell, plus clip_l / t5xxl / ae files). Loaded offline from the shipped configs (in bf16, then in float32
for training, since bf16 convolutions are very slow on CPUs without bf16 kernels), each trains 2 steps and
generates with its adapter. The BFL conversion is checked against diffusers' own converter at this width.
Slow: minutes on two CPU cores, ~6 GB of memory."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difflora.config.generate import GenerateConfig
from difflora.config.train import TrainConfig
from difflora.generation.generate import generate
from difflora.models.architecture import config_folder
from difflora.models.bfl_file import to_diffusers
from difflora.models.dit_files import ComponentFiles
from difflora.models.identity import model_identity
from difflora.models.loading import load_pipeline
from difflora.training.trainer import train
from tests.support.adapters import read_file_deltas
from tests.support.flux import bfl_transformer_state, ldm_vae_state

pytestmark = pytest.mark.slow


def _config(name: str, component: str) -> dict:
    return json.loads((config_folder(name) / component / "config.json").read_text())


def _write_real_files(name: str, folder: Path, *, prefix: str) -> dict[str, Path]:
    """Random-weight components of the real configs (depth reduced as the module docstring says)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    folder.mkdir()
    torch.manual_seed(0)
    transformer_config = {k: v for k, v in _config(name, "transformer").items() if not k.startswith("_")}
    transformer = FluxTransformer2DModel(**(transformer_config | {"num_layers": 1, "num_single_layers": 1}))
    state = {prefix + k: v.to(torch.bfloat16) for k, v in bfl_transformer_state(transformer).items()}
    del transformer
    save_file(state, str(folder / "flux1.safetensors"))
    del state
    clip = CLIPTextModel(CLIPTextConfig(**_config(name, "text_encoder")))
    save_file(
        {k: v.to(torch.bfloat16).contiguous() for k, v in clip.state_dict().items()},
        str(folder / "clip_l.safetensors"),
    )
    del clip
    t5 = T5EncoderModel(T5Config(**(_config(name, "text_encoder_2") | {"num_layers": 1})))
    t5_state = {
        k: v.to(torch.bfloat16).contiguous()
        for k, v in t5.state_dict().items()
        if k != "encoder.embed_tokens.weight"
    }
    save_file(t5_state, str(folder / "t5xxl.safetensors"))
    del t5, t5_state
    vae = AutoencoderKL.from_config({k: v for k, v in _config(name, "vae").items() if not k.startswith("_")})
    save_file({k: v.contiguous() for k, v in ldm_vae_state(vae).items()}, str(folder / "ae.safetensors"))
    del vae
    gc.collect()
    return {
        n: folder / f"{f}.safetensors"
        for n, f in (("model", "flux1"), ("clip_l", "clip_l"), ("t5", "t5xxl"), ("vae", "ae"))
    }


def test_our_bfl_conversion_equals_diffusers_at_full_width():
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    torch.manual_seed(1)
    config = {k: v for k, v in _config("flux", "transformer").items() if not k.startswith("_")}
    transformer = FluxTransformer2DModel(**(config | {"num_layers": 1, "num_single_layers": 1})).to(
        torch.bfloat16
    )
    bfl = bfl_transformer_state(transformer)
    ours = to_diffusers(bfl)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert set(ours) == set(theirs) == set(transformer.state_dict())
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


@pytest.mark.parametrize(("name", "prefix"), [("flux", "model.diffusion_model."), ("flux-schnell", "")])
def test_real_flux_files_load_offline_train_and_generate(name, prefix, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    paths = _write_real_files(name, tmp_path / "files", prefix=prefix)
    files = {"clip_l": str(paths["clip_l"]), "t5": str(paths["t5"]), "vae": str(paths["vae"])}
    pipe = load_pipeline(paths["model"], files=ComponentFiles(**files), dtype=torch.bfloat16)
    assert model_identity(pipe).family == name
    assert (pipe.transformer.config.num_layers, pipe.transformer.config.num_single_layers) == (1, 1)
    assert pipe.transformer.config.guidance_embeds == (name == "flux")
    assert pipe.vae.config.latent_channels == 16 and pipe.text_encoder_2.config.num_layers == 1
    assert pipe.tokenizer_2("a photo of a cat").input_ids == [
        3,
        9,
        1202,
        13,
        3,
        9,
        1712,
        1,
    ]  # the real T5 pieces
    del pipe
    gc.collect()
    data = tmp_path / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    for index in range(2):
        Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(data / f"{index}.png")
        (data / f"{index}.txt").write_text("a photo of sks dog")
    adapter = train(
        TrainConfig(
            data_dir=str(data),
            model=str(paths["model"]),
            **files,
            output_dir=str(tmp_path / "out"),
            name="real",
            max_steps=2,
            batch_size=1,
            resolution=128,
            mixed_precision="no",  # bf16 convolutions have no fast kernel on this CPU: the VAE would take hours
            sample_every=0,
            grad_log_every=0,
            rank=4,
            learning_rate=1e-2,
            num_threads=2,
        ),
        progress=False,
    )
    deltas = read_file_deltas(adapter)
    assert len(deltas) == 8 + 3 and all(key.startswith("transformer.") for key in deltas)
    gc.collect()
    images = generate(
        GenerateConfig(
            prompt="a photo of sks dog",
            model=str(paths["model"]),
            **files,
            adapters=("real:0.8",),
            adapter_dir=(str(tmp_path / "out"),),
            steps=2,
            width=128,
            height=128,
            out=str(tmp_path / "generated"),
        )
    )
    assert images and Image.open(images[0]).size == (128, 128)
