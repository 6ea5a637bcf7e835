"""SD3.5 medium trained and rendered through difflora's own trainer and generation paths (no SD3 branch in
them: what differs is the family's), on the reduced random SD3.5 medium of tests/support/sd3.py: 2 steps with
text embeddings cached adapt exactly the attention preset (MMDiT-X's attn2 included, the last block's
missing text output left out), the plan states the reference script's σ sampling, a render is
StableDiffusion3Pipeline's image bit for bit, and the trained LoRA composes as W0 + w·ΔW and returns to the
base bit for bit. On a shared 2-core CPU: the shared 2-step training ~30 s, each test 12-32 s."""

from __future__ import annotations

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
from difflora.models.loading import load_pipeline
from difflora.training.trainer import train
from tests.support.adapters import read_file_deltas
from tests.support.paths import copy_samples
from tests.support.sd3 import tiny_sd3_pipeline, write_sd3_files

pytestmark = pytest.mark.slow  # end-to-end: a training run and pipeline renders

PROMPT = "a red stripe"
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ATTENTION = ("add_q_proj", "add_k_proj", "add_v_proj")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A saved reduced SD3.5 medium and 2 images of the style concept."""
    root = tmp_path_factory.mktemp("sd3-train")
    tiny_sd3_pipeline(medium=True, seed=5).save_pretrained(root / "model")
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


def _expected_modules() -> set[str]:
    """The attention preset on 2 joint blocks, from the architecture: both streams' q/k/v/out in block 0,
    MMDiT-X's attn2 there too; block 1 (the last) has no text output projection (`context_pre_only`)."""
    block0 = [f"attn.{n}" for n in (*ATTENTION, *TEXT_ATTENTION, "to_add_out")] + [
        f"attn2.{n}" for n in ATTENTION
    ]
    block1 = [f"attn.{n}" for n in (*ATTENTION, *TEXT_ATTENTION)]
    return {f"transformer.transformer_blocks.0.{n}" for n in block0} | {
        f"transformer.transformer_blocks.1.{n}" for n in block1
    }


def test_two_steps_adapt_the_attention_preset_with_cached_text(adapter):
    deltas = read_file_deltas(adapter)
    assert set(deltas) == _expected_modules()
    # the last block's text queries only feed its text outputs, which it drops: no gradient reaches them
    idle = "transformer.transformer_blocks.1.attn.add_q_proj"
    assert float(deltas.pop(idle).abs().max()) == 0
    assert all(float(delta.abs().max()) > 0 for delta in deltas.values())
    plan = (adapter.parent / "style.run" / "plan.txt").read_text()
    assert "Stable Diffusion 3.5 medium" in plan and "flow_matching" in plan
    assert "flow matching, timesteps shift (mean 0, scale 1, shift 3)" in plan  # the reference script's
    assert "text embeddings cached" in plan


def test_a_render_is_the_sd3_pipelines_image(workspace):
    from diffusers import StableDiffusion3Pipeline

    pipe = load_pipeline(workspace / "model")
    (image,) = render(pipe, [PROMPT], seeds=[3], steps=2, guidance=4.0, negative_prompt="blue")
    reference = StableDiffusion3Pipeline.from_pretrained(workspace / "model")
    reference.set_progress_bar_config(disable=True)
    expected = reference(
        PROMPT,
        negative_prompt="blue",
        num_inference_steps=2,
        guidance_scale=4.0,
        height=32,
        width=32,
        max_sequence_length=32,
        generator=torch.Generator("cpu").manual_seed(3),
    ).images[0]
    assert image.size == (32, 32)  # the model's native size: sample size 16, 2x autoencoder
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


def test_a_transformer_file_with_its_component_files_trains_and_generates(workspace, tmp_path):
    """Stability's transformer-only file with ComfyUI's clip_l / clip_g / t5xxl / VAE files (`--clip-l`,
    `--clip-g`, `--t5`, `--vae`) through the same config fields the CLI fills: 1 step, then a render with
    the adapter at weight 1 that differs from the base's."""
    paths = write_sd3_files(load_pipeline(workspace / "model"), tmp_path / "files", dtype=torch.float32)
    files = {name: str(paths[name]) for name in ("clip_l", "clip_g", "t5", "vae")}
    config = TrainConfig(
        data_dir=str(workspace / "style"),
        model=str(paths["model"]),
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
    assert set(read_file_deltas(trained)) == _expected_modules()
    common = {"prompt": PROMPT, "model": str(paths["model"]), "steps": 1, "width": 32, "height": 32}
    common |= {"seed": 1, **files}
    (base,) = generate(GenerateConfig(**common, out=str(tmp_path / "base")))
    (adapted,) = generate(
        GenerateConfig(
            **common, adapters=("style",), adapter_dir=(str(trained.parent),), out=str(tmp_path / "lora")
        )
    )
    assert not np.array_equal(np.asarray(Image.open(base)), np.asarray(Image.open(adapted)))
