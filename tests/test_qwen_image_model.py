"""Qwen-Image as a family: detection from a diffusers config and from ComfyUI's single-file keys (with and
without `model.diffusion_model.`), the shipped configurations' module trees at full size (meta device), the
text conditioning and the transformer call against QwenImagePipeline's own code on the reduced model of
tests/support/qwen_image.py (real configurations at reduced width and depth: a CPU test cannot hold the 7 B
text encoder or the 20 B transformer), the flow-matching shift against the pipeline's, and loading from
ComfyUI's three single files and from a diffusers folder with every tensor compared."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from difflora.errors import ModelError
from difflora.formats.reference import reference_model
from difflora.models.architecture import classify_transformer_file, detect_architecture, pipeline_architecture
from difflora.models.dit_files import ComponentFiles
from difflora.models.families import family
from difflora.models.families.flow import TimestepSampling
from difflora.models.loading import load_pipeline
from tests.support.qwen_image import tiny_qwen_pipeline, write_qwen_files

QWEN = family("qwen-image")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pipe():
    return tiny_qwen_pipeline(seed=3)


def test_detected_from_comfyui_keys_with_and_without_prefix() -> None:
    keys = ["txt_norm.weight", "img_in.weight", "txt_in.weight", "proj_out.weight", "norm_out.linear.weight"]
    shapes = {key: (1,) for key in keys} | {"transformer_blocks.0.attn.to_q.weight": (1,)}
    assert classify_transformer_file(shapes, source="f") == "qwen-image"
    prefixed = {"model.diffusion_model." + key: shape for key, shape in shapes.items()}
    assert classify_transformer_file(prefixed, source="f") == "qwen-image"
    with pytest.raises(ModelError, match="lacks img_in.weight"):
        classify_transformer_file({k: v for k, v in shapes.items() if k != "img_in.weight"}, source="f")
    flux = {"double_blocks.0.img_attn.qkv.weight": (1,), "img_in.weight": (1,)}
    assert not QWEN.matches_transformer_file(flux)  # Flux's BFL file shares img_in, not txt_norm


def test_detected_from_configs_and_no_other_family_claims_it(pipe) -> None:
    config = dict(pipe.transformer.config)
    claimed = [
        f.name for f in (family(n) for n in ("flux", "flux-schnell", "sd3", "sd35-medium", "qwen-image"))
    ]
    matched = [
        name for name in claimed if family(name).matches_denoisers({"transformer": config}, embedded=False)
    ]
    assert matched == ["qwen-image"]
    assert pipeline_architecture(pipe).name == "qwen-image"
    flux_config = json.loads((family("flux").config_dir() / "transformer" / "config.json").read_text())
    assert not QWEN.matches_model(flux_config, embedded=False)


def test_shipped_configs_are_the_published_sizes() -> None:
    """60 blocks of 24 heads 128 wide over 64 packed channels, 3584-wide text (20.4 B parameters); the text
    encoder is Qwen2.5-VL 7B: 28 layers 3584 wide, 4 key/value heads, a 32-block vision tower (8.29 B)."""
    transformer = reference_model("qwen-image", "transformer")
    assert len(transformer.transformer_blocks) == 60
    assert transformer.transformer_blocks[0].attn.to_q.weight.shape == (3072, 3072)
    assert transformer.txt_in.weight.shape == (3072, 3584)
    assert round(sum(p.numel() for p in transformer.parameters()) / 1e9, 1) == 20.4
    encoder = reference_model("qwen-image", "text_encoder")
    text = encoder.config.text_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_key_value_heads) == (28, 3584, 4)
    assert len(encoder.model.visual.blocks) == 32
    assert round(sum(p.numel() for p in encoder.parameters()) / 1e9, 2) == 8.29


def test_targets_are_both_streams_attention(pipe) -> None:
    from difflora.adapter.names import adaptable_modules

    names = [n for n in adaptable_modules(pipe.transformer) if n.startswith("transformer_blocks.0.attn.")]
    suffixes = {name[len("transformer_blocks.0.attn.") :] for name in names}
    assert set(QWEN.target_preset("attention")) == suffixes
    mlp = {
        n for n in adaptable_modules(pipe.transformer) if n.startswith("transformer_blocks.0.") and "mlp" in n
    }
    assert {n[len("transformer_blocks.0.") :] for n in mlp} == set(QWEN.mlp_targets)


def test_conditioning_is_the_pipelines_encoding(pipe) -> None:
    """Template, 34 dropped tokens, last hidden state, mask: equal to `encode_prompt` bit for bit, zero
    padding after it to the cached length."""
    captions = ["a red stripe", "a photo of a small blue cat sitting on a mat"]
    conditioning = QWEN.conditioning(dict(pipe.transformer.config), {"max_sequence_length": 40})
    with torch.no_grad():
        cached = conditioning.encode([pipe.tokenizer], [pipe.text_encoder], captions)
        embeds, mask = pipe.encode_prompt(captions, CPU, max_sequence_length=40)
    length = embeds.shape[1]
    assert torch.equal(cached["hidden"][:, :length], embeds)
    assert torch.equal(cached["mask"][:, :length], mask)
    assert cached["hidden"].shape[1] == 40 and not cached["hidden"][:, length:].any()
    assert not cached["mask"][:, length:].any()


def test_prediction_is_the_pipelines_transformer_call(pipe) -> None:
    """The packed call with σ and the padded mask gives the pipeline's call on its unpadded embeddings."""
    captions = ["a red stripe", "a blue square"]
    conditioning = QWEN.conditioning(dict(pipe.transformer.config), {"max_sequence_length": 24})
    generator = torch.Generator().manual_seed(0)
    latents, sigmas = torch.randn(2, 16, 8, 8, generator=generator), torch.tensor([0.3, 0.7])
    with torch.no_grad():
        text = conditioning.encode([pipe.tokenizer], [pipe.text_encoder], captions)
        ours = conditioning.predict(
            pipe.transformer, latents, sigmas, text, {}, device=CPU, dtype=torch.float32, guidance=1.0
        )
        embeds, mask = pipe.encode_prompt(captions, CPU, max_sequence_length=24)
        packed = pipe._pack_latents(latents, 2, 16, 8, 8)
        theirs = pipe.transformer(
            hidden_states=packed,
            timestep=sigmas,
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=mask,
            img_shapes=[[(1, 4, 4)]] * 2,
            return_dict=False,
        )[0]
    expected = pipe._unpack_latents(theirs, 64, 64, 8)[:, :, 0]
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_default_shift_is_the_pipelines_dynamic_shift(pipe) -> None:
    """μ for a 1024-px image (4096 tokens) is the pipeline's `calculate_shift` with its scheduler's line."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    config = dict(pipe.scheduler.config)
    schedule = QWEN.flow_schedule(config, None)
    assert schedule.sampling == TimestepSampling("flux-shift")
    expected = calculate_shift(4096, 256, 8192, 0.5, 0.9)
    assert math.isclose(schedule.mu(4096), expected, rel_tol=1e-12)
    assert (config["base_image_seq_len"], config["max_image_seq_len"], config["max_shift"]) == (
        256,
        8192,
        0.9,
    )


def _assert_same_weights(loaded, original, skip: tuple[str, ...] = ()) -> None:
    ours, theirs = loaded.state_dict(), original.state_dict()
    assert set(ours) == set(theirs)
    different = [key for key in theirs if key not in skip and not torch.equal(ours[key], theirs[key])]
    assert different == []


def test_loads_comfyui_single_files(pipe, tmp_path: Path) -> None:
    """Transformer (prefixed), Qwen2.5-VL (`model.*`/`visual.*`, no head) and Wan-layout VAE files give the
    same tensors; the absent head is the token embedding (what text encoding never reads)."""
    paths = write_qwen_files(pipe, tmp_path)
    assert detect_architecture(paths["transformer"]).name == "qwen-image"
    files = ComponentFiles(text_encoder=str(paths["text_encoder"]), vae=str(paths["vae"]))
    loaded = load_pipeline(paths["transformer"], files=files)
    assert type(loaded).__name__ == "QwenImagePipeline"
    _assert_same_weights(loaded.transformer, pipe.transformer)
    _assert_same_weights(loaded.vae, pipe.vae)
    _assert_same_weights(loaded.text_encoder, pipe.text_encoder, skip=("lm_head.weight",))
    embedding = loaded.text_encoder.model.language_model.embed_tokens.weight
    assert torch.equal(loaded.text_encoder.lm_head.weight, embedding)
    assert loaded.tokenizer("Hello, world! 123").input_ids == [9707, 11, 1879, 0, 220, 16, 17, 18]
    assert dict(loaded.scheduler.config)["use_dynamic_shifting"] is True


def test_single_file_without_text_encoder_says_which_flag(pipe, tmp_path: Path) -> None:
    paths = write_qwen_files(pipe, tmp_path)
    with pytest.raises(ModelError, match="--text-encoder FILE"):
        load_pipeline(paths["transformer"], files=ComponentFiles(vae=str(paths["vae"])))


def test_a_text_encoder_file_without_its_vision_tower_is_refused_in_one_line(pipe, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from tests.support.qwen_image import comfy_text_encoder_state

    paths = write_qwen_files(pipe, tmp_path)
    text_only = {
        k: v for k, v in comfy_text_encoder_state(pipe.text_encoder).items() if k.startswith("model.")
    }
    save_file(text_only, str(tmp_path / "text_only.safetensors"))
    files = ComponentFiles(text_encoder=str(tmp_path / "text_only.safetensors"), vae=str(paths["vae"]))
    with pytest.raises(ModelError, match="^the text encoder file has no vision tower"):
        load_pipeline(paths["transformer"], files=files)


def test_loads_a_diffusers_folder(pipe, tmp_path: Path) -> None:
    pipe.save_pretrained(tmp_path / "model")
    loaded = load_pipeline(tmp_path / "model")
    assert detect_architecture(tmp_path / "model").name == "qwen-image"
    _assert_same_weights(loaded.transformer, pipe.transformer)
    _assert_same_weights(loaded.text_encoder, pipe.text_encoder)
