"""Chroma trained and rendered through the family-agnostic trainer and generator, on a tiny random Chroma
(`tests.support.chroma`, saved as a diffusers folder with a 32-token T5): the text cache holds T5's states
and the transformer's text mask exactly as `ChromaPipeline` computes them, the training forward is the
pipeline's transformer call, 2 steps adapt the preset asked for, `generate` renders what diffusers'
ChromaPipeline renders bit for bit, and composition is W0 + Σ wᵢ·ΔWᵢ with a bit-exact return to the base."""

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
from difflora.models.loading import load_pipeline
from difflora.training.data import caption_cache
from difflora.training.text import pipeline_conditioning
from difflora.training.trainer import train
from tests.support.adapters import read_file_deltas
from tests.support.chroma import tiny_chroma_pipeline, write_chroma_files
from tests.support.paths import copy_samples

PROMPT = "a red stripe on a white background"
TOKENS = 32
pytestmark = pytest.mark.slow  # end-to-end: training runs and pipeline renders
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


@pytest.fixture(scope="module")
def chroma_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("chroma") / "tiny-chroma"
    tiny_chroma_pipeline(max_tokens=TOKENS).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for concept in ("style", "subject"):
        copy_samples(concept, root / concept, range(2))
    return root


@pytest.fixture(scope="module")
def adapters(chroma_dir, data, tmp_path_factory) -> dict[str, Path]:
    """style: the default (attention) targets, with samples rendered at its last step (from the prompts
    encoded before the text encoder was freed); subject: attention-mlp limited to single block 0."""
    out = tmp_path_factory.mktemp("adapters")
    return {
        "style": _train(chroma_dir, out, data / "style", 3, sample_every=2),
        "subject": _train(
            chroma_dir, out, data / "subject", 4, targets="attention-mlp", blocks=("double=1-18", "single=0")
        ),
    }


def _train(model: Path, out: Path, data: Path, seed: int, sample_every: int = 0, **extra) -> Path:
    config = TrainConfig(
        data_dir=str(data),
        model=str(model),
        output_dir=str(out),
        max_steps=2,
        batch_size=1,
        resolution=32,
        sample_every=sample_every,
        grad_log_every=0,
        rank=4,
        learning_rate=5e-2,
        seed=seed,
        num_threads=2,
        **extra,
    )
    return train(config, progress=False)


def test_the_text_cache_holds_t5_states_and_mask_as_chroma_pipeline_encodes_them(chroma_dir, tmp_path):
    pipe = load_pipeline(chroma_dir)
    cache, keys = caption_cache({PROMPT, ""}, pipe, tmp_path)
    for caption in (PROMPT, ""):
        cached = cache.load(keys[caption])
        hidden, mask = pipe._get_t5_prompt_embeds(caption, max_sequence_length=TOKENS, device="cpu")
        assert set(cached) == {"hidden", "mask"}
        assert torch.equal(cached["mask"], mask[0])
        # the cache encodes its captions as one batch, the pipeline one prompt: float rounding apart
        assert torch.allclose(cached["hidden"], hidden[0], rtol=0, atol=1e-5)
    # the mask keeps every real token and the first pad: "" is one token (</s>), so two ones
    assert cache.load(keys[""])["mask"].sum() == 2


def test_the_training_forward_is_chroma_pipelines_transformer_call(chroma_dir):
    """Given the pipeline's own text inputs (the cache's equal them: above), the training forward is the
    transformer call ChromaPipeline makes: packed latents, σ, zero text ids, the image grid's ids and the
    text mask extended over the image tokens."""
    pipe = load_pipeline(chroma_dir)
    conditioning = pipeline_conditioning(pipe)
    latents = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(2))
    sigmas = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        embeds, text_ids, mask, *_ = pipe.encode_prompt(
            [PROMPT, ""], do_classifier_free_guidance=False, max_sequence_length=TOKENS
        )
        text = {"hidden": embeds, "mask": mask}
        cpu = torch.device("cpu")
        got = conditioning.predict(
            pipe.transformer, latents, sigmas, text, {}, device=cpu, dtype=torch.float32, guidance=1.0
        )
        packed = pipe._pack_latents(latents, 2, 4, 8, 6)
        want = pipe.transformer(
            hidden_states=packed,
            timestep=sigmas,
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=pipe._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32),
            attention_mask=pipe._prepare_attention_mask(2, packed.shape[1], torch.float32, mask),
            return_dict=False,
        )[0]
    assert torch.equal(got, pipe._unpack_latents(want, 8, 6, 1))


