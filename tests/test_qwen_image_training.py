"""Qwen-Image trained and rendered through difflora's own trainer and generation paths (no Qwen branch in them:
what differs is the family's), on the reduced Qwen-Image of tests/support/qwen_image.py (real configurations
at reduced width and depth; a CPU cannot hold the 7 B text encoder or the 20 B transformer): 2 steps with text
embeddings cached adapt exactly the attention preset, the cached latents are the autoencoder's frame latents
normalised as the pipeline un-normalises them, a render is QwenImagePipeline's image bit for bit, and the
trained LoRA composes as W0 + w·ΔW and returns to the base bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difflora.adapter.names import adaptable_modules
from difflora.composition.composer import Composer
from difflora.config.generate import GenerateConfig
from difflora.config.spec import parse_adapter_weights
from difflora.config.train import TrainConfig
from difflora.generation.generate import generate
from difflora.generation.pipeline import render
from difflora.models.families import family
from difflora.models.loading import load_pipeline
from difflora.training.trainer import train
from tests.support.adapters import read_file_deltas
from tests.support.paths import copy_samples
from tests.support.qwen_image import tiny_qwen_pipeline, write_qwen_files

pytestmark = pytest.mark.slow  # end-to-end: a training run and pipeline renders

PROMPT = "a red stripe"
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
TOKENS = 32  # the saved model's text length (difflora_defaults.json), as a small model would be trained


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A saved reduced Qwen-Image declaring 64-px images and 32 text tokens, and 2 images of a concept."""
    root = tmp_path_factory.mktemp("qwen-train")
    tiny_qwen_pipeline(seed=5).save_pretrained(root / "model")
    defaults = {"resolution": 64, "max_sequence_length": TOKENS}
    (root / "model" / "difflora_defaults.json").write_text(json.dumps(defaults))
    copy_samples("style", root / "style", range(2))
    return root


@pytest.fixture(scope="module")
def adapter(workspace) -> Path:
    config = TrainConfig(
        data_dir=str(workspace / "style"),
        model=str(workspace / "model"),
        output_dir=str(workspace / "out"),
        max_steps=2,
        batch_size=1,
        resolution=32,
        sample_every=0,
        grad_log_every=0,
        rank=4,
        learning_rate=5e-2,
        seed=3,
        num_threads=2,
    )
    return train(config, progress=False)


def test_two_steps_adapt_the_attention_preset_with_cached_text(adapter):
    deltas = read_file_deltas(adapter)
    expected = {f"transformer.transformer_blocks.{b}.attn.{n}" for b in (0, 1) for n in ATTENTION}
    assert set(deltas) == expected
    # the last block's text stream feeds nothing (the output reads the image tokens): its text queries and
    # text output projection get no gradient
    idle = {f"transformer.transformer_blocks.1.attn.{n}" for n in ("add_q_proj", "to_add_out")}
    assert all(float(deltas.pop(name).abs().max()) == 0 for name in idle)
    assert all(float(delta.abs().max()) > 0 for delta in deltas.values())
    plan = (adapter.parent / "style.run" / "plan.txt").read_text()
    assert "Qwen-Image" in plan and "flow_matching" in plan
    assert "flux-shift" in plan and "text embeddings cached" in plan


