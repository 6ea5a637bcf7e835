"""The tiny Flux-architecture model (difflora/embedded/flux): loads offline as a plain FluxPipeline, is what
its README and build report say (config, parameter counts, dtype), and draws the colour it is told.
The slow test re-measures the whole accuracy grid against the report's numbers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from difflora.embedded import EMBEDDED_MODEL_DIR, shapes, signatures

EMBEDDED_FLUX_DIR = EMBEDDED_MODEL_DIR.parent / "flux"

REPORT = json.loads((EMBEDDED_FLUX_DIR / "report.json").read_text())
README = (EMBEDDED_FLUX_DIR / "README.md").read_text()
CALL = {
    "height": 64,
    "width": 64,
    "max_sequence_length": 32,
    "guidance_scale": 3.5,
    "true_cfg_scale": REPORT["accuracy"]["true_cfg_scale"],
    "negative_prompt": "",
    "output_type": "np",
}


@pytest.fixture(scope="module")
def pipe():
    from diffusers import FluxPipeline

    # One thread: on a shared 2-core machine two spinning OpenMP threads run several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    p = FluxPipeline.from_pretrained(EMBEDDED_FLUX_DIR)
    p.set_progress_bar_config(disable=True)
    yield p
    torch.set_num_threads(threads)


def _generate(pipe, prompt: str, seeds: list[int], steps: int) -> np.ndarray:
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    out = pipe(prompt, num_images_per_prompt=len(seeds), generator=gens, num_inference_steps=steps, **CALL)
    return (np.clip(out.images, 0, 1) * 255).round().astype(np.uint8)


def _stored_params(component: str) -> int:
    """Parameter count read from the safetensors headers, independently of any model class."""
    (path,) = (EMBEDDED_FLUX_DIR / component).glob("*.safetensors")
    with safe_open(path, "pt") as f:
        names = list(f.keys())  # safe_open is not iterable
        return sum(int(np.prod(f.get_slice(k).get_shape())) for k in names)


@pytest.mark.slow  # a fresh interpreter importing torch and diffusers: ~10 s
def test_loads_offline_as_plain_flux_pipeline():
    code = (
        "import json, sys; from diffusers import FluxPipeline as P; p = P.from_pretrained(sys.argv[1]); "
        "t = p.transformer.config; print(json.dumps({"
        "'cls': type(p.transformer).__name__, 'blocks': [t.num_layers, t.num_single_layers], "
        "'width': t.num_attention_heads * t.attention_head_dim, 'in': t.in_channels, 'guid': t.guidance_embeds, "
        "'lat': p.vae.config.latent_channels, 'vsf': p.vae_scale_factor, 'clip_len': p.tokenizer_max_length, "
        "'clip_pos': p.text_encoder.config.max_position_embeddings, 't5_len': p.tokenizer_2.model_max_length, "
        "'t5_dim': p.text_encoder_2.config.d_model, 'joint': t.joint_attention_dim, "
        "'pooled': [t.pooled_projection_dim, p.text_encoder.config.hidden_size], "
        "'sched': type(p.scheduler).__name__, 'dtypes': sorted({str(m.dtype) for m in "
        "(p.transformer, p.vae, p.text_encoder, p.text_encoder_2)})}))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": "/nonexistent"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(EMBEDDED_FLUX_DIR)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["cls"] == "FluxTransformer2DModel" and info["guid"] is True
    assert info["blocks"] == [2, 2] and info["width"] == 64
    assert info["in"] == 4 * info["lat"] == 16  # 2x2 latent patches packed into channels
    assert info["vsf"] == 4  # 64x64 images <-> 16x16x4 latents <-> 8x8 image tokens
    assert info["clip_len"] == info["clip_pos"] == 32 and info["t5_len"] == 32
    assert info["joint"] == info["t5_dim"] and info["pooled"][0] == info["pooled"][1]
    assert info["sched"] == "FlowMatchEulerDiscreteScheduler"
    assert info["dtypes"] == ["torch.float32"]  # fp16 on disk, fp32 on load
    total = sum(f.stat().st_size for f in EMBEDDED_FLUX_DIR.rglob("*") if f.is_file())
    assert total <= 30 * 2**20


def test_parameter_counts_match_the_report_and_readme(pipe):
    for component, module in (
        ("transformer", pipe.transformer),
        ("text_encoder_2", pipe.text_encoder_2),
        ("text_encoder", pipe.text_encoder),
        ("vae", pipe.vae),
    ):
        loaded = sum(p.numel() for p in module.parameters())
        assert loaded == _stored_params(component) == REPORT["params"][component], component
    assert f"{REPORT['params']['transformer']:,}" in README


def test_reused_parts_are_the_embedded_sd_models_weights():
    for sub in ("vae", "text_encoder"):
        (ours,) = (EMBEDDED_FLUX_DIR / sub).glob("*.safetensors")
        (theirs,) = (EMBEDDED_MODEL_DIR / sub).glob("*.safetensors")
        with safe_open(ours, "pt") as a, safe_open(theirs, "pt") as b:
            names = sorted(a.keys())
            assert names == sorted(b.keys())
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in names), sub


def test_t5_tokenizer_keeps_caption_words_whole(pipe):
    tok = pipe.tokenizer_2
    words = ["a", "red", "circle", "on", "a", "white", "background"]
    assert tok.tokenize(" ".join(words)) == ["▁" + w for w in words]
    ids = tok(" ".join(words)).input_ids
    assert len(ids) == len(words) + 1 and ids[-1] == tok.eos_token_id == 1 and tok.pad_token_id == 0


def test_render_has_the_prompted_colour(pipe):
    colour, shape, bg = REPORT["smoke_prompt"]
    image = _generate(pipe, f"a {colour} {shape} on a {bg} background", [0], steps=20)[0]
    assert image.shape == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3)
    assert signatures.dominant_colour(image) == colour


@pytest.mark.slow
def test_accuracy_grid_matches_the_report(pipe):
    """Every colour x shape x background prompt at the report's seeds gives the README's numbers."""
    acc = REPORT["accuracy"]
    hits_c = hits_s = n = 0
    for colour in shapes.COLOURS:
        for shape in shapes.SHAPES:
            for bg in shapes.BACKGROUNDS:
                images = _generate(
                    pipe, f"a {colour} {shape} on a {bg} background", acc["seeds"], acc["steps"]
                )
                hits_c += sum(signatures.dominant_colour(im) == colour for im in images)
                hits_s += sum(signatures.classify_shape(im) == shape for im in images)
                n += len(images)
    # Same seeds, same CPU arithmetic: the same images; 2 images of slack for another CPU's float rounding.
    assert n == acc["images"]
    assert abs(hits_c - round(acc["colour_accuracy"] * n)) <= 2, (hits_c, n)
    assert abs(hits_s - round(acc["shape_accuracy"] * n)) <= 2, (hits_s, n)
    stated = re.search(r"colour ([\d.]+)%.*?shape ([\d.]+)%", README, re.S)
    assert stated and (float(stated[1]), float(stated[2])) == (
        round(100 * acc["colour_accuracy"], 1),
        round(100 * acc["shape_accuracy"], 1),
    )