def test_training_adapts_the_preset_and_the_blocks_asked_for(adapters):
    style, subject = read_file_deltas(adapters["style"]), read_file_deltas(adapters["subject"])
    double = {f"transformer.transformer_blocks.0.attn.{name}" for name in ATTENTION}
    single = {f"transformer.single_transformer_blocks.0.attn.{name}" for name in ("to_q", "to_k", "to_v")}
    assert set(style) == double | single
    assert set(subject) == single | {"transformer.single_transformer_blocks.0.proj_mlp"}
    assert all(float(delta.abs().max()) > 0 for delta in [*style.values(), *subject.values()])
    plan = (adapters["style"].parent / "style.run" / "plan.txt").read_text()
    assert "(Chroma, chroma-" in plan and "flow matching, timesteps flux-shift" in plan
    assert "text embeddings cached" in plan
    assert (adapters["style"].parent / "style.run" / "samples" / "step-000002.png").is_file()


def test_generate_renders_what_chroma_pipeline_renders(chroma_dir, tmp_path):
    """`difflora generate` with no Chroma flags (at 32 px, for time): real CFG 5 against "", T5 at the
    tokenizer's 32 tokens: bit for bit ChromaPipeline's image with those settings."""
    from diffusers import ChromaPipeline

    config = GenerateConfig(
        prompt=PROMPT, model=str(chroma_dir), seed=3, steps=3, width=32, height=32, out=str(tmp_path)
    )
    (path,) = generate(config)
    reference = ChromaPipeline.from_pretrained(chroma_dir)
    reference.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(3)
    expected = reference(
        PROMPT,
        num_inference_steps=3,
        generator=generator,
        guidance_scale=5.0,
        max_sequence_length=TOKENS,
        width=32,
        height=32,
    ).images[0]
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(expected))


def test_composition_is_w0_plus_the_weighted_updates_and_returns_to_base_bit_for_bit(
    chroma_dir, adapters, tmp_path
):
    pipe = load_pipeline(chroma_dir)
    transformer = pipe.transformer
    base = {name: m.weight.detach().clone() for name, m in adaptable_modules(transformer).items()}
    composer = Composer(pipe, "fused", adapter_dirs=[adapters["style"].parent])
    composer.set(parse_adapter_weights("style:0.7,subject:0.3"))
    expected = {}
    for name, weight in (("style", 0.7), ("subject", 0.3)):
        for key, delta in read_file_deltas(adapters[name]).items():
            live = key.removeprefix("transformer.")
            expected[live] = expected.get(live, base[live].double()) + weight * delta
    assert len(expected) == 8 + 3 + 1
    for name, module in adaptable_modules(transformer).items():
        if name in expected:
            assert torch.allclose(module.weight.double(), expected[name], rtol=1e-6, atol=1e-7), name
            assert not torch.equal(module.weight, base[name]), name
        else:
            assert torch.equal(module.weight, base[name]), name
    composer.set(parse_adapter_weights(""))
    for name, module in adaptable_modules(transformer).items():
        assert torch.equal(module.weight, base[name]), name
    config = GenerateConfig(
        prompt=PROMPT,
        model=str(chroma_dir),
        adapters=("style:0.7", "subject:0.3"),
        adapter_dir=(str(adapters["style"].parent),),
        seed=1,
        steps=2,
        width=32,
        height=32,
        out=str(tmp_path),
    )
    (path,) = generate(config)
    assert Image.open(path).size == (32, 32)


def test_a_single_file_model_trains_with_its_t5_and_vae_files(data, tmp_path):
    """The original-layout transformer file with `--t5` and `--vae` trains as the folder does."""
    paths = write_chroma_files(tiny_chroma_pipeline(seed=6, max_tokens=TOKENS), tmp_path / "files")
    trained = _train(paths["model"], tmp_path, data / "style", 5, t5=str(paths["t5"]), vae=str(paths["vae"]))
    double = {f"transformer.transformer_blocks.0.attn.{name}" for name in ATTENTION}
    single = {f"transformer.single_transformer_blocks.0.attn.{name}" for name in ("to_q", "to_k", "to_v")}
    deltas = read_file_deltas(trained)
    assert set(deltas) == double | single
    assert all(float(delta.abs().max()) > 0 for delta in deltas.values())


def test_train_text_encoder_is_refused_in_one_line(chroma_dir, data, tmp_path):
    """Chroma's only text encoder, T5-XXL, stays frozen and cached: the flag would do nothing."""
    from difflora.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^--train-text-encoder: Chroma models have no text encoder"):
        _train(chroma_dir, tmp_path, data / "style", 1, train_text_encoder=True)
