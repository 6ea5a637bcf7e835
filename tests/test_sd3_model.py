"""SD3 / SD3.5 on the family seam, on a reduced random SD3 (tests/support/sd3.py: 2 joint blocks of the real
64-wide heads, MMDiT-X's attn2 in block 0 for SD3.5 medium, 1-layer CLIP-L, CLIP-G and T5 with the real
vocabularies, a 16-channel autoencoder): the shipped SD3.5 medium and large configs claimed by their own
family, detection from a folder and from Stability's single-file keys, the all-in-one file and the
transformer file with separate CLIP-L / CLIP-G / T5 / autoencoder files loading every weight bit for bit,
the text conditioning equal to the pipeline's `encode_prompt`, and the flow-matching settings against the
reference script's computation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from difflora.errors import ModelError
from difflora.models.architecture import detect_architecture
from difflora.models.dit_files import ComponentFiles
from difflora.models.families import families, family
from difflora.models.geometry import model_geometry, pipeline_geometry
from difflora.models.identity import model_identity
from difflora.models.loading import load_pipeline
from difflora.training.text import pipeline_conditioning, pipeline_text_encoders
from tests.support.sd3 import mmdit_state, tiny_sd3_pipeline, write_sd3_all_in_one, write_sd3_files

VARIANTS = {"sd35-medium": True, "sd3": False}  # family -> MMDiT-X (attn2)
COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")


@pytest.fixture(scope="module")
def medium() -> object:
    return tiny_sd3_pipeline(medium=True, seed=1)


@pytest.fixture(scope="module")
def medium_dir(medium, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sd3") / "tiny-sd35-medium"
    medium.save_pretrained(folder)
    return folder


def _shipped(name: str, component: str, file: str = "config.json") -> dict:
    return json.loads((family(name).config_dir() / component / file).read_text())


def _assert_same_weights(want_pipe, got_pipe, *, cast=lambda t: t) -> None:
    for component in COMPONENTS:
        want, got = getattr(want_pipe, component).state_dict(), getattr(got_pipe, component).state_dict()
        assert set(want) == set(got), component
        for key, value in want.items():
            assert torch.equal(cast(value) if component == "transformer" else value, got[key]), key


# ------------------------------------------------------------------------------------------ shipped configs


@pytest.mark.parametrize("name", VARIANTS)
def test_each_shipped_config_is_claimed_by_its_own_family_only(name):
    transformer = _shipped(name, "transformer")
    claimed = [f.name for f in families() if f.matches_model(transformer, embedded=False)]
    assert claimed[0] == name and not set(claimed) & (set(VARIANTS) - {name})  # `custom` claims any model
    index = _shipped(name, ".", "model_index.json")
    assert index["_class_name"] == family(name).pipeline_class_name
    assert [c for c in family(name).components if c in index] == list(family(name).components)
    # published values: 64-wide heads, T5-XXL's 4096 context, both CLIPs' 768 + 1280 pooled widths
    assert (
        transformer["num_attention_heads"] * transformer["attention_head_dim"]
        == (transformer["caption_projection_dim"])
    )
    assert (transformer["joint_attention_dim"], transformer["pooled_projection_dim"]) == (4096, 2048)
    widths = [_shipped(name, c)["projection_dim"] for c in ("text_encoder", "text_encoder_2")]
    assert sum(widths) == transformer["pooled_projection_dim"]
    assert _shipped(name, "scheduler", "scheduler_config.json")["shift"] == 3.0
    assert _shipped(name, "vae")["latent_channels"] == transformer["in_channels"] == 16


def test_the_shipped_configs_build_the_published_module_trees():
    from difflora.formats.reference import reference_model

    medium, large = reference_model("sd35-medium", "transformer"), reference_model("sd3", "transformer")
    assert (len(medium.transformer_blocks), len(large.transformer_blocks)) == (24, 38)
    with_attn2 = [i for i, block in enumerate(medium.transformer_blocks) if block.attn2 is not None]
    assert with_attn2 == list(range(13))  # MMDiT-X: the first 13 blocks
    assert all(block.attn2 is None for block in large.transformer_blocks)
    assert large.transformer_blocks[-1].attn.to_add_out is None  # the last block's text stream ends there


# ------------------------------------------------------------------------------------------ detection


def _fake_mmdit(path: Path, *, attn2: bool, prefix: str) -> Path:
    keys = ["x_embedder.proj.weight", "pos_embed", "context_embedder.weight", "t_embedder.mlp.0.weight"]
    keys += ["y_embedder.mlp.0.weight", "final_layer.linear.weight", "joint_blocks.0.x_block.attn.qkv.weight"]
    keys += ["joint_blocks.0.x_block.attn2.qkv.weight"] if attn2 else []
    save_file({prefix + key: torch.zeros(1) for key in keys}, str(path))
    return path


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."], ids=["bare", "comfyui-prefix"])
def test_medium_and_large_are_told_apart_by_the_second_attention(tmp_path, prefix):
    for name, attn2 in VARIANTS.items():
        found = detect_architecture(_fake_mmdit(tmp_path / f"{name}.safetensors", attn2=attn2, prefix=prefix))
        assert (found.name, found.prediction_type, found.resolution) == (name, "flow_matching", 1024)
    incomplete = tmp_path / "partial.safetensors"
    save_file({prefix + "joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(1)}, str(incomplete))
    with pytest.raises(
        ModelError, match="Stable Diffusion 3.*transformer file.*lacks x_embedder.proj.weight"
    ):
        detect_architecture(incomplete)


def test_a_diffusers_folder_is_detected_from_its_transformer(medium_dir):
    assert detect_architecture(medium_dir).name == "sd35-medium"
    pipe = load_pipeline(medium_dir)
    identity = model_identity(pipe)
    assert (identity.family, identity.prediction_type) == ("sd35-medium", "flow_matching")
    assert family("sd35-medium").default_pixels(pipe) == 16 * 2  # sample size 16, 2x autoencoder
    assert pipeline_geometry(pipe).step == 2 * 2  # buckets keep the 2x2 patches whole


# ------------------------------------------------------------------------------------------ single files


def test_an_all_in_one_file_loads_every_weight_and_the_config_from_its_keys(medium, tmp_path):
    path = write_sd3_all_in_one(medium, tmp_path / "sd3.5_medium.safetensors")
    loaded = load_pipeline(path)
    assert model_identity(loaded).family == "sd35-medium"
    _assert_same_weights(medium, loaded)
    want, got = dict(medium.transformer.config), dict(loaded.transformer.config)
    for key in ("num_layers", "num_attention_heads", "attention_head_dim", "caption_projection_dim"):
        assert got[key] == want[key], key
    for key in ("joint_attention_dim", "pooled_projection_dim", "pos_embed_max_size", "qk_norm"):
        assert got[key] == want[key], key
    assert list(got["dual_attention_layers"]) == [0] and loaded.vae.config.latent_channels == 16


def test_a_transformer_file_with_separate_component_files_loads_upcast(tmp_path):
    pipe = tiny_sd3_pipeline(medium=False, seed=2)
    paths = write_sd3_files(pipe, tmp_path, dtype=torch.bfloat16)
    parts = {name: str(paths[name]) for name in ("clip_l", "clip_g", "t5", "vae")}
    loaded = load_pipeline(paths["model"], files=ComponentFiles(**parts))
    assert model_identity(loaded).family == "sd3"
    assert list(loaded.transformer.config.dual_attention_layers) == []
    _assert_same_weights(pipe, loaded, cast=lambda t: t.to(torch.bfloat16).float())
    geometry = model_geometry(str(paths["model"]))  # what `difflora check` plans with, from configs alone
    assert (geometry.resolution, geometry.step) == (1024, 16)
    parts.pop("clip_g")
    with pytest.raises(ModelError, match="--clip-g FILE"):
        load_pipeline(paths["model"], files=ComponentFiles(**parts))


# ------------------------------------------------------------------------------------------ conditioning


def test_the_text_conditioning_is_the_pipelines_encode_prompt(medium_dir):
    pipe = load_pipeline(medium_dir)
    captions = ["a red stripe on a white wall", ""]
    tokenizers, encoders = pipeline_text_encoders(pipe)
    assert list(encoders) == ["text_encoder", "text_encoder_2", "text_encoder_3"]
    conditioning = pipeline_conditioning(pipe)
    assert conditioning.cache_tag == "t5=32"  # the tokenizer's 32 tokens, below the pipeline's 256
    with torch.no_grad():
        text = conditioning.encode(tokenizers, list(encoders.values()), captions)
        hidden, _, pooled, _ = pipe.encode_prompt(
            captions, None, None, do_classifier_free_guidance=False, max_sequence_length=32
        )
    assert text["hidden"].shape == (2, 77 + 32, 64) and text["pooled"].shape == (2, 64)
    assert torch.equal(text["hidden"], hidden) and torch.equal(text["pooled"], pooled)


def test_the_transformer_takes_sigma_times_the_schedulers_timesteps(medium):
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    text = {"hidden": torch.randn(1, 20, 64), "pooled": torch.randn(1, 64)}
    conditioning = family("sd35-medium").conditioning(dict(medium.transformer.config))
    sigma = torch.tensor([0.25])
    with torch.no_grad():
        got = conditioning.predict(
            medium.transformer,
            latents,
            sigma,
            text,
            {},
            device=torch.device("cpu"),
            dtype=torch.float32,
            guidance=1.0,
        )
        want = medium.transformer(
            hidden_states=latents,
            timestep=torch.tensor([250.0]),
            encoder_hidden_states=text["hidden"],
            pooled_projections=text["pooled"],
        ).sample
    assert torch.equal(got, want)


# ------------------------------------------------------------------------------------------ flow matching


def test_default_sigmas_are_the_reference_scripts_logit_normal_through_the_shifted_scheduler():
    """diffusers' train_dreambooth_lora_sd3.py draws u = sigmoid(n), n ~ N(0, 1), and takes the shifted
    scheduler's sigma at index ⌊1000·u⌋ (a table descending from 1): σ = S(1 - ⌊1000u⌋/1000), S(s) = 3s/(1+2s).
    difflora draws S(sigmoid(n)) unrounded; since sigmoid(-n) = 1 - u, the two agree draw for draw (with n
    negated) to within the table's step."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = _shipped("sd35-medium", "scheduler", "scheduler_config.json")
    schedule = family("sd35-medium").flow_schedule(config, None)
    assert (schedule.sampling.kind, schedule.sampling.mean, schedule.sampling.scale) == ("shift", 0.0, 1.0)
    assert schedule.sampling.shift == 3.0
    ours = schedule.sigmas(4096, 64, torch.Generator().manual_seed(7)).double()
    n = torch.normal(0.0, 1.0, size=(4096,), generator=torch.Generator().manual_seed(7))
    assert torch.allclose(
        ours, 3 * torch.sigmoid(n.double()) / (1 + 2 * torch.sigmoid(n.double())), atol=1e-6
    )
    table = FlowMatchEulerDiscreteScheduler.from_config(config).sigmas.double()
    reference = table[(torch.sigmoid(-n) * 1000).long()]
    assert float((reference - ours).abs().max()) <= 3 / 1000 + 1e-6


@pytest.mark.parametrize("name", VARIANTS)
def test_a_full_size_files_shapes_give_back_the_published_config(name):
    """The real SD3.5 medium / large at full width and depth, on the meta device: the shapes of its tensors
    in Stability's layout (tests/support/sd3.py's map) detect its family and read back as its config."""
    from difflora.formats.reference import reference_model
    from difflora.models.architecture import classify_transformer_file
    from difflora.models.families.mmdit import transformer_config

    state = mmdit_state(reference_model(name, "transformer"))
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    assert classify_transformer_file(shapes, source="full.safetensors") == name
    shipped = _shipped(name, "transformer")
    assert transformer_config(shapes, {"_class_name": shipped["_class_name"], "sample_size": 128}) == {
        key: value for key, value in shipped.items() if not key.startswith("_")
    }