def test_frame_latents_are_normalised_as_the_pipeline_decodes(workspace):
    """Encoding a frame and undoing the pipeline's decode-side map (x / (1/std) + mean) returns the raw
    latents of the autoencoder: the training latents are what the transformer denoises at generation."""
    pipe = load_pipeline(workspace / "model")
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        normalised = family("qwen-image").latent_encoder(pipe.vae).encode(pixels).latent_dist
        raw = pipe.vae.encode(pixels[:, :, None]).latent_dist
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, 16, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, 16, 1, 1)
    torch.testing.assert_close(normalised.mean * std + mean, raw.mean[:, :, 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(normalised.std * std, raw.std[:, :, 0], rtol=1e-5, atol=1e-6)


def test_a_render_is_the_qwen_pipelines_image(workspace):
    from diffusers import QwenImagePipeline

    pipe = load_pipeline(workspace / "model")
    (image,) = render(pipe, [PROMPT], seeds=[3], steps=2, guidance=4.0, negative_prompt="blue")
    reference = QwenImagePipeline.from_pretrained(workspace / "model")
    reference.set_progress_bar_config(disable=True)
    expected = reference(
        PROMPT,
        negative_prompt="blue",
        num_inference_steps=2,
        true_cfg_scale=4.0,
        height=64,
        width=64,
        max_sequence_length=TOKENS,
        generator=torch.Generator("cpu").manual_seed(3),
    ).images[0]
    assert image.size == (64, 64)  # the model folder's declared resolution
    assert np.array_equal(np.asarray(image), np.asarray(expected))


def test_the_trained_adapter_composes_exactly_and_returns_to_base(workspace, adapter):
    pipe = load_pipeline(workspace / "model")
    transformer = pipe.transformer
    base = {name: m.weight.detach().clone() for name, m in adaptable_modules(transformer).items()}
    image = np.asarray(render(pipe, [PROMPT], seeds=[1], steps=2)[0])
    composer = Composer(pipe, "fused", adapter_dirs=[adapter.parent])
    composer.set(parse_adapter_weights("style:0.7"))
    expected = {
        key.removeprefix("transformer."): base[key.removeprefix("transformer.")].double() + 0.7 * delta
        for key, delta in read_file_deltas(adapter).items()
    }
    for name, module in adaptable_modules(transformer).items():
        if name in expected:
            assert torch.allclose(module.weight.double(), expected[name], rtol=1e-6, atol=1e-7), name
        else:
            assert torch.equal(module.weight, base[name]), name
    adapted = np.asarray(render(pipe, [PROMPT], seeds=[1], steps=2)[0])
    assert not np.array_equal(adapted, image)
    composer.set(parse_adapter_weights(""))
    for name, module in adaptable_modules(transformer).items():
        assert torch.equal(module.weight, base[name]), name
    assert np.array_equal(np.asarray(render(pipe, [PROMPT], seeds=[1], steps=2)[0]), image)


def test_without_a_negative_prompt_true_cfg_runs_on_qwens_blank_one(workspace):
    """The default true CFG (4.0) runs, as Qwen-Image's own examples run it, on the negative prompt " "."""
    from diffusers import QwenImagePipeline

    pipe = load_pipeline(workspace / "model")
    (image,) = render(pipe, [PROMPT], seeds=[2], steps=2)
    reference = QwenImagePipeline.from_pretrained(workspace / "model")
    reference.set_progress_bar_config(disable=True)
    expected = reference(
        PROMPT,
        negative_prompt=" ",
        num_inference_steps=2,
        true_cfg_scale=4.0,
        height=64,
        width=64,
        max_sequence_length=TOKENS,
        generator=torch.Generator("cpu").manual_seed(2),
    ).images[0]
    assert np.array_equal(np.asarray(image), np.asarray(expected))


def test_comfyui_single_files_train_and_generate(workspace, tmp_path):
    """ComfyUI's transformer file with its Qwen2.5-VL and VAE files (`--text-encoder`, `--vae`) through the
    same config fields the CLI fills: 1 step, then a render with the adapter at weight 1 that differs from
    the base's."""
    paths = write_qwen_files(load_pipeline(workspace / "model"), tmp_path / "files")
    files = {"text_encoder": str(paths["text_encoder"]), "vae": str(paths["vae"])}
    config = TrainConfig(
        data_dir=str(workspace / "style"),
        model=str(paths["transformer"]),
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        batch_size=1,
        resolution=32,
        sample_every=0,
        grad_log_every=0,
        rank=4,
        learning_rate=5e-2,
        seed=3,
        num_threads=2,
        **files,
    )
    trained = train(config, progress=False)
    expected = {f"transformer.transformer_blocks.{b}.attn.{n}" for b in (0, 1) for n in ATTENTION}
    assert set(read_file_deltas(trained)) == expected
    # 2 steps: with one, the scheduler's stretch to shift_terminal divides 0 by 0 (diffusers' own NaN)
    common = {"prompt": PROMPT, "model": str(paths["transformer"]), "steps": 2, "width": 32, "height": 32}
    common |= {"seed": 1, **files}
    (base,) = generate(GenerateConfig(**common, out=str(tmp_path / "base")))
    (adapted,) = generate(
        GenerateConfig(
            **common, adapters=("style",), adapter_dir=(str(trained.parent),), out=str(tmp_path / "lora")
        )
    )
    assert not np.array_equal(np.asarray(Image.open(base)), np.asarray(Image.open(adapted)))


def test_training_the_text_encoder_is_refused_in_one_line(workspace, tmp_path):
    from difflora.errors import ConfigError

    config = TrainConfig(
        data_dir=str(workspace / "style"),
        model=str(workspace / "model"),
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        resolution=32,
        train_text_encoder=True,
    )
    with pytest.raises(ConfigError, match="^--train-text-encoder: Qwen-Image models have no text encoder"):
        train(config, progress=False)
