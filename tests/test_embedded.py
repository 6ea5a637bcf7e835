"""The embedded default model: loads offline as a plain SD1 pipeline, is deterministic, draws what its
prompt says, and the sample concepts' signatures are in the sample images but not in base generations.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difflora.embedded import EMBEDDED_MODEL_DIR, shapes, signatures

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"


def _generate(pipe, prompt: str, seeds: list[int], steps: int = 20) -> np.ndarray:
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    out = pipe(
        prompt,
        num_images_per_prompt=len(seeds),
        generator=gens,
        num_inference_steps=steps,
        guidance_scale=7.5,
        output_type="np",
    ).images
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    # One thread: on a shared 2-core machine two spinning OpenMP threads run several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    p = StableDiffusionPipeline.from_pretrained(EMBEDDED_MODEL_DIR)
    p.set_progress_bar_config(disable=True)
    yield p
    torch.set_num_threads(threads)


def _sample(folder: str) -> list[tuple[np.ndarray, str]]:
    pngs = sorted((SAMPLE / folder).glob("*.png"))
    return [
        (np.asarray(Image.open(p).convert("RGB")), p.with_suffix(".txt").read_text().strip()) for p in pngs
    ]


@pytest.mark.slow  # a fresh interpreter importing torch and diffusers: ~10 s
def test_loads_offline_as_plain_sd1_pipeline_within_size_budget():
    code = (
        "import json; from diffusers import StableDiffusionPipeline as P; from difflora.embedded import "
        "EMBEDDED_MODEL_DIR as D; p = P.from_pretrained(D); print(json.dumps({"
        "'tok': p.tokenizer.model_max_length, 'pos': p.text_encoder.config.max_position_embeddings, "
        "'lat': p.vae.config.latent_channels, 'size': p.unet.config.sample_size, "
        "'dtypes': sorted({str(m.dtype) for m in (p.unet, p.vae, p.text_encoder)}), "
        "'sched': [p.scheduler.config.beta_schedule, p.scheduler.config.prediction_type, "
        "p.scheduler.config.num_train_timesteps], 'safety': p.safety_checker is None}))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": "/nonexistent"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["tok"] == info["pos"] == 32  # the pipeline pads prompts to the length it was trained on
    assert info["lat"] == 4 and info["size"] == 16  # 64x64 images <-> 16x16x4 latents
    assert info["dtypes"] == ["torch.float32"]  # fp16 on disk, fp32 by default on load
    assert info["sched"] == ["scaled_linear", "epsilon", 1000]
    assert info["safety"]
    total = sum(f.stat().st_size for f in EMBEDDED_MODEL_DIR.rglob("*") if f.is_file())
    assert total <= 40 * 2**20


def test_tokenizer_is_real_clip_bpe(pipe):
    # Ids of OpenAI CLIP's vocabulary: "a</w>" 320, "red</w>" 736, "circle</w>" 7117.
    assert pipe.tokenizer("a red circle").input_ids == [49406, 320, 736, 7117, 49407]
    assert len(pipe.tokenizer) == 49408


def test_generation_is_deterministic_per_seed(pipe):
    a = _generate(pipe, "a green square on a black background", [3], steps=4)
    b = _generate(pipe, "a green square on a black background", [3], steps=4)
    c = _generate(pipe, "a green square on a black background", [4], steps=4)
    assert a.shape == (1, 64, 64, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.slow
def test_small_eval_sample_passes_the_bars(pipe):
    rng = np.random.default_rng(1)
    hits_c = hits_s = n = 0
    for i in rng.permutation(len(shapes.COLOURS) * len(shapes.SHAPES))[:9]:
        colour, shape = shapes.COLOURS[i // 3], shapes.SHAPES[i % 3]
        bg = shapes.BACKGROUNDS[i % 3 - 1]
        images = _generate(pipe, f"a {colour} {shape} on a {bg} background", [0, 1])
        hits_c += sum(signatures.dominant_colour(im) == colour for im in images)
        hits_s += sum(signatures.classify_shape(im) == shape for im in images)
        n += len(images)
    assert hits_c / n >= 0.9 and hits_s / n >= 0.7, (hits_c, hits_s, n)


def test_sample_folders_show_their_signatures():
    style, subject = _sample("style"), _sample("subject")
    assert 16 <= len(style) <= 40 and 16 <= len(subject) <= 40
    assert all(f", {shapes.STYLE_TRIGGER} style" in cap for _, cap in style)
    assert all(shapes.SUBJECT_TRIGGER in cap for _, cap in subject)
    assert all(signatures.stripe_energy(im) >= signatures.STRIPE_THRESHOLD for im, _ in style)
    assert all(signatures.cross_score(im) >= signatures.CROSS_THRESHOLD for im, _ in subject)
    # Each signature is specific to its concept: it does not fire on the other folder.
    assert all(signatures.stripe_energy(im) < signatures.STRIPE_THRESHOLD for im, _ in subject)
    assert all(signatures.cross_score(im) < signatures.CROSS_THRESHOLD for im, _ in style)


@pytest.mark.slow
def test_base_model_does_not_draw_the_sample_concepts(pipe):
    """Prompted with the sample captions, trigger words included, the base draws neither concept."""
    for folder, measure, threshold in (
        ("style", signatures.stripe_energy, signatures.STRIPE_THRESHOLD),
        ("subject", signatures.cross_score, signatures.CROSS_THRESHOLD),
    ):
        for _, caption in _sample(folder)[:3]:
            for im in _generate(pipe, caption, [0]):
                assert measure(im) < threshold, (caption, measure(im))


def test_sample_data_is_what_the_committed_script_draws():
    for folder, make, seed in (("style", shapes.style_batch, 101), ("subject", shapes.subject_batch, 202)):
        committed = _sample(folder)
        images, captions = make(seed, len(committed))
        assert [c for _, c in committed] == captions
        assert all(np.array_equal(im, ref) for (im, _), ref in zip(committed, images, strict=True))


def test_measures_recognise_drawn_scenes():
    images, captions = shapes.base_batch(123, 90)
    for im, cap in zip(images, captions, strict=True):
        _, colour, shape, *_ = cap.split()
        assert signatures.dominant_colour(im) == colour
        assert signatures.classify_shape(im) == shape
        assert signatures.stripe_energy(im) < signatures.STRIPE_THRESHOLD
    crosses, _ = shapes.subject_batch(124, 10)
    assert all(signatures.classify_shape(im) == "cross" for im in crosses)
