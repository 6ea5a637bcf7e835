"""Flux generation as the tiny Flux needs it: true CFG and the T5 length, declared by the model folder
(`difflora_defaults.json`) and overridable by flags, rendered exactly as diffusers' own FluxPipeline renders
with the same settings and seed; and training encodes T5 at the length generation uses."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from difflora.config.generate import GenerateConfig
from difflora.embedded import EMBEDDED_MODEL_DIR
from difflora.errors import ConfigError, ModelError
from difflora.generation.generate import generate
from difflora.generation.pipeline import render
from difflora.models.identity import model_identity
from difflora.models.loading import load_pipeline
from difflora.training.text import pipeline_conditioning, pipeline_text_encoders

TINY_FLUX = EMBEDDED_MODEL_DIR.parent / "flux"
PROMPT = "a red circle on a white background"
STEPS = 6


@pytest.fixture(scope="module")
def reference():
    """diffusers' FluxPipeline on the tiny Flux folder, nothing of difflora's in the way."""
    from diffusers import FluxPipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pipe = FluxPipeline.from_pretrained(TINY_FLUX)
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    torch.set_num_threads(threads)


def _reference_image(pipe, seed: int, **settings) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(seed)
    image = pipe(PROMPT, num_inference_steps=STEPS, generator=generator, **settings).images[0]
    return np.asarray(image)


def test_the_folders_defaults_render_what_flux_pipeline_renders_with_them(reference, tmp_path):
    """`difflora generate --model <tiny flux>` with no Flux flags: 64 px, true CFG 5 against "", T5 at 32
    tokens (the folder's difflora_defaults.json), bit for bit FluxPipeline's image with those settings."""
    declared = json.loads((TINY_FLUX / "difflora_defaults.json").read_text())
    assert declared == {"max_sequence_length": 32, "resolution": 64, "true_cfg": 5.0}
    config = GenerateConfig(
        prompt=PROMPT, model=str(TINY_FLUX), seed=3, steps=STEPS, guidance=3.5, out=str(tmp_path)
    )
    (path,) = generate(config)
    expected = _reference_image(
        reference,
        3,
        height=64,
        width=64,
        guidance_scale=3.5,
        true_cfg_scale=5.0,
        negative_prompt="",
        max_sequence_length=32,
    )
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), expected)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert (sidecar["true_cfg"], sidecar["max_sequence_length"]) == (5.0, 32)
    assert "True CFG scale: 5, Max sequence length: 32" in sidecar["parameters"]


def test_flags_override_the_folders_defaults(reference):
    """--true-cfg 1 (off: no negative pass) and --max-sequence-length 16 reach the pipeline as given."""
    pipe = load_pipeline(TINY_FLUX)
    (image,) = render(
        pipe, [PROMPT], seeds=[5], steps=STEPS, guidance=2.0, true_cfg=1.0, max_sequence_length=16
    )
    expected = _reference_image(
        reference, 5, height=64, width=64, guidance_scale=2.0, true_cfg_scale=1.0, max_sequence_length=16
    )
    assert np.array_equal(np.asarray(image), expected)
    # a negative prompt with true CFG: the same as FluxPipeline given it
    (image,) = render(pipe, [PROMPT], seeds=[6], steps=STEPS, negative_prompt="a blue square", guidance=3.5)
    expected = _reference_image(
        reference,
        6,
        height=64,
        width=64,
        guidance_scale=3.5,
        true_cfg_scale=5.0,
        negative_prompt="a blue square",
        max_sequence_length=32,
    )
    assert np.array_equal(np.asarray(image), expected)


def test_training_encodes_t5_at_the_length_generation_uses():
    """The trainer's text conditioning equals FluxPipeline.encode_prompt at the folder's 32 tokens."""
    pipe = load_pipeline(TINY_FLUX)
    tokenizers, encoders = pipeline_text_encoders(pipe)
    captions = [PROMPT, "a blue square on a gray background, zebrastripes style"]
    with torch.no_grad():
        ours = pipeline_conditioning(pipe).encode(tokenizers, list(encoders.values()), captions)
        hidden, pooled, _ = pipe.encode_prompt(captions, captions, max_sequence_length=32)
    assert ours["hidden"].shape[1] == 32
    assert torch.equal(ours["hidden"], hidden) and torch.equal(ours["pooled"], pooled)


def test_an_sd_model_refuses_flux_options_and_a_folder_refuses_unknown_defaults(tmp_path):
    sd = load_pipeline(None)
    with pytest.raises(ConfigError, match=r"^--true-cfg: .* models take no such option"):
        render(sd, [PROMPT], seeds=[0], steps=1, true_cfg=5.0)
    folder = tmp_path / "flux"
    shutil.copytree(TINY_FLUX, folder)
    (folder / "difflora_defaults.json").write_text(json.dumps({"true_cfg": 2.0, "shift": 3}))
    with pytest.raises(ModelError, match=r"'shift' is not a generation option of Flux.1 dev models"):
        render(load_pipeline(folder), [PROMPT], seeds=[0], steps=1)


def test_a_flux_folder_without_defaults_takes_flux_pipelines_and_its_tokenizers(tmp_path):
    """No defaults file: true CFG off, T5 at the tokenizer's saved length (32 here; FluxPipeline's 512 for
    real Flux), and FluxPipeline's 128 latent pixels as the default size."""
    folder = tmp_path / "flux"
    shutil.copytree(TINY_FLUX, folder)
    (folder / "difflora_defaults.json").unlink()
    pipe = load_pipeline(folder)
    family = model_identity(pipe).model_family
    assert family.generation_options(pipe, {}) == {"true_cfg": 1.0, "max_sequence_length": 32}
    assert family.default_pixels(pipe) == 128 * pipe.vae_scale_factor
    assert family.default_pixels(load_pipeline(TINY_FLUX)) == 64
