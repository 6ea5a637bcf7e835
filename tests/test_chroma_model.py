"""Chroma on the family seam, on a tiny random Chroma (its real configuration at reduced depth and width:
see `tests.support.chroma`): detection from the original single-file keys (with and without ComfyUI's
prefix) and from a diffusers folder, never confused with Flux.1 either way; the transformer file with its
T5 and autoencoder files loading every weight bit for bit; `--clip-l` refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers.loaders.single_file_utils import infer_diffusers_model_type
from safetensors.torch import save_file

from difflora.errors import ModelError
from difflora.models.architecture import detect_architecture
from difflora.models.dit_files import ComponentFiles
from difflora.models.families import family
from difflora.models.geometry import model_geometry, pipeline_geometry
from difflora.models.identity import model_identity
from difflora.models.loading import load_pipeline
from tests.support.chroma import tiny_chroma_pipeline, write_chroma_files
from tests.support.flux import tiny_flux_pipeline, write_flux_files

PREFIXES = pytest.mark.parametrize("prefix", ["", "model.diffusion_model."], ids=["bare", "comfyui-prefix"])
# The top-level keys of each layout (the blocks aside), as the original implementations name them.
CHROMA_KEYS = ["img_in.weight", "txt_in.weight", "final_layer.linear.weight"]
CHROMA_KEYS += ["distilled_guidance_layer.in_proj.weight", "distilled_guidance_layer.in_proj.bias"]
FLUX_KEYS = ["img_in.weight", "txt_in.weight", "time_in.in_layer.weight", "vector_in.in_layer.weight"]
FLUX_KEYS += ["final_layer.linear.weight", "final_layer.adaLN_modulation.1.weight"]
BLOCKS = ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"]


def _fake(path: Path, keys: list[str], prefix: str) -> Path:
    save_file({prefix + key: torch.zeros(1) for key in keys + BLOCKS}, str(path))
    return path


@PREFIXES
def test_chroma_and_flux_files_are_told_apart_by_the_approximator(tmp_path, prefix):
    chroma = _fake(tmp_path / "chroma.safetensors", CHROMA_KEYS, prefix)
    schnell = _fake(tmp_path / "schnell.safetensors", FLUX_KEYS, prefix)
    dev = _fake(tmp_path / "dev.safetensors", [*FLUX_KEYS, "guidance_in.in_layer.weight"], prefix)
    found = {name: detect_architecture(path) for name, path in (("c", chroma), ("s", schnell), ("d", dev))}
    assert (found["c"].name, found["c"].prediction_type, found["c"].resolution) == (
        "chroma",
        "flow_matching",
        1024,
    )
    assert (found["s"].name, found["d"].name) == ("flux-schnell", "flux")
    # diffusers' own single-file detection says the same of the same keys
    assert infer_diffusers_model_type(dict.fromkeys(prefix + k for k in CHROMA_KEYS + BLOCKS)) == "chroma"
    assert infer_diffusers_model_type(dict.fromkeys(prefix + k for k in FLUX_KEYS + BLOCKS)) != "chroma"
    incomplete = _fake(tmp_path / "partial.safetensors", CHROMA_KEYS[3:], prefix)
    with pytest.raises(ModelError, match="Chroma transformer file.*lacks img_in.weight"):
        detect_architecture(incomplete)


def test_diffusers_folders_are_told_apart_by_their_transformer(tmp_path):
    chroma, flux = tmp_path / "chroma", tmp_path / "schnell"
    tiny_chroma_pipeline(max_tokens=32).save_pretrained(chroma)
    tiny_flux_pipeline(guidance=False, max_tokens=32).save_pretrained(flux)
    assert (detect_architecture(chroma).name, detect_architecture(flux).name) == ("chroma", "flux-schnell")
    pipe = load_pipeline(chroma)
    identity = model_identity(pipe)
    assert (identity.family, identity.prediction_type) == ("chroma", "flow_matching")
    assert (
        family("chroma").default_pixels(pipe) == 128 * 2
    )  # ChromaPipeline's 128 latent pixels, 2x autoencoder
    assert pipeline_geometry(pipe).step == 2 * 2
    assert model_identity(load_pipeline(flux)).family == "flux-schnell"


def test_the_shipped_configs_build_chroma_at_full_size_on_the_meta_device():
    """The shipped transformer config is Chroma1-HD's: 19 double and 38 single blocks 3072 wide, no guidance
    or CLIP input, no per-block modulation Linear, the 64 -> 5120 -> 3072 approximator of 5 layers."""
    from accelerate import init_empty_weights
    from diffusers import ChromaTransformer2DModel

    config = json.loads((family("chroma").config_dir() / "transformer" / "config.json").read_text())
    with init_empty_weights():
        model = ChromaTransformer2DModel.from_config(config)
    names = {name for name, _ in model.named_modules()}
    assert (len(model.transformer_blocks), len(model.single_transformer_blocks)) == (19, 38)
    assert not any(n.endswith(("norm1.linear", "norm.linear", "norm_out.linear")) for n in names)
    approximator = model.distilled_guidance_layer
    assert (approximator.in_proj.in_features, approximator.in_proj.out_features) == (64, 5120)
    assert (len(approximator.layers), approximator.out_proj.out_features) == (5, 3072)
    # the modulation vectors it computes: 3 per single block, 6 per stream of a double block, 2 final
    assert model.time_text_embed.mod_proj.shape[0] == 3 * 38 + 2 * 6 * 19 + 2


@PREFIXES
def test_a_transformer_file_with_t5_and_vae_files_loads_every_weight(tmp_path, prefix):
    pipe = tiny_chroma_pipeline(latent_channels=8, seed=3)
    paths = write_chroma_files(pipe, tmp_path, prefix=bool(prefix), dtype=torch.float32)
    files = ComponentFiles(t5=str(paths["t5"]), vae=str(paths["vae"]))
    loaded = load_pipeline(paths["model"], files=files)
    assert type(loaded).__name__ == "ChromaPipeline" and model_identity(loaded).family == "chroma"
    assert loaded.transformer.config.approximator_layers == 5 and loaded.vae.config.latent_channels == 8
    for component in ("transformer", "text_encoder", "vae"):
        want, got = getattr(pipe, component).state_dict(), getattr(loaded, component).state_dict()
        assert set(want) == set(got), component
        for key, value in want.items():
            assert torch.equal(value, got[key]), f"{component}.{key}"
    geometry = model_geometry(str(paths["model"]))  # what `difflora check` plans with, from configs alone
    assert (geometry.resolution, geometry.step, geometry.note) == (1024, 16, None)


def test_clip_l_is_refused_and_a_missing_t5_is_asked_for(tmp_path):
    paths = write_chroma_files(tiny_chroma_pipeline(seed=4), tmp_path)
    clip = write_flux_files(tiny_flux_pipeline(seed=4), tmp_path / "flux")["clip_l"]
    given = ComponentFiles(clip_l=str(clip), t5=str(paths["t5"]), vae=str(paths["vae"]))
    with pytest.raises(ModelError, match=r"^--clip-l: Chroma models have no such component; leave it out\.$"):
        load_pipeline(paths["model"], files=given)
    with pytest.raises(ModelError, match="--t5 FILE"):
        load_pipeline(paths["model"], files=ComponentFiles(vae=str(paths["vae"])))


def test_a_bf16_file_loads_upcast_to_the_dtype_asked_for(tmp_path):
    pipe = tiny_chroma_pipeline(seed=5)
    paths = write_chroma_files(pipe, tmp_path, dtype=torch.bfloat16)
    loaded = load_pipeline(paths["model"], files=ComponentFiles(t5=str(paths["t5"]), vae=str(paths["vae"])))
    want = pipe.transformer.state_dict()
    for key, value in loaded.transformer.state_dict().items():
        assert value.dtype == torch.float32, key
        assert torch.equal(value, want[key].to(torch.bfloat16).float()), key


@pytest.mark.slow
def test_at_full_width_the_file_loads_as_diffusers_own_converter_converts_it():
    """Chroma's real 3072 width (24 heads of 128, the single blocks' 12288-wide MLP: diffusers' converter
    splits `linear1` at a fixed 3072), one block of each kind, a 32-wide approximator of 5 layers, bf16:
    difflora's loader and `convert_chroma_transformer_checkpoint_to_diffusers` place every tensor alike."""
    from diffusers import ChromaTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_chroma_transformer_checkpoint_to_diffusers

    from tests.support.chroma import bfl_chroma_state

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = ChromaTransformer2DModel(
            num_layers=1, num_single_layers=1, joint_attention_dim=32, approximator_hidden_dim=32
        )
    finally:
        torch.set_default_dtype(default)
    state = {"model.diffusion_model." + k: v for k, v in bfl_chroma_state(model).items()}
    theirs = convert_chroma_transformer_checkpoint_to_diffusers(dict(state))
    shipped = json.loads((family("chroma").config_dir() / "transformer" / "config.json").read_text())
    ours = family("chroma").build_transformer(state, shipped, torch.bfloat16)
    assert ours.config.num_attention_heads == 24 and ours.config.approximator_hidden_dim == 32
    mine = ours.state_dict()
    assert set(mine) == set(theirs)
    for key, value in theirs.items():
        assert torch.equal(mine[key], value), key
